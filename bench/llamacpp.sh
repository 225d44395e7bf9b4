#!/usr/bin/env bash
# CPU benchmark: llama.cpp's llama-bench vs `driftwood bench inference`, same model, same threads.
#
# Builds llama-bench from the llama-cpp-python==0.3.36 sdist (llama.cpp 0c1e57098, CPU, Release,
# GGML_NATIVE=ON) into $DRIFTWOOD_REF_DIR (default /tmp/driftwood-ref; an existing build there is
# reused, shared with tests/reference/make_reference.sh), then runs
#   llama-bench -m MODEL -t THREADS -p 5,128,512 -n 128 -r 3 -o json
#   $DRIFTWOOD_BIN bench inference --model MODEL --threads THREADS --json
# and prints one table: prefill 5/128/512 and decode, llama.cpp tok/s, driftwood tok/s, ratio.
#
# Usage: bench/llamacpp.sh [--model PATH] [--threads N] [--reps N]
#   model default: $DRIFTWOOD_MODEL (e.g. the path printed by `models/fetch.sh smollm2-135m`)
#   DRIFTWOOD_BIN default: target/release/driftwood (relative to the repo root)
# Needs: python3 + pip, cmake, g++, make (Debian: apt-get install -y cmake g++ make).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF_DIR="${DRIFTWOOD_REF_DIR:-/tmp/driftwood-ref}"
LCP_VERSION=0.3.36
MODEL="${DRIFTWOOD_MODEL:-}"
THREADS=2
REPS=3
DRIFTWOOD_BIN="${DRIFTWOOD_BIN:-$ROOT/target/release/driftwood}"

while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

if [ -z "$MODEL" ]; then
    echo "error: no model given: pass --model PATH or set DRIFTWOOD_MODEL" >&2
    echo "       (e.g. DRIFTWOOD_MODEL=\"\$(models/fetch.sh smollm2-135m)\" $0)" >&2
    exit 2
fi
[ -f "$MODEL" ] || { echo "error: model file not found: $MODEL" >&2; exit 2; }
for tool in python3 cmake g++ make; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (Debian: apt-get install -y cmake g++ make)" >&2; exit 1; }
done

# ---- llama-bench (cached build) -----------------------------------------------------------------
mkdir -p "$REF_DIR"
SDIST="$REF_DIR/llama_cpp_python-$LCP_VERSION.tar.gz"
LLAMA="$REF_DIR/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
BUILD="$REF_DIR/build-cpu"
BENCH="$BUILD/bin/llama-bench"
if [ ! -x "$BENCH" ]; then
    if [ ! -f "$SDIST" ]; then
        echo "== downloading llama-cpp-python==$LCP_VERSION sdist into $REF_DIR" >&2
        # pip may fail after the download while preparing metadata; only the tarball matters.
        python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LCP_VERSION" -d "$REF_DIR" >&2 || true
        [ -f "$SDIST" ] || { echo "error: $SDIST was not downloaded" >&2; exit 1; }
    fi
    [ -f "$LLAMA/CMakeLists.txt" ] || tar -xzf "$SDIST" -C "$REF_DIR"
    if [ ! -f "$BUILD/CMakeCache.txt" ]; then
        cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF > "$REF_DIR/cmake-configure.log" 2>&1 \
            || { tail -n 30 "$REF_DIR/cmake-configure.log" >&2; exit 1; }
    fi
    echo "== building llama-bench (about 4 minutes on 2 cores; log: $REF_DIR/build-llama-bench.log)" >&2
    cmake --build "$BUILD" -j"$(nproc)" --target llama-bench > "$REF_DIR/build-llama-bench.log" 2>&1 \
        || { tail -n 30 "$REF_DIR/build-llama-bench.log" >&2; exit 1; }
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Both engines busy-wait their worker threads: any other load on the cores (a cargo build...)
# wrecks the numbers (seen: decode 3.9 tok/s instead of ~115 under load average 6 on 2 cores).
LOAD1="$(cut -d' ' -f1 /proc/loadavg)"
if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 0.5 else 1)' "$LOAD1"; then
    echo "warning: load average is $LOAD1: other processes compete for the cores, timings will be low and noisy" >&2
fi

echo "== llama-bench -m $MODEL -t $THREADS -p 5,128,512 -n 128 -r $REPS" >&2
"$BENCH" -m "$MODEL" -t "$THREADS" -p 5,128,512 -n 128 -r "$REPS" -o json > "$TMP/llamacpp.json"

# ---- driftwood ----------------------------------------------------------------------------------
DW_NOTE=""
if [ ! -x "$DRIFTWOOD_BIN" ]; then
    DW_NOTE="driftwood binary not found at $DRIFTWOOD_BIN (build it with: cargo build --release, or set DRIFTWOOD_BIN)"
else
    echo "== $DRIFTWOOD_BIN bench inference --model $MODEL --threads $THREADS --json" >&2
    if ! "$DRIFTWOOD_BIN" bench inference --model "$MODEL" --threads "$THREADS" --json > "$TMP/driftwood.json" 2> "$TMP/driftwood.err"; then
        DW_NOTE="driftwood bench failed: $(tail -n 3 "$TMP/driftwood.err" | tr '\n' ' ')"
    elif ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$TMP/driftwood.json" 2>/dev/null; then
        DW_NOTE="driftwood bench printed no valid JSON on stdout"
    fi
fi

# ---- side-by-side table -------------------------------------------------------------------------
python3 - "$TMP/llamacpp.json" "$TMP/driftwood.json" "$DW_NOTE" "$MODEL" "$THREADS" <<'PY'
import json, os, sys
lc_path, dw_path, note, model, threads = sys.argv[1:6]

lc_rows = {}
for r in json.load(open(lc_path)):
    if r.get("n_gen", 0) == 0 and r.get("n_prompt", 0) > 0:
        lc_rows[("prefill", r["n_prompt"])] = (r["avg_ts"], r.get("stddev_ts", 0.0))
    elif r.get("n_prompt", 0) == 0 and r.get("n_gen", 0) > 0:
        lc_rows[("decode", r["n_gen"])] = (r["avg_ts"], r.get("stddev_ts", 0.0))

dw = {}
if not note:
    d = json.load(open(dw_path))
    for p in d.get("prefill", []):
        dw[("prefill", p["tokens"])] = p["tok_s"]
    dec = d.get("decode")
    if dec:
        dw["decode"] = dec["tok_s"]

any_lc = json.load(open(lc_path))
build = any_lc[0] if any_lc else {}
print(f"model: {os.path.basename(model)}   threads: {threads}   "
      f"llama.cpp {build.get('build_commit', '?')} ({build.get('cpu_info', '?')}, backend {build.get('backends', '?')})")
print(f"{'test':<14} {'llama.cpp tok/s':>18} {'driftwood tok/s':>16} {'ratio dw/lc':>12}")
rows = [("prefill", n) for n in (5, 128, 512)] + [("decode", 128)]
for key in rows:
    label = f"prefill {key[1]}" if key[0] == "prefill" else f"decode {key[1]}"
    lc = lc_rows.get(key)
    d = dw.get(key) if key[0] == "prefill" else dw.get("decode")
    lc_s = f"{lc[0]:9.2f} ± {lc[1]:5.2f}" if lc else "n/a"
    d_s = f"{d:.2f}" if d is not None else "n/a"
    ratio = f"{d / lc[0]:.2f}x" if (lc and d is not None and lc[0] > 0) else "n/a"
    print(f"{label:<14} {lc_s:>18} {d_s:>16} {ratio:>12}")
if note:
    print(f"(driftwood column empty: {note})")
elif "decode" in dw:
    dec = json.load(open(dw_path))["decode"]
    if dec.get("tokens") not in (None, 128):
        print(f"(driftwood decode measured over {dec['tokens']} tokens)")
PY
