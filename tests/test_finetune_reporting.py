"""What a fine-tuning run reports about itself: the evaluation's generation bound, the trainable count after
re-selection, the selection's batch count with a warm-up."""

from __future__ import annotations

import json

import torch
from test_cli import save_tiny_llama
from test_reselect import _cfg as reselect_cfg
from transformers import AutoTokenizer, LlamaForCausalLM

import smt_kernels.finetune.reselect as reselect_mod
from smt_kernels.finetune import FinetuneConfig, run_finetune
from smt_kernels.finetune.data import TokenizedTask
from smt_kernels.layout import covered_elements
from smt_kernels.tasks import Example, Task


def _model_dir(path):
    """A tiny Llama whose 72-wide weights leave 32-blocks clipped at the edge, with the character tokenizer."""
    return save_tiny_llama(path, hidden_size=72, intermediate_size=112)


def _cfg(model_dir, **change) -> FinetuneConfig:
    return reselect_cfg(model_dir, **({"block_size": 32} | change))


def test_generation_bound_leaves_room_for_every_held_out_answer(tmp_path):
    """A task whose character-based bound is too small for its answers' tokens (one per character here): the
    evaluation's bound is the longest held-out answer's token count, end marker included."""
    tok = AutoTokenizer.from_pretrained(_model_dir(tmp_path / "m"))
    answers = ["1 9 18 38 55 84 88", "3 4"]
    task = Task("lists", [Example("p", "a")], [Example(f"q{i}", a) for i, a in enumerate(answers)], max_new_tokens=8)
    data = TokenizedTask.build(task, tok, _cfg(tmp_path / "m"))
    longest = max(len(data.fmt.encode(ex, 160).answer_ids) for ex in task.eval)
    assert longest > len(answers[0]) > task.max_new_tokens and data.max_new_tokens == longest


def test_trainable_count_after_reselection_describes_the_last_selection(tmp_path, monkeypatch):
    model_dir = _model_dir(tmp_path / "m")
    seen = {}
    real = reselect_mod.Reselector.reselect

    def spy(self, step):
        real(self, step)
        seen["last"] = {n: list(p) for n, p in self.prepared.selection.items()}

    monkeypatch.setattr(reselect_mod.Reselector, "reselect", spy)
    cfg = _cfg(model_dir, reselect_at=(2,), strategy="global", num_blocks=6, ratio=None)
    result = run_finetune(cfg)
    modules = dict(LlamaForCausalLM.from_pretrained(model_dir).named_modules())
    covered = sum(
        covered_elements(torch.tensor(p), modules[n].out_features, modules[n].in_features, 32)
        for n, p in seen["last"].items()
        if p
    )
    assert result.reselections and result.trainable_params == covered


def test_selection_counts_the_batches_a_warmup_used(tmp_path):
    out = tmp_path / "o"
    cfg = _cfg(_model_dir(tmp_path / "m"), steps=2, select_batches=4, select_warmup_steps=2, output_dir=str(out))
    run_finetune(cfg)
    saved = json.loads((out / "selection.json").read_text())
    assert saved["num_batches"] == 2 and saved["warmup_steps"] == 2


def test_a_run_leaves_the_callers_global_state_alone(tmp_path):
    """run_finetune seeds torch's global generator for itself and loads without progress bars; afterwards the
    caller's random state and progress-bar setting are as they were."""
    from transformers.utils import logging as hf_logging

    model_dir = _model_dir(tmp_path / "m")
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(123)
        state = torch.get_rng_state()
        run_finetune(_cfg(model_dir, steps=2))
        assert torch.equal(torch.get_rng_state(), state)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
