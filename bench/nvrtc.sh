#!/usr/bin/env bash
# Fetches NVRTC (CUDA's run-time compiler, 13.0) from PyPI into a cache and prints its library
# directory: with it on LD_LIBRARY_PATH, `cargo test` compiles the CUDA kernels on a machine with
# no GPU and no CUDA toolkit (backend::cuda::tests::kernels_compile_with_nvrtc).
#   export LD_LIBRARY_PATH=$(bash bench/nvrtc.sh)
set -euo pipefail
VERSION=13.0.88
DIR="${XDG_CACHE_HOME:-$HOME/.cache}/driftwood/nvrtc-$VERSION"
LIB="$DIR/nvidia/cu13/lib"
if [ ! -e "$LIB/libnvrtc.so.13" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps "nvidia-cuda-nvrtc==$VERSION" -d "$tmp" >&2
    mkdir -p "$DIR"
    python3 -m zipfile -e "$tmp"/nvidia_cuda_nvrtc-*.whl "$DIR" >&2
fi
echo "$LIB"
