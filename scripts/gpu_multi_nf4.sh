#!/usr/bin/env bash
# FSDP2 with the 4-bit base at the LLaMA-3-70B shape on two H200s (issue 14), one device call on the
# nvidia-h200-x2 kind (~3 min): one GPU (2 micro-batches of 1x2048) against FSDP2 over 2 GPUs with the 4-bit codes,
# embeddings and lm_head sharded (1x2048 per rank), then the reproduction check if time is left.
# Results under $OUT/multi_nf4/.   Usage: bash scripts/gpu_multi_nf4.sh
set -uo pipefail
. scripts/gpu_env.sh
begin_run "multi_nf4"
bd=/tmp/bench_distributed_nf4
rm -rf "$bd"
A=(--model "${MODEL:-llama3-70b}" --quantize nf4 --batch 1 --seq 2048 --steps "${STEPS:-4}" --warmup 2 --ratio 0.01 --out "$bd")
run() { local name=$1 limit=$2; shift 2; timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1; echo "$name rc=$? $(date -u +%T)" >> "$log"; cp "$bd"/*.json "$out/" 2>/dev/null; }
run single 100 python -m benchmarks.bench_distributed --mode single "${A[@]}"
run fsdp2 100 torchrun --standalone --nproc-per-node 2 -m benchmarks.bench_distributed --mode fsdp2 \
  --shard-nf4-base 1 --shard-embeddings 1 --tag fsdp2_nf4_sharded "${A[@]}"
[ -n "${VERIFY:-}" ] && run verify 60 python -m benchmarks.bench_distributed --mode verify "${A[@]}"
date -u >> "$log"
cat "$log"; for f in "$out"/*.log; do echo "== $f"; grep -v Warning "$f" | tail -n 4; done
