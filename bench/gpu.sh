#!/usr/bin/env bash
# Driftwood's GPU checks and benchmarks, for any machine with an NVIDIA GPU and a driftwood binary.
# CI has no GPU: this script is how the CUDA backend is checked and measured (BENCHMARKS.md).
#
# Usage: bench/gpu.sh [--bin PATH] [--out DIR] [--models DIR] [--stages LIST]
#   --bin     driftwood binary (default: .gpu/driftwood, else target/release/driftwood)
#   --out     where logs and JSON go (default: bench/out/gpu)
#   --models  where synthesized models are written (default: /tmp/driftwood-gpu-models)
#   --real    a real model file for parity and cross-device snapshots (default: the registry's
#             smollm2-135m when fetched)
#   --stages  comma-separated, in this order by default:
#             info,zero-copy,parity,snapshot,bench,llamacpp
#       info       nvidia-smi and the device driftwood picks
#       zero-copy  bench zero-copy --device cuda (pointer identity, memory, GEMM 128..4096)
#       parity     CPU vs CUDA logits and greedy tokens: tiny synthesized models in every
#                  weight format, then the real model (as shipped, and converted to F16); the
#                  logits actor on both devices
#       snapshot   a chat snapshot taken on the CPU continues on CUDA, and back
#       bench      bench inference --device cuda: Llama-3.2-1B shapes (BF16, F16, Q4_0) and
#                  SmolLM2-135M shapes (F16, Q4_1), synthesized; decode with the argmax on the
#                  device (tg) and with every token's logits copied to the host
#       llamacpp   llama.cpp's llama-bench (CUDA, built by bench/llamacpp-cuda.sh) on the same files
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BIN=""
OUT="$ROOT/bench/out/gpu"
MODELS=/tmp/driftwood-gpu-models
REAL=""
STAGES="info,zero-copy,parity,snapshot,bench,llamacpp"

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --real) REAL="$2"; shift 2 ;;
        --stages) STAGES="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$BIN" ]; then
    for b in "$ROOT/.gpu/driftwood" "$ROOT/target/release/driftwood"; do
        [ -x "$b" ] && BIN="$b" && break
    done
fi
[ -x "${BIN:-}" ] || { echo "gpu.sh: no driftwood binary (build with cargo build --release, or pass --bin)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu.sh: nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
if [ -z "$REAL" ]; then
    fetched="${DRIFTWOOD_MODELS:-$HOME/.cache/driftwood/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -s "$fetched" ] && REAL="$fetched"
fi
mkdir -p "$OUT" "$MODELS"
export NCCL_NVLS_ENABLE=0
FAILED=0

has() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
say() { printf '\n== %s ==\n' "$*"; }
# Runs a command, logging it; a failure is recorded but the other stages still run.
check() {
    echo "+ $*"
    if ! "$@"; then
        echo "!! failed: $*"
        FAILED=$((FAILED + 1))
    fi
}
synth() { # synth SHAPE DTYPE [LAYERS]: prints the path of a synthesized model (cached)
    local shape=$1 dtype=$2 layers=${3:-} path
    path="$MODELS/$shape${layers:+-l$layers}-$dtype.gguf"
    if [ ! -s "$path" ]; then
        "$BIN" synth --shape "$shape" --dtype "$dtype" ${layers:+--layers "$layers"} -o "$path" >&2
    fi
    echo "$path"
}

if has info; then
    say "device"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    "$BIN" --version
    date -u +%Y-%m-%dT%H:%MZ
fi

if has zero-copy; then
    say "zero-copy (bench zero-copy --device cuda)"
    "$BIN" bench zero-copy --device cuda > "$OUT/zero-copy.txt" || { echo "!! failed: bench zero-copy"; FAILED=$((FAILED + 1)); }
    cat "$OUT/zero-copy.txt"
fi

if has parity; then
    say "parity: CPU vs CUDA"
    # K-quants need rows of 256 values: the Llama-3.2-1B shapes (one layer) carry them.
    for dt in f32 f16 bf16 q8_0 q4_0 q4_1; do
        check "$BIN" bench parity -m "$(synth smollm2-135m "$dt" 2)" --device cuda --steps 16
    done
    for dt in q4_k q5_k q6_k bf16; do
        check "$BIN" bench parity -m "$(synth llama-3.2-1b "$dt" 1)" --device cuda --steps 16
    done
    if [ -n "$REAL" ] && [ -s "$REAL" ]; then
        # As shipped (8-bit activations: exact agreement is not expected, see BENCHMARKS.md), then
        # the same weights in F16, where greedy tokens must agree.
        "$BIN" bench parity -m "$REAL" --device cuda --steps 32 || echo "(the quantized real model is reported, not required to pass)"
        check "$BIN" convert "$REAL" --dtype f16 -o "$MODELS/real-f16.gguf"
        check "$BIN" bench parity -m "$MODELS/real-f16.gguf" --device cuda --steps 32
    fi
    # The logits actor picks each token in Wasm from logits the host stores into its memory:
    # on CUDA the device writes them there itself. Both devices must pick the same tokens.
    LOGITS="$ROOT/examples/target/wasm32-wasip1/release/logits.wasm"
    [ -s "$LOGITS" ] || LOGITS="$ROOT/.gpu/logits.wasm"
    if [ -s "$LOGITS" ]; then
        M="${REAL:-$(synth smollm2-135m q4_1 2)}"
        for dev in cpu cuda; do
            "$BIN" run "$LOGITS" -m "$M" --device $dev --verbose --prompt "The capital of France is" > "$OUT/logits-$dev.txt" 2> "$OUT/logits-$dev.err" || true
            grep "straight into actor memory" "$OUT/logits-$dev.err" || { echo "!! logits actor failed on $dev:"; tail -n 5 "$OUT/logits-$dev.err"; }
        done
        if [ -s "$OUT/logits-cpu.txt" ] && [ "$(grep tokens= "$OUT/logits-cpu.txt")" = "$(grep tokens= "$OUT/logits-cuda.txt")" ]; then
            echo "logits actor: CPU and CUDA pick the same tokens: $(grep tokens= "$OUT/logits-cuda.txt")"
        else
            echo "!! logits actor: CPU and CUDA differ:"; cat "$OUT/logits-cpu.txt" "$OUT/logits-cuda.txt"
            FAILED=$((FAILED + 1))
        fi
    else
        echo "!! no logits.wasm (build examples, or copy it to .gpu/logits.wasm)"
        FAILED=$((FAILED + 1))
    fi
fi

if has snapshot; then
    say "cross-device snapshots"
    CHAT="$ROOT/examples/target/wasm32-wasip1/release/chat.wasm"
    [ -s "$CHAT" ] || CHAT="$ROOT/.gpu/chat.wasm"
    MODEL="${REAL:-$(synth smollm2-135m q4_1 2)}"
    if [ -s "$CHAT" ]; then
        S="$MODELS/snap"
        mkdir -p "$S"
        # One uninterrupted conversation per device, then each split across the two devices.
        for dev in cpu cuda; do
            "$BIN" run "$CHAT" -m "$MODEL" --device $dev --prompt "/max 12" --prompt "Name a colour." --prompt "And another one?" > "$S/whole-$dev.txt"
        done
        for pair in "cpu cuda" "cuda cpu"; do
            set -- $pair
            "$BIN" run "$CHAT" -m "$MODEL" --device "$1" --prompt "/max 12" --prompt "Name a colour." --save "$S/from-$1.dws" > /dev/null
            "$BIN" restore "$S/from-$1.dws" -m "$MODEL" --device "$2" --prompt "And another one?" > "$S/$1-then-$2.txt"
            if [ "$(tail -n 1 "$S/$1-then-$2.txt")" = "$(tail -n 1 "$S/whole-$1.txt")" ]; then
                echo "snapshot $1 -> $2: the reply matches the uninterrupted $1 run"
            else
                echo "!! snapshot $1 -> $2: reply differs from the uninterrupted $1 run:"
                echo "   restored:      $(tail -n 1 "$S/$1-then-$2.txt")"
                echo "   uninterrupted: $(tail -n 1 "$S/whole-$1.txt")"
                FAILED=$((FAILED + 1))
            fi
        done
        cp "$S"/*.txt "$OUT/" 2>/dev/null || true
    else
        echo "!! no chat.wasm (build examples, or copy it to .gpu/chat.wasm)"
        FAILED=$((FAILED + 1))
    fi
fi

BENCH_MODELS=()
if has bench || has llamacpp; then
    for spec in "llama-3.2-1b bf16" "llama-3.2-1b f16" "llama-3.2-1b q4_0" "smollm2-135m f16" "smollm2-135m q4_1"; do
        set -- $spec
        BENCH_MODELS+=("$(synth "$1" "$2")")
    done
fi

if has bench; then
    say "driftwood bench inference --device cuda"
    for m in "${BENCH_MODELS[@]}"; do
        name=$(basename "$m" .gguf)
        if ! "$BIN" bench inference -m "$m" --device cuda --prefill 512 --decode 128 --repeats 5 --json > "$OUT/driftwood-$name.json"; then
            echo "!! failed: bench inference -m $m"
            FAILED=$((FAILED + 1))
            continue
        fi
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); d=r["decode"]; h=r["decode_host_logits"]; p=r["prefill"][-1]; b=r.get("boundary") or {}
print(f"{sys.argv[2]:28} pp{p["tokens"]} {p["tok_s"]:9.1f} tok/s   tg{d["tokens"]} {d["tok_s"]:7.1f} tok/s ({d["ms_per_token"]:.3f} ms, floor {r.get("floor_ms_per_token") or 0:.3f} ms; logits to host {h["tok_s"]:.1f} tok/s; boundary {b.get("overhead_percent", 0):.3f}%)")' "$OUT/driftwood-$name.json" "$name"
    done
fi

if has llamacpp; then
    say "llama.cpp llama-bench (CUDA)"
    check "$HERE/llamacpp-cuda.sh" --out "$OUT" "${BENCH_MODELS[@]}"
fi

say "done: $FAILED failure(s); logs and JSON in $OUT"
[ "$FAILED" -eq 0 ]
