#!/usr/bin/env bash
# Fetches NVRTC (CUDA's run-time compiler, 13.0) from PyPI into a cache and prints its library
# directory: with it on LD_LIBRARY_PATH, `cargo test` compiles the CUDA kernels on a machine with
# no GPU and no CUDA toolkit (backend::cuda::tests::kernels_compile_with_nvrtc).
#   export LD_LIBRARY_PATH=$(bash bench/nvrtc.sh)
set -euo pipefail
DIR="$(bash "$(dirname "${BASH_SOURCE[0]}")/wheel.sh" nvidia-cuda-nvrtc 13.0.88)"
echo "$DIR/nvidia/cu13/lib"
