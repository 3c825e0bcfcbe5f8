#!/usr/bin/env bash
# The H200 runs of the custom-op / host-cost work, in phases that each fit one device call (< 10 min).
# Usage: bash scripts/gpu_run.sh PHASE   (PHASE: tests | small | large | layers); results under $OUT/<phase>/,
# packed into $OUT/<phase>.tgz with a log. Needs the GPU image (torch, triton, transformers, peft).
set -uo pipefail
phase="$1"
. scripts/gpu_env.sh
begin_run "$phase"
{ git rev-parse HEAD; git status --short | head -20; } >> "$log" 2>&1
case "$phase" in
  tests)
    python -m pytest -q -p no:cacheprovider tests/test_custom_ops.py tests/test_module.py tests/test_launch.py \
      tests/test_split_layer.py > "$out/pytest_gpu.log" 2>&1; echo "pytest rc=$?" >> "$log"
    python -m benchmarks.bench_compile --sections host --no-results --out "$out" > "$out/bench_host.log" 2>&1
    echo "host rc=$?" >> "$log"
    ;;
  small)
    python -m benchmarks.bench_compile --sections model --presets smollm2-135m --methods "${METHODS:-frozen,full,lora,smt}" \
      --modes "${MODES:-eager,default,reduce-overhead}" --no-results --out "$out" --name compile_smollm \
      > "$out/bench_smollm.log" 2>&1; echo "smollm rc=$?" >> "$log"
    ;;
  large)
    python -m benchmarks.bench_compile --sections model --presets "${PRESETS:-llama-1.1b-1x1024,llama-1.1b-8x1024,llama2-7b-1x1024,llama2-7b-8x1024}" \
      --methods "${METHODS:-frozen,smt}" --no-results --out "$out" --name compile_large > "$out/bench_large.log" 2>&1
    echo "large rc=$?" >> "$log"
    ;;
  layers)
    for mode in eager default; do
      extra=(); [ "$mode" = eager ] || extra=(--compile "$mode")
      python -m benchmarks.bench_layer --sections layer --tokens 16384 --shapes 1024x4096,4096x4096,4096x14336 \
        --blocks 1,2,1%,3% --layouts random --methods frozen,smt,lora,full --no-results --out "$out" \
        --name "layer_$mode" "${extra[@]}" > "$out/bench_layer_$mode.log" 2>&1
      echo "layers $mode rc=$?" >> "$log"
    done
    ;;
esac
date -u >> "$log"
tar -czf "${OUT:-/tmp/out}/$phase.tgz" -C "${OUT:-/tmp/out}" "$phase"
cp "$log" "${OUT:-/tmp/out}/${phase}_run.log"
for f in "$out"/*.log; do echo "== $f"; tail -n 25 "$f"; done
