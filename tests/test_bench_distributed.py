"""CPU smoke test of benchmarks.bench_distributed: one process, DDP and FSDP2 over two gloo ranks, and verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARGS = ["--model", "tiny", "--device", "cpu", "--batch", "2", "--seq", "32", "--block-size", "16", "--ratio", "0.2"]
ARGS += ["--steps", "2", "--warmup", "1", "--lr", "1e-2"]


def _run(cmd: list[str], out, extra: tuple[str, ...] = ()) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = cmd + ARGS + list(extra) + ["--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.timeout(600)
def test_single_ddp_fsdp2_agree_and_blocks_reproduce(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    single_args = ["--mode", "single", "--profile", "1", "--sync-debug", "1"]
    _run([sys.executable, "-m", "benchmarks.bench_distributed", *single_args], tmp_path)
    # the non-default paths: DDP through wrap_ddp, FSDP2 with explicit prefetch and embeddings in their own units
    extra = {"ddp": ["--ddp-buffers", "off"], "fsdp2": ["--prefetch", "1", "--shard-embeddings", "1"]}
    for mode in ("ddp", "fsdp2"):
        _run(torchrun + ["-m", "benchmarks.bench_distributed", "--mode", mode, *extra[mode]], tmp_path)
    _run([sys.executable, "-m", "benchmarks.bench_distributed", "--mode", "verify"], tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    report = json.loads((tmp_path / "verify.json").read_text())
    assert set(report) == {"single", "ddp", "fsdp2"}
    for mode in ("ddp", "fsdp2"):
        run = json.loads((tmp_path / f"{mode}.json").read_text())
        assert run["world"] == 2 and run["trainable_params"] == single["trainable_params"]
        assert report[mode]["loss_max_abs_diff_vs_single"] < 1e-4
        assert report[mode]["probe_max_abs_diff_vs_single"] < 1e-4
    profile = (tmp_path / "profile_single_rank0.txt").read_text()
    # SMT's autograd nodes: one per layer call, or two under gradient checkpointing (ops.split_layer)
    assert "_SparseBlockLinearFunction" in profile or "_SavedColumnsFunction" in profile
    assert (tmp_path / "sync_single_rank0.txt").read_text() == "sync debug mode needs CUDA\n"
    for mode in ("single", "ddp", "fsdp2"):  # the host's issue time per step, no longer than the step
        run = json.loads((tmp_path / f"{mode}.json").read_text())
        assert len(run["host_ms_per_rank"]) == run["world"] and run["host_ms"] == run["host_ms_per_rank"][0]
        assert len(run["step_ms_max_per_rank"]) == run["world"]
        assert all(0 < h <= m for h, m in zip(run["host_ms_per_rank"], run["step_ms_max_per_rank"], strict=True))
    for entry in report.values():
        assert entry["probe_max_abs_diff"] < 1e-5
    # the blocks trained: the loss of the last step differs from the first
    assert single["loss_curve"][0] != single["loss_curve"][-1]


@pytest.mark.timeout(600)
def test_4bit_base_single_and_fsdp2_with_sharded_codes_agree(tmp_path):
    """--quantize nf4: the 4-bit base built layer by layer; FSDP2 shards its codes (--shard-nf4-base); the saved
    blocks reproduce each run on a freshly built 4-bit base."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    nf4 = ("--quantize", "nf4")
    _run([sys.executable, "-m", "benchmarks.bench_distributed", "--mode", "single"], tmp_path, nf4)
    # two decoder layers per fully_shard unit, prefetching one unit ahead
    fsdp2 = ["--mode", "fsdp2", "--shard-nf4-base", "1", "--layers-per-unit", "2", "--prefetch", "1"]
    _run(torchrun + ["-m", "benchmarks.bench_distributed", *fsdp2], tmp_path, nf4)
    _run([sys.executable, "-m", "benchmarks.bench_distributed", "--mode", "verify"], tmp_path, nf4)
    single = json.loads((tmp_path / "single.json").read_text())
    fsdp2 = json.loads((tmp_path / "fsdp2.json").read_text())
    assert single["quantize"] == fsdp2["quantize"] == "nf4" and fsdp2["shard_nf4_base"]
    assert fsdp2["layers_per_unit"] == 2 and fsdp2["layers"] >= 2
    assert fsdp2["trainable_params"] == single["trainable_params"] > 0
    report = json.loads((tmp_path / "verify.json").read_text())
    assert report["fsdp2"]["loss_max_abs_diff_vs_single"] < 1e-4
    for entry in report.values():
        assert entry["probe_max_abs_diff"] < 1e-5
    assert single["loss_curve"][0] != single["loss_curve"][-1]


def test_bad_4bit_combinations_are_refused(tmp_path):
    cases = [
        (["--mode", "single", "--shard-nf4-base", "1", "--quantize", "nf4"], "--shard-nf4-base 1 needs --quantize nf4"),
        (["--mode", "fsdp2", "--shard-nf4-base", "1"], "--shard-nf4-base 1 needs --quantize nf4 and --mode fsdp2"),
        (["--mode", "ddp", "--quantize", "nf4"], "needs --ddp-buffers off"),
    ]
    for extra, needle in cases:
        cmd = [sys.executable, "-m", "benchmarks.bench_distributed", *extra, *ARGS, "--out", str(tmp_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and needle in done.stderr, done.stderr[-2000:]
