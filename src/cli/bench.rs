//! `driftwood bench`: measurements printed as tables, or JSON with --json.

use std::time::Duration;

use clap::{Args, Subcommand};
use driftwood::backend::{self, DeviceSpec};
use driftwood::bench::zero_copy;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Is actor memory really device memory? Pointer identity, RSS cost of sharing vs copying,
    /// GEMM latency on guest operands in place vs through copies, and correctness
    ZeroCopy(ZeroCopyArgs),
}

#[derive(Args)]
pub struct ZeroCopyArgs {
    /// Square GEMM sizes to measure
    #[arg(long, value_delimiter = ',', default_value = "128,512,1024")]
    pub sizes: Vec<usize>,
    /// Compute device: auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// CPU worker threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Minimum time spent timing each size and path
    #[arg(long, default_value = "300ms", value_parser = super::parse_duration)]
    pub min_time: Duration,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl BenchCommand {
    pub fn execute(self) -> anyhow::Result<()> {
        match self {
            BenchCommand::ZeroCopy(args) => args.execute(),
        }
    }
}

impl ZeroCopyArgs {
    fn execute(self) -> anyhow::Result<()> {
        if self.sizes.iter().any(|&s| s == 0 || s > 8192) {
            anyhow::bail!("--sizes: each size must be between 1 and 8192, got {:?}", self.sizes);
        }
        let backend = backend::open(self.device, self.threads)?;
        let report = zero_copy::run(backend, &self.sizes, self.min_time)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        let mb = |b: i64| b as f64 / (1 << 20) as f64;
        println!("zero-copy bench on {}", report.device.name);
        println!();
        println!("{:<44} {:>18} {:>18}", "metric", "zero-copy", "copy");
        println!("{}", "-".repeat(82));
        let p = &report.pointers;
        println!("{:<44} {:>18} {:>18}", "region base", format!("{:#x}", p.region_base), "");
        println!("{:<44} {:>18} {:>18}", "memory.data_ptr()", format!("{:#x}", p.memory_data_ptr), "");
        println!("{:<44} {:>18} {:>18}", "backend compute pointer", format!("{:#x}", p.backend_ptr), "");
        println!("{:<44} {:>18} {:>18}", "pointer identity", if p.identical { "yes" } else { "NO" }, "");
        let r = &report.rss;
        println!(
            "{:<44} {:>18} {:>18}",
            format!("RSS delta, {} MB made device-accessible", r.bytes_shared >> 20),
            format!("{:.2} MB", mb(r.zero_copy_delta)),
            format!("{:.2} MB", mb(r.copy_delta))
        );
        for g in &report.gemm {
            println!(
                "{:<44} {:>18} {:>18}",
                format!("gemm {0}x{0}x{0} latency (median)", g.size),
                format!("{:.3} ms", g.zero_copy_ms),
                format!("{:.3} ms", g.copy_ms)
            );
            println!(
                "{:<44} {:>18} {:>18}",
                format!("gemm {0} errors / {1} (max |err| {2:.1e})", g.size, g.size * g.size, g.max_abs_error),
                g.errors_zero_copy,
                g.errors_copy
            );
        }
        println!();
        for g in &report.gemm {
            println!("gemm {:>5}: zero-copy {:.2}x vs copy, {:.1} GFLOP/s", g.size, g.speedup, g.gflops_zero_copy);
        }
        Ok(())
    }
}
