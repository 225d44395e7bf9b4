//! `driftwood synth`: write a random-weight Llama GGUF of a known shape, for speed work on
//! machines that cannot fetch a real model.

use std::path::PathBuf;
use std::time::Instant;

use clap::builder::PossibleValuesParser;
use clap::Args;
use driftwood::engine::synth::{self, SynthShape};
use driftwood::quant::DType;

/// Write a random-weight Llama GGUF of a known shape, for speed work without a model hub
///
/// The file has the shape, tensor names, metadata and weight format of the real model (Llama 3
/// RoPE scaling included), so it loads wherever a .gguf is accepted (`--model FILE.gguf`) and in
/// llama.cpp, and runs at the real model's speed. Weights are seeded uniform noise, scaled so
/// activations stay finite through every layer: the same --seed gives the same bytes. The
/// vocabulary is byte-level (one token per byte of text) padded with filler tokens to the real
/// size, so generated text is noise: measure speed with it, never quality.
///
/// Examples:
///   driftwood synth --shape llama-3.2-1b --dtype q4_0 -o /tmp/llama-3.2-1b-q4_0.gguf
///   driftwood bench inference --model /tmp/llama-3.2-1b-q4_0.gguf
///   driftwood synth --shape smollm2-135m --dtype bf16 --layers 2 -o tiny.gguf
#[derive(Args)]
#[command(verbatim_doc_comment)] // keep the example lines apart
pub struct SynthArgs {
    /// Shape to copy: llama-3.2-1b (16 layers, dim 2048, 1.24 B parameters) or smollm2-135m
    /// (30 layers, dim 576, 135 M parameters)
    #[arg(long, value_name = "NAME", value_parser = PossibleValuesParser::new(SynthShape::PRESETS))]
    pub shape: String,
    /// Format of every weight matrix: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k or q6_k (norms
    /// stay f32). K-quants need widths that are multiples of 256, which smollm2-135m's are not
    #[arg(long, value_name = "FORMAT", value_parser = super::parse_dtype)]
    pub dtype: DType,
    /// Seed of the random weights
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep only the first N layers (a smaller, faster variant of the shape)
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// The .gguf file to write (replaced if it exists; written under a temporary name first)
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
}

impl SynthArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let mut shape = SynthShape::preset(&self.shape)?;
        if let Some(n) = self.layers {
            shape = shape.with_layers(n);
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("synth {} {}", shape.name, self.dtype));
        let started = Instant::now();
        let report = synth::write_synth(&shape, self.dtype, self.seed, &self.output, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })?;
        bar.finish_and_clear();
        eprintln!(
            "driftwood: wrote {} ({}, {} layers, {}, {:.1} M parameters, {:.1} MB) in {:.1} s",
            self.output.display(),
            shape.name,
            shape.n_layers,
            self.dtype,
            report.n_params as f64 / 1e6,
            report.file_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
