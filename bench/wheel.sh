#!/usr/bin/env bash
# Fetches a PyPI wheel (no dependencies) once, unpacks it into a cache and prints the folder:
#   bench/wheel.sh NAME VERSION     e.g. bench/wheel.sh nvidia-cuda-nvrtc 13.0.88
# Used by nvrtc.sh and ptxas.sh to get CUDA's compilers on a machine with no CUDA toolkit.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bench/wheel.sh NAME VERSION" >&2; exit 2; }
NAME=$1
VERSION=$2
DIR="${XDG_CACHE_HOME:-$HOME/.cache}/driftwood/$NAME-$VERSION"
if [ ! -e "$DIR/.unpacked" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps "$NAME==$VERSION" -d "$tmp" >&2
    rm -rf "$DIR" && mkdir -p "$DIR"
    python3 -m zipfile -e "$tmp"/*.whl "$DIR" >&2
    touch "$DIR/.unpacked"
fi
echo "$DIR"
