//! A stateful echo: replies `#<count> <message>` and keeps a running checksum and history, so a
//! snapshot/restore can be checked against an uninterrupted run.
//!
//! Commands: `!history` replies with every message so far, `!stats` with the count and checksum,
//! `!trap` executes `unreachable` (for error-path tests), `!grow N` grows memory by N pages and
//! replies with the result of `memory.grow`, `!spin` loops forever (for timeout tests).

use driftwood_guest::Actor;

/// Mutable globals outside the struct, so snapshot code must capture globals, not only the heap.
static mut TOTAL_BYTES: u64 = 0;

struct Echo {
    count: u64,
    checksum: u64,
    history: Vec<String>,
}

impl Actor for Echo {
    fn init() -> Self {
        driftwood_guest::log(driftwood_guest::abi::log_level::DEBUG, "echo actor initialised");
        Echo { count: 0, checksum: 0xcbf29ce484222325, history: Vec::new() }
    }

    fn handle(&mut self, msg: &str) -> String {
        match msg.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["!history"] => return self.history.join("\n"),
            ["!stats"] => {
                // SAFETY: actors are single-threaded; no other reference to the static exists.
                let total = unsafe { TOTAL_BYTES };
                return format!("count={} checksum={:016x} bytes={total}", self.count, self.checksum);
            }
            ["!trap"] => core::arch::wasm32::unreachable(),
            ["!spin"] => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            ["!grow", pages] => {
                let pages: usize = pages.parse().unwrap_or(0);
                return format!("grow={}", core::arch::wasm32::memory_grow::<0>(pages) as isize);
            }
            _ => {}
        }
        self.count += 1;
        for b in msg.bytes() {
            self.checksum = (self.checksum ^ b as u64).wrapping_mul(0x100000001b3);
        }
        // SAFETY: as above.
        unsafe { TOTAL_BYTES += msg.len() as u64 };
        self.history.push(msg.to_owned());
        format!("#{} {msg}", self.count)
    }
}

driftwood_guest::export_actor!(Echo);
