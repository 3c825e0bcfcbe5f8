#!/usr/bin/env bash
# Is FSDP2 at the LLaMA-3-8B shape host-bound? (issue 14; one device call on nvidia-h200-x2, < 10 min.) One GPU and
# FSDP2 (embeddings sharded) with the host's issue time per step next to the step time (host_ms) and one more step in
# torch.cuda's sync debug mode (where the host waited for the GPU, sync_*.txt), then both at twice the tokens per
# micro-batch (BATCH2, default 8): if the host is the limit, FSDP2's ratio to one GPU rises with more work per call.
# (2026-11-30's run of this script also tried --compile-layers 1, which did not finish compiling within 170 s.)
# Results packed into $OUT/fsdp2_host.tgz (a device call returns at most 8 files) and $OUT/run.log.
# Usage: bash scripts/gpu_fsdp2_host.sh
set -uo pipefail
. scripts/gpu_env.sh
OUT_FINAL="${OUT:-/tmp/out}"
OUT=/tmp/work_out begin_run "fsdp2_host"
bd=/tmp/bench_fsdp2_host
A=(--model llama3-8b --batch 4 --seq 1024 --steps 8 --warmup 3 --ratio 0.01 --out "$bd")
TR=(torchrun --standalone --nproc-per-node 2 -m benchmarks.bench_distributed --mode fsdp2 --shard-embeddings 1)
run() { local name=$1 limit=$2; shift 2; timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1; echo "$name rc=$? $(date -u +%T)" >> "$log"; }
B=(--model llama3-8b --batch "${BATCH2:-8}" --seq 1024 --steps 6 --warmup 2 --ratio 0.01 --out "$bd")
run single 110 python -m benchmarks.bench_distributed --mode single --sync-debug 1 "${A[@]}"
run fsdp2 110 "${TR[@]}" --sync-debug 1 --tag fsdp2 "${A[@]}"
run single_b2 130 python -m benchmarks.bench_distributed --mode single --tag single_b2 "${B[@]}"
run fsdp2_b2 130 "${TR[@]}" --tag fsdp2_b2 "${B[@]}"
cp "$bd"/*.json "$bd"/sync_*.txt "$out/" 2>/dev/null
python - "$out" >> "$log" 2>&1 <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))}
for name, r in runs.items():
    base = runs.get("single_b2" if name.endswith("_b2") else "single")
    ratio = round(r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"], 3) if base else None
    mem = round(r["peak_mem_gib"] / base["peak_mem_gib"], 3) if base else None
    print(name, "step", r["step_ms"], "host", r["host_ms_per_rank"], "tok/s/gpu", r["tokens_per_s_per_gpu"], ratio,
          "peak", r["peak_mem_gib"], mem, "loss0", r["loss_curve"][0], "lossN", r["loss_curve"][-1])
PY
for f in "$out"/*.log; do echo "== $f"; grep -v "Warning\|warn\|^W1\|OMP_NUM\|\*\*\*" "$f" | tail -n 4; done >> "$log"
tar -czf "$OUT_FINAL/fsdp2_host.tgz" -C /tmp/work_out fsdp2_host
cp "$log" "$OUT_FINAL/run.log"
cat "$log"
