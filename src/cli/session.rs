//! The message loop every command that runs an actor shares: deliver messages (the --prompt
//! arguments or stdin lines) one at a time and print the replies, serve control-socket requests
//! between messages, and save a snapshot at the end.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};

use driftwood::actor::Actor;

/// Where the messages come from and what happens around them.
pub struct Drive<'a> {
    pub prompts: &'a [String],
    /// Serve `driftwood snapshot` on this socket (the run then lasts until a request stops it).
    pub control: Option<&'a Path>,
    /// Snapshot the actor here after the last message.
    pub save: Option<&'a Path>,
    pub verbose: bool,
}

impl Drive<'_> {
    /// Runs the loop on `actor` to the end of its input (or to a control request to stop).
    pub fn run(&self, actor: &mut Actor) -> anyhow::Result<()> {
        if let Some(sock) = self.control {
            let (tx, rx) = std::sync::mpsc::channel();
            let _socket = super::control::listen(sock, tx.clone())?;
            spawn_input(self.prompts.to_vec(), tx);
            serve_actor(actor, rx)?;
        } else {
            deliver_messages(actor, self.prompts)?;
        }
        Ok(())
    }

    /// The `--save` at the end, if asked for.
    pub fn finish(&self, actor: &mut Actor) -> anyhow::Result<()> {
        match self.save {
            Some(path) => save_snapshot(actor, path, self.verbose),
            None => Ok(()),
        }
    }
}

/// What the main loop waits for.
pub enum Event {
    Message(String),
    InputDone,
    Control { path: PathBuf, stop: bool, reply: Sender<String> },
}

/// Delivers one message and prints the actor's reply (if any) on its own line.
pub fn deliver_one(actor: &mut Actor, msg: &str, out: &mut impl Write) -> anyhow::Result<()> {
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
pub fn deliver_messages(actor: &mut Actor, prompts: &[String]) -> anyhow::Result<()> {
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
pub fn save_snapshot(actor: &mut Actor, path: &std::path::Path, verbose: bool) -> anyhow::Result<()> {
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

/// Feeds prompts or stdin lines into `events` from a thread.
pub fn spawn_input(prompts: Vec<String>, events: Sender<Event>) {
    std::thread::spawn(move || {
        if prompts.is_empty() {
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(l) => {
                        if events.send(Event::Message(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
        } else {
            for p in prompts {
                if events.send(Event::Message(p)).is_err() {
                    return;
                }
            }
        }
        let _ = events.send(Event::InputDone);
    });
}

/// The main loop with a control socket: messages and control requests, one at a time. Input
/// ending does not end the run: it goes on serving snapshots until one asks it to stop.
pub fn serve_actor(actor: &mut Actor, events: Receiver<Event>) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    for event in events {
        match event {
            Event::Message(msg) => deliver_one(actor, &msg, &mut out)?,
            Event::InputDone => {}
            Event::Control { path, stop, reply } => {
                let answer = match driftwood::snapshot::save(actor, &path) {
                    Ok(stats) => serde_json::json!({"ok": true, "file_bytes": stats.file_bytes}),
                    Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
                };
                let _ = reply.send(answer.to_string());
                if stop {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
