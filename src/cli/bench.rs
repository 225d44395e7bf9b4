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
    /// Model load, prefill at several lengths, decode ms/token and the host-function boundary
    /// cost per token. Compare with llama.cpp on the same file: bench/llamacpp.sh
    Inference(InferenceArgs),
    /// Snapshot save and restore time, file size and bytes/token vs re-prefilling the same
    /// context from scratch, at several context lengths
    Snapshot(SnapshotArgs),
    /// Does a device compute what the CPU computes? Loads the model on both, prefills a prompt
    /// and decodes greedily, comparing logits (max relative error) and tokens at every step
    Parity(ParityArgs),
}

#[derive(Args)]
pub struct ParityArgs {
    /// Model: registry name, .gguf file or Hugging Face folder
    #[arg(short, long, default_value = "smollm2-135m")]
    pub model: String,
    /// The device to check against the CPU: cuda, cuda:N, or cpu:scalar|avx2|avx512 (the CPU's
    /// own kernels at another SIMD level, a yardstick for what the order of float additions does)
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    /// CPU worker threads for the reference (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt text (tokenized without a chat template)
    #[arg(long, default_value = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,")]
    pub prompt: String,
    /// Greedy tokens to decode after the prompt
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Largest acceptable relative logit error (max |cpu - device| / max |cpu|); the command fails
    /// above it or when a greedy token differs. Default by weight format: 1e-3 for f32, 1e-2 for
    /// f16/bf16, 5e-2 for quantized formats (the CPU reference rounds activations as ggml does,
    /// the GPU keeps them in f32; measured gaps are in BENCHMARKS.md)
    #[arg(long)]
    pub tolerance: Option<f32>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl ParityArgs {
    fn execute(self) -> anyhow::Result<()> {
        let reference = BenchModel { model: self.model.clone(), device: DeviceSpec::Cpu, threads: self.threads }.load()?;
        let device = BenchModel { model: self.model.clone(), device: self.device, threads: self.threads }.load()?;
        let prompt = reference.tokenizer.encode(&self.prompt, false)?;
        let report = driftwood::bench::parity::run(reference.model.clone(), device.model.clone(), reference.tokenizer.clone(), &prompt, self.steps)?;
        let tolerance = self.tolerance.unwrap_or_else(|| {
            let dtype = reference.model.weights.layers.first().map(|l| l.wq.dtype).unwrap_or(driftwood::quant::DType::F32);
            match dtype {
                driftwood::quant::DType::F32 => 1e-3,
                driftwood::quant::DType::F16 | driftwood::quant::DType::BF16 => 1e-2,
                _ => 5e-2,
            }
        });
        let pass = report.passes(tolerance);
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("parity bench: {} on {} vs {}", report.model, report.device, report.reference);
            println!();
            println!("{:>5} {:>9} {:>9} {:>12} {:>10} {:>9}", "step", "cpu", "device", "max |diff|", "rel err", "top2 gap");
            for r in &report.steps {
                let mut flag = if r.cpu_token == r.device_token { String::new() } else { "  <- differs".to_string() };
                if r.device_argmax != r.device_token {
                    flag += &format!("  <- the device's own argmax chose {}", r.device_argmax);
                }
                println!("{:>5} {:>9} {:>9} {:>12.2e} {:>10.2e} {:>9.3}{flag}", r.step, r.cpu_token, r.device_token, r.max_abs_diff, r.rel_err, r.cpu_top2_gap);
            }
            println!();
            println!(
                "greedy tokens agree: {}/{} (device-side argmax {}/{}); max relative error {:.2e} (tolerance {:.0e}); mean |diff| {:.2e}: {}",
                report.tokens_agree,
                report.steps.len(),
                report.device_argmax_agrees,
                report.steps.len(),
                report.max_rel_err,
                tolerance,
                report.mean_abs_diff,
                if pass { "PASS" } else { "FAIL" }
            );
        }
        if !pass {
            anyhow::bail!("{} differs from the CPU beyond the tolerance", report.device);
        }
        Ok(())
    }
}

/// The model and device a model benchmark runs on.
#[derive(Args)]
pub struct BenchModel {
    /// Model: registry name, .gguf file or Hugging Face folder
    #[arg(short, long, default_value = "smollm2-135m")]
    pub model: String,
    /// Compute device: auto, cpu, cuda or cuda:N (cpu:scalar, cpu:avx2, cpu:avx512 pick the CPU kernels' SIMD level, for comparisons)
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// CPU worker threads (default: all cores)
    #[arg(long)]
    pub threads: Option<usize>,
}

impl BenchModel {
    fn load(&self) -> anyhow::Result<super::model::Loaded> {
        let backend = backend::open(self.device, self.threads)?;
        let args = super::model::ModelArgs { model: Some(self.model.clone()), ..Default::default() };
        args.load(backend, true)
    }
}

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: BenchModel,
    /// Context lengths in tokens
    #[arg(long, value_delimiter = ',', default_value = "24,512,4096")]
    pub tokens: Vec<usize>,
    /// Where the snapshot files are written (default: the system temp dir)
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl SnapshotArgs {
    fn execute(self) -> anyhow::Result<()> {
        if self.tokens.contains(&0) {
            anyhow::bail!("--tokens: each length must be at least 1");
        }
        let loaded = self.target.load()?;
        let dir = self.dir.clone().unwrap_or_else(std::env::temp_dir);
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let report = driftwood::bench::snapshot::run(loaded.model.clone(), loaded.tokenizer.clone(), &self.tokens, &dir, |m| bar.set_message(m.to_string()))?;
        bar.finish_and_clear();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        println!("snapshot bench: {} on {}", report.model, report.device);
        println!();
        println!("{:>7} {:>11} {:>12} {:>14} {:>12} {:>11} {:>9}", "tokens", "save ms", "restore ms", "re-prefill ms", "file MB", "B/token", "speedup");
        for r in &report.rows {
            println!(
                "{:>7} {:>11.2} {:>12.2} {:>14.1} {:>12.2} {:>11.0} {:>8.1}x",
                r.tokens,
                r.save_ms,
                r.restore_ms,
                r.reprefill_ms,
                r.file_bytes as f64 / 1e6,
                r.bytes_per_token,
                r.speedup
            );
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct InferenceArgs {
    #[command(flatten)]
    pub target: BenchModel,
    /// Prompt lengths to time prefill at
    #[arg(long, value_delimiter = ',', default_value = "5,128,512")]
    pub prefill: Vec<usize>,
    /// Tokens to decode
    #[arg(long, default_value_t = 128)]
    pub decode: usize,
    /// Repetitions per measurement (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the Wasm-driven boundary measurement
    #[arg(long)]
    pub no_boundary: bool,
    /// KV cache size of the timed sessions (default: just what the runs need)
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl InferenceArgs {
    fn execute(self) -> anyhow::Result<()> {
        if self.decode == 0 || self.prefill.contains(&0) {
            anyhow::bail!("--prefill sizes and --decode must be at least 1");
        }
        let loaded = self.target.load()?;
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        let opts = driftwood::bench::inference::Options {
            prefill_sizes: self.prefill.clone(),
            decode_tokens: self.decode,
            repeats: self.repeats,
            boundary: !self.no_boundary,
            context: self.ctx,
        };
        let report =
            driftwood::bench::inference::run(loaded.model.clone(), loaded.tokenizer.clone(), loaded.load_ms, &opts, |m| bar.set_message(m.to_string()))?;
        bar.finish_and_clear();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        println!("inference bench: {} on {}", report.model, report.device);
        println!();
        println!("{:<36} {:>14} {:>14}", "measurement", "time", "rate");
        println!("{}", "-".repeat(66));
        println!("{:<36} {:>11.1} ms {:>14}", "model load (mmap)", report.load_ms, format!("{:.0} MB weights", report.weights_mb));
        for p in &report.prefill {
            println!("{:<36} {:>11.2} ms {:>10.1} tok/s", format!("prefill {} tokens", p.tokens), p.ms, p.tok_s);
        }
        let (d, h) = (&report.decode, &report.decode_host_logits);
        println!("{:<36} {:>8.3} ms/tok {:>10.1} tok/s", format!("decode {} tokens", d.tokens), d.ms_per_token, d.tok_s);
        println!("{:<36} {:>8.3} ms/tok {:>10.1} tok/s", "  with every token's logits on host", h.ms_per_token, h.tok_s);
        if let Some(b) = &report.boundary {
            println!("{:<36} {:>8.3} ms/tok {:>14}", "decode driven from wasm", b.ms_per_token_wasm, "");
            println!("{:<36} {:>8.2} us/tok {:>13.3}%", "host-function boundary overhead", b.overhead_us_per_token, b.overhead_percent);
        }
        if let (Some(bw), Some(floor)) = (report.bandwidth_gb_s, report.floor_ms_per_token) {
            println!("{:<36} {:>8.3} ms/tok {:>14}", "decode floor (weights / bandwidth)", floor, format!("{bw:.0} GB/s"));
            println!("{:<36} {:>11.2}x", "decode time / floor", d.ms_per_token / floor);
        }
        println!("{:<36} {:>11.1} MB", "process RSS after load", report.rss_after_load_mb);
        Ok(())
    }
}

#[derive(Args)]
pub struct ZeroCopyArgs {
    /// Square GEMM sizes to measure [default: 128,512,1024 on the CPU; up to 4096 on a GPU]
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Compute device: auto, cpu, cuda or cuda:N (cpu:scalar, cpu:avx2, cpu:avx512 pick the CPU kernels' SIMD level, for comparisons)
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
            BenchCommand::Inference(args) => args.execute(),
            BenchCommand::Snapshot(args) => args.execute(),
            BenchCommand::Parity(args) => args.execute(),
        }
    }
}

impl ZeroCopyArgs {
    fn execute(self) -> anyhow::Result<()> {
        if self.sizes.iter().any(|&s| s == 0 || s > 8192) {
            anyhow::bail!("--sizes: each size must be between 1 and 8192, got {:?}", self.sizes);
        }
        let backend = backend::open(self.device, self.threads)?;
        let sizes = match (self.sizes.is_empty(), backend.info().kind) {
            (false, _) => self.sizes.clone(),
            (true, backend::DeviceKind::Cpu) => vec![128, 512, 1024],
            (true, _) => vec![128, 512, 1024, 2048, 4096],
        };
        let report = zero_copy::run(backend, &sizes, self.min_time)?;
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
        if let (Some(zc), Some(cp)) = (r.device_zero_copy_delta, r.device_copy_delta) {
            println!("{:<44} {:>18} {:>18}", "device memory delta", format!("{:.2} MB", mb(zc)), format!("{:.2} MB", mb(cp)));
        }
        for g in &report.gemm {
            println!(
                "{:<44} {:>18} {:>18}",
                format!("gemm {0}x{0}x{0} latency (median)", g.size),
                format!("{:.3} ms", g.zero_copy_ms),
                format!("{:.3} ms", g.copy_ms)
            );
            println!(
                "{:<44} {:>18} {:>18}",
                format!("gemm {0} errors / {1} checked (max |err| {2:.1e})", g.size, g.checked, g.max_abs_error),
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
