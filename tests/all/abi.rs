//! ABI bounds checks: malicious or buggy guest pointers trap the actor with a clear message.

use crate::common::*;

const GEMM_IMPORT: &str = r#"(import "driftwood" "gemm" (func $gemm (param i32 i32 i32 i32 i32 i32) (result i32)))"#;
const LOG_IMPORT: &str = r#"(import "driftwood" "log" (func $log (param i32 i32 i32)))"#;

fn run_wat(name: &str, wat: &str) -> Run {
    let dir = temp_dir();
    let path = write_file(dir.path(), name, wat);
    run(&["run", &path, "-p", "go"])
}

fn gemm_call(a: u32, b: u32, c: u32, m: i32, n: i32, k: i32) -> String {
    format!("(drop (call $gemm (i32.const {a}) (i32.const {b}) (i32.const {c}) (i32.const {m}) (i32.const {n}) (i32.const {k})))")
}

#[test]
fn gemm_with_operand_past_end_of_memory_traps_naming_the_range() {
    // One page = 65536 bytes; B (4×4 f32 = 64 bytes) starts 32 bytes before the end.
    let r = run_wat("oob.wat", &wat_actor(GEMM_IMPORT, 1, &gemm_call(4096, 65504, 8192, 4, 4, 4)));
    r.assert_code(1);
    assert!(r.stderr.contains("driftwood::gemm: `b` range 0xffe0..0x10020 (64 bytes) is outside linear memory of 65536 bytes"), "{}", r.stderr);
}

#[test]
fn gemm_with_negative_dimension_traps_instead_of_reading_wild_memory() {
    let r = run_wat("neg.wat", &wat_actor(GEMM_IMPORT, 1, &gemm_call(0, 4096, 8192, -1, 4, 4)));
    r.assert_code(1);
    assert!(r.stderr.contains("driftwood::gemm: `a`"), "{}", r.stderr);
}

#[test]
fn gemm_with_misaligned_operand_traps() {
    let r = run_wat("align.wat", &wat_actor(GEMM_IMPORT, 1, &gemm_call(4098, 8192, 16384, 2, 2, 2)));
    r.assert_code(1);
    assert!(r.stderr.contains("driftwood::gemm: `a` at 0x1002 is not 4-byte aligned"), "{}", r.stderr);
}

#[test]
fn gemm_writing_over_its_input_traps() {
    let r = run_wat("overlap.wat", &wat_actor(GEMM_IMPORT, 1, &gemm_call(4096, 8192, 4100, 4, 4, 4)));
    r.assert_code(1);
    assert!(r.stderr.contains("driftwood::gemm: output `c` overlaps input `a`"), "{}", r.stderr);
}

#[test]
fn gemm_with_zero_dimension_returns_invalid_argument_status() {
    // Status -4 (INVALID_ARGUMENT) is stored at 0 and the actor replies with nothing; check via
    // a guest that traps unless the status matches, so the assertion runs inside the guest.
    let body =
        "(if (i32.ne (call $gemm (i32.const 0) (i32.const 64) (i32.const 128) (i32.const 0) (i32.const 4) (i32.const 4)) (i32.const -4)) (then unreachable))";
    let r = run_wat("zero.wat", &wat_actor(GEMM_IMPORT, 1, body));
    r.assert_code(0);
}

#[test]
fn gemm_in_wat_guest_computes_correct_product() {
    // A = [[1,2],[3,4]] at 0, B = [[5,6],[7,8]] at 16, C at 32; the guest checks C = [[19,22],[43,50]].
    let data = r#"(data (i32.const 0) "\00\00\80\3f\00\00\00\40\00\00\40\40\00\00\80\40\00\00\a0\40\00\00\c0\40\00\00\e0\40\00\00\00\41")"#;
    let check = |off: u32, val: f32| format!("(if (f32.ne (f32.load (i32.const {off})) (f32.const {val})) (then unreachable))");
    let body = format!(
        "(if (call $gemm (i32.const 0) (i32.const 16) (i32.const 32) (i32.const 2) (i32.const 2) (i32.const 2)) (then unreachable)) {} {} {} {}",
        check(32, 19.0),
        check(36, 22.0),
        check(40, 43.0),
        check(44, 50.0)
    );
    let wat = wat_actor(GEMM_IMPORT, 1, &body).replacen("(memory (export \"memory\") 1)", &format!("(memory (export \"memory\") 1) {data}"), 1);
    run_wat("product.wat", &wat).assert_code(0);
}

#[test]
fn log_with_invalid_utf8_traps() {
    let wat = wat_actor(LOG_IMPORT, 1, "(call $log (i32.const 2) (i32.const 0) (i32.const 4))").replacen(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 1) (data (i32.const 0) \"ok\\ff\\fe\")",
        1,
    );
    let r = run_wat("utf8.wat", &wat);
    r.assert_code(1);
    assert!(r.stderr.contains("driftwood::log: `message` is not valid UTF-8 at byte 2"), "{}", r.stderr);
}

#[test]
fn log_prints_the_message_tagged_with_the_actor() {
    let wat = wat_actor(LOG_IMPORT, 1, "(call $log (i32.const 1) (i32.const 0) (i32.const 5))").replacen(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 1) (data (i32.const 0) \"hello\")",
        1,
    );
    let r = run_wat("log.wat", &wat);
    r.assert_code(0);
    assert!(r.stderr.contains("[log.wat] warn: hello"), "{}", r.stderr);
}
