//! `driftwood restore` and `driftwood inspect`: thaw a snapshot and continue, or describe one.

use std::path::PathBuf;

use clap::Args;
use driftwood::engine::registry;
use driftwood::snapshot::{self, format, KvRestore};

use super::args::RuntimeArgs;
use super::session::Drive;

/// Thaw a snapshot (.dws) and continue the actor: same output behaviour as `run`.
///
/// The actor's memory, globals, KV cache, token history and sampler come back exactly; its init
/// is not called again. Without --model the snapshot's own model is used (by registry name); a
/// different model must be asked for explicitly with --model, and then the KV cache is rebuilt
/// by re-prefilling the conversation (the command says so and reports the cost).
///
/// Examples:
///   driftwood restore chat.dws --prompt "And what about Germany?" --save chat2.dws
///   driftwood restore chat.dws --model other.gguf --prompt "Go on"
#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot file
    pub snapshot: PathBuf,
    /// A message to deliver (repeat for several); without it, stdin lines are the messages
    #[arg(short, long = "prompt", value_name = "TEXT")]
    pub prompts: Vec<String>,
    /// Snapshot the actor again after the last message
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub model: super::model::ModelArgs,
}

impl RestoreArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let snap = format::read(&self.snapshot)?;
        let runtime = self.runtime.build()?;
        let session = match (&snap.meta.model, &self.model.model) {
            (None, None) => None,
            (mref, explicit) => {
                let mut args = self.model.clone();
                if explicit.is_none() {
                    let name = mref.as_ref().map(|m| m.name.clone()).unwrap_or_default();
                    registry::resolve(&name)
                        .map_err(|e| anyhow::anyhow!("{}: the snapshot's model '{name}' cannot be found ({e}); pass --model", self.snapshot.display()))?;
                    args.model = Some(name);
                }
                if args.ctx.is_none() {
                    args.ctx = Some(snap.meta.kv_len.max(4096));
                }
                let loaded = args.load(runtime.config().backend.clone(), !self.runtime.verbose)?;
                Some(args.session(&loaded)?)
            }
        };
        let (mut actor, restored) = snapshot::thaw(&runtime, &self.snapshot, snap, session, self.model.model.is_some())?;
        match restored {
            KvRestore::Reprefilled { old_tokens, new_tokens, ms } => eprintln!(
                "driftwood: model changed: rebuilt the KV cache by re-prefilling the conversation ({old_tokens} tokens in the snapshot, {new_tokens} with the new tokenizer) in {ms:.1} ms"
            ),
            KvRestore::Imported { tokens } if self.runtime.verbose => eprintln!("driftwood: restored {tokens} tokens of KV cache"),
            _ => {}
        }
        let drive = Drive { prompts: &self.prompts, control: None, save: self.save.as_deref(), verbose: self.runtime.verbose };
        drive.run(&mut actor)?;
        drive.finish(&mut actor)
    }
}

/// Describe a snapshot: actor, model, tokens, sizes, versions (without loading it).
#[derive(Args)]
pub struct InspectArgs {
    /// The snapshot file
    pub snapshot: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

impl InspectArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let (meta, tensors) = format::read_meta(&self.snapshot)?;
        let file_bytes = std::fs::metadata(&self.snapshot)?.len();
        if self.json {
            let tensors: Vec<serde_json::Value> =
                tensors.iter().map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype, "shape": t.shape, "bytes": t.bytes})).collect();
            let out = serde_json::json!({"file": self.snapshot.display().to_string(), "file_bytes": file_bytes, "meta": meta, "tensors": tensors});
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        let kv_bytes: u64 = tensors.iter().filter(|t| t.name.starts_with("kv.")).map(|t| t.bytes).sum();
        let mem_stored: u64 = tensors.iter().filter(|t| t.name == "actor.memory.pages").map(|t| t.bytes).sum();
        println!("{}", self.snapshot.display());
        println!("  format            v{} (driftwood {}), created {} (unix)", meta.format_version, meta.driftwood_version, meta.created_unix);
        println!("  actor             {} (module sha256 {}…)", meta.actor_name, &meta.module_sha256[..16.min(meta.module_sha256.len())]);
        println!("  linear memory     {} bytes ({} stored: zero pages omitted), {} mutable globals", meta.memory_bytes, mem_stored, meta.globals.len());
        match &meta.model {
            Some(m) => {
                println!("  model             {} ({}, weights {}…)", m.name, m.architecture, &m.weights_hash[..16.min(m.weights_hash.len())]);
                println!(
                    "  conversation      {} tokens in the KV cache ({} layers × {} values, f16: {} bytes, {} bytes/token)",
                    meta.kv_len,
                    m.n_layers,
                    m.kv_dim,
                    kv_bytes,
                    if meta.kv_len > 0 { kv_bytes / meta.kv_len as u64 } else { 0 }
                );
            }
            None => println!("  model             none"),
        }
        println!("  file              {file_bytes} bytes, {} tensors", tensors.len());
        Ok(())
    }
}
