#!/usr/bin/env bash
# Why DDP/FSDP2 per-GPU throughput trails one GPU (LLaMA-3-8B shape): one micro-batch per step on one GPU alone,
# DDP with one rank (a process group, no partner), and two one-GPU runs at once on both GPUs. Results: $OUT/diag.tgz.
set -uo pipefail
out="${OUT:-/tmp/out}/diag"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
A=(--model llama3-8b --batch 4 --seq 1024 --steps 8 --warmup 2 --ratio 0.01 --world 1)
python -m benchmarks.bench_distributed --mode single "${A[@]}" --out /tmp/diag/alone > "$out/alone.log" 2>&1
OMP_NUM_THREADS=1 python -m benchmarks.bench_distributed --mode single "${A[@]}" --out /tmp/diag/omp1 > "$out/omp1.log" 2>&1
torchrun --standalone --nproc-per-node 1 -m benchmarks.bench_distributed --mode ddp "${A[@]}" --out /tmp/diag/ddp1 > "$out/ddp1.log" 2>&1
CUDA_VISIBLE_DEVICES=0 python -m benchmarks.bench_distributed --mode single "${A[@]}" --out /tmp/diag/both0 > "$out/both0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 python -m benchmarks.bench_distributed --mode single "${A[@]}" --out /tmp/diag/both1 > "$out/both1.log" 2>&1
wait
for f in "$out"/*.log; do echo "== $f"; grep -o '"step_ms": [0-9.]*, "step_ms_min": [0-9.]*' "$f"; done | tee "$out/summary.txt"
tar -czf "${OUT:-/tmp/out}/diag.tgz" -C "${OUT:-/tmp/out}" diag
