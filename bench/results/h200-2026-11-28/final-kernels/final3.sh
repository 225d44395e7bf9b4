export DRIFTWOOD_KERNEL_CACHE=/tmp/kc
bench/gpu.sh --bin .gpu/driftwood --out /tmp/out --stages bench 2>&1 | grep -E "tg128|!!"
cd /tmp/out && tar czf $OUT/gpu-out3.tgz . 
