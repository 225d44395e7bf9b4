//! The command line: one clap `Command` enum whose variants each own an `execute()`.

mod args;
mod bench;
mod control;
mod convert;
mod model;
mod run;
mod session;
mod snapshot;
mod synth;

use std::time::Duration;

use clap::{Parser, Subcommand};
use driftwood::actor::ActorError;
use driftwood::quant::DType;

/// Driftwood runs stateful WebAssembly actors that drive LLM inference.
///
/// An actor is a wasm32-wasip1 module (see the `driftwood-guest` SDK). Its linear memory lives in
/// a region the runtime owns and shares with the compute device without copies; host functions
/// in the `driftwood` import module give it compute (and, with a model, inference).
#[derive(Parser)]
#[command(name = "driftwood", version, about, long_about = None, propagate_version = true, after_help = driftwood::options::help_text())]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    Run(run::RunArgs),
    Restore(snapshot::RestoreArgs),
    Inspect(snapshot::InspectArgs),
    Snapshot(control::SnapshotArgs),
    /// Measure: zero-copy sharing, inference speed, snapshot save/restore (tables or --json)
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    Synth(synth::SynthArgs),
    Convert(convert::ConvertArgs),
}

impl Command {
    pub fn execute(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => args.execute(),
            Command::Restore(args) => args.execute(),
            Command::Inspect(args) => args.execute(),
            Command::Snapshot(args) => args.execute(),
            Command::Bench(cmd) => cmd.execute(),
            Command::Synth(args) => args.execute(),
            Command::Convert(args) => args.execute(),
        }
    }
}

/// 1 when the actor failed (trap, timeout, broken protocol), 2 for everything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let actor = err.downcast_ref::<ActorError>().or_else(|| match err.downcast_ref::<driftwood::snapshot::ThawError>() {
        Some(driftwood::snapshot::ThawError::Actor(e)) => Some(e),
        _ => None,
    });
    match actor {
        Some(e) if e.is_actor_failure() => 1,
        _ => 2,
    }
}

/// Writing to a closed stdout (e.g. `driftwood … | head`) is not an error.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Parses a weight format as `--dtype` takes it (`q4_k`, `Q8_0`, `bf16`, `fp16`, ...).
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| format!("unknown weight format '{s}', expected one of f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k"))
}

/// Parses sizes like `4GiB`, `512MiB`, `64k`, `1048576`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size '{s}': expected a number with an optional unit like 512MiB or 4GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("invalid size unit '{other}' in '{s}': use B, KiB, MiB or GiB")),
    };
    Ok((value * mult) as usize)
}

/// Parses durations like `30s`, `500ms`, `5m`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration '{s}': expected e.g. 30s, 500ms or 5m"))?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("invalid duration unit '{other}' in '{s}': use ms, s, m or h")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("invalid duration '{s}': must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0s").is_err());
    }
}
