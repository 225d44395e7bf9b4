B=.gpu/driftwood
export DRIFTWOOD_KERNEL_CACHE=/tmp/kc
M=/tmp/m; mkdir -p $M
syn() { [ -s $M/$1-$3$2.gguf ] || $B synth --shape $1 --dtype $2 ${3:+--layers $3} -o $M/$1-$3$2.gguf >/dev/null 2>&1; echo $M/$1-$3$2.gguf; }
for dt in q4_k q5_k q6_k q4_0; do echo -n "parity llama1b 1L $dt: "; $B bench parity -m $(syn llama-3.2-1b $dt 1) --device cuda --steps 16 2>&1 | grep -E "greedy tokens agree|rror" | head -3; done
echo -n "parity smollm2 2L q4_1: "; $B bench parity -m $(syn smollm2-135m q4_1 2) --device cuda --steps 16 2>&1 | grep -E "greedy tokens agree|rror" | head -3
f=$(syn llama-3.2-1b q4_k)
echo -n "llama-3.2-1b q4_k: "; $B bench inference -m $f --device cuda --prefill 16 --decode 128 --repeats 3 --no-boundary 2>&1 | grep -E "decode 128|floor|rror|failed" | tr -s ' ' | tr '\n' '|'; echo
