//! `driftwood convert`: re-encode a GGUF model's weight matrices into another format.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use driftwood::engine::convert;
use driftwood::engine::registry;
use driftwood::quant::DType;

/// Re-encode a GGUF model's weight matrices into another format
///
/// Every 2-D weight matrix is decoded to f32 and packed as --dtype by the reference quantizers
/// (those llama-quantize uses without an importance matrix). Everything else is copied as it was:
/// metadata (except general.file_type, set to the new format), tensor order, norm weights and
/// other vectors, matrices already in the format, and matrices whose rows do not fill whole
/// blocks of it (K-quants need row lengths that are multiples of 256, which SmolLM2's 576 is not).
/// The summary says how many tensors were converted and why the others were kept.
///
/// f32 keeps every weight exactly as it decodes; f16 and bf16 round each to 11 and 8 significant
/// bits. Going to another quantization adds its rounding to the source's: convert from the most
/// precise file you have.
///
/// Examples:
///   driftwood convert SmolLM2-135M-Instruct.Q4_1.gguf --dtype f16 -o smollm2-f16.gguf
///   driftwood bench parity --model smollm2-f16.gguf --device cuda
///   driftwood convert smollm2-135m --dtype q8_0 -o smollm2-q8_0.gguf
#[derive(Args)]
#[command(verbatim_doc_comment)] // keep the example lines apart
pub struct ConvertArgs {
    /// The .gguf model to read, or a registry name (smollm2-135m) once fetched
    #[arg(value_name = "MODEL")]
    pub input: String,
    /// Format of the weight matrices: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k or q6_k
    #[arg(long, value_name = "FORMAT", value_parser = super::parse_dtype)]
    pub dtype: DType,
    /// The .gguf file to write (replaced if it exists; written under a temporary name first);
    /// must differ from the input
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
}

impl ConvertArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        // A registry name stands for its fetched file; anything else is a path, so a missing
        // file is reported as such by the reader.
        let input = match registry::ENTRIES.iter().any(|e| e.name == self.input) && !std::path::Path::new(&self.input).exists() {
            true => registry::resolve(&self.input)?.0,
            false => PathBuf::from(&self.input),
        };
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("convert to {}", self.dtype));
        let started = Instant::now();
        let report = convert::convert(&input, &self.output, self.dtype, |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        bar.finish_and_clear();
        let report = report?;
        eprintln!(
            "driftwood: wrote {} ({:.1} MB, from {:.1} MB) in {:.1} s: {}",
            self.output.display(),
            report.output_bytes as f64 / 1e6,
            report.input_bytes as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            report.summary()
        );
        Ok(())
    }
}
