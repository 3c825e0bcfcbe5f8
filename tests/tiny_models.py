"""Tiny random LLaMA/Qwen2 models, batches and checks shared by the patching, block-file and Trainer tests."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from smt_kernels import SparseBlockLinear

B = 32  # hidden 80, k/v out 40, MLP 136: no dimension is a multiple of 32, so edge blocks are clipped
ARCHS = ["llama", "qwen2"]  # Qwen2 has q/k/v biases
SELECTION = {
    "model.layers.0.self_attn.q_proj": [(0, 0), (2, 2)],  # (2, 2) is the clipped 16×16 corner
    "model.layers.0.self_attn.v_proj": [(1, 1)],
    "model.layers.1.self_attn.k_proj": [(0, 2), (1, 0)],
    "model.layers.1.mlp.down_proj": [(2, 4)],  # an MLP target: 80×136, corner block 16×8
}


def tiny(arch="llama", seed=0, dtype=torch.float32, **config):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=96,
        hidden_size=80,
        intermediate_size=136,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kw.update(config)
    cls, cfg = (LlamaForCausalLM, LlamaConfig) if arch == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    model = cls(cfg(**kw)).to(dtype)
    if arch == "qwen2":
        with torch.no_grad():  # random (not zero) biases, so that keeping them is actually tested
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_()
    return model


def make_batch(seed=1, n=2, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def snapshot(model):
    """Everything a failed call must leave alone: tensors, module types, requires_grad flags, SMT config."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: type(m).__name__ for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        copy.deepcopy(getattr(model, "smt_config", None)),
    )


def assert_unchanged(model, snap):
    tensors, types, flags, cfg = snap
    now = model.state_dict()
    assert list(now) == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(now[k], v), k
    assert {n: type(m).__name__ for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert getattr(model, "smt_config", None) == cfg


def block_mask(shape, blocks):
    mask = torch.zeros(shape, dtype=torch.bool)
    for r, c in blocks:
        mask[r * B : (r + 1) * B, c * B : (c + 1) * B] = True
    return mask


def train(model, steps=3, seed=1, **opt_kw):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1, **opt_kw)
    for i in range(steps):
        model(**make_batch(seed + i)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def block_weights(model):
    """{module name: its block_weight} of every patched layer, detached copies."""
    return {n: m.block_weight.detach().clone() for n, m in model.named_modules() if isinstance(m, SparseBlockLinear)}


def assert_only_blocks_changed(model, base_state, selection):
    """Every parameter/buffer equals the base exactly, except the selected blocks, which all changed somewhere."""
    mods = dict(model.named_modules())
    for key, before in base_state.items():
        name = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and name in selection:
            m = mods[name]
            assert isinstance(m, SparseBlockLinear)
            mask = block_mask(before.shape, selection[name])
            for w in (m.weight.detach(), m.merged_weight()):
                assert torch.equal(w[~mask], before[~mask]), key
            merged = m.merged_weight()
            for r, c in selection[name]:
                blk = (slice(r * B, (r + 1) * B), slice(c * B, (c + 1) * B))
                assert not torch.equal(merged[blk], before[blk]), f"{key} block {(r, c)} did not train"
        else:
            assert torch.equal(model.state_dict()[key], before), key
