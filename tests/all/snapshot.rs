//! Snapshots: freeze a live actor, thaw it, and continue exactly where it was.

use std::sync::Arc;
use std::time::Duration;

use driftwood::actor::{Runtime, RuntimeConfig};
use driftwood::backend::cpu::CpuBackend;
use driftwood::engine::sampler::SamplerConfig;
use driftwood::engine::Session;
use driftwood::snapshot::{self, format, KvRestore};

use crate::common::*;
use crate::model::default_model;

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig { max_memory: 1 << 30, timeout: Duration::from_secs(120), backend: Arc::new(CpuBackend::new(Some(2))), verbose: false }).unwrap()
}

#[test]
fn echo_state_survives_save_and_restore_via_cli() {
    let dir = temp_dir();
    let snap = dir.path().join("echo.dws");
    let echo = example_wasm("echo");
    let uninterrupted = run(&["run", echo.to_str().unwrap(), "-p", "alpha", "-p", "beta", "-p", "gamma", "-p", "!stats"]);
    uninterrupted.assert_code(0);
    run(&["run", echo.to_str().unwrap(), "-p", "alpha", "-p", "beta", "--save", snap.to_str().unwrap()]).assert_code(0);
    let resumed = run(&["restore", snap.to_str().unwrap(), "-p", "gamma", "-p", "!stats"]);
    resumed.assert_code(0);
    let want: Vec<&str> = uninterrupted.stdout.lines().skip(2).collect();
    assert_eq!(resumed.stdout.lines().collect::<Vec<_>>(), want, "stderr: {}", resumed.stderr);
    assert!(want[0] == "#3 gamma");
}

#[test]
fn restored_actor_has_identical_memory_and_globals() {
    let rt = runtime();
    let module = rt.load(&example_wasm("echo")).unwrap();
    let mut actor = rt.instantiate(&module).unwrap();
    actor.init().unwrap();
    for m in ["one", "two", "three"] {
        actor.deliver(m.as_bytes()).unwrap();
    }
    let dir = temp_dir();
    let path = dir.path().join("e.dws");
    let stats = snapshot::save(&mut actor, &path).unwrap();
    assert!(stats.stored_memory_bytes < stats.memory_bytes, "zero pages are not stored: {stats:?}");
    let before = snapshot::capture(&mut actor).unwrap();
    let (mut thawed, kv) = snapshot::thaw(&rt, &path, format::read(&path).unwrap(), None, false).unwrap();
    assert_eq!(kv, KvRestore::None);
    let after = snapshot::capture(&mut thawed).unwrap();
    assert_eq!(after.memory, before.memory);
    assert!(!before.meta.globals.is_empty(), "echo has at least __stack_pointer");
    assert_eq!(after.meta.globals, before.meta.globals);
    // And both continue identically.
    assert_eq!(actor.deliver(b"four").unwrap(), thawed.deliver(b"four").unwrap());
    assert_eq!(actor.deliver(b"!history").unwrap(), thawed.deliver(b"!history").unwrap());
}

/// Same device, same model: after a restore, generation reproduces the uninterrupted run with
/// identical tokens and bit-identical logits, greedy and seeded sampling alike.
#[test]
fn restore_then_generate_is_bit_identical() {
    let Some((model, tok)) = default_model() else { return };
    for sampler in [SamplerConfig::default(), SamplerConfig { temperature: 0.9, top_k: 40, top_p: 0.95, seed: 1234, ..Default::default() }] {
        let rt = runtime();
        let module = rt.load(&example_wasm("chat")).unwrap();
        let mut a = rt.instantiate(&module).unwrap();
        a.attach_session(Session::new(model.clone(), tok.clone(), 512, sampler.clone()).unwrap());
        a.init().unwrap();
        a.deliver(b"/max 8").unwrap();
        a.deliver(b"Hi!").unwrap();
        let dir = temp_dir();
        let path = dir.path().join("chat.dws");
        snapshot::save(&mut a, &path).unwrap();
        let fresh = Session::new(model.clone(), tok.clone(), 512, SamplerConfig::default()).unwrap();
        let (mut b, kv) = snapshot::thaw(&rt, &path, format::read(&path).unwrap(), Some(fresh), false).unwrap();
        let n = a.session().unwrap().kv_len();
        assert_eq!(kv, KvRestore::Imported { tokens: n });
        assert_eq!(b.session().unwrap().tokens, a.session().unwrap().tokens);
        assert_eq!(b.memory_bytes(), a.memory_bytes());
        for step in 0..12 {
            let (sa, sb) = (a.session_mut().unwrap(), b.session_mut().unwrap());
            let ta = sa.generate_step().unwrap();
            let tb = sb.generate_step().unwrap();
            assert_eq!(ta, tb, "step {step}, sampler {sampler:?}");
            let (la, lb) = (a.session().unwrap().logits().to_vec(), b.session().unwrap().logits().to_vec());
            assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()), "logits differ at step {step}");
            if matches!(ta, Some((_, true))) {
                break;
            }
        }
        // The actor itself continues the conversation identically.
        assert_eq!(a.deliver(b"What is 2+2?").unwrap(), b.deliver(b"What is 2+2?").unwrap());
    }
}

#[test]
fn chat_restored_from_cli_continues_like_the_uninterrupted_run() {
    if default_model().is_none() {
        return;
    }
    let chat = example_wasm("chat");
    let dir = temp_dir();
    let snap = dir.path().join("c.dws");
    let full = run(&["run", chat.to_str().unwrap(), "-p", "/max 16", "-p", "Hi!", "-p", "What is 2+2?"]);
    full.assert_code(0);
    run(&["run", chat.to_str().unwrap(), "-p", "/max 16", "-p", "Hi!", "--save", snap.to_str().unwrap()]).assert_code(0);
    let resumed = run(&["restore", snap.to_str().unwrap(), "-p", "What is 2+2?"]);
    resumed.assert_code(0);
    assert_eq!(resumed.stdout, full.stdout.lines().skip(2).map(|l| format!("{l}\n")).collect::<String>(), "stderr: {}", resumed.stderr);
    let inspect = run(&["inspect", snap.to_str().unwrap(), "--json"]);
    inspect.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(v["meta"]["model"]["name"], "smollm2-135m");
    assert!(v["meta"]["kv_len"].as_u64().unwrap() > 30);
}

#[test]
fn truncated_or_corrupt_snapshot_is_a_clear_error() {
    let dir = temp_dir();
    let snap = dir.path().join("e.dws");
    run(&["run", example_wasm("echo").to_str().unwrap(), "-p", "x", "--save", snap.to_str().unwrap()]).assert_code(0);
    let bytes = std::fs::read(&snap).unwrap();
    for (name, data) in [("cut.dws", bytes[..bytes.len() * 2 / 3].to_vec()), ("tiny.dws", bytes[..5].to_vec()), ("junk.dws", vec![0xff; 4096])] {
        let p = write_file(dir.path(), name, data);
        let r = run(&["restore", &p, "-p", "y"]);
        r.assert_code(2);
        assert!(r.stderr.contains(name), "{name}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

#[test]
fn killing_a_save_never_damages_the_previous_snapshot() {
    let dir = temp_dir();
    let snap = dir.path().join("g.dws");
    let gemm = example_wasm("gemm");
    run(&["run", gemm.to_str().unwrap(), "-p", "8", "--save", snap.to_str().unwrap()]).assert_code(0);
    let original = std::fs::read(&snap).unwrap();
    // A big actor (three 1500×1500 f32 matrices of random data) takes a while to save; kill it at
    // different moments and check the file under the final name is always a whole snapshot.
    for delay_ms in [150u64, 300, 450, 600, 900] {
        let mut child = driftwood()
            .args(["run", gemm.to_str().unwrap(), "-p", "1500", "--save", snap.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let now = std::fs::read(&snap).unwrap();
        if now != original {
            format::read(&snap).expect("a replaced snapshot must be complete");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert!(leftovers.iter().any(|n| n == "g.dws"), "{leftovers:?}");
    }
    // A killed save may leave a temp file; the next successful save to the name removes it (its
    // writer is gone), plus one planted for a process that cannot exist.
    std::fs::write(dir.path().join(".g.dws.tmp-999999999-0"), b"junk").unwrap();
    run(&["run", gemm.to_str().unwrap(), "-p", "8", "--save", snap.to_str().unwrap()]).assert_code(0);
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "stale temp files survive a later save: {names:?}");
    format::read(&snap).expect("the last save is complete");
}

#[test]
fn live_actor_is_frozen_through_its_control_socket() {
    use std::io::{BufRead, BufReader, Write};
    let dir = temp_dir();
    let sock = dir.path().join("echo.sock");
    let (s1, s2) = (dir.path().join("one.dws"), dir.path().join("two.dws"));
    let mut child = driftwood()
        .args(["run", example_wasm("echo").to_str().unwrap(), "--control", sock.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    writeln!(stdin, "alpha").unwrap();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "#1 alpha\n");
    run(&["snapshot", sock.to_str().unwrap(), "-o", s1.to_str().unwrap()]).assert_code(0);
    writeln!(stdin, "beta").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "#2 beta\n", "the actor keeps running after a snapshot");
    drop(stdin);
    run(&["snapshot", sock.to_str().unwrap(), "-o", s2.to_str().unwrap(), "--stop"]).assert_code(0);
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the socket file is removed on exit");
    assert_eq!(run(&["restore", s1.to_str().unwrap(), "-p", "beta"]).stdout, "#2 beta\n");
    assert_eq!(run(&["restore", s2.to_str().unwrap(), "-p", "gamma"]).stdout, "#3 gamma\n");
    let r = run(&["snapshot", sock.to_str().unwrap(), "-o", s1.to_str().unwrap()]);
    r.assert_code(2);
    assert!(r.stderr.contains("cannot connect"), "{}", r.stderr);
}
