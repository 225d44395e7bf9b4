//! Benchmarks behind `driftwood bench`: each returns a serializable report that the CLI prints
//! as a table or as JSON.

pub mod inference;
pub mod parity;
pub mod snapshot;
pub mod zero_copy;

/// Resident set size of this process in bytes (from /proc/self/statm; 0 where unavailable).
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * crate::region::page_size()
}

pub use crate::numeric::median_ms;

/// A deterministic xorshift generator for bench and test inputs (no dependency on `rand` state).
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
