//! `driftwood bench zero-copy`: is the actor's memory really the device's memory, and what does
//! that buy?
//!
//! Reports (1) pointer identity: the region base, Wasmtime's `memory.data_ptr()` and the pointer
//! the backend computes on; (2) the RSS growth of making 16 MB of actor memory device-accessible
//! by sharing vs by copying into a device buffer; (3) GEMM latency on operands in guest memory,
//! computed in place vs through explicit copies, at several sizes; (4) correctness of every
//! element against an f64 reference.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{median_ms, rss_bytes, XorShift};
use crate::actor::{Runtime, RuntimeConfig};
use crate::backend::Backend;
use crate::region::Region;

/// A minimal actor: just memory and the required exports. The bench drives its memory directly.
const BENCH_ACTOR: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "driftwood_alloc") (param i32) (result i32) i32.const 0)
  (func (export "driftwood_handle") (param i32 i32) (result i64) i64.const 0))"#;

const SHARED_BYTES: usize = 16 << 20;

#[derive(Debug, Serialize)]
pub struct PointerIdentity {
    pub region_base: usize,
    pub memory_data_ptr: usize,
    pub backend_ptr: usize,
    pub identical: bool,
}

#[derive(Debug, Serialize)]
pub struct RssDelta {
    pub bytes_shared: usize,
    pub zero_copy_delta: i64,
    pub copy_delta: i64,
    /// Device memory taken by each path (GPUs only).
    pub device_zero_copy_delta: Option<i64>,
    pub device_copy_delta: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct GemmRow {
    pub size: usize,
    pub zero_copy_ms: f64,
    pub copy_ms: f64,
    pub speedup: f64,
    pub gflops_zero_copy: f64,
    pub errors_zero_copy: usize,
    pub errors_copy: usize,
    /// Elements compared with the f64 reference (all of them up to 1024, a random sample above).
    pub checked: usize,
    pub max_abs_error: f64,
}

#[derive(Debug, Serialize)]
pub struct ZeroCopyReport {
    pub device: crate::backend::DeviceInfo,
    pub pointers: PointerIdentity,
    pub rss: RssDelta,
    pub gemm: Vec<GemmRow>,
}

/// Runs the benchmark on `backend` for square GEMMs of each size.
pub fn run(backend: Arc<dyn Backend>, sizes: &[usize], min_time: Duration) -> anyhow::Result<ZeroCopyReport> {
    let largest = sizes.iter().copied().max().unwrap_or(128);
    let operand_bytes = 3 * largest * largest * 4;
    let runtime = Runtime::new(RuntimeConfig {
        max_memory: (operand_bytes + SHARED_BYTES + (1 << 20)).next_power_of_two().max(64 << 20),
        timeout: Duration::from_secs(60),
        backend: backend.clone(),
        verbose: false,
    })?;
    let module = runtime.compile("bench-actor".into(), "<built-in bench actor>".into(), BENCH_ACTOR.as_bytes().to_vec())?;
    let mut actor = runtime.instantiate(&module)?;
    actor.grow_to(operand_bytes.max(SHARED_BYTES))?;

    let base = actor.region().base();
    let pointers =
        PointerIdentity { region_base: base as usize, memory_data_ptr: actor.memory_ptr() as usize, backend_ptr: backend.device_ptr(base)?, identical: false };
    let pointers =
        PointerIdentity { identical: pointers.region_base == pointers.memory_data_ptr && pointers.memory_data_ptr == pointers.backend_ptr, ..pointers };

    let rss = measure_rss(backend.as_ref())?;

    let mut rows = Vec::new();
    for &size in sizes {
        rows.push(gemm_row(&mut actor, backend.as_ref(), size, min_time)?);
    }
    Ok(ZeroCopyReport { device: backend.info().clone(), pointers, rss, gemm: rows })
}

/// RSS growth of making a freshly written 16 MB region device-accessible: sharing it vs copying
/// it into a device buffer.
fn measure_rss(backend: &dyn Backend) -> anyhow::Result<RssDelta> {
    let region = Region::reserve(SHARED_BYTES * 2, SHARED_BYTES, SHARED_BYTES)?;
    // SAFETY: the region has SHARED_BYTES committed, and nothing else uses it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.base(), SHARED_BYTES) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    let device = || backend.device_memory_used().map(|b| b as i64);
    let (before, dev_before) = (rss_bytes() as i64, device());
    backend.share_region(&region)?;
    let (zero_copy_delta, dev_zc) = (rss_bytes() as i64 - before, device().zip(dev_before).map(|(a, b)| a - b));
    let (before, dev_before) = (rss_bytes() as i64, device());
    let copy = backend.upload(bytes)?;
    let (copy_delta, dev_copy) = (rss_bytes() as i64 - before, device().zip(dev_before).map(|(a, b)| a - b));
    drop(copy);
    Ok(RssDelta { bytes_shared: SHARED_BYTES, zero_copy_delta, copy_delta, device_zero_copy_delta: dev_zc, device_copy_delta: dev_copy })
}

fn gemm_row(actor: &mut crate::actor::Actor, backend: &dyn Backend, n: usize, min_time: Duration) -> anyhow::Result<GemmRow> {
    let elems = n * n;
    let base = actor.region().base();
    // SAFETY: the memory was grown to hold three n×n f32 matrices at offset 0 (the largest size),
    // the actor is idle, and these slices are dropped before the actor runs again.
    let (a, b, c) = unsafe {
        let p = base as *mut f32;
        (std::slice::from_raw_parts_mut(p, elems), std::slice::from_raw_parts_mut(p.add(elems), elems), std::slice::from_raw_parts_mut(p.add(2 * elems), elems))
    };
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ n as u64);
    a.iter_mut().chain(b.iter_mut()).for_each(|x| *x = rng.next_f32());
    let checks = checked_elements(n, &mut rng);
    let reference: Vec<f64> = checks.iter().map(|&(i, j)| (0..n).map(|k| a[i * n + k] as f64 * b[k * n + j] as f64).sum()).collect();
    let tolerance = |r: f64| 1e-5 * n as f64 + 1e-5 * r.abs();
    let count_errors = |c: &[f32]| {
        checks
            .iter()
            .zip(&reference)
            .filter(|(&(i, j), r)| {
                // NaN (an unwritten element) counts as an error.
                let err = (c[i * n + j] as f64 - **r).abs();
                err.is_nan() || err > tolerance(**r)
            })
            .count()
    };

    let mut zc = Vec::new();
    let started = Instant::now();
    while zc.len() < 3 || (started.elapsed() < min_time && zc.len() < 1000) {
        c.fill(f32::NAN);
        let t = Instant::now();
        // SAFETY: a, b, c are disjoint n×n ranges of the shared region (see above).
        unsafe { backend.gemm_shared(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), n, n, n)? };
        zc.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let errors_zero_copy = count_errors(c);
    let max_abs_error = checks.iter().zip(&reference).map(|(&(i, j), r)| (c[i * n + j] as f64 - r).abs()).fold(0.0, f64::max);

    let mut cp = Vec::new();
    let started = Instant::now();
    while cp.len() < 3 || (started.elapsed() < min_time && cp.len() < 1000) {
        c.fill(f32::NAN);
        let t = Instant::now();
        backend.gemm_copied(a, b, c, n, n, n)?;
        cp.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let errors_copy = count_errors(c);
    let (zero_copy_ms, copy_ms) = (median_ms(&mut zc), median_ms(&mut cp));
    Ok(GemmRow {
        size: n,
        zero_copy_ms,
        copy_ms,
        speedup: copy_ms / zero_copy_ms,
        gflops_zero_copy: 2.0 * (n as f64).powi(3) / (zero_copy_ms * 1e6),
        errors_zero_copy,
        errors_copy,
        checked: checks.len(),
        max_abs_error,
    })
}

/// Which elements of an n×n product to check: every one up to 1024, else 16384 random ones
/// (an f64 reference of a 4096³ product would take a minute of CPU).
fn checked_elements(n: usize, rng: &mut XorShift) -> Vec<(usize, usize)> {
    if n <= 1024 {
        return (0..n * n).map(|e| (e / n, e % n)).collect();
    }
    (0..16384).map(|_| (rng.next_u64() as usize % n, rng.next_u64() as usize % n)).collect()
}
