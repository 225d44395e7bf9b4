#!/usr/bin/env bash
# Builds and runs the product microbenchmark on a GPU machine (nvcc, sm_90).
set -euo pipefail
cd "$(dirname "$0")"
out=${OUT:-/tmp}
nvcc -O3 -arch=sm_90 -std=c++17 -Xptxas -v -o /tmp/gemv_bench gemv_bench.cu >"$out/ptxas.txt" 2>&1 || { grep -E "error" "$out/ptxas.txt" | head -30; exit 1; }
grep -E "Compiling entry|Used" "$out/ptxas.txt" | paste - - | grep -E "dense_|matvec_f16|ffn_f16" | sed -E 's/ptxas info *: //g' | cut -c1-200 | head -20
/tmp/gemv_bench | tee "$out/gemv.txt"
