//! Shared helpers: build the example actors once, run the `driftwood` binary, write WAT guests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds every example actor (once per test process) and returns the path of `name`.wasm.
pub fn example_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = repo_root();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
            .arg(root.join("examples/Cargo.toml"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building the example actors failed ({status}); is the wasm32-wasip1 target installed?"));
        }
        Ok(root.join("examples/target/wasm32-wasip1/release"))
    });
    match dir {
        Ok(dir) => dir.join(format!("{name}.wasm")),
        Err(e) => panic!("{e}"),
    }
}

/// Result of running the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "exit code\n--- stdout:\n{}\n--- stderr:\n{}", self.stdout, self.stderr);
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn driftwood() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_driftwood"));
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `driftwood args…` with `stdin` as standard input.
pub fn run_with_stdin(args: &[&str], stdin: &str) -> Run {
    use std::io::Write;
    let mut child = driftwood().args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn driftwood");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("wait for driftwood").into()
}

pub fn run(args: &[&str]) -> Run {
    driftwood().args(args).output().expect("run driftwood").into()
}

/// A fresh temp dir for one test.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Writes `text` to `dir/name` and returns the path as a string.
pub fn write_file(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.to_string_lossy().into_owned()
}

/// The exports every actor needs, for WAT guests: a bump allocator at 1024 and a handle that
/// calls `$main` and replies with nothing.
pub const WAT_ACTOR_EXPORTS: &str = r#"
  (global $bump (mut i32) (i32.const 1024))
  (func (export "driftwood_alloc") (param $n i32) (result i32)
    (local $p i32) (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n))) (local.get $p))
  (func (export "driftwood_handle") (param i32 i32) (result i64) (call $main) (i64.const 0))
"#;

/// A WAT actor whose every message runs `body` (inside `(func $main …)`).
pub fn wat_actor(imports: &str, memory_pages: u32, body: &str) -> String {
    format!("(module {imports}\n (memory (export \"memory\") {memory_pages})\n{WAT_ACTOR_EXPORTS}\n (func $main {body}))")
}
