#!/usr/bin/env bash
# The layer as two autograd nodes under gradient checkpointing (smt_kernels.ops.split_layer), on 2 H200s in one
# device call (nvidia-h200-x2, < 10 min; on one GPU the two groups run one after the other), carrying the bitsandbytes wheel
# (.whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl):
#   GPU 0: the GPU tests of the layer, the split and the 4-bit layer; then bench_nf4_model at the LLaMA-3-70B shape
#   GPU 1: bench_nf4_model at the LLaMA-3-8B shape (4-bit floor and SMT, bitsandbytes QLoRA, bf16 floor and SMT)
# Results under $OUT/split/, packed into $OUT/split.tgz.   Usage: bash scripts/gpu_split.sh
set -uo pipefail
. scripts/gpu_env.sh
begin_run "split"
install_bnb "$log"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
second=1; [ "$gpus" -ge 2 ] || second=0  # one GPU: both groups run on it, one after the other
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 10 200 python -m pytest -q -p no:cacheprovider tests/test_split_layer.py tests/test_module.py \
    tests/test_nf4_module.py tests/test_custom_ops.py > "$out/pytest_gpu.log" 2>&1
  echo "pytest rc=$? $(date -u +%T)" >> "$log"
  timeout -k 10 "${LIMIT70:-300}" python -m benchmarks.bench_nf4_model --models llama3-70b \
    --methods "${METHODS70:-nf4_frozen,nf4_smt,bnb_qlora}" --no-results --out "$out" --name nf4_model_70b \
    > "$out/bench_70b.log" 2>&1
  echo "70b rc=$? $(date -u +%T)" >> "$log"
) &
[ "$second" = 1 ] || wait
(
  export CUDA_VISIBLE_DEVICES=$second
  timeout -k 10 "${LIMIT8:-420}" python -m benchmarks.bench_nf4_model --models llama3-8b \
    --methods "${METHODS8:-nf4_frozen,nf4_smt,bnb_frozen,bnb_qlora,bf16_frozen,bf16_smt}" --no-results --out "$out" \
    --name nf4_model_8b > "$out/bench_8b.log" 2>&1
  echo "8b rc=$? $(date -u +%T)" >> "$log"
) &
wait
date -u >> "$log"
tar -czf "${OUT:-/tmp/out}/split.tgz" -C "${OUT:-/tmp/out}" split
cat "$log"
tail -n 5 "$out/pytest_gpu.log"
for f in "$out"/bench_70b.log "$out"/bench_8b.log; do echo "== $f"; tail -n 12 "$f"; done
