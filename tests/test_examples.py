"""Smoke tests of examples/: each runs a few steps on a tiny random Llama (the --tiny flag) and its output loads."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

import smt_kernels
from smt_kernels.patch import patched_modules

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_base():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from common import tiny_llama
    finally:
        sys.path.remove(str(EXAMPLES))
    return tiny_llama(0)[0]


def _trained_blocks(blocks_dir: Path) -> dict[str, torch.Tensor]:
    model = smt_kernels.load_blocks(_tiny_base(), blocks_dir)
    return {n: m.block_weight.detach().clone() for n, m in patched_modules(model).items()}


def test_trainer_example_resumes_to_the_same_blocks(tmp_path):
    """A run interrupted after its step-2 checkpoint and resumed ends with the blocks of an uninterrupted run."""
    trainer_smt = _example("trainer_smt")
    a, b = tmp_path / "a", tmp_path / "b"
    trainer_smt.main(["--tiny", "--steps", "4", "--save-steps", "2", "--lr", "1e-2", "--out", str(a)])
    shutil.copytree(a, b)
    shutil.rmtree(b / "trainer" / "checkpoint-4")  # as if killed between the two checkpoints
    shutil.rmtree(b / "blocks")
    trainer_smt.main(
        ["--tiny", "--steps", "4", "--save-steps", "2", "--lr", "1e-2", "--out", str(b), "--resume", "--merged"]
    )
    blocks_a, blocks_b = _trained_blocks(a / "blocks"), _trained_blocks(b / "blocks")
    assert blocks_a.keys() == blocks_b.keys() and blocks_a
    assert all(torch.equal(blocks_a[n], blocks_b[n]) for n in blocks_a)
    _assert_trained_and_merged(b / "blocks", b / "merged")


def _assert_trained_and_merged(blocks_dir: Path, merged_dir: Path | None = None) -> None:
    """The saved blocks differ from the base weights there; a merged model equals base + blocks."""
    patched = smt_kernels.load_blocks(_tiny_base(), blocks_dir)
    base = dict(_tiny_base().named_modules())
    layers = patched_modules(patched)
    assert any(not torch.equal(m.merged_weight(), base[n].weight) for n, m in layers.items()), "nothing trained"
    if merged_dir is not None:
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        ids = torch.randint(7, 90, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, patched(ids).logits, rtol=1e-5, atol=1e-5)


def test_trl_sft_example(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    _example("trl_sft_smt").main(["--tiny", "--steps", "3", "--lr", "1e-2", "--out", str(tmp_path)])
    _assert_trained_and_merged(tmp_path / "blocks")


def test_plain_loop_example(tmp_path):
    from transformers import AutoModelForCausalLM

    _example("plain_loop").main(["--tiny", "--steps", "3", "--lr", "1e-2", "--out", str(tmp_path)])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = _tiny_base()
    now, before = dict(merged.named_parameters()), dict(base.named_parameters())
    changed = {n for n in before if not torch.equal(now[n], before[n])}
    assert changed and all(n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") for n in changed), changed
