//! The host side of the ABI: the functions in import module `driftwood`.
//!
//! Names and status codes come from `driftwood_guest::abi`, shared with actors. Every pointer a
//! guest passes goes through [`guest_range`], the one bounds check: a range outside linear
//! memory, or a misaligned typed operand, traps the actor with a message naming the function,
//! the argument and the bad range. Guest bytes are never held across a call back into Wasm.

use std::ops::Range;

use driftwood_guest::abi::{imports, log_level, status, ABI_VERSION, MODULE};
use wasmtime::{Caller, Linker, Memory};

use super::ActorState;

/// A broken ABI contract; converted into a trap.
#[derive(Debug, thiserror::Error)]
pub enum AbiError {
    #[error("{MODULE}::{func}: `{arg}` range {start:#x}..{end:#x} ({len} bytes) is outside linear memory of {memory} bytes")]
    OutOfBounds { func: &'static str, arg: &'static str, start: u64, end: u64, len: u64, memory: usize },
    #[error("{MODULE}::{func}: `{arg}` at {ptr:#x} is not {align}-byte aligned")]
    Misaligned { func: &'static str, arg: &'static str, ptr: u32, align: usize },
    #[error("{MODULE}::{func}: `{arg}` size overflows ({what})")]
    Overflow { func: &'static str, arg: &'static str, what: String },
    #[error("{MODULE}::{func}: `{arg}` is not valid UTF-8 at byte {at}")]
    Utf8 { func: &'static str, arg: &'static str, at: usize },
    #[error("{MODULE}::{func}: output `{out}` overlaps input `{input}`")]
    Overlap { func: &'static str, out: &'static str, input: &'static str },
    #[error("{MODULE}::{func}: the actor exports no memory")]
    NoMemory { func: &'static str },
}

/// The one bounds check: `len` bytes at guest offset `ptr`, aligned to `align`, inside a memory
/// of `memory` bytes.
pub fn guest_range(memory: usize, ptr: u32, len: u64, align: usize, func: &'static str, arg: &'static str) -> Result<Range<usize>, AbiError> {
    let start = u64::from(ptr);
    let end = start.checked_add(len).ok_or_else(|| AbiError::Overflow { func, arg, what: format!("{start} + {len}") })?;
    if end > memory as u64 {
        return Err(AbiError::OutOfBounds { func, arg, start, end, len, memory });
    }
    if align > 1 && !(ptr as usize).is_multiple_of(align) {
        return Err(AbiError::Misaligned { func, arg, ptr, align });
    }
    Ok(start as usize..end as usize)
}

/// Byte size of `rows × cols` elements of `elem` bytes, or an overflow error.
pub fn array_bytes(rows: u32, cols: u32, elem: u64, func: &'static str, arg: &'static str) -> Result<u64, AbiError> {
    u64::from(rows).checked_mul(u64::from(cols)).and_then(|n| n.checked_mul(elem)).ok_or_else(|| AbiError::Overflow {
        func,
        arg,
        what: format!("{rows} × {cols} × {elem} bytes"),
    })
}

fn overlaps(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The actor's memory, cached after instantiation (looked up by name before that, e.g. from a
/// start function).
pub fn memory(caller: &mut Caller<'_, ActorState>, func: &'static str) -> Result<Memory, AbiError> {
    if let Some(mem) = caller.data().memory {
        return Ok(mem);
    }
    caller.get_export(driftwood_guest::abi::exports::MEMORY).and_then(|e| e.into_memory()).ok_or(AbiError::NoMemory { func })
}

/// Reads a UTF-8 string argument out of guest memory.
pub fn read_str(caller: &mut Caller<'_, ActorState>, ptr: u32, len: u32, func: &'static str, arg: &'static str) -> Result<String, AbiError> {
    let mem = memory(caller, func)?;
    let data = mem.data(&*caller);
    let range = guest_range(data.len(), ptr, u64::from(len), 1, func, arg)?;
    match std::str::from_utf8(&data[range]) {
        Ok(s) => Ok(s.to_owned()),
        Err(e) => Err(AbiError::Utf8 { func, arg, at: e.valid_up_to() }),
    }
}

/// Adds every `driftwood` import to the linker.
pub fn add_to_linker(linker: &mut Linker<ActorState>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, imports::ABI_VERSION, |_: Caller<'_, ActorState>| ABI_VERSION)?;

    linker.func_wrap(MODULE, imports::LOG, |mut caller: Caller<'_, ActorState>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
        let text = read_str(&mut caller, ptr as u32, len as u32, imports::LOG, "message")?;
        let tag = match level {
            log_level::ERROR => "error",
            log_level::WARN => "warn",
            log_level::INFO => "info",
            _ => "debug",
        };
        if level <= log_level::INFO || caller.data().verbose {
            eprintln!("[{}] {tag}: {text}", caller.data().name);
        }
        Ok(())
    })?;

    linker.func_wrap(MODULE, imports::GEMM, |mut caller: Caller<'_, ActorState>, a: i32, b: i32, c: i32, m: i32, n: i32, k: i32| -> wasmtime::Result<i32> {
        const F: &str = imports::GEMM;
        let (m, n, k) = (m as u32, n as u32, k as u32);
        if m == 0 || n == 0 || k == 0 {
            return Ok(status::INVALID_ARGUMENT);
        }
        let mem = memory(&mut caller, F)?;
        let size = mem.data_size(&caller);
        let ra = guest_range(size, a as u32, array_bytes(m, k, 4, F, "a")?, 4, F, "a")?;
        let rb = guest_range(size, b as u32, array_bytes(k, n, 4, F, "b")?, 4, F, "b")?;
        let rc = guest_range(size, c as u32, array_bytes(m, n, 4, F, "c")?, 4, F, "c")?;
        if overlaps(&rc, &ra) {
            return Err(AbiError::Overlap { func: F, out: "c", input: "a" }.into());
        }
        if overlaps(&rc, &rb) {
            return Err(AbiError::Overlap { func: F, out: "c", input: "b" }.into());
        }
        let base = mem.data_ptr(&caller);
        let backend = caller.data().backend.clone();
        // SAFETY: the three ranges are inside this actor's memory (checked above), 4-byte
        // aligned, `c` overlaps neither input, and no guest code runs during the call.
        let result = unsafe {
            backend.gemm_shared(
                base.add(ra.start) as *const f32,
                base.add(rb.start) as *const f32,
                base.add(rc.start) as *mut f32,
                m as usize,
                n as usize,
                k as usize,
            )
        };
        Ok(match result {
            Ok(()) => status::OK,
            Err(e) => {
                eprintln!("[{}] gemm: {e}", caller.data().name);
                status::BACKEND_ERROR
            }
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_range_accepts_exact_fit_and_rejects_one_past() {
        assert_eq!(guest_range(100, 96, 4, 4, "f", "x").unwrap(), 96..100);
        let err = guest_range(100, 97, 4, 1, "f", "x").unwrap_err().to_string();
        assert!(err.contains("0x61..0x65") && err.contains("100 bytes"), "{err}");
        assert!(matches!(guest_range(100, 2, 4, 4, "f", "x"), Err(AbiError::Misaligned { .. })));
        assert!(matches!(guest_range(usize::MAX, u32::MAX, u64::MAX, 1, "f", "x"), Err(AbiError::Overflow { .. })));
    }

    #[test]
    fn array_bytes_detects_overflow() {
        assert_eq!(array_bytes(3, 5, 4, "f", "x").unwrap(), 60);
        assert!(array_bytes(u32::MAX, u32::MAX, u64::MAX, "f", "x").is_err());
    }
}
