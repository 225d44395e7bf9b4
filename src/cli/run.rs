//! `driftwood run`: start an actor and feed it messages.

use std::path::PathBuf;

use clap::Args;

use super::args::RuntimeArgs;
use super::session::Drive;

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
        let drive = Drive { prompts: &self.prompts, control: self.control.as_deref(), save: self.save.as_deref(), verbose: self.runtime.verbose };
        drive.run(&mut actor)?;
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
        drive.finish(&mut actor)
    }
}
