#!/usr/bin/env bash
# GPU benchmark baseline: builds llama.cpp's llama-bench with CUDA (sm_90, H100/H200) from the
# trimmed source made by bench/llamacpp-src.sh, then runs, for each MODEL,
#   llama-bench -m MODEL -ngl 99 -fa 1 -p 512 -n 128 -r REPS -o json -oe md
# saving OUT/NAME.json (stdout) and OUT/NAME.md (stderr: the markdown table) per model.
# Runs offline from the repo root. An unchanged tarball reuses the build in $LLAMACPP_CUDA_DIR.
#
# Usage: bench/llamacpp-cuda.sh [--out DIR] [--reps N] [--build-only] [MODEL.gguf ...]
#   --out DIR       where results go (default bench/out/llamacpp-cuda)
#   --reps N        llama-bench repetitions (default 5)
#   --build-only    build llama-bench, run nothing
#   --src TARBALL   default .gpu/llama.cpp-src.tar.xz
# Env:   LLAMACPP_CUDA_DIR  unpack/build directory (default /tmp/llamacpp-cuda)
# Needs: nvcc (CUDA >= 12), cmake >= 3.18, g++, ninja (else make), xz or python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${LLAMACPP_CUDA_DIR:-/tmp/llamacpp-cuda}"
SRC_TAR="$ROOT/.gpu/llama.cpp-src.tar.xz"
OUT="$ROOT/bench/out/llamacpp-cuda"
REPS=5
BUILD_ONLY=0
MODELS=()

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --src) SRC_TAR="$2"; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "unknown argument: $1" >&2; exit 2 ;;
        *) MODELS+=("$1"); shift ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }
[ "$BUILD_ONLY" = 1 ] || [ ${#MODELS[@]} -gt 0 ] || die "no model given (usage: $0 [--out DIR] MODEL.gguf ...; or --build-only)"
for m in "${MODELS[@]}"; do [ -f "$m" ] || die "model file not found: $m"; done
[ -f "$SRC_TAR" ] || die "$SRC_TAR not found: run bench/llamacpp-src.sh on a machine with internet first"

export NCCL_NVLS_ENABLE=0
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="$PATH:/usr/local/cuda/bin"
command -v nvcc >/dev/null || die "nvcc not found (not on PATH nor in /usr/local/cuda/bin)"
for tool in cmake g++; do command -v "$tool" >/dev/null || die "$tool not found"; done
GEN=Ninja; command -v ninja >/dev/null || { GEN="Unix Makefiles"; echo "note: ninja not found, using make"; }

# ---- 1. unpack (only when the tarball changed) ------------------------------------------------
SRC="$WORK/llama.cpp" BUILD="$WORK/build"
STAMP="$(sha256sum "$SRC_TAR" | cut -d' ' -f1)"
if [ "$(cat "$WORK/stamp" 2>/dev/null)" != "$STAMP" ]; then
    rm -rf "$WORK" && mkdir -p "$WORK"
    if command -v xz >/dev/null; then tar -xJf "$SRC_TAR" -C "$WORK"
    else python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$SRC_TAR" "$WORK"; fi
    echo "$STAMP" > "$WORK/stamp"
fi
COMMIT="$(grep -o 'commit [0-9a-f]*' "$SRC/DRIFTWOOD-SOURCE" | cut -d' ' -f2)"
echo "== llama.cpp $COMMIT; $(nvcc --version | grep -o 'release [0-9.]*'); $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "note: nvidia-smi found no GPU"

# ---- 2. configure + build llama-bench ----------------------------------------------------------
# Kernels are upstream's defaults for sm_90 (FA on, FA vec quants default: f16 KV uses f16-f16);
# NCCL (multi-GPU only), OpenSSL, ccache and non-bench targets are off.
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$SRC" -B "$BUILD" -G "$GEN" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_COMMIT="$COMMIT" > "$WORK/configure.log" 2>&1 \
        || { tail -n 40 "$WORK/configure.log" >&2; rm -f "$BUILD/CMakeCache.txt"; die "cmake configure failed (log: $WORK/configure.log)"; }
fi
echo "== building llama-bench with $(nproc) jobs (log: $WORK/build.log)"
T0=$SECONDS
cmake --build "$BUILD" --target llama-bench -j"$(nproc)" > "$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; die "build failed (log: $WORK/build.log)"; }
BENCH="$BUILD/bin/llama-bench"
echo "== build time: $((SECONDS - T0)) s -> $BENCH"
[ "$BUILD_ONLY" = 1 ] && exit 0

# ---- 3. benchmarks -----------------------------------------------------------------------------
mkdir -p "$OUT"
for m in "${MODELS[@]}"; do
    name="$(basename "$m" .gguf)"
    echo "== $name: llama-bench -ngl 99 -fa 1 -p 512 -n 128 -r $REPS"
    "$BENCH" -m "$m" -ngl 99 -fa 1 -p 512 -n 128 -r "$REPS" -o json -oe md \
        > "$OUT/$name.json" 2> "$OUT/$name.md" || { cat "$OUT/$name.md" >&2; die "llama-bench failed on $m"; }
    grep '^|' "$OUT/$name.md" || cat "$OUT/$name.md"
done
echo "== results in $OUT"
