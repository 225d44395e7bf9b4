B=.gpu/driftwood
export DRIFTWOOD_KERNEL_CACHE=/tmp/kc
M=/tmp/m; mkdir -p $M
syn() { [ -s $M/$1-$3$2.gguf ] || $B synth --shape $1 --dtype $2 ${3:+--layers $3} -o $M/$1-$3$2.gguf >/dev/null 2>&1; echo $M/$1-$3$2.gguf; }
for dt in f32 f16 q4_1; do echo -n "parity smollm2 2L $dt: "; $B bench parity -m $(syn smollm2-135m $dt 2) --device cuda --steps 16 2>&1 | grep -E "greedy tokens agree|rror" | head -3; done
for dt in f32 bf16; do echo -n "parity llama1b 1L $dt: "; $B bench parity -m $(syn llama-3.2-1b $dt 1) --device cuda --steps 16 2>&1 | grep -E "greedy tokens agree|rror" | head -3; done
for spec in "llama-3.2-1b f16" "llama-3.2-1b bf16" "llama-3.2-1b q4_0" "smollm2-135m f16" "smollm2-135m q4_1"; do
  set -- $spec; f=$(syn $1 $2)
  echo -n "$1 $2: "
  $B bench inference -m $f --device cuda --prefill 16 --decode 128 --repeats 5 --no-boundary 2>&1 | grep -E "decode 128|rror|failed" | tr -s ' ' | tr '\n' '|'; echo
done
