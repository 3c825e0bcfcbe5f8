"""The public workflow on a 4-bit base: quantize_base -> select_blocks -> patch -> train -> save_blocks ->
load_blocks / merge / fold_blocks_into_checkpoint; mixed 16-bit/4-bit models; block files across bases."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_unchanged, snapshot
from tiny_models import tiny as tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import smt_kernels
from smt_kernels import (
    fold_blocks_into_checkpoint,
    load_blocks,
    merge,
    patch,
    patched_modules,
    quantize_base,
    read_blocks,
    save_blocks,
    select_blocks,
    trainable_parameters,
)
from smt_kernels.quant import NF4Linear, NF4SparseBlockLinear
from smt_kernels.quant.model import patch_nf4

B = 32  # hidden 80, k/v out 40, MLP 136: edge blocks are clipped
TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny(dtype=torch.bfloat16, seed=3):
    return tiny_llama("llama", seed, dtype)


def batch(seed=1):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def logits(model, seed=9):
    with torch.no_grad():
        return model(**batch(seed)).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bf16 Hugging Face checkpoint in 3+ shards: the 'original 16-bit model'."""
    d = tmp_path_factory.mktemp("bf16")
    tiny().save_pretrained(d, max_shard_size="100KB")
    return d


def four_bit(checkpoint, **kw):
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    return quantize_base(base, "nf4", compute_dtype=torch.bfloat16, **kw).eval()


def test_end_to_end_on_a_4bit_base(checkpoint, tmp_path):
    model = four_bit(checkpoint)
    before_select = {k: v.clone() for k, v in model.state_dict().items()}
    sel = select_blocks(model, [batch(1), batch(2)], num_blocks=5, targets=TARGETS, block_size=B, progress=False)
    assert sel.num_blocks == 5 and set(sel.scores) == {
        n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS
    }
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_select.items())  # selection changes nothing

    patch(model, sel, block_dtype=torch.float32, verbose=False)
    mods = patched_modules(model)
    assert set(mods) == set(sel) and all(isinstance(m, NF4SparseBlockLinear) for m in mods.values())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.block_weight" for n in mods]
    assert all(m.block_weight.dtype == torch.float32 for m in mods.values())
    trainable, total = trainable_parameters(model)
    assert trainable == sum(m.trainable_elements() for m in mods.values())
    assert total == sum(p.numel() for p in tiny().parameters())  # 4-bit weights count as their out × in elements

    base_state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".block_weight")}
    start = {n: m.block_weight.detach().clone() for n, m in mods.items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**batch(1)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for k, v in base_state.items():  # the 4-bit base, biases, norms, embeddings: bit for bit unchanged
        assert torch.equal(state[k], v), k
    for n, m in mods.items():
        assert not torch.equal(m.block_weight, start[n]), n
    model.eval()
    want = logits(model)

    save_blocks(model, tmp_path / "blocks")
    block_size, saved = read_blocks(tmp_path / "blocks")
    assert block_size == B and set(saved) == set(mods)
    for n, (idx, w) in saved.items():
        assert torch.equal(idx, mods[n].block_indices) and torch.equal(w, mods[n].block_weight.detach())

    fresh = four_bit(checkpoint)
    load_blocks(fresh, tmp_path / "blocks")
    assert all(isinstance(m, NF4SparseBlockLinear) for m in patched_modules(fresh).values())
    assert torch.equal(logits(fresh), want)  # the same 4-bit base and blocks: the same bits
    with torch.no_grad():  # and onto a model already patched with the layout (resuming): only the blocks are copied
        for m in patched_modules(fresh).values():
            m.block_weight.zero_()
    load_blocks(fresh, tmp_path / "blocks")
    assert torch.equal(logits(fresh), want)

    merged = merge(model)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules()) and not hasattr(merged, "smt_config")
    q = merged.get_submodule(next(iter(mods)))
    assert type(q) is nn.Linear and q.weight.dtype == torch.bfloat16
    assert torch.equal(logits(merged), want)  # the same bf16 weights; on the CPU the same GEMM

    # the exact result: the blocks folded into the original bf16 checkpoint, read by plain transformers, equal the
    # bf16 model patched with the same blocks and merged
    out = fold_blocks_into_checkpoint(tmp_path / "blocks", checkpoint, tmp_path / "folded")
    folded = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    reference = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    patch(reference, sel, verbose=False)
    with torch.no_grad():
        for n, m in patched_modules(reference).items():
            m.block_weight.copy_(saved[n][1])
    merge(reference).eval()
    got, ref = folded.state_dict(), reference.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert torch.equal(logits(folded), logits(reference))


def test_mixed_model_16bit_and_4bit_targets(tmp_path):
    model = quantize_base(tiny(torch.float32), "nf4", skip=("v_proj",))
    sel = {"model.layers.0.self_attn.q_proj": [(0, 0), (2, 2)], "model.layers.0.self_attn.v_proj": [(1, 1)]}
    q_old = model.get_submodule("model.layers.0.self_attn.q_proj")
    seen = []
    handle = q_old.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    patch(model, sel, B, verbose=False)
    mods = patched_modules(model)
    assert {n: type(m).__name__ for n, m in mods.items()} == {
        "model.layers.0.self_attn.q_proj": "NF4SparseBlockLinear",
        "model.layers.0.self_attn.v_proj": "SparseBlockLinear",
    }
    assert model.smt_config["selection"] == sel
    model(**batch()).loss.backward()
    assert seen == ["NF4SparseBlockLinear"]  # the hook moved with the module
    handle.remove()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    want = logits(model)

    save_blocks(model, tmp_path / "blocks")
    fresh = quantize_base(tiny(torch.float32), "nf4", skip=("v_proj",))
    load_blocks(fresh, tmp_path / "blocks")
    assert torch.equal(logits(fresh), want)

    merge(model, frozen="keep")  # the untrained 4-bit layers stay 4-bit
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear
    assert type(model.get_submodule("model.layers.0.self_attn.k_proj")) is NF4Linear
    assert not patched_modules(model) and not hasattr(model, "smt_config")
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    model(**batch()).loss.backward()
    assert seen == ["NF4SparseBlockLinear"]  # removed through the handle taken on the original layer


def test_patch_on_4bit_rolls_back_when_building_fails(monkeypatch):
    model = quantize_base(tiny(torch.float32), "nf4", skip=("v_proj",))
    snap = snapshot(model)
    real = NF4SparseBlockLinear.from_nf4_linear
    calls = []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(*a, **k)

    monkeypatch.setattr(NF4SparseBlockLinear, "from_nf4_linear", fail_second)
    sel = {
        "model.layers.0.self_attn.q_proj": [(0, 0)],
        "model.layers.0.self_attn.v_proj": [(0, 0)],
        "model.layers.1.self_attn.q_proj": [(1, 1)],
    }
    with pytest.raises(torch.OutOfMemoryError):
        patch(model, sel, B)
    assert_unchanged(model, snap)
    assert all(
        type(model.get_submodule(n)) is t
        for n, t in [("model.layers.0.self_attn.q_proj", NF4Linear), ("model.layers.0.self_attn.v_proj", nn.Linear)]
    )


def test_bad_4bit_selections_change_nothing():
    model = quantize_base(tiny(torch.float32), "nf4", skip=("v_proj",))
    snap = snapshot(model)
    with pytest.raises(ValueError) as err:
        patch(
            model,
            {"model.layers.0.self_attn.q_proj": [(9, 0)], "model.layers.0.self_attn.v_proj": [(0, 0)]},
            B,
            block_dtype=torch.float16,
        )
    msg = str(err.value)
    assert "out of range" in msg and "blocks of an nn.Linear have its weight's dtype torch.float32" in msg
    assert "nn.Linear/NF4Linear modules" in msg
    with pytest.raises(ValueError, match="quantize_base\\(model\\) first"):
        patch_nf4(model, {"model.layers.0.self_attn.v_proj": [(0, 0)]}, B)
    assert_unchanged(model, snap)


def test_block_files_across_bases_name_the_base(checkpoint, tmp_path):
    """Blocks trained on a bf16 base are refused by a 4-bit base and the reverse, with the training base named
    and the model untouched; strict=False loads them (the blocks are absolute values) over the other base."""
    sel = {"model.layers.0.self_attn.q_proj": [(0, 0)], "model.layers.1.mlp.down_proj": [(2, 4)]}
    bf16 = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    patch(bf16, sel, B, verbose=False)
    with torch.no_grad():
        for m in patched_modules(bf16).values():
            m.block_weight.add_(0.5)
    save_blocks(bf16, tmp_path / "from_bf16")
    nf4 = patch(four_bit(checkpoint), sel, B, verbose=False)
    with torch.no_grad():
        for m in patched_modules(nf4).values():
            m.block_weight.add_(0.5)
    save_blocks(nf4, tmp_path / "from_nf4")

    target = four_bit(checkpoint)
    snap = snapshot(target)
    with pytest.raises(ValueError, match="trained on a 16-bit base, but this model's base is 4-bit NF4") as err:
        load_blocks(target, tmp_path / "from_bf16")
    assert "strict=False" in str(err.value)
    assert_unchanged(target, snap)
    plain = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    snap = snapshot(plain)
    with pytest.raises(ValueError, match="trained on a 4-bit NF4 base, but this model's base is 16-bit") as err:
        load_blocks(plain, tmp_path / "from_nf4")
    assert "fold_blocks_into_checkpoint" in str(err.value)
    assert_unchanged(plain, snap)

    load_blocks(target, tmp_path / "from_bf16", strict=False)
    for n, m in patched_modules(target).items():
        assert isinstance(m, NF4SparseBlockLinear) and m.block_weight.dtype == torch.bfloat16
        assert torch.equal(m.block_weight, patched_modules(bf16)[n].block_weight)
    # and blocks trained on 4 bits (bf16 blocks here, the weights' dtype) over the bf16 base: what folding gives
    load_blocks(plain, tmp_path / "from_nf4", strict=False)
    for n, m in patched_modules(plain).items():
        assert isinstance(m, smt_kernels.SparseBlockLinear)
        assert torch.equal(m.block_weight, patched_modules(nf4)[n].block_weight)
    folded = fold_blocks_into_checkpoint(tmp_path / "from_nf4", checkpoint, tmp_path / "folded")
    folded_state = LlamaForCausalLM.from_pretrained(folded, dtype=torch.bfloat16).state_dict()
    for k, v in merge(plain).state_dict().items():
        assert torch.equal(folded_state[k], v), k


def test_select_blocks_on_4bit_equals_the_dequantized_twin():
    """Gradient scores of NF4 targets (through nf4_weight_gradients) equal those of the 16-bit model whose weights
    are the dequantized 4-bit ones; the activation score too. The model is left as it was."""
    model = quantize_base(tiny(torch.float32), "nf4")
    twin = tiny(torch.float32)
    for name, m in smt_kernels.quant.nf4_modules(model).items():
        twin.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32))
    snap = snapshot(model)
    chosen = {}
    for score in ("abs_mean", "l2", "activation"):
        got = select_blocks(
            model, [batch(1), batch(2)], num_blocks=4, targets=TARGETS, score=score, block_size=B, progress=False
        )
        want = select_blocks(
            twin, [batch(1), batch(2)], num_blocks=4, targets=TARGETS, score=score, block_size=B, progress=False
        )
        assert set(got.scores) == set(want.scores)
        for n in want.scores:
            torch.testing.assert_close(got.scores[n], want.scores[n], rtol=1e-4, atol=1e-9)
        assert dict(got) == dict(want), score
        chosen[score] = got
    assert_unchanged(model, snap)
    assert all(m.weight_grad_fold is None for m in smt_kernels.quant.nf4_modules(model).values())
    # gradient checkpointing recomputes the 4-bit forwards; each target's gradient is still folded once per batch
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again = select_blocks(
        model, [batch(1), batch(2)], num_blocks=4, targets=TARGETS, block_size=B, training=True, progress=False
    )
    first = chosen["abs_mean"]
    assert dict(again) == dict(first) and all(torch.equal(again.scores[n], first.scores[n]) for n in first.scores)
    patch(model, {"model.layers.0.self_attn.q_proj": [(0, 0)]}, B, verbose=False)
    with pytest.raises(ValueError, match="already a NF4SparseBlockLinear"):
        select_blocks(model, batch(1), num_blocks=1, targets=TARGETS, block_size=B, progress=False)


@pytest.mark.parametrize("score", ["abs_mean", "mean_abs"])
def test_select_on_4bit_holds_one_dense_gradient_at_a_time(monkeypatch, score):
    """Each 4-bit target's dense dL/dW is folded and freed before the next one exists; no parameter gets a .grad."""
    import weakref

    import smt_kernels.select as select_mod

    model = quantize_base(tiny(torch.float32), "nf4")
    folded = []
    real_fold = select_mod._GradientAccumulator.fold

    def spy(self, grad):
        assert all(ref() is None for ref in folded), "an earlier dense gradient is still alive"
        assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
        assert tuple(grad.shape) == self.shape
        folded.append(weakref.ref(grad))
        real_fold(self, grad)

    monkeypatch.setattr(select_mod._GradientAccumulator, "fold", spy)
    select_blocks(model, [batch(1), batch(2)], num_blocks=3, targets=TARGETS, score=score, block_size=B, progress=False)
    assert len(folded) == 2 * 6


def test_blocks_load_onto_the_same_checkpoint_quantized_elsewhere(checkpoint, tmp_path):
    """The double-quantization offset is a mean, rounded differently by a GPU and the CPU (seen on an H200: 12
    scale/offset tensors of a tiny model differed): blocks trained on one such base load onto the other; a changed
    4-bit code is still refused."""
    sel = {"model.layers.0.self_attn.q_proj": [(0, 0)], "model.layers.1.mlp.down_proj": [(2, 4)]}
    trained = patch(four_bit(checkpoint), sel, B, verbose=False)
    with torch.no_grad():
        for m in patched_modules(trained).values():
            m.block_weight.add_(0.5)
    save_blocks(trained, tmp_path / "blocks")

    elsewhere = four_bit(checkpoint)
    with torch.no_grad():  # one ulp off, as another device's summation order gives
        for m in elsewhere.modules():
            if isinstance(m, NF4Linear):
                m.weight_absmax_offset.copy_(torch.nextafter(m.weight_absmax_offset, torch.tensor(1.0)))
                m.weight_absmax_scale.copy_(torch.nextafter(m.weight_absmax_scale, torch.zeros(())))
    load_blocks(elsewhere, tmp_path / "blocks")
    for n, m in patched_modules(elsewhere).items():
        assert torch.equal(m.block_weight, patched_modules(trained)[n].block_weight)

    other = four_bit(checkpoint)
    layer = other.model.layers[1].self_attn.k_proj  # not a target: its codes identify the base
    with torch.no_grad():
        layer.weight_packed[::97] ^= 0x11
    snap = snapshot(other)
    with pytest.raises(ValueError, match="different base model.*k_proj.weight_packed"):
        load_blocks(other, tmp_path / "blocks")
    assert_unchanged(other, snap)
