//! The actor runtime: shared region, Wasmtime memory, message delivery, failure modes.

use std::sync::Arc;
use std::time::Duration;

use driftwood::actor::{Runtime, RuntimeConfig};
use driftwood::backend::cpu::CpuBackend;

use crate::common::*;

fn runtime(max_memory: usize) -> Runtime {
    Runtime::new(RuntimeConfig { max_memory, timeout: Duration::from_secs(30), backend: Arc::new(CpuBackend::new(Some(1))), verbose: false }).unwrap()
}

#[test]
fn memory_data_ptr_is_region_base_before_and_after_growth() {
    let rt = runtime(64 << 20);
    let wat = wat_actor("", 2, "(drop (memory.grow (i32.const 100)))");
    let module = rt.compile("grow.wat".into(), "grow.wat".into(), wat.into_bytes()).unwrap();
    let mut actor = rt.instantiate(&module).unwrap();
    let base = actor.region().base();
    assert_eq!(actor.memory_ptr(), base);
    assert_eq!(actor.memory_size(), 2 * 65536);
    assert_eq!(actor.region().committed(), 2 * 65536);
    actor.deliver(b"grow please").unwrap();
    assert_eq!(actor.memory_size(), 102 * 65536, "the guest's memory.grow took effect");
    assert_eq!(actor.memory_ptr(), base, "growth moved the memory");
    assert_eq!(actor.region().base(), base);
    assert_eq!(actor.region().committed(), 102 * 65536);
    // The bytes the host sees through the region are the guest's bytes.
    // SAFETY: offset 1024 is inside the committed memory; the actor is idle.
    let at_region = unsafe { std::slice::from_raw_parts(base.add(1024), 11) };
    assert_eq!(at_region, b"grow please");
}

#[test]
fn growth_past_max_memory_returns_minus_one_in_the_guest() {
    let rt = runtime(4 << 20);
    let mut actor = rt.instantiate(&rt.load(&example_wasm("echo")).unwrap()).unwrap();
    actor.init().unwrap();
    let before = actor.memory_size();
    let reply = String::from_utf8(actor.deliver(b"!grow 1000").unwrap()).unwrap();
    assert_eq!(reply, "grow=-1");
    assert_eq!(actor.memory_size(), before);
    let reply = String::from_utf8(actor.deliver(b"!grow 1").unwrap()).unwrap();
    assert_eq!(reply, format!("grow={}", before / 65536));
    // The actor still works after the refused growth.
    assert_eq!(String::from_utf8(actor.deliver(b"hi").unwrap()).unwrap(), "#1 hi");
}

#[test]
fn growth_past_max_memory_via_cli_is_not_a_crash() {
    let r = run(&["run", example_wasm("echo").to_str().unwrap(), "--max-memory", "2MiB", "-p", "!grow 64", "-p", "a"]);
    r.assert_code(0);
    assert_eq!(r.stdout, "grow=-1\n#1 a\n");
}

#[test]
fn echo_keeps_state_across_stdin_messages() {
    let r = run_with_stdin(&["run", example_wasm("echo").to_str().unwrap()], "hello\nwörld 🦀\n!stats\n");
    r.assert_code(0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[..2], ["#1 hello", "#2 wörld 🦀"]);
    assert!(lines[2].starts_with("count=2 ") && lines[2].ends_with(&format!("bytes={}", 5 + "wörld 🦀".len())), "{}", lines[2]);
}

#[test]
fn gemm_actor_reports_zero_errors_on_random_inputs() {
    let r = run(&["run", example_wasm("gemm").to_str().unwrap(), "-p", "", "-p", "64 48 80", "-p", "200"]);
    r.assert_code(0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    for (line, (dims, total)) in lines.iter().zip([("128x128x128", 16384), ("64x48x80", 3072), ("200x200x200", 40000)]) {
        assert!(line.starts_with(&format!("gemm {dims}: errors=0/{total} ")), "{line}");
    }
}

#[test]
fn runaway_actor_is_stopped_by_the_timeout_with_exit_1() {
    let started = std::time::Instant::now();
    let r = run(&["run", example_wasm("echo").to_str().unwrap(), "--timeout", "500ms", "-p", "before", "-p", "!spin"]);
    r.assert_code(1);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(r.stdout, "#1 before\n");
    assert!(r.stderr.contains("exceeded the 0.5s timeout in driftwood_handle"), "{}", r.stderr);
}

#[test]
fn trap_in_actor_exits_1_without_a_host_panic() {
    let r = run(&["run", example_wasm("echo").to_str().unwrap(), "-p", "!trap", "-p", "never delivered"]);
    r.assert_code(1);
    assert!(r.stderr.contains("echo.wasm: trapped in driftwood_handle"), "{}", r.stderr);
    assert!(r.stderr.contains("unreachable"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
fn file_that_is_not_wasm_is_rejected_with_exit_2() {
    let dir = temp_dir();
    let path = write_file(dir.path(), "notes.wasm", "these are not the bytes you are looking for");
    let r = run(&["run", &path]);
    r.assert_code(2);
    assert!(r.stderr.contains("notes.wasm: not a valid WebAssembly module"), "{}", r.stderr);
}

#[test]
fn module_missing_actor_exports_is_rejected_naming_them() {
    let dir = temp_dir();
    let path = write_file(dir.path(), "bare.wat", r#"(module (memory (export "memory") 1) (func (export "run")))"#);
    let r = run(&["run", &path]);
    r.assert_code(2);
    assert!(
        r.stderr.contains("bare.wat: not a driftwood actor: missing exports `driftwood_handle` (i32, i32) -> (i64), `driftwood_alloc` (i32) -> (i32)"),
        "{}",
        r.stderr
    );
}

#[test]
fn module_with_foreign_imports_is_rejected() {
    let dir = temp_dir();
    let wat = wat_actor(r#"(import "env" "mystery" (func))"#, 1, "");
    let path = write_file(dir.path(), "foreign.wat", wat);
    let r = run(&["run", &path]);
    r.assert_code(2);
    assert!(r.stderr.contains("imports `env::mystery`"), "{}", r.stderr);
}

#[test]
fn missing_actor_file_is_an_io_error_with_exit_2() {
    let r = run(&["run", "/nonexistent/actor.wasm"]);
    r.assert_code(2);
    assert!(r.stderr.contains("/nonexistent/actor.wasm: cannot read"), "{}", r.stderr);
}

#[test]
fn bench_zero_copy_reports_identity_and_correct_results() {
    let r = run(&["bench", "zero-copy", "--sizes", "64,128", "--min-time", "10ms", "--json"]);
    r.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["pointers"]["identical"], true, "{}", r.stdout);
    assert_eq!(v["pointers"]["region_base"], v["pointers"]["memory_data_ptr"]);
    let rows = v["gemm"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row["errors_zero_copy"], 0, "{row}");
        assert_eq!(row["errors_copy"], 0, "{row}");
        assert!(row["zero_copy_ms"].as_f64().unwrap() > 0.0);
    }
    // Copying 16 MB must cost about 16 MB of RSS; sharing must cost (almost) nothing.
    let zc = v["rss"]["zero_copy_delta"].as_i64().unwrap();
    let cp = v["rss"]["copy_delta"].as_i64().unwrap();
    assert!(zc < 1 << 20, "zero-copy RSS delta {zc}");
    assert!(cp > 15 << 20, "copy RSS delta {cp}");
}

/// `--device cuda` on a machine without CUDA is a clear error (exit 2) naming the device and
/// what is missing; `--device auto` falls back to the CPU silently and runs.
#[test]
fn cuda_without_a_driver_is_a_clear_error_and_auto_falls_back_to_the_cpu() {
    if driftwood::backend::cuda::unavailable_reason(0).is_none() {
        eprintln!("skipped: this machine has a CUDA device");
        return;
    }
    let echo = example_wasm("echo");
    let echo = echo.to_str().unwrap();
    let r = run(&["run", echo, "--device", "cuda", "--prompt", "hi"]);
    r.assert_code(2);
    assert!(r.stderr.contains("cuda:0 is not available"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
    let r = run(&["run", echo, "--device", "cuda:7", "--prompt", "hi"]);
    r.assert_code(2);
    assert!(r.stderr.contains("cuda:7 is not available"), "{}", r.stderr);
    let r = run(&["run", echo, "--device", "auto", "--prompt", "hi"]);
    r.assert_code(0);
    assert!(r.stdout.contains("hi"), "{}", r.stdout);
    let r = run(&["run", echo, "--device", "gpu", "--prompt", "hi"]);
    r.assert_code(2);
    assert!(r.stderr.contains("expected auto, cpu, cpu:ISA, cuda or cuda:N"), "{}", r.stderr);
    let r = run(&["run", echo, "--device", "cpu:avx9", "--prompt", "hi"]);
    r.assert_code(2);
    assert!(r.stderr.contains("unknown CPU level 'avx9'"), "{}", r.stderr);
}
