//! Flags shared by the commands that run actors.

use std::time::Duration;

use clap::Args;
use driftwood::actor::{Runtime, RuntimeConfig};
use driftwood::backend::{self, DeviceSpec};

/// Flags every command that runs actors shares.
#[derive(Args, Clone)]
pub struct RuntimeArgs {
    /// Largest linear memory the actor may grow to (e.g. 256MiB, 4GiB); growing beyond it makes
    /// the guest's memory.grow return -1
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = super::parse_size)]
    pub max_memory: usize,
    /// Wall-clock limit for one call into the actor (init, or one message); a runaway actor is
    /// stopped with exit code 1
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// Compute device: auto, cpu, cuda or cuda:N (cpu:scalar, cpu:avx2, cpu:avx512 pick the CPU kernels' SIMD level, for comparisons)
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// CPU worker threads (default: all cores)
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Show the actor's debug log lines
    #[arg(short, long)]
    pub verbose: bool,
}

impl RuntimeArgs {
    pub fn build(&self) -> anyhow::Result<Runtime> {
        let backend = backend::open(self.device, self.threads)?;
        Ok(Runtime::new(RuntimeConfig { max_memory: self.max_memory, timeout: self.timeout, backend, verbose: self.verbose })?)
    }
}
