//! The control socket of `driftwood run --control PATH`, and `driftwood snapshot`, its client.
//!
//! The running actor serves one JSON request per connection, always between two messages (the
//! main thread owns the actor; the listener only forwards requests to it):
//! `{"op": "snapshot", "path": "/abs/out.dws", "stop": false}` → `{"ok": true, "file_bytes": …}`
//! or `{"ok": false, "error": "…"}`. With `"stop": true` the actor exits after the snapshot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use clap::Args;

use super::session::Event;

/// Removes the socket file when the run ends.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket and forwards requests to `events`.
pub fn listen(path: &Path, events: Sender<Event>) -> anyhow::Result<ControlSocket> {
    if path.exists() {
        // A stale socket from a crashed run is replaced; a live one refuses the connection test.
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!("{}: another driftwood is already listening there", path.display());
        }
        std::fs::remove_file(path).map_err(|e| anyhow::anyhow!("{}: cannot remove stale socket: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| anyhow::anyhow!("{}: cannot listen: {e}", path.display()))?;
    std::thread::Builder::new().name("driftwood-control".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let events = events.clone();
            let _ = serve(conn, events);
        }
    })?;
    Ok(ControlSocket { path: path.to_owned() })
}

fn serve(conn: UnixStream, events: Sender<Event>) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(conn.try_clone()?).read_line(&mut line)?;
    let mut out = conn;
    let reply = match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(v) if v["op"] == "snapshot" && v["path"].is_string() => {
            let (tx, rx) = mpsc::channel();
            let path = PathBuf::from(v["path"].as_str().unwrap_or_default());
            let stop = v["stop"].as_bool().unwrap_or(false);
            if events.send(Event::Control { path, stop, reply: tx }).is_err() {
                serde_json::json!({"ok": false, "error": "the actor has exited"}).to_string()
            } else {
                rx.recv().unwrap_or_else(|_| serde_json::json!({"ok": false, "error": "the actor exited before answering"}).to_string())
            }
        }
        _ => serde_json::json!({"ok": false, "error": format!("bad request {:?}: expected {{\"op\":\"snapshot\",\"path\":…}}", line.trim())}).to_string(),
    };
    writeln!(out, "{reply}")
}

/// Freeze a running actor through its control socket (`driftwood run --control SOCKET`).
///
/// The actor is captured between two messages and keeps running unless --stop is given.
///
/// Example:
///   driftwood run chat.wasm --control /tmp/chat.sock &
///   driftwood snapshot /tmp/chat.sock -o chat.dws
#[derive(Args)]
pub struct SnapshotArgs {
    /// The control socket of a running actor
    pub socket: PathBuf,
    /// Where to write the snapshot (.dws)
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Stop the actor after the snapshot
    #[arg(long)]
    pub stop: bool,
}

impl SnapshotArgs {
    pub fn execute(self) -> anyhow::Result<()> {
        let output = if self.output.is_absolute() { self.output.clone() } else { std::env::current_dir()?.join(&self.output) };
        let mut conn = UnixStream::connect(&self.socket)
            .map_err(|e| anyhow::anyhow!("{}: cannot connect (is `driftwood run --control` running?): {e}", self.socket.display()))?;
        writeln!(conn, "{}", serde_json::json!({"op": "snapshot", "path": output, "stop": self.stop}))?;
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}: bad reply {line:?}: {e}", self.socket.display()))?;
        if v["ok"] != true {
            anyhow::bail!("{}: {}", self.socket.display(), v["error"].as_str().unwrap_or("snapshot failed"));
        }
        eprintln!("driftwood: saved {} ({} bytes)", output.display(), v["file_bytes"]);
        Ok(())
    }
}
