"""``smt-kernels finetune`` data parallel under torchrun, on the CPU (gloo, 2 processes, a tiny random Llama).

A 2-rank run equals one process on the same global batch (losses, held-out curve, selection, trained weights),
only rank 0 writes files and prints the summary, and a checkpoint of a 2-rank run resumes under a real
``torchrun`` launch to the uninterrupted result. The 2-rank runs are forked (the children inherit the imported
torch/transformers, like tests/test_distributed.py); the resume goes through ``torchrun -m smt_kernels``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_cli import TINY_FOR
from test_distributed import free_port, run_ranks

from smt_kernels.cli import main

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest's ``one_thread``)."""


def _argv(model_dir: Path, method: str, out: Path, *extra: str) -> list[str]:
    budget = ["--ratio", "0.1"] if method != "full" else []
    return [
        "finetune",
        "--model",
        str(model_dir),
        "--method",
        method,
        *budget,
        *TINY_FOR[method],
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--lr",
        "1e-2" if method != "full" else "1e-3",
        "--output-dir",
        str(out),
        "--output-json",
        str(out / "r.json"),
        "--device",
        "cpu",  # gloo ranks on the CPU, also on a machine with GPUs
        *extra,
    ]


# ------------------------------------------------------------------------------------- forked ranks running main()


def _rank(rank: int, port: int, argv: list[str], result: Path) -> None:
    """One torchrun-like rank: the environment torchrun sets, a gloo group, ``main(argv)``, counted writes."""
    from smt_kernels.finetune import report, run

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    writes = {"outputs": 0, "checkpoint": 0, "json": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            writes[name] += 1
            return fn(*args, **kwargs)

        return call

    run.save_outputs = counted("outputs", run.save_outputs)
    run.save_checkpoint = counted("checkpoint", run.save_checkpoint)
    report.FinetuneResult.write_json = counted("json", report.FinetuneResult.write_json)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(argv)
    finally:
        dist.destroy_process_group()
    result.joinpath(f"rank{rank}.json").write_text(json.dumps({"code": code, "stdout": stdout.getvalue(), **writes}))


def run_two_ranks(argv: list[str], tmp: Path) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    # fork is fast; a process that has used CUDA (the GPU test run) cannot fork a CUDA-capable child
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_rank, args=(free_port(), argv, tmp), nprocs=WORLD, start_method=method)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """What the run trained, as it saved it: the SMT blocks, the LoRA adapter or the merged model."""
    from safetensors.torch import load_file

    files = sorted(out.glob("smt_blocks*.safetensors")) or sorted((out / "lora_adapter").glob("*.safetensors"))
    files = files or [out / "merged" / "model.safetensors"]
    assert len(files) == 1, files
    return load_file(files[0])


def assert_same_run(got: dict, want: dict) -> None:
    """Two result JSONs of the same training: per-step losses (fp32 all-reduce rounding), held-out curves, blocks."""
    want_loss = torch.tensor([c["loss"] for c in want["loss_curve"]])
    got_loss = torch.tensor([c["loss"] for c in got["loss_curve"]])
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert [c["step"] for c in got["loss_curve"]] == [c["step"] for c in want["loss_curve"]]
    assert [c["step"] for c in got["eval_loss_curve"]] == [c["step"] for c in want["eval_loss_curve"]]
    torch.testing.assert_close(
        torch.tensor([c["loss"] for c in got["eval_loss_curve"]]),
        torch.tensor([c["loss"] for c in want["eval_loss_curve"]]),
        rtol=1e-5,
        atol=0,
    )
    for key in ("num_blocks", "blocks_per_layer", "trainable_params", "lora_rank", "data_sha256"):
        assert got[key] == want[key], key


def one_process_and_two_ranks(model_dir: Path, method: str, tmp: Path, capsys, *extra: str):
    """The same command in one process (``tmp/one``) and on 2 gloo ranks (``tmp/two``): both succeed, with the same
    per-step losses and held-out curve (fp32 all-reduce rounding) and the same saved weights.
    Returns (one process's JSON, the ranks' JSON, the ranks' reports)."""
    one, two = tmp / "one", tmp / "two"
    assert main(_argv(model_dir, method, one, *extra)) == 0, capsys.readouterr().err
    ranks = run_two_ranks(_argv(model_dir, method, two, *extra), tmp / "ranks")
    assert [r["code"] for r in ranks] == [0, 0]
    r1, r2 = json.loads((one / "r.json").read_text()), json.loads((two / "r.json").read_text())
    assert_same_run(r2, r1)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}")
    return r1, r2, ranks


@pytest.mark.parametrize("method", ["smt", "lora", "full"])
def test_two_ranks_equal_one_process(method, tiny_model_dir, tmp_path, capsys):
    """Global batch 4 = 2 rows on each of 2 ranks: the same selection, losses and weights as one process on 4;
    rank 0 alone writes the outputs, the checkpoint and the JSON, and prints the summary."""
    extra = ["--checkpoint-every", "2", "--save-merged"]
    r1, r2, ranks = one_process_and_two_ranks(tiny_model_dir, method, tmp_path, capsys, *extra)
    one, two = tmp_path / "one", tmp_path / "two"
    assert [(r["outputs"], r["checkpoint"], r["json"]) for r in ranks] == [(1, 1, 1), (0, 0, 0)]
    assert ranks[0]["stdout"].count(f"== {method} on reverse") == 1 and ranks[1]["stdout"] == ""
    assert "cpu × 2 ranks" in ranks[0]["stdout"]
    assert (r1["ranks"], r2["ranks"]) == (1, 2)
    if method == "smt":
        assert (
            json.loads((two / "selection.json").read_text())["blocks"]
            == json.loads((one / "selection.json").read_text())["blocks"]
        )
    if method == "full":
        from safetensors.torch import load_file

        base, w2 = load_file(tiny_model_dir / "model.safetensors"), _weights(two)
        assert any(not torch.equal(base[k], w2[k]) for k in base)  # it trained


def _select_on_share(rank: int, batches: list[dict], kwargs: dict) -> dict[str, torch.Tensor]:
    from smt_kernels.distributed import select_blocks_distributed
    from smt_kernels.finetune.parallel import Ranks

    model = _load(kwargs.pop("model_dir"))
    share = [Ranks(torch.device("cpu"), WORLD, rank).selection_shard(b) for b in batches]
    return select_blocks_distributed(model, share, **kwargs).scores


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_selection_on_shares_scores_like_one_process(tiny_model_dir, tmp_path):
    """Each rank's share of a warm-up batch is scaled by the global label-token count, so the block scores equal
    one process's on the whole batch even when the ranks' shares hold different numbers of answer tokens."""
    from transformers import AutoTokenizer

    from smt_kernels import select_blocks
    from smt_kernels.finetune import FinetuneConfig, build_task
    from smt_kernels.finetune.data import IGNORE, TokenizedTask

    cfg = FinetuneConfig(model=str(tiny_model_dir), task="reverse", num_train=24, max_length=160, block_size=16)
    data = TokenizedTask.build(build_task(cfg), AutoTokenizer.from_pretrained(tiny_model_dir), cfg)
    stream = data.stream(4, seed=1)
    batches = [next(stream) for _ in range(2)]
    halves = [[int((b["labels"][r : r + 2, 1:] != IGNORE).sum()) for r in (0, 2)] for b in batches]
    assert any(a != b for a, b in halves), halves  # unequal shares: a plain mean per rank would weigh them wrong
    kwargs = dict(ratio=0.1, block_size=16, progress=False)
    want = select_blocks(_load(tiny_model_dir), batches, **kwargs).scores
    for rank, got in enumerate(run_ranks(_select_on_share, tmp_path, batches, {**kwargs, "model_dir": tiny_model_dir})):
        assert got.keys() == want.keys()
        for k in want:
            where = f"rank {rank} {k}"
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-12, msg=lambda m, w=where: f"{w}: {m}")


def test_batch_that_does_not_split_over_the_ranks(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Refused before any process group or model load, naming the numbers."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = _argv(tiny_model_dir, "smt", tmp_path / "o", "--batch-size", "5")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "smt-kernels finetune: error (rank 0): --batch-size 5 (the global batch) does not split over 2 ranks; "
        "give a multiple of 2"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "batch_size, num_train, needle",
    [
        (5, 24, "--batch-size 5 (the global batch) does not split over 2 ranks"),
        (8, 5, "5 training examples, fewer than --batch-size 8, make batches of 5 that do not split over 2 ranks"),
    ],
)
def test_check_world(batch_size, num_train, needle):
    from smt_kernels.finetune import FinetuneConfig, FinetuneError
    from smt_kernels.finetune.parallel import check_world

    cfg = FinetuneConfig(batch_size=batch_size)
    with pytest.raises(FinetuneError, match=re.escape(needle)):
        check_world(cfg, 2, num_train)
    check_world(cfg, 1, num_train)  # one process takes any batch
    check_world(FinetuneConfig(batch_size=4), 2, num_train)  # an even batch of at most num_train rows splits


def test_resume_under_torchrun(tiny_model_dir, tmp_path, capsys):
    """The step-2 checkpoint of a 2-rank run, resumed by ``torchrun --nproc-per-node 2 -m smt_kernels``, ends
    where the uninterrupted 2-rank run ended."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    ranks = run_two_ranks(_argv(tiny_model_dir, "smt", whole, "--checkpoint-every", "2"), tmp_path / "ranks")
    assert [r["code"] for r in ranks] == [0, 0]
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint", resumed / "checkpoint")  # the run was interrupted after step 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    argv = _argv(tiny_model_dir, "smt", resumed, "--checkpoint-every", "2", "--resume", str(resumed / "checkpoint"))
    proc = subprocess.run([*cmd, "-m", "smt_kernels", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("== smt on reverse") == 1, proc.stdout  # rank 0 prints, rank 1 does not
    assert "resumed at step 2" in proc.stdout
    got, want = json.loads((resumed / "r.json").read_text()), json.loads((whole / "r.json").read_text())
    assert got["resumed_from_step"] == 2 and got["ranks"] == WORLD
    assert_same_run(got, want)
    w1, w2 = _weights(whole), _weights(resumed)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
