//! The zero-copy demo: fill A and B in linear memory, have the host compute C = A·B on them in
//! place, and check every element of C against the actor's own computation.
//!
//! Message: a size `N` (square) or `M N K`; empty means 128. Reply: one line with the sizes,
//! the error count over all elements, the host call's time and the actor's own check time.

use driftwood_guest::Actor;

struct Gemm {
    /// A small LCG so every run is reproducible and each message uses new data.
    seed: u64,
    runs: u32,
}

impl Gemm {
    fn next(&mut self) -> f32 {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn parse(msg: &str) -> Result<(usize, usize, usize), String> {
    let nums: Result<Vec<usize>, _> = msg.split_whitespace().map(str::parse::<usize>).collect();
    match nums.map_err(|e| format!("bad size '{msg}': {e}"))?.as_slice() {
        [] => Ok((128, 128, 128)),
        [n] => Ok((*n, *n, *n)),
        [m, n, k] => Ok((*m, *n, *k)),
        _ => Err(format!("bad size '{msg}': expected N or M N K")),
    }
}

impl Actor for Gemm {
    fn init() -> Self {
        Gemm { seed: 0x5EED, runs: 0 }
    }

    fn handle(&mut self, msg: &str) -> String {
        let (m, n, k) = match parse(msg.trim()) {
            Ok(dims) => dims,
            Err(e) => return format!("error: {e}"),
        };
        self.runs += 1;
        let a: Vec<f32> = (0..m * k).map(|_| self.next()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| self.next()).collect();
        let mut c = vec![f32::NAN; m * n];
        let t0 = std::time::Instant::now();
        if let Err(e) = driftwood_guest::gemm(&a, &b, &mut c, m, n, k) {
            return format!("error: gemm failed: {e}");
        }
        let host_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = std::time::Instant::now();
        let mut errors = 0usize;
        let mut max_err = 0f64;
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for p in 0..k {
                    acc += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                let err = (c[i * n + j] as f64 - acc).abs();
                if !(err <= 1e-5 * k as f64 + 1e-5 * acc.abs()) {
                    errors += 1;
                }
                max_err = max_err.max(err);
            }
        }
        let check_ms = t1.elapsed().as_secs_f64() * 1e3;
        format!("gemm {m}x{n}x{k}: errors={errors}/{} max_abs_err={max_err:.2e} host_ms={host_ms:.3} check_ms={check_ms:.3} run={}", m * n, self.runs)
    }
}

driftwood_guest::export_actor!(Gemm);
