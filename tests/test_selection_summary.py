"""``summarize_selection``'s block size: the given one, the Selection's or the patched model's, never a guess
that contradicts them."""

from __future__ import annotations

import pytest
from tiny_models import tiny

import smt_kernels
from smt_kernels.select import Selection

Q = "model.layers.0.self_attn.q_proj"  # 80×80


def test_plain_selection_on_a_patched_model_uses_its_block_size():
    model = smt_kernels.patch(tiny(), Selection({Q: [(0, 0)]}, block_size=16), verbose=False)
    summary = smt_kernels.summarize_selection(model, model.smt_config["selection"])  # a plain dict
    assert summary.block_size == 16 and summary.trainable == 16 * 16 == smt_kernels.trainable_parameters(model)[0]


def test_without_any_block_size_the_default_is_smt_configs():
    summary = smt_kernels.summarize_selection(tiny(), {Q: [(0, 0)]})
    assert summary.block_size == smt_kernels.SMTConfig.block_size == 256 and summary.trainable == 80 * 80


@pytest.mark.parametrize("patched", [False, True])
def test_a_block_size_that_contradicts_the_selection_is_refused(patched):
    selection = Selection({Q: [(0, 0)]}, block_size=16)
    model = smt_kernels.patch(tiny(), selection, verbose=False) if patched else tiny()
    with pytest.raises(ValueError, match="block_size 64, the selection's block_size 16"):
        smt_kernels.summarize_selection(model, selection, block_size=64)
    assert smt_kernels.summarize_selection(model, selection, block_size=16).trainable == 256


def test_a_block_size_that_contradicts_the_patched_model_is_refused():
    model = smt_kernels.patch(tiny(), {Q: [(0, 0)]}, block_size=32, verbose=False)
    with pytest.raises(ValueError, match="block_size 16, the patched model's block_size 32"):
        smt_kernels.summarize_selection(model, {Q: [(0, 0)]}, block_size=16)
    with pytest.raises(ValueError, match="the selection's block_size 16, the patched model's block_size 32"):
        smt_kernels.summarize_selection(model, Selection({Q: [(0, 0)]}, block_size=16))
