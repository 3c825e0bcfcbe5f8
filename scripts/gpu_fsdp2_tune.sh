#!/usr/bin/env bash
# FSDP2 at the LLaMA-3-8B shape (issue 14: >= 90 % of one GPU's tokens/s per GPU), one device call on
# nvidia-h200-x2 (< 10 min): one GPU, then FSDP2 (embeddings sharded) as measured before and with what the
# 2026-11-30 profile suggests trying: NCCL's Simple protocol (it picked LL), explicit prefetch, two decoder layers
# per fully_shard unit. Results under $OUT/fsdp2_tune/.   Usage: bash scripts/gpu_fsdp2_tune.sh
set -uo pipefail
. scripts/gpu_env.sh
begin_run "fsdp2_tune"
bd=/tmp/bench_fsdp2_tune
A=(--model llama3-8b --batch 4 --seq 1024 --steps 8 --warmup 3 --ratio 0.01 --out "$bd")
TR=(torchrun --standalone --nproc-per-node 2 -m benchmarks.bench_distributed --mode fsdp2 --shard-embeddings 1)
run() { local name=$1; shift; timeout -k 10 110 "$@" > "$out/$name.log" 2>&1; echo "$name rc=$? $(date -u +%T)" >> "$log"; }
run single python -m benchmarks.bench_distributed --mode single "${A[@]}"
run fsdp2 "${TR[@]}" --tag fsdp2 "${A[@]}"
NCCL_PROTO=Simple run fsdp2_simple "${TR[@]}" --tag fsdp2_simple "${A[@]}"
run fsdp2_prefetch2 "${TR[@]}" --prefetch 2 --tag fsdp2_prefetch2 "${A[@]}"
run fsdp2_units2 "${TR[@]}" --layers-per-unit 2 --tag fsdp2_units2 "${A[@]}"
cp "$bd"/*.json "$out/" 2>/dev/null
python - "$out" >> "$log" 2>&1 <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
one = json.loads((out / "single.json").read_text())
for f in sorted(out.glob("fsdp2*.json")):
    r = json.loads(f.read_text())
    print(f.stem, r["step_ms"], r["tokens_per_s_per_gpu"], round(r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], 3),
          r["peak_mem_gib"], round(r["peak_mem_gib"] / one["peak_mem_gib"], 3))
PY
cat "$log"
