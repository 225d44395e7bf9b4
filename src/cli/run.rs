//! `driftwood run`: start an actor and feed it messages.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use driftwood::actor::{Runtime, RuntimeConfig};
use driftwood::backend::{self, DeviceSpec};

/// Run an actor: instantiate it, call its init once, then deliver messages one at a time.
///
/// Messages are the --prompt arguments in order or, without --prompt, each line of standard
/// input. Each reply the actor returns is printed on its own line; the actor's own WASI
/// stdout/stderr pass straight through.
///
/// Examples:
///   driftwood run examples/target/wasm32-wasip1/release/gemm.wasm --prompt 256
///   echo hello | driftwood run echo.wasm
#[derive(Args)]
pub struct RunArgs {
    /// The actor module (.wasm, or .wat text)
    pub actor: PathBuf,
    /// A message to deliver (repeat for several); without it, stdin lines are the messages
    #[arg(short, long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// Listen on this Unix socket for `driftwood snapshot SOCKET -o FILE`; the run then keeps
    /// serving snapshots after input ends, until one is taken with --stop
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// Snapshot the actor to FILE after the last message (see `driftwood restore`)
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub model: super::model::ModelArgs,
}

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

impl RunArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let runtime = self.runtime.build()?;
        let module = runtime.load(&self.actor)?;
        let mut actor = runtime.instantiate(&module)?;
        if self.model.model.is_some() || module.uses_model() {
            let loaded = self.model.load(runtime.config().backend.clone(), !self.runtime.verbose && self.model.model.is_none())?;
            actor.attach_session(self.model.session(&loaded)?);
        }
        actor.init()?;
        if let Some(sock) = &self.control {
            let (tx, rx) = std::sync::mpsc::channel();
            let _socket = super::control::listen(sock, tx.clone())?;
            super::control::spawn_input(self.prompts.clone(), tx);
            super::control::serve_actor(&mut actor, rx)?;
        } else {
            deliver_messages(&mut actor, &self.prompts)?;
        }
        if self.runtime.verbose {
            let st = actor.host_stats();
            eprintln!(
                "driftwood: {} model calls, {} tokens evaluated in {:.1} ms; {} logits vectors stored by {} straight into actor memory",
                st.calls,
                st.tokens_evaluated,
                st.compute.as_secs_f64() * 1e3,
                st.logits_in_place,
                runtime.config().backend.info().name
            );
        }
        if let Some(path) = &self.save {
            save_snapshot(&mut actor, path, self.runtime.verbose)?;
        }
        Ok(())
    }
}

/// Delivers one message and prints the actor's reply (if any) on its own line.
pub fn deliver_one(actor: &mut driftwood::actor::Actor, msg: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let reply = actor.deliver(msg.as_bytes())?;
    if !reply.is_empty() {
        out.write_all(&reply)?;
        if !reply.ends_with(b"\n") {
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Delivers the prompts (or stdin lines) one at a time, printing each reply.
pub fn deliver_messages(actor: &mut driftwood::actor::Actor, prompts: &[String]) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    if prompts.is_empty() {
        for line in std::io::stdin().lock().lines() {
            deliver_one(actor, &line?, &mut out)?;
        }
    } else {
        for prompt in prompts {
            deliver_one(actor, prompt, &mut out)?;
        }
    }
    Ok(())
}

/// Writes a snapshot atomically and reports its size on stderr.
pub fn save_snapshot(actor: &mut driftwood::actor::Actor, path: &std::path::Path, verbose: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let stats = driftwood::snapshot::save(actor, path)?;
    if verbose {
        eprintln!(
            "driftwood: saved {} ({} bytes: {} of {} memory bytes stored, {} KV bytes) in {:.1} ms",
            path.display(),
            stats.file_bytes,
            stats.stored_memory_bytes,
            stats.memory_bytes,
            stats.kv_bytes,
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
