B=.gpu/driftwood; M=/tmp/m; mkdir -p $M
export DRIFTWOOD_KERNEL_CACHE=/tmp/kc
syn() { f=$M/$1-$2.gguf; [ -s $f ] || $B synth --shape $1 --dtype $2 -o $f >/dev/null 2>&1; echo $f; }
for spec in "llama-3.2-1b f16" "smollm2-135m bf16" "smollm2-135m q4_1"; do set -- $spec
 echo -n "parity $1 $2: "; $B bench parity -m $(syn $1 $2) --device cuda --steps 8 2>&1 | grep -E "agree"; done
f=$(syn llama-3.2-1b f16)
for t in 1 0; do echo -n "1b f16 tensor=$t: "; DRIFTWOOD_CUDA_TENSOR_PREFILL=$t $B bench inference -m $f --device cuda --prefill 128,512 --decode 16 --repeats 3 --no-boundary 2>&1 | grep -E "prefill" | tr -s ' ' | tr '\n' '|'; echo; done
