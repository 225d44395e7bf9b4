bash bench/gemv/run.sh > /tmp/gemv.log 2>&1; grep -E "^(old|dense|read)" /tmp/gemv.log | grep -v "Compiling"
grep -E "Compiling entry|Used" $OUT/ptxas.txt | paste - - | grep -E "dense_f16" | sed -E 's/.*function .([a-z0-9_]+).*Used ([0-9]+) registers.*/\\1 \\2 regs/'
B=.gpu/driftwood; M=/tmp/m; mkdir -p $M
export DRIFTWOOD_KERNEL_CACHE=/tmp/kc
syn() { f=$M/$1-$2.gguf; [ -s $f ] || $B synth --shape $1 --dtype $2 -o $f >/dev/null 2>&1; echo $f; }
$B bench parity -m $(syn llama-3.2-1b f16) --device cuda --steps 16 2>&1 | grep -E "agree"
$B bench parity -m $(syn smollm2-135m bf16) --device cuda --steps 16 2>&1 | grep -E "agree"
for spec in "llama-3.2-1b f16" "smollm2-135m f16"; do set -- $spec; f=$(syn $1 $2)
for ps in 4 2; do echo -n "$1 $2 per_sm $ps: "; DRIFTWOOD_CUDA_DENSE_PER_SM=$ps $B bench inference -m $f --device cuda --prefill 16 --decode 128 --repeats 3 --no-boundary 2>&1 | grep -E "decode 128|host|x$" | tr -s ' ' | tr '\n' '|'; echo; done; done
