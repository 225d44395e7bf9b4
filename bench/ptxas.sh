#!/usr/bin/env bash
# Registers, spills and shared memory of every CUDA kernel, without a GPU: compiles
# src/backend/cuda/kernels.cu to PTX with NVRTC as the backend does (bench/nvrtc.sh), then runs
# ptxas -v (from PyPI's nvidia-cuda-nvcc, cached) for the architecture given.
#   bench/ptxas.sh [sm_90] [NAME-FILTER]
# A persistent kernel planned at B blocks of 256 threads per SM needs at most 65536 / (256 * B)
# registers (64 for 4 blocks); the CUDA backend caps its grids at the driver's occupancy, so a
# kernel over that bound runs fewer blocks, not a second wave.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH="${1:-sm_90}"
FILTER="${2:-}"
PTXAS="$(bash "$ROOT/bench/wheel.sh" nvidia-cuda-nvcc 13.0.88)/nvidia/cu13/bin/ptxas"
chmod +x "$PTXAS"  # zipfile drops the mode bits
LIB="$(bash "$ROOT/bench/nvrtc.sh")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" python3 - "$LIB" "$ROOT/src/backend/cuda/kernels.cu" "$ARCH" "$WORK/kernels.ptx" <<'PY'
import ctypes, os, sys
lib, src, arch, out = sys.argv[1:]
nvrtc = ctypes.CDLL(os.path.join(lib, "libnvrtc.so.13"))
prog = ctypes.c_void_p()
if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), open(src, "rb").read(), b"kernels.cu", 0, None, None):
    sys.exit("ptxas.sh: nvrtcCreateProgram failed")
opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]  # as driver.rs compiles
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if rc:
    sys.exit(f"ptxas.sh: NVRTC could not compile {src}:\n{log.value.decode()}")
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
nvrtc.nvrtcGetPTX(prog, ptx)
open(out, "wb").write(ptx.value)
PY
# ptxas prints, per kernel: "Compiling entry function 'X'", then its stack/spill line, then "Used N registers".
"$PTXAS" -v --gpu-name "$ARCH" "$WORK/kernels.ptx" -o "$WORK/kernels.cubin" 2>&1 | awk -v f="$FILTER" '
    /Compiling entry function/ { match($0, /'\''[^'\'']+'\''/); name = substr($0, RSTART + 1, RLENGTH - 2); spill = "" }
    /spill stores/ { split($0, a, ","); s = a[2]; gsub(/^ +/, "", s); if (s !~ /^0 bytes/) spill = "  SPILLS: " s }
    /Used [0-9]+ registers/ { if (f == "" || index(name, f)) { match($0, /Used [0-9]+ registers/); printf "%-22s %s%s\n", name, substr($0, RSTART + 5, RLENGTH - 5), spill } }'
