//! The Driftwood host ABI: every import name, signature and status code, defined once.
//!
//! The host (`driftwood` runtime) and guests (this SDK) both use this module, so a name or a
//! status code can never drift between the two sides. All pointers are offsets into the actor's
//! linear memory (`i32` on the wire, read as `u32`); lengths are byte or element counts as each
//! function says. The host bounds-checks every pointer: a range outside memory, a misaligned
//! `f32` operand, or invalid UTF-8 traps the actor (breaking the ABI is a bug, not a condition).
//! Recoverable conditions come back as negative status codes.

/// The import module every Driftwood host function lives in.
pub const MODULE: &str = "driftwood";

/// Bumped whenever an import changes meaning or signature. Additions keep the version.
pub const ABI_VERSION: i32 = 1;

/// Export names the runtime looks for in an actor.
pub mod exports {
    /// `memory`: the actor's linear memory.
    pub const MEMORY: &str = "memory";
    /// `driftwood_init()`: optional, called once after instantiation (never after a restore).
    pub const INIT: &str = "driftwood_init";
    /// `driftwood_handle(ptr: i32, len: i32) -> i64`: one message in, packed reply out
    /// (`ptr << 32 | len`; the reply stays valid until the next call into the actor).
    pub const HANDLE: &str = "driftwood_handle";
    /// `driftwood_alloc(len: i32) -> i32`: a buffer the host may fill with the next message.
    pub const ALLOC: &str = "driftwood_alloc";
    /// `_initialize()`: WASI reactor start-up (runs static constructors); called before init.
    pub const WASI_INITIALIZE: &str = "_initialize";
}

/// Import names in module [`MODULE`], with their signatures.
pub mod imports {
    /// `abi_version() -> i32`
    pub const ABI_VERSION: &str = "abi_version";
    /// `log(level: i32, ptr: i32, len: i32)`: a UTF-8 line on the host's stderr.
    pub const LOG: &str = "log";
    /// `gemm(a: i32, b: i32, c: i32, m: i32, n: i32, k: i32) -> i32`: `C[m×n] = A[m×k] · B[k×n]`,
    /// row-major `f32`, all three in guest memory, computed by the compute backend in place
    /// (no copies on the CPU; on CUDA the region is host-registered). `C` must not overlap `A`/`B`.
    pub const GEMM: &str = "gemm";

    // ---- the model (status NO_MODEL when the runtime has none) ----
    // Functions that fill a caller buffer return the size they need (bytes or elements) and
    // write at most `cap` of it, like snprintf: when the result is larger than `cap`, call
    // again with a bigger buffer.

    /// `model_info(out: i32, cap: i32) -> i32`: `key=value` lines (name, architecture,
    /// vocab_size, context_length, max_seq, n_layers, dim, eog token ids, chat_template).
    pub const MODEL_INFO: &str = "model_info";
    /// `vocab_size() -> i32`
    pub const VOCAB_SIZE: &str = "vocab_size";
    /// `tokenize(text: i32, len: i32, parse_special: i32, out: i32, cap: i32) -> i32`: u32 token
    /// ids of UTF-8 text (BOS added when the model wants it); returns the count.
    pub const TOKENIZE: &str = "tokenize";
    /// `detokenize(tokens: i32, n: i32, out: i32, cap: i32) -> i32`: UTF-8 text of u32 ids
    /// (special tokens rendered); returns the byte length.
    pub const DETOKENIZE: &str = "detokenize";
    /// `chat_template(msgs: i32, len: i32, add_generation_prompt: i32, out: i32, cap: i32) -> i32`:
    /// renders the model's chat template. `msgs` is `role \0 content \0` repeated.
    pub const CHAT_TEMPLATE: &str = "chat_template";
    /// `eval(tokens: i32, n: i32, logits: i32) -> i32`: appends u32 ids to the KV cache; when
    /// `logits` is non-zero the last token's `vocab_size` f32 logits are written there.
    pub const EVAL: &str = "eval";
    /// `sample() -> i32`: a token drawn from the current logits by the host's sampler.
    pub const SAMPLE: &str = "sample";
    /// `set_sampler(temperature: f32, top_k: i32, top_p: f32, min_p: f32, repeat_penalty: f32,
    /// seed: i64) -> i32`: temperature 0 is greedy.
    pub const SET_SAMPLER: &str = "set_sampler";
    /// `generate_step() -> i32`: sample a token and, unless it ends generation, evaluate it;
    /// returns the token, or END_OF_SEQUENCE / CONTEXT_FULL.
    pub const GENERATE_STEP: &str = "generate_step";
    /// `kv_len() -> i32`: tokens in the KV cache.
    pub const KV_LEN: &str = "kv_len";
    /// `kv_truncate(n: i32) -> i32`: forget cached positions from `n` on; returns the new length.
    pub const KV_TRUNCATE: &str = "kv_truncate";
    /// `is_eog(token: i32) -> i32`: 1 if the token ends generation (EOS, EOT, <|im_end|>…).
    pub const IS_EOG: &str = "is_eog";
}

/// Log levels for [`imports::LOG`].
pub mod log_level {
    pub const ERROR: i32 = 0;
    pub const WARN: i32 = 1;
    pub const INFO: i32 = 2;
    pub const DEBUG: i32 = 3;
}

/// Status codes returned by host functions: `0` (or a non-negative count) is success.
pub mod status {
    pub const OK: i32 = 0;
    /// The KV cache has no room for the tokens asked for.
    pub const CONTEXT_FULL: i32 = -1;
    /// The model produced an end-of-generation token.
    pub const END_OF_SEQUENCE: i32 = -2;
    /// No model is loaded in this runtime (run without `--model`).
    pub const NO_MODEL: i32 = -3;
    /// An argument is out of its domain (e.g. a zero dimension, an unknown token id).
    pub const INVALID_ARGUMENT: i32 = -4;
    /// The output buffer is too small; the call did nothing.
    pub const BUFFER_TOO_SMALL: i32 = -5;
    /// The compute backend failed (details on the host's stderr).
    pub const BACKEND_ERROR: i32 = -6;
    /// This build is not running inside a Driftwood host (the SDK's host-target stubs).
    pub const UNAVAILABLE: i32 = -7;

    /// A short name for a status code, for messages.
    pub fn name(code: i32) -> &'static str {
        match code {
            OK => "ok",
            CONTEXT_FULL => "context full",
            END_OF_SEQUENCE => "end of sequence",
            NO_MODEL => "no model loaded",
            INVALID_ARGUMENT => "invalid argument",
            BUFFER_TOO_SMALL => "buffer too small",
            BACKEND_ERROR => "backend error",
            UNAVAILABLE => "not running in a driftwood host",
            c if c > 0 => "ok",
            _ => "unknown status",
        }
    }
}

/// Packs a reply pointer and length into the `i64` returned by `driftwood_handle`.
pub const fn pack_reply(ptr: u32, len: u32) -> i64 {
    ((ptr as u64) << 32 | len as u64) as i64
}

/// Splits the `i64` returned by `driftwood_handle` into `(ptr, len)`.
pub const fn unpack_reply(packed: i64) -> (u32, u32) {
    let bits = packed as u64;
    ((bits >> 32) as u32, bits as u32)
}

/// The raw imports. On wasm32 they link against the host; on other targets they are stubs that
/// return [`status::UNAVAILABLE`] so the SDK and actors type-check in the host workspace.
#[allow(clippy::missing_safety_doc)]
pub mod raw {
    #[cfg(target_arch = "wasm32")]
    #[link(wasm_import_module = "driftwood")]
    extern "C" {
        pub fn abi_version() -> i32;
        pub fn log(level: i32, ptr: *const u8, len: usize);
        pub fn gemm(a: *const f32, b: *const f32, c: *mut f32, m: u32, n: u32, k: u32) -> i32;
        pub fn model_info(out: *mut u8, cap: usize) -> i32;
        pub fn vocab_size() -> i32;
        pub fn tokenize(text: *const u8, len: usize, parse_special: i32, out: *mut u32, cap: usize) -> i32;
        pub fn detokenize(tokens: *const u32, n: usize, out: *mut u8, cap: usize) -> i32;
        pub fn chat_template(msgs: *const u8, len: usize, add_generation_prompt: i32, out: *mut u8, cap: usize) -> i32;
        pub fn eval(tokens: *const u32, n: usize, logits: *mut f32) -> i32;
        pub fn sample() -> i32;
        pub fn set_sampler(temperature: f32, top_k: i32, top_p: f32, min_p: f32, repeat_penalty: f32, seed: i64) -> i32;
        pub fn generate_step() -> i32;
        pub fn kv_len() -> i32;
        pub fn kv_truncate(n: i32) -> i32;
        pub fn is_eog(token: i32) -> i32;
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod stubs {
        use super::super::status::UNAVAILABLE;
        pub unsafe fn abi_version() -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn log(_level: i32, ptr: *const u8, len: usize) {
            // SAFETY: the caller passes a valid (ptr, len) pair, as on wasm32.
            let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
            eprintln!("{}", String::from_utf8_lossy(bytes));
        }
        pub unsafe fn gemm(_a: *const f32, _b: *const f32, _c: *mut f32, _m: u32, _n: u32, _k: u32) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn model_info(_out: *mut u8, _cap: usize) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn vocab_size() -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn tokenize(_text: *const u8, _len: usize, _parse_special: i32, _out: *mut u32, _cap: usize) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn detokenize(_tokens: *const u32, _n: usize, _out: *mut u8, _cap: usize) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn chat_template(_msgs: *const u8, _len: usize, _add: i32, _out: *mut u8, _cap: usize) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn eval(_tokens: *const u32, _n: usize, _logits: *mut f32) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn sample() -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn set_sampler(_t: f32, _k: i32, _p: f32, _min_p: f32, _rp: f32, _seed: i64) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn generate_step() -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn kv_len() -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn kv_truncate(_n: i32) -> i32 {
            UNAVAILABLE
        }
        pub unsafe fn is_eog(_token: i32) -> i32 {
            UNAVAILABLE
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    pub use stubs::*;
}
