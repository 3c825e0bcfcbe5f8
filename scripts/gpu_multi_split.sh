#!/usr/bin/env bash
# Two H200s after the split layer (checkpointing) and the bfloat16 view of the 4-bit codes (FSDP2 on torch 2.11),
# one device call on nvidia-h200-x2 (< 10 min): the 70B 4-bit FSDP2 run with its reproduction check
# (scripts/gpu_multi_nf4.sh, VERIFY=1), then one GPU against FSDP2 (embeddings sharded, 2 profiled steps) at the
# LLaMA-3-8B shape. Results under $OUT/multi_nf4/ and $OUT/multi8/.   Usage: bash scripts/gpu_multi_split.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
VERIFY=1 timeout -k 10 "${LIMIT_NF4:-290}" bash scripts/gpu_multi_nf4.sh > /tmp/multi_nf4.txt 2>&1
echo "multi_nf4 rc=$?"
tail -n 30 /tmp/multi_nf4.txt
out="${OUT:-/tmp/out}/multi8"
mkdir -p "$out"
bd=/tmp/bench_distributed_8b
A=(--model llama3-8b --batch 4 --seq 1024 --steps 12 --warmup 3 --ratio 0.01 --out "$bd")
timeout -k 10 100 python -m benchmarks.bench_distributed --mode single "${A[@]}" > "$out/single.log" 2>&1
echo "single rc=$?"
timeout -k 10 140 torchrun --standalone --nproc-per-node 2 -m benchmarks.bench_distributed --mode fsdp2 \
  --shard-embeddings 1 --profile 2 --tag fsdp2_shard_embeddings "${A[@]}" > "$out/fsdp2.log" 2>&1
echo "fsdp2 rc=$?"
cp "$bd"/*.json "$bd"/profile_*.txt "$out/" 2>/dev/null
for f in "$out"/single.log "$out"/fsdp2.log; do echo "== $f"; grep -v Warning "$f" | tail -n 5; done
