"""Block selection on tiny random LLaMA/Qwen2 models: scores against a direct reference, budgets, planted
gradients, determinism, memory behaviour (no non-target gradients), restored model state, bad inputs, summary."""

import json

import pytest
import torch
from tiny_models import tiny as tiny_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from smt_kernels import Selection, SMTConfig, patch, select_blocks, summarize_selection
from smt_kernels import select as select_mod

B = 32  # hidden 80 and k/v out 40 are not multiples of 32: every matrix has clipped edge blocks
QKV = ("q_proj", "k_proj", "v_proj")


def tiny(arch="llama", seed=0):
    return tiny_model(arch, seed)


def make_batches(n=2, seed=1, pad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, 6:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def clipped_blocks(t, b):
    """Yield (r, c, block) over the clipped b×b blocks of a 2-D tensor."""
    for r in range(-(-t.shape[0] // b)):
        for c in range(-(-t.shape[1] // b)):
            yield r, c, t[r * b : (r + 1) * b, c * b : (c + 1) * b]


def reference_grad_scores(model, batches, score, targets=QKV):
    """Full-fine-tuning style reference: sum .grad over batches, then score each clipped block with a loop."""
    model = model.float()
    model.zero_grad()
    for batch in batches:
        model(**batch).loss.backward()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            g = m.weight.grad.double()
            s = torch.zeros(-(-g.shape[0] // B), -(-g.shape[1] // B), dtype=torch.float64)
            for r, c, blk in clipped_blocks(g, B):
                s[r, c] = {
                    "abs_mean": blk.mean().abs(),
                    "mean_abs": blk.abs().mean(),
                    "l1": blk.abs().sum(),
                    "l2": blk.square().sum().sqrt(),
                }[score]
            out[name] = s
    model.zero_grad(set_to_none=True)
    return out


def top_global(scores, k):
    flat = [
        (float(s[r, c]), i, r, c)
        for i, (n, s) in enumerate(scores.items())
        for r in range(s.shape[0])
        for c in range(s.shape[1])
    ]
    flat.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
    names = list(scores)
    out = {}
    for _, i, r, c in flat[:k]:
        out.setdefault(names[i], []).append((r, c))
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize(
    "arch, score",
    [
        ("llama", "abs_mean"),
        ("llama", "mean_abs"),
        ("llama", "l1"),
        ("llama", "l2"),
        ("qwen2", "abs_mean"),
        ("qwen2", "l2"),
    ],
)
def test_gradient_scores_match_reference(arch, score):
    model, batches = tiny(arch), make_batches()
    sel = select_blocks(model, batches, num_blocks=7, score=score, block_size=B, progress=False)
    ref = reference_grad_scores(model, batches, score)
    assert list(sel.scores) == list(ref)
    for name in ref:
        torch.testing.assert_close(sel.scores[name], ref[name], rtol=1e-5, atol=1e-12)
    assert dict(sel) == top_global(sel.scores, 7)
    assert sel.num_blocks == 7 and sel.block_size == B and sel.score == score


def test_activation_score_matches_reference_and_ignores_padding():
    model, batches = tiny(), make_batches(pad=True)
    sel = select_blocks(model, batches, num_blocks=5, score="activation", block_size=B, progress=False)
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].detach()))
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in QKV
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        masks = [b["attention_mask"].bool() for b in batches]
        rows = torch.cat([x[m] for x, m in zip(xs, masks, strict=True)]).double()
        imp = model.get_submodule(name).weight.detach().double().abs() * rows.norm(dim=0)[None, :]
        for r, c, blk in clipped_blocks(imp, B):
            torch.testing.assert_close(sel.scores[name][r, c], blk.mean(), rtol=1e-6, atol=0)
    # padded positions changed nothing: padding with other token ids gives the same scores
    other = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 5)) for b in batches]
    sel2 = select_blocks(model, other, num_blocks=5, score="activation", block_size=B, progress=False)
    for name in sel.scores:
        torch.testing.assert_close(sel2.scores[name], sel.scores[name], rtol=1e-6, atol=0)


class Planted(nn.Module):
    """Wraps a causal LM: loss + scale · Σ W[block] of one target, so that block's gradient dominates."""

    def __init__(self, lm, name, block, scale):
        super().__init__()
        self.lm, self.name, self.block, self.scale = lm, name, block, scale

    def forward(self, **batch):
        out = self.lm(**batch)
        r, c = self.block
        w = self.lm.get_submodule(self.name).weight
        out.loss = out.loss + self.scale * w[r * B : (r + 1) * B, c * B : (c + 1) * B].sum()
        return out


@pytest.mark.parametrize("score", ["abs_mean", "mean_abs", "l1", "l2"])
def test_finds_planted_gradient(score):
    name = "model.layers.1.self_attn.k_proj"
    model = Planted(tiny(), name, (1, 2), 10.0)  # (1, 2) is the clipped 8×16 corner block of the 40×80 k_proj
    sel = select_blocks(model, make_batches(), num_blocks=1, score=score, block_size=B, progress=False)
    assert dict(sel) == {f"lm.{name}": [(1, 2)]}
    per = select_blocks(
        model, make_batches(), num_blocks=1, score=score, strategy="per_matrix", block_size=B, progress=False
    )
    assert per[f"lm.{name}"] == [(1, 2)] and len(per) == 6


def test_activation_finds_planted_activation():
    model = tiny()
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.input_layernorm.weight[32:64] *= 30.0  # input block-column 1 of layer 1's q/k/v is loud
        layer.self_attn.v_proj.weight[0:32] *= 3.0  # and v_proj's row block 0 is heavy
    sel = select_blocks(model, make_batches(), num_blocks=1, score="activation", block_size=B, progress=False)
    assert dict(sel) == {"model.layers.1.self_attn.v_proj": [(0, 1)]}


def test_deterministic_and_json_round_trip(tmp_path):
    a = select_blocks(tiny(seed=3), make_batches(), num_blocks=9, block_size=B, progress=False)
    b = select_blocks(tiny(seed=3), make_batches(), num_blocks=9, block_size=B, progress=False)
    assert dict(a) == dict(b) and a.num_blocks == 9
    text = json.dumps(a)  # a Selection is a plain dict for json
    assert json.loads(text) == {k: [list(p) for p in v] for k, v in a.items()}
    path = a.save(tmp_path / "sel.json")
    c = Selection.load(path)
    assert dict(c) == dict(a) and c.block_size == B and c.score == "abs_mean" and c.targets == QKV
    model = tiny(seed=3)
    patch(model, json.loads(text), block_size=B, verbose=False)  # a JSON-loaded dict patches as is
    # modules come out in model order, blocks sorted
    order = [n for n, _ in model.named_modules()]
    assert list(a) == sorted(a, key=order.index)
    assert all(v == sorted(v) for v in a.values())


def test_ties_break_by_model_order_then_block():
    model = tiny()
    for n, m in model.named_modules():  # zero q/k/v: every gradient block score is 0 -> pure tie
        if n.rsplit(".", 1)[-1] in QKV:
            nn.init.zeros_(m.weight)
    sel = select_blocks(model, make_batches(), num_blocks=4, score="activation", block_size=B, progress=False)
    assert dict(sel) == {"model.layers.0.self_attn.q_proj": [(0, 0), (0, 1), (0, 2), (1, 0)]}


def test_budgets():
    model, batches = tiny(), make_batches(1)
    # q 80×80 -> 3×3 blocks, k/v 40×80 -> 2×3: 9 + 6 + 6 = 21 per layer, 42 in all
    per = select_blocks(model, batches, num_blocks=2, strategy="per_matrix", block_size=B, progress=False)
    assert len(per) == 6 and all(len(v) == 2 for v in per.values())
    everything = select_blocks(model, batches, ratio=1.0, block_size=B, progress=False)
    assert everything.num_blocks == 42
    target_elems = 2 * (80 * 80 + 2 * 40 * 80)
    r = select_blocks(model, batches, ratio=0.25, block_size=B, progress=False)
    covered = summarize_selection(model, r).trainable  # at least the ratio, less than one block more
    assert 0.25 * target_elems <= covered < 0.25 * target_elems + B * B
    assert r.num_blocks > round(0.25 * target_elems / B**2)  # clipped blocks are small: more of them are needed
    tiny_ratio = select_blocks(model, batches, ratio=1e-6, strategy="per_matrix", block_size=B, progress=False)
    assert all(len(v) == 1 for v in tiny_ratio.values()) and len(tiny_ratio) == 6  # at least one block each
    mlp = select_blocks(
        model,
        batches,
        num_blocks=3,
        targets=("gate_proj", "up_proj", "down_proj", "o_proj"),
        block_size=B,
        progress=False,
    )
    assert mlp.num_blocks == 3 and all(
        n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj", "o_proj") for n in mlp
    )
    full_name = select_blocks(
        model, batches, num_blocks=2, targets=("model.layers.1.mlp.down_proj",), block_size=B, progress=False
    )
    assert list(full_name) == ["model.layers.1.mlp.down_proj"]


def test_restores_model_state_and_keeps_no_gradients():
    model = tiny()
    model.model.embed_tokens.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    prior = torch.full_like(q, 0.5)
    q.grad = prior
    model.train()
    model.model.layers[1].eval()  # mixed modes come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    for score in ("abs_mean", "l2", "activation"):
        select_blocks(model, make_batches(), num_blocks=3, score=score, block_size=B, progress=False)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert q.grad is prior
        assert all(p.grad is None for p in model.parameters() if p is not q)
        assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("score", ["abs_mean", "mean_abs"])
def test_only_target_weights_get_gradients(monkeypatch, score):
    """While selecting, only target weights require grad, and at most the one being folded holds a .grad."""
    model = tiny()
    targets = {id(m.weight) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in QKV}
    seen = []
    real_fold = select_mod._GradientAccumulator.fold

    def spy(self, grad):
        seen.append(
            (
                {id(p) for p in model.parameters() if p.requires_grad} == targets,
                sum(p.grad is not None for p in model.parameters()),
            )
        )
        real_fold(self, grad)

    monkeypatch.setattr(select_mod._GradientAccumulator, "fold", spy)
    select_blocks(model, make_batches(2), num_blocks=3, score=score, block_size=B, progress=False)
    assert len(seen) == 2 * 6 and all(ok and alive == 1 for ok, alive in seen)
    acc = select_mod._GradientAccumulator(model.model.layers[0].self_attn.q_proj.weight, score, B, None)
    # abs_mean keeps (R, C) block sums only; the others a dense fp32 sum
    assert tuple(acc.acc.shape) == ((3, 3) if score == "abs_mean" else (80, 80))


def test_training_mode_with_gradient_checkpointing_gives_same_selection():
    model = tiny().eval()
    plain = select_blocks(model, make_batches(), num_blocks=6, block_size=B, progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = select_blocks(
        model, make_batches(), num_blocks=6, block_size=B, training=True, progress=False, accumulate_device="cpu"
    )
    assert dict(ckpt) == dict(plain)
    assert not model.training


def test_bad_inputs():
    model, batches = tiny(), make_batches(1)
    kw = dict(block_size=B, progress=False)
    with pytest.raises(ValueError, match="exactly one of num_blocks or ratio"):
        select_blocks(model, batches, **kw)
    with pytest.raises(ValueError, match="exactly one of num_blocks or ratio"):
        select_blocks(model, batches, num_blocks=2, ratio=0.1, **kw)
    with pytest.raises(ValueError, match="num_blocks=43 but all targets together has only 42 blocks of 32"):
        select_blocks(model, batches, num_blocks=43, **kw)
    with pytest.raises(ValueError, match="num_blocks=7 but model.layers.0.self_attn.k_proj has only 6 blocks"):
        select_blocks(model, batches, num_blocks=7, strategy="per_matrix", **kw)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        select_blocks(model, batches, num_blocks=0, **kw)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        select_blocks(model, batches, ratio=1.5, **kw)
    with pytest.raises(ValueError, match="score must be one of"):
        select_blocks(model, batches, num_blocks=1, score="fisher", **kw)
    with pytest.raises(ValueError, match="strategy must be one of"):
        select_blocks(model, batches, num_blocks=1, strategy="layerwise", **kw)
    with pytest.raises(ValueError, match="power of two"):
        select_blocks(model, batches, num_blocks=1, block_size=48, progress=False)
    with pytest.raises(ValueError, match=r"matches targets \['qkv'\]; its linear modules are named \['down_proj'"):
        select_blocks(model, batches, num_blocks=1, targets=("qkv",), **kw)
    # one misspelt target among good ones is refused too, not dropped
    with pytest.raises(ValueError, match=r"targets \['v_prj'\] match no linear module of LlamaForCausalLM; its"):
        select_blocks(model, batches, num_blocks=1, targets=("q_proj", "v_prj"), **kw)
    with pytest.raises(ValueError, match="batches is empty"):
        select_blocks(model, [], num_blocks=1, **kw)
    with pytest.raises(ValueError, match="batch 0 produced no loss"):
        select_blocks(model, [{"input_ids": batches[0]["input_ids"]}], num_blocks=1, **kw)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(flags.values())  # failures restored the model too
    patch(model, {"model.layers.0.self_attn.q_proj": [(0, 0)]}, block_size=B, verbose=False)
    with pytest.raises(ValueError, match="needs an unpatched model"):
        select_blocks(model, batches, num_blocks=1, **kw)


def test_config_gives_the_keyword_selection_and_conflicts_are_refused():
    model, batches = tiny(), make_batches(2)
    kw = dict(ratio=0.05, targets=("v_proj", "k_proj"), score="l2", strategy="per_matrix", block_size=B)
    cfg = SMTConfig(**kw)
    by_config = select_blocks(model, batches, config=cfg, progress=False)
    by_keywords = select_blocks(model, batches, progress=False, **kw)
    assert dict(by_config) == dict(by_keywords) and by_config  # the same blocks
    assert by_config.config == by_keywords.config == cfg  # the Selection carries how it was made
    assert select_blocks(model, batches, num_blocks=3, block_size=B, progress=False).config == SMTConfig(
        num_blocks=3, block_size=B
    )
    # a keyword that repeats the config's value is fine; one that differs is refused before any warm-up
    assert dict(select_blocks(model, batches, config=cfg, score="l2", progress=False)) == dict(by_config)
    with pytest.raises(ValueError, match=r"select_blocks: score='abs_mean' but config.score='l2'"):
        select_blocks(model, batches, config=cfg, score="abs_mean", progress=False)
    with pytest.raises(ValueError, match=r"num_blocks=4 but config.num_blocks=None"):
        select_blocks(model, batches, config=cfg, num_blocks=4, progress=False)
    with pytest.raises(TypeError, match="config must be an smt_kernels.SMTConfig, got dict"):
        select_blocks(model, batches, config=cfg.to_dict(), progress=False)


def test_single_batch_dict_and_num_batches_limit():
    model = tiny()
    batches = make_batches(3)

    def endless():
        while True:
            yield from batches

    a = select_blocks(model, endless(), num_blocks=4, num_batches=3, block_size=B, progress=False)
    b = select_blocks(model, batches, num_blocks=4, block_size=B, progress=False)
    assert dict(a) == dict(b) and a.num_batches == 3
    one = select_blocks(model, batches[0], num_blocks=4, block_size=B, progress=False)
    assert one.num_batches == 1


def test_summary_and_heat_map(tmp_path, capsys):
    model = tiny()
    sel = select_blocks(model, make_batches(), num_blocks=8, block_size=B, progress=True)
    assert "SMT selection (abs_mean)" in capsys.readouterr().err  # the tqdm bar
    s = summarize_selection(model, sel)
    assert s.num_blocks == 8 and s.kinds == list(QKV)
    assert s.per_kind() == {k: sum(len(v) for n, v in sel.items() if n.endswith(k)) for k in QKV}
    assert set(s.per_layer()) == {0, 1}
    assert sum(sum(row.values()) for row in s.per_layer().values()) == 8
    expected = sum(
        min(B, m.out_features - r * B) * min(B, m.in_features - c * B)
        for n, v in sel.items()
        for m in [model.get_submodule(n)]
        for r, c in v
    )
    assert s.trainable == expected and s.target_params == 2 * (80 * 80 + 2 * 40 * 80)
    text = str(s)
    assert "8 blocks of 32×32" in text and f"{expected:,} trainable" in text and "v_proj" in text
    png = s.plot(tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts, layers, kinds = s.heatmap()
    assert counts.shape == (2, 3) and int(counts.sum()) == 8 and layers == [0, 1]
    patch(model, sel, verbose=False)
    s2 = summarize_selection(model, sel)  # works on the patched model as well
    assert s2.trainable == s.trainable and s2.per_layer() == s.per_layer()
    with pytest.raises(ValueError, match="modules the model does not have"):
        summarize_selection(model, {"nope": [(0, 0)]}, block_size=B)


@pytest.mark.parametrize("strategy", ["global", "per_matrix"])
@pytest.mark.parametrize("budget", [{"ratio": 0.1}, {"ratio": 0.15}, {"ratio": 0.3}, {"num_blocks": 3}])
def test_budget_elements_is_what_select_blocks_trains(strategy, budget):
    """Known before any warm-up, and exact when the dimensions are multiples of b (q 64×64, k/v 32×64, b = 16)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    sel = select_blocks(model, make_batches(1), strategy=strategy, block_size=16, progress=False, **budget)
    want = select_mod.budget_elements(model, strategy=strategy, block_size=16, **budget)
    assert want == summarize_selection(model, sel).trainable


def test_budget_elements_with_clipped_blocks_is_within_one_block():
    model = tiny()  # b = 32: every matrix has clipped edge blocks
    for strategy in ("global", "per_matrix"):
        sel = select_blocks(model, make_batches(1), ratio=0.2, strategy=strategy, block_size=B, progress=False)
        groups = 1 if strategy == "global" else 6
        got = summarize_selection(model, sel).trainable
        assert abs(select_mod.budget_elements(model, ratio=0.2, strategy=strategy, block_size=B) - got) < groups * B * B
    with pytest.raises(ValueError, match="num_blocks=7 but model.layers.0.self_attn.k_proj has only 6 blocks"):
        select_mod.budget_elements(model, num_blocks=7, strategy="per_matrix", block_size=B)


@pytest.mark.parametrize("warmup", [0, 2])
def test_a_refused_selection_leaves_no_hooks_on_the_weights(warmup):
    """A target the scores cannot use (a float64 weight after float32 ones) is refused before any hook is put on
    a weight: later backward passes keep their gradients and take no stale warm-up step."""
    model = tiny_model()
    model.model.layers[1].self_attn.k_proj.double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(warmup_steps=warmup, warmup_lr=1e-2) if warmup else {}
    with pytest.raises(TypeError, match="k_proj.weight has dtype torch.float64"):
        select_blocks(model, make_batches(), num_blocks=2, block_size=16, progress=False, **kw)
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    model.model.layers[1].self_attn.k_proj.float()
    model(**make_batches()[0]).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert all(torch.equal(p, before[n].to(p.dtype)) for n, p in model.named_parameters())
