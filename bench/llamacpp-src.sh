#!/usr/bin/env bash
# Packs a trimmed llama.cpp source tree for building llama-bench with CUDA on a GPU machine
# (no internet there; what travels is limited to 64 MiB, Driftwood's binary included).
#
# Source: the sdist of llama-cpp-python==0.3.36 (llama.cpp 0c1e57098 in vendor/llama.cpp),
# downloaded from PyPI into $DRIFTWOOD_REF_DIR (default /tmp/driftwood-ref, shared with
# tests/reference/make_reference.sh and bench/llamacpp.sh; an existing download is reused).
# Kept: CMake files, cmake/, include/, src/, common/, vendor/ (without mtmd's miniaudio, stb,
# hash), ggml/ with only the CPU and CUDA backends, tools/llama-bench. tools/CMakeLists.txt,
# vendor/CMakeLists.txt and the top CMakeLists.txt are patched (sed) to match.
#
# Usage: bench/llamacpp-src.sh [--out PATH]   (default: .gpu/llama.cpp-src.tar.xz in the repo)
# The tarball unpacks to llama.cpp/ (with DRIFTWOOD-SOURCE naming version and commit);
# bench/llamacpp-cuda.sh builds it on the GPU machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF_DIR="${DRIFTWOOD_REF_DIR:-/tmp/driftwood-ref}"
LCP_VERSION=0.3.36
OUT="$ROOT/.gpu/llama.cpp-src.tar.xz"

while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
OUT="$(realpath -m "$OUT")"

# ---- 1. the sdist (same approach as tests/reference/make_reference.sh) ----------------------
SDIST="$REF_DIR/llama_cpp_python-$LCP_VERSION.tar.gz"
mkdir -p "$REF_DIR"
if [ ! -f "$SDIST" ]; then
    echo "== downloading llama-cpp-python==$LCP_VERSION sdist into $REF_DIR"
    # pip may fail after the download while preparing metadata; only the tarball matters.
    python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LCP_VERSION" -d "$REF_DIR" || true
    [ -f "$SDIST" ] || { echo "error: $SDIST was not downloaded" >&2; exit 1; }
fi

# ---- 2. copy the parts llama-bench needs into a staging tree --------------------------------
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
PREFIX="llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
KEEP=(CMakeLists.txt LICENSE cmake include src common vendor ggml tools/CMakeLists.txt tools/llama-bench)
tar -xzf "$SDIST" -C "$STAGE" "${KEEP[@]/#/$PREFIX/}" "llama_cpp_python-$LCP_VERSION/CHANGELOG.md"
COMMIT="$(grep -o 'ggml-org/llama.cpp@[0-9a-f]*' "$STAGE/llama_cpp_python-$LCP_VERSION/CHANGELOG.md" | head -1 | cut -d@ -f2)"
mv "$STAGE/$PREFIX" "$STAGE/llama.cpp"
cd "$STAGE/llama.cpp"

# ggml: only the CPU and CUDA backends (the others are add_subdirectory'd only when enabled).
find ggml/src -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu ! -name ggml-cuda -exec rm -rf {} +
rm -rf vendor/miniaudio vendor/stb vendor/hash      # used by tools/mtmd only
# CMake: no tests/examples/pocs/app/mtmd subdirectories; tools/ builds llama-bench only.
sed -i -E '/^\s*add_subdirectory\((tests|examples|pocs|app|tools\/mtmd)\)/d' CMakeLists.txt
sed -i -E '/add_subdirectory\((miniaudio|stb|hash)\)/d' vendor/CMakeLists.txt
sed -i -E '/add_subdirectory\(/{/llama-bench/!d}' tools/CMakeLists.txt
printf 'llama-cpp-python %s sdist (PyPI), llama.cpp commit %s, trimmed by bench/llamacpp-src.sh\n' \
    "$LCP_VERSION" "$COMMIT" > DRIFTWOOD-SOURCE

# ---- 3. the tarball (reproducible: sorted, no owners, fixed mtime) --------------------------
mkdir -p "$(dirname "$OUT")"
tar -C "$STAGE" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - llama.cpp \
    | xz -9 -T2 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "== $OUT: $(du -h "$OUT" | cut -f1) ($(stat -c %s "$OUT") bytes; llama.cpp $COMMIT)"
