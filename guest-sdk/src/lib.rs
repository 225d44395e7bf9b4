//! `driftwood-guest`: the SDK for Driftwood actors.
//!
//! An actor is a `wasm32-wasip1` library (`crate-type = ["cdylib"]`) that implements [`Actor`]
//! and calls [`export_actor!`]. The runtime instantiates it once, calls [`Actor::init`] once,
//! then delivers messages one at a time to [`Actor::handle`]; whatever `handle` returns is
//! printed by the runtime (WASI stdout/stderr also pass through). Snapshots are taken between
//! messages, so everything the actor keeps in `self` survives a freeze and thaw.
//!
//! ```ignore
//! #[derive(Default)]
//! struct Counter { n: u64 }
//! impl driftwood_guest::Actor for Counter {
//!     fn init() -> Self { Counter::default() }
//!     fn handle(&mut self, msg: &str) -> String { self.n += 1; format!("{}: {msg}", self.n) }
//! }
//! driftwood_guest::export_actor!(Counter);
//! ```

pub mod abi;

pub use abi::status;

/// A status code from the host that is not success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub i32);

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (status {})", status::name(self.0), self.0)
    }
}

impl std::error::Error for HostError {}

/// Turns a raw status into a `Result`, keeping non-negative values (counts) as `Ok`.
pub fn check(code: i32) -> Result<u32, HostError> {
    if code >= 0 {
        Ok(code as u32)
    } else {
        Err(HostError(code))
    }
}

/// The ABI version of the host this actor runs in ([`abi::ABI_VERSION`] when they agree).
pub fn abi_version() -> i32 {
    // SAFETY: no arguments; the import only returns a number.
    unsafe { abi::raw::abi_version() }
}

/// Writes a line to the host's log (stderr), tagged with the level.
pub fn log(level: i32, message: &str) {
    // SAFETY: `message` is a live UTF-8 slice for the duration of the call.
    unsafe { abi::raw::log(level, message.as_ptr(), message.len()) }
}

/// `C = A · B` in `f32`, row-major, computed by the host's compute backend directly on this
/// actor's memory. `a` is `m×k`, `b` is `k×n`, `c` is `m×n`.
pub fn gemm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<(), HostError> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(HostError(status::INVALID_ARGUMENT));
    }
    let dim = |x: usize| u32::try_from(x).map_err(|_| HostError(status::INVALID_ARGUMENT));
    // SAFETY: the slices cover the ranges the host reads and writes (checked above) and `c` is a
    // unique borrow, so it cannot overlap `a` or `b`.
    let code = unsafe { abi::raw::gemm(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), dim(m)?, dim(n)?, dim(k)?) };
    check(code).map(|_| ())
}

/// The model the runtime serves (`driftwood run --model …`): tokenizer, chat template, the KV
/// cache of this actor's conversation, and sampling.
pub mod model {
    use super::{abi::raw, check, status, HostError};

    /// Calls a snprintf-style import until the buffer is big enough.
    fn fill<T: Copy + Default>(mut call: impl FnMut(*mut T, usize) -> i32) -> Result<Vec<T>, HostError> {
        let mut buf = vec![T::default(); 256];
        loop {
            let need = check(call(buf.as_mut_ptr(), buf.len()))? as usize;
            if need <= buf.len() {
                buf.truncate(need);
                return Ok(buf);
            }
            buf.resize(need, T::default());
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// `key=value` lines describing the model.
    pub fn info() -> Result<String, HostError> {
        // SAFETY: `out` is a live buffer of `cap` bytes.
        fill(|out, cap| unsafe { raw::model_info(out, cap) }).map(text)
    }

    pub fn vocab_size() -> Result<usize, HostError> {
        // SAFETY: no pointers.
        check(unsafe { raw::vocab_size() }).map(|n| n as usize)
    }

    /// Token ids of `text`; with `parse_special`, `<|im_start|>`-style markers become special tokens.
    pub fn tokenize(text: &str, parse_special: bool) -> Result<Vec<u32>, HostError> {
        // SAFETY: `text` and `out` are live for the call, `out` holds `cap` u32s.
        fill(|out, cap| unsafe { raw::tokenize(text.as_ptr(), text.len(), parse_special as i32, out, cap) })
    }

    pub fn detokenize(tokens: &[u32]) -> Result<String, HostError> {
        // SAFETY: as above.
        fill(|out, cap| unsafe { raw::detokenize(tokens.as_ptr(), tokens.len(), out, cap) }).map(text)
    }

    /// Renders the model's chat template over `(role, content)` messages.
    pub fn chat_template(messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String, HostError> {
        let mut packed = Vec::new();
        for (role, content) in messages {
            packed.extend_from_slice(role.as_bytes());
            packed.push(0);
            packed.extend_from_slice(content.as_bytes());
            packed.push(0);
        }
        // SAFETY: as above.
        fill(|out, cap| unsafe { raw::chat_template(packed.as_ptr(), packed.len(), add_generation_prompt as i32, out, cap) }).map(text)
    }

    /// Appends tokens to this actor's KV cache.
    pub fn eval(tokens: &[u32]) -> Result<(), HostError> {
        // SAFETY: `tokens` is live; a null logits pointer asks for no logits.
        check(unsafe { raw::eval(tokens.as_ptr(), tokens.len(), std::ptr::null_mut()) }).map(|_| ())
    }

    /// Appends tokens and has the host write the last token's logits into `logits` (resized to
    /// the vocabulary): the logits land directly in this actor's memory.
    pub fn eval_logits(tokens: &[u32], logits: &mut Vec<f32>) -> Result<(), HostError> {
        logits.resize(vocab_size()?, 0.0);
        // SAFETY: `logits` holds vocab_size f32s, as the host writes.
        check(unsafe { raw::eval(tokens.as_ptr(), tokens.len(), logits.as_mut_ptr()) }).map(|_| ())
    }

    /// A token drawn from the current logits by the host's sampler (not yet evaluated).
    pub fn sample() -> Result<u32, HostError> {
        // SAFETY: no pointers.
        check(unsafe { raw::sample() })
    }

    /// Sampling settings for [`sample`] and [`generate_step`]; temperature 0 is greedy.
    #[derive(Debug, Clone, Copy)]
    pub struct Sampling {
        pub temperature: f32,
        pub top_k: u32,
        pub top_p: f32,
        pub min_p: f32,
        pub repeat_penalty: f32,
        pub seed: u64,
    }

    impl Default for Sampling {
        fn default() -> Self {
            Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, seed: 0 }
        }
    }

    pub fn set_sampler(s: Sampling) -> Result<(), HostError> {
        // SAFETY: no pointers.
        check(unsafe { raw::set_sampler(s.temperature, s.top_k as i32, s.top_p, s.min_p, s.repeat_penalty, s.seed as i64) }).map(|_| ())
    }

    /// One fused step: sample and evaluate. `Ok(None)` at the end of generation.
    pub fn generate_step() -> Result<Option<u32>, HostError> {
        // SAFETY: no pointers.
        match unsafe { raw::generate_step() } {
            status::END_OF_SEQUENCE => Ok(None),
            code => check(code).map(Some),
        }
    }

    pub fn kv_len() -> Result<usize, HostError> {
        // SAFETY: no pointers.
        check(unsafe { raw::kv_len() }).map(|n| n as usize)
    }

    pub fn kv_truncate(n: usize) -> Result<usize, HostError> {
        // SAFETY: no pointers.
        check(unsafe { raw::kv_truncate(n.min(i32::MAX as usize) as i32) }).map(|n| n as usize)
    }

    pub fn is_eog(token: u32) -> bool {
        // SAFETY: no pointers.
        unsafe { raw::is_eog(token as i32) == 1 }
    }

    /// A piece of streamed output: the token and the complete UTF-8 text it adds (possibly
    /// empty while a multi-byte character is split across tokens).
    #[derive(Debug, Clone)]
    pub struct Piece {
        pub token: u32,
        pub text: String,
    }

    /// Streams up to `max_tokens` generated tokens as text pieces; stops at end of generation.
    pub fn generate(max_tokens: usize) -> Generate {
        Generate { left: max_tokens, tokens: Vec::new(), emitted: 0, done: false }
    }

    pub struct Generate {
        left: usize,
        tokens: Vec<u32>,
        emitted: usize,
        done: bool,
    }

    impl Generate {
        /// Every token generated so far.
        pub fn tokens(&self) -> &[u32] {
            &self.tokens
        }
    }

    impl Iterator for Generate {
        type Item = Result<Piece, HostError>;

        fn next(&mut self) -> Option<Self::Item> {
            if self.done || self.left == 0 {
                return None;
            }
            self.left -= 1;
            let token = match generate_step() {
                Ok(Some(t)) => t,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.tokens.push(token);
            let all = match detokenize(&self.tokens) {
                Ok(t) => t,
                Err(e) => return Some(Err(e)),
            };
            // Hold back a trailing replacement character: the rest of it is in the next token.
            let complete = all.strip_suffix('\u{FFFD}').unwrap_or(&all);
            let text =
                if complete.len() > self.emitted && complete.is_char_boundary(self.emitted) { complete[self.emitted..].to_owned() } else { String::new() };
            self.emitted += text.len();
            Some(Ok(Piece { token, text }))
        }
    }
}

/// A Driftwood actor: state that lives in linear memory between messages.
pub trait Actor: Sized + 'static {
    /// Called once, when the actor is first started (not when it is restored from a snapshot).
    fn init() -> Self;
    /// Handles one message; the returned text is printed by the runtime (may be empty).
    fn handle(&mut self, message: &str) -> String;
}

#[doc(hidden)]
pub mod __private {
    use super::Actor;
    use std::cell::RefCell;

    /// The actor instance and the last reply (kept alive until the next call, so the host can
    /// read it). Wasm actors are single-threaded; the thread-local is just a safe static.
    pub struct Slot<A> {
        pub actor: Option<A>,
        pub reply: Vec<u8>,
    }

    thread_local! {
        static SLOT: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
    }

    fn with_slot<A: Actor, R>(f: impl FnOnce(&mut Slot<A>) -> R) -> R {
        SLOT.with(|cell| {
            let mut guard = cell.borrow_mut();
            let any = guard.get_or_insert_with(|| Box::new(Slot::<A> { actor: None, reply: Vec::new() }));
            let slot = any.downcast_mut::<Slot<A>>().expect("one actor type per module");
            f(slot)
        })
    }

    pub fn init<A: Actor>() {
        with_slot::<A, _>(|slot| {
            if slot.actor.is_none() {
                slot.actor = Some(A::init());
            }
        })
    }

    /// # Safety
    /// `ptr` must be a buffer of `len` bytes returned by `alloc(len)` and not used afterwards.
    pub unsafe fn handle<A: Actor>(ptr: *mut u8, len: usize) -> i64 {
        // SAFETY: the host wrote `len` bytes at `ptr`, a buffer it got from `alloc(len)`; we take
        // ownership back here (same layout as `alloc`).
        let bytes = unsafe { Vec::from_raw_parts(ptr, len, len.max(1)) };
        let message = String::from_utf8_lossy(&bytes).into_owned();
        drop(bytes);
        with_slot::<A, _>(|slot| {
            let actor = slot.actor.get_or_insert_with(A::init);
            slot.reply = actor.handle(&message).into_bytes();
            super::abi::pack_reply(slot.reply.as_ptr() as usize as u32, slot.reply.len() as u32)
        })
    }

    pub fn alloc(len: usize) -> *mut u8 {
        let mut buf = Vec::<u8>::with_capacity(len.max(1));
        let ptr = buf.as_mut_ptr();
        std::mem::forget(buf);
        ptr
    }
}

/// Exports `driftwood_init`, `driftwood_handle` and `driftwood_alloc` for an [`Actor`] type.
#[macro_export]
macro_rules! export_actor {
    ($actor:ty) => {
        #[no_mangle]
        pub extern "C" fn driftwood_init() {
            $crate::__private::init::<$actor>()
        }

        #[no_mangle]
        pub extern "C" fn driftwood_handle(ptr: *mut u8, len: usize) -> i64 {
            // SAFETY: the host passes back the buffer it got from `driftwood_alloc(len)`.
            unsafe { $crate::__private::handle::<$actor>(ptr, len) }
        }

        #[no_mangle]
        pub extern "C" fn driftwood_alloc(len: usize) -> *mut u8 {
            $crate::__private::alloc(len)
        }
    };
}
