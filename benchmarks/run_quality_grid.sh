#!/usr/bin/env bash
# The quality grid of docs/results.md: each method × learning rate is its own process, all at once on one GPU
# (SmolLM2-135M runs are host-bound, so the GPU has room for many), then one merged table, plot and CSV.
# Accuracy and loss do not depend on the concurrency; tokens/s do (they are measured under contention).
# It pins the first grid's 128 eval examples and no dev split; the larger budget sweep with dev-chosen learning
# rates and confidence intervals is benchmarks/run_quality_sweep.sh.
#
#   bash benchmarks/run_quality_grid.sh MODEL_DIR OUT_DIR [SEEDS]      # e.g. /tmp/smol $OUT/quality 0,1,2
#
# SPECS (space-separated --methods items), BUDGET (seconds per process, default 480) and EXTRA (more
# benchmarks.quality options, e.g. "--steps 20 --tasks reverse") may be set in the environment.
set -uo pipefail
model=${1:?model directory}
out=${2:?output directory}
seeds=${3:-0,1,2}
specs=${SPECS:-"smt@0.01/1e-3 smt@0.01/3e-3 smt@0.01/1e-2 smt@0.05/1e-3 smt@0.05/3e-3 smt@0.05/1e-2
lora@0.01/1e-3 lora@0.01/3e-3 lora@0.01/1e-2 lora@0.05/1e-3 lora@0.05/3e-3 lora@0.05/1e-2
full/3e-5 full/1e-4 full/3e-4"}
mkdir -p "$out/runs"
pids=()
for spec in $specs; do
    dir="$out/runs/$(echo "$spec" | tr '@/' '__')"
    mkdir -p "$dir"
    OMP_NUM_THREADS=1 python -m benchmarks.quality --model-dir "$model" --out "$dir" --methods "$spec" \
        --seeds "$seeds" --time-budget "${BUDGET:-480}" --num-eval 128 --num-dev 0 ${EXTRA:-} >"$dir/log.txt" 2>&1 &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=$((failed + 1))
done
dirs=()
for d in "$out"/runs/*; do
    [ -f "$d/quality.csv" ] && dirs+=("$d")
done
python -m benchmarks.quality --merge "${dirs[@]}" --out "$out"
echo "$failed of ${#pids[@]} processes failed; logs in $out/runs/*/log.txt"
exit $((failed > 0))
