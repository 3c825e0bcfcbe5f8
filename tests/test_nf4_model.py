"""A 4-bit LLaMA end to end: quantize_base -> patch_nf4 -> train -> merge_nf4; loading a sharded bf16 checkpoint
shard by shard; folding trained blocks into the original checkpoint; bitsandbytes Linear4bit models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HAS_CUDA
from safetensors.torch import load_file
from tiny_models import tiny as tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

import smt_kernels.quant.checkpoint as ckpt
from smt_kernels.quant.checkpoint import fold_blocks_into_checkpoint, load_nf4_pretrained
from smt_kernels.quant.model import (
    merge_nf4,
    nf4_modules,
    nf4_weight_gradients,
    patch_nf4,
    quantize_base,
    trained_blocks,
)
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the training and loading paths run on the GPU when there is one
B = 32  # hidden 80, k/v out 40, MLP 136: edge blocks are clipped
SELECTION = {
    "model.layers.0.self_attn.q_proj": [(0, 0), (2, 2)],
    "model.layers.0.self_attn.v_proj": [(1, 1)],
    "model.layers.1.mlp.down_proj": [(2, 4)],
}


def tiny(dtype=torch.float32, seed=0, **config):
    return tiny_llama("llama", seed, dtype, **config)


def batch(seed=1, device="cpu"):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "labels": ids}


def test_quantize_base_replaces_linears_except_lm_head_and_skip():
    model = tiny()
    ref = tiny()
    quantize_base(model, "nf4", skip=("down_proj",))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    assert kinds["lm_head"] == "Linear"
    assert all(k == "Linear" for n, k in kinds.items() if n.endswith("down_proj"))
    assert sum(k == "NF4Linear" for k in kinds.values()) == 2 * 6
    # the quantized model is the original with each weight replaced by its NF4 dequantization
    for name, m in nf4_modules(model).items():
        ref.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, ref(**batch()).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="method='nf4'"):
        quantize_base(tiny(), "int8")


def test_qwen2_biases_are_kept():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=80,
        intermediate_size=136,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model, twin = Qwen2ForCausalLM(cfg), Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    twin.load_state_dict(model.state_dict())
    quantize_base(model, "nf4")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, NF4Linear) and q.bias is not None and not q.bias.requires_grad
    for name, m in nf4_modules(model).items():
        twin.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, twin(**batch()).logits, rtol=1e-4, atol=1e-4)


def test_quantize_patch_train_merge():
    model = quantize_base(tiny(torch.bfloat16).to(DEVICE), "nf4", compute_dtype=torch.bfloat16)
    patch_nf4(model, SELECTION, B, block_dtype=torch.float32)
    assert model.smt_config["selection"] == {n: [tuple(p) for p in v] for n, v in SELECTION.items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.block_weight" for n in SELECTION]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: m.block_weight.detach().clone() for n, m in nf4_modules(model, trainable=True).items()}
    losses = []
    for _ in range(4):
        loss = model(**batch(device=DEVICE)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, m in nf4_modules(model, trainable=True).items():
        assert not torch.equal(m.block_weight, before[n])
    with torch.no_grad():
        logits = model(**batch(device=DEVICE)).logits
    merged = merge_nf4(model)
    assert not nf4_modules(merged) and not hasattr(merged, "smt_config")
    assert all(p.requires_grad for p in merged.parameters())  # flags from before patch_nf4
    w = merged.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert w.dtype == torch.bfloat16
    with torch.no_grad():
        # the same bf16 weight either way: exact on the CPU; on a GPU cuBLAS may pick another kernel for nn.Linear
        tol = 0 if DEVICE == "cpu" else 1e-2
        torch.testing.assert_close(merged(**batch(device=DEVICE)).logits, logits, rtol=tol, atol=tol)


def test_hf_gradient_checkpointing_gives_the_same_block_gradients():
    model = patch_nf4(quantize_base(tiny(), "nf4"), SELECTION, B)
    model.train()
    model(**batch()).loss.backward()
    want = {n: m.block_weight.grad.clone() for n, m in nf4_modules(model, trainable=True).items()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**batch()).loss.backward()
    for n, m in nf4_modules(model, trainable=True).items():
        torch.testing.assert_close(m.block_weight.grad, want[n], rtol=1e-5, atol=1e-7)


def test_dense_weight_gradients_for_selection():
    """nf4_weight_gradients hands each target's dL/dW to its callback, equal to autograd's on the dequantized twin;
    the first layer's q_proj (whose input needs no gradient) included."""
    model = quantize_base(tiny(), "nf4")
    twin = tiny()
    for name, m in nf4_modules(model).items():
        twin.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    with nf4_weight_gradients(model, {n: got[n].append for n in names}):
        model(**batch()).loss.backward()
    assert all(m.weight_grad_fold is None for m in nf4_modules(model).values())
    for p in twin.parameters():
        p.requires_grad_(False)
    for n in names:
        twin.get_submodule(n).weight.requires_grad_(True)
    twin(**batch()).loss.backward()
    for n in names:
        assert len(got[n]) == 1
        torch.testing.assert_close(got[n][0], twin.get_submodule(n).weight.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="frozen NF4Linear"):
        with nf4_weight_gradients(model, {"lm_head": print}):
            pass


def test_patch_nf4_refuses_bad_selection_without_changing_anything():
    model = quantize_base(tiny(), "nf4", skip=("v_proj",))
    types = {n: type(m) for n, m in model.named_modules()}
    bad = {
        "model.layers.0.self_attn.q_proj": [(9, 0)],
        "model.layers.0.self_attn.v_proj": [(0, 0)],
        "model.nope": [(0, 0)],
    }
    with pytest.raises(ValueError) as err:
        patch_nf4(model, bad, B)
    msg = str(err.value)
    assert "out of range" in msg and "quantize_base(model) first" in msg and "no such module" in msg
    assert {n: type(m) for n, m in model.named_modules()} == types and not hasattr(model, "smt_config")
    patch_nf4(model, {"model.layers.0.self_attn.q_proj": [(0, 0)]}, B)
    with pytest.raises(ValueError, match="already patched"):
        patch_nf4(model, {"model.layers.0.self_attn.k_proj": [(0, 0)]}, B)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16_sharded")
    model = tiny(torch.bfloat16, seed=3)
    model.save_pretrained(d, max_shard_size="100KB")
    assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return d, model


def test_load_sharded_bf16_into_4bit_shard_by_shard(sharded, monkeypatch):
    directory, full = sharded
    shards = ckpt.checkpoint_shards(directory)
    assert len(shards) >= 3
    opened, live = [], []
    real_safe_open = ckpt.safe_open

    class CountingOpen:  # records the shards opened and the most 16-bit tensors ever held at once
        def __init__(self, path, **kw):
            opened.append(path)
            self.f = real_safe_open(path, **kw)

        def __enter__(self):
            inner = self.f.__enter__()
            outer = self

            class Reader:
                def keys(self):
                    return inner.keys()

                def get_tensor(self, key):
                    live.append(key)
                    return inner.get_tensor(key)

            outer.reader = Reader()
            return outer.reader

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(ckpt, "safe_open", CountingOpen)
    model = load_nf4_pretrained(directory, device=DEVICE, compute_dtype=torch.bfloat16)
    assert [str(s) for s in shards] == opened  # each shard once, in order
    assert len(live) == len(set(live))  # each tensor read once
    reference = quantize_base(LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(DEVICE), "nf4")
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in reference.named_modules()}
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch(device=DEVICE)).logits, reference.eval()(**batch(device=DEVICE)).logits)


def test_load_tied_embeddings(tmp_path):
    """A checkpoint without lm_head.weight (tied to the input embedding) loads with the two tied."""
    tiny(torch.bfloat16, seed=4, tie_word_embeddings=True).save_pretrained(tmp_path, max_shard_size="100KB")
    model = load_nf4_pretrained(tmp_path, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = quantize_base(LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16), "nf4").eval()
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, reference(**batch()).logits)


def test_load_missing_tensor_is_an_error(sharded, tmp_path):
    directory, _ = sharded
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    # drop the shard holding the embeddings: the index still names its tensors, the shards lack them
    victim = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks .* tensors the model needs"):
        load_nf4_pretrained(tmp_path, device="cpu")


def test_fold_blocks_trained_on_nf4_into_bf16_checkpoint(sharded, tmp_path):
    directory, full = sharded
    model = load_nf4_pretrained(directory, device="cpu", compute_dtype=torch.bfloat16)
    patch_nf4(model, SELECTION, B)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch()).loss.backward()
    opt.step()
    blocks = trained_blocks(model)
    out = fold_blocks_into_checkpoint(blocks, directory, tmp_path / "folded", block_size=B)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in directory.iterdir())
    folded = {}
    for shard in ckpt.checkpoint_shards(out):
        folded.update(load_file(shard))
    original = full.state_dict()
    assert set(folded) == set(original)
    for key, t in original.items():
        name = key.removesuffix(".weight")
        if name not in blocks:
            assert torch.equal(folded[key], t), key  # untouched, bit for bit
            continue
        expected = t.clone()
        idx, bw = blocks[name]
        for k, (r, c) in enumerate(idx.tolist()):
            tile = expected[r * B : (r + 1) * B, c * B : (c + 1) * B]
            tile.copy_(bw[k, : tile.shape[0], : tile.shape[1]])
        assert torch.equal(folded[key], expected), key
        assert not torch.equal(folded[key], t)


def test_fold_block_file_written_by_save_blocks(sharded, tmp_path):
    """The block file of a bf16 SMT run (smt_kernels.save_blocks) folds into the checkpoint it was trained on."""
    import smt_kernels

    directory, full = sharded
    model = tiny(torch.bfloat16, seed=3)
    smt_kernels.patch(model, SELECTION, block_size=B, verbose=False)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "block_weight"):
                m.block_weight.add_(1.0)
    smt_kernels.save_blocks(model, tmp_path / "blocks")
    out = fold_blocks_into_checkpoint(tmp_path / "blocks", directory, tmp_path / "folded")
    merged = smt_kernels.merge(model).state_dict()
    folded = {}
    for shard in ckpt.checkpoint_shards(out):
        folded.update(load_file(shard))
    for key, t in merged.items():
        if key in folded:
            assert torch.equal(folded[key], t), key


def test_fold_refuses_blocks_that_do_not_fit(sharded, tmp_path):
    directory, _ = sharded
    bad = {
        "model.layers.0.self_attn.k_proj": (torch.tensor([[5, 0]]), torch.zeros(1, B, B)),
        "model.missing": (torch.tensor([[0, 0]]), torch.zeros(1, B, B)),
    }
    with pytest.raises(ValueError, match="out of range") as err:
        fold_blocks_into_checkpoint(bad, directory, tmp_path / "out", block_size=B)
    assert "no model.missing.weight" in str(err.value) and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="must differ"):
        fold_blocks_into_checkpoint({}, directory, directory, block_size=B)


def test_bitsandbytes_linear4bit_model_is_taken_over_without_requantizing():
    """The packed bytes and quant state of bitsandbytes layers are adopted as they are. (The model is compared with
    its dequantized twin, not with bitsandbytes' own CPU forward: bitsandbytes 0.50.2's CPU dequantize_4bit kernel
    returns wrong values for some shapes, e.g. 40×80, where its pure-torch fallback and ours agree.)"""
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    model = bnb_model(bnb_nn)
    ref = tiny()
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    quantize_base(model, "nf4")
    assert set(nf4_modules(model)) == set(packed)
    for name, m in nf4_modules(model).items():
        assert torch.equal(m.weight_packed, packed[name].reshape(-1))  # the same bytes: no requantization
        assert m.double_quant and m.compute_dtype == torch.float32
        ref.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, ref(**batch()).logits, rtol=1e-4, atol=1e-4)
    patch_nf4(model, {"model.layers.0.self_attn.q_proj": [(0, 0)]}, B)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), NF4SparseBlockLinear)


def bnb_model(bnb_nn, seed=0):
    """The tiny model with bitsandbytes Linear4bit layers (NF4, double quantization) quantized on the CPU."""
    model = tiny(seed=seed)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            layer = bnb_nn.Linear4bit(
                m.in_features,
                m.out_features,
                bias=m.bias is not None,
                compute_dtype=torch.float32,
                compress_statistics=True,
                quant_type="nf4",
            )
            layer.load_state_dict(m.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.to("cpu"))  # .to() quantizes
    return model


def test_load_checkpoint_bitsandbytes_quantized(tmp_path):
    """A checkpoint saved from a bitsandbytes 4-bit model (its packed weights and quant states) loads without
    requantizing: the same NF4 tensors as taking the live bitsandbytes model over."""
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    from safetensors.torch import save_file

    model = bnb_model(bnb_nn, seed=5)
    # what transformers writes for a load_in_4bit model; the loader reads the tensors, not this
    model.config.quantization_config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    }
    model.config.save_pretrained(tmp_path)
    assert "quantization_config" in json.loads((tmp_path / "config.json").read_text())
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in state)
    keys = sorted(state)
    half = len(keys) // 2  # two shards; a layer's pieces may sit in different shards
    save_file({k: state[k] for k in keys[:half]}, tmp_path / "model-00001-of-00002.safetensors", {"format": "pt"})
    save_file({k: state[k] for k in keys[half:]}, tmp_path / "model-00002-of-00002.safetensors", {"format": "pt"})
    index = {
        "metadata": {},
        "weight_map": {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_nf4_pretrained(tmp_path, device="cpu", compute_dtype=torch.float32)
    reference = quantize_base(model, "nf4").eval()
    got, want = loaded.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**batch()).logits, reference(**batch()).logits)


def _bf16_blocks(tmp_path, model, name="blocks"):
    """``model`` patched with SELECTION, its blocks changed, saved; returns the blocks directory."""
    import smt_kernels

    smt_kernels.patch(model, SELECTION, block_size=B, verbose=False)
    with torch.no_grad():
        for m in smt_kernels.patched_modules(model).values():
            m.block_weight.add_(1.0)
    return smt_kernels.save_blocks(model, tmp_path / name)


def test_fold_checks_the_base_the_blocks_were_trained_on(sharded, tmp_path):
    """Blocks of another checkpoint of the same architecture are refused before anything is written; blocks
    trained in fp32 from this bf16 checkpoint, or on its 4-bit quantization, are its own."""
    directory, _ = sharded
    other = tmp_path / "other_ckpt"
    tiny(torch.bfloat16, seed=5).save_pretrained(other, max_shard_size="100KB")
    blocks = _bf16_blocks(tmp_path, tiny(torch.bfloat16, seed=3))
    with pytest.raises(ValueError, match=r"different base model .* tensors differ") as err:
        fold_blocks_into_checkpoint(blocks, other, tmp_path / "out")
    assert "strict=False" in str(err.value) and not (tmp_path / "out").exists()
    fold_blocks_into_checkpoint(blocks, other, tmp_path / "out", strict=False)  # asked for: folded
    fp32 = _bf16_blocks(tmp_path, LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32), "fp32")
    fold_blocks_into_checkpoint(fp32, directory, tmp_path / "from_fp32")
    nf4 = load_nf4_pretrained(directory, device="cpu", compute_dtype=torch.bfloat16)
    patch_nf4(nf4, SELECTION, B)
    import smt_kernels

    smt_kernels.save_blocks(nf4, tmp_path / "nf4")
    fold_blocks_into_checkpoint(tmp_path / "nf4", directory, tmp_path / "from_nf4")  # norms and embeddings match
    with pytest.raises(ValueError, match="different base model"):
        fold_blocks_into_checkpoint(tmp_path / "nf4", other, tmp_path / "nf4_other")
    with pytest.raises(TypeError, match="strict must be True or False"):
        fold_blocks_into_checkpoint(blocks, directory, tmp_path / "x", strict="yes")


def test_fold_refuses_a_checkpoint_of_other_weight_shapes(tmp_path):
    """Blocks trained in 80-wide weights (edge blocks clipped at 80) fold into no 96-wide checkpoint, even where
    the block indices fit it: the clipped edge's zero padding would overwrite real weights."""
    wide = tmp_path / "wide"
    tiny(torch.bfloat16, seed=3, hidden_size=96).save_pretrained(wide, max_shard_size="100KB")
    blocks = _bf16_blocks(tmp_path, tiny(torch.bfloat16, seed=3))
    with pytest.raises(ValueError, match=r"trained in a 80×80 weight, the checkpoint's is 96×96"):
        fold_blocks_into_checkpoint(blocks, wide, tmp_path / "out", strict=False)
    assert not (tmp_path / "out").exists()


def test_trained_blocks_of_a_mixed_model_fold_every_patched_layer(sharded, tmp_path):
    """16-bit targets of a model whose other linears are 4-bit (quantize_base(skip=...)) are folded too."""
    import smt_kernels

    directory, full = sharded
    model = quantize_base(LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16), "nf4", skip=("v_proj",))
    smt_kernels.patch(model, SELECTION, block_size=B, verbose=False)
    with torch.no_grad():
        for m in smt_kernels.patched_modules(model).values():
            m.block_weight.add_(1.0)
    blocks = trained_blocks(model)
    assert set(blocks) == set(SELECTION)
    out = fold_blocks_into_checkpoint(blocks, directory, tmp_path / "folded", block_size=B)
    folded = {}
    for shard in ckpt.checkpoint_shards(out):
        folded.update(load_file(shard))
    v = "model.layers.0.self_attn.v_proj"
    assert not torch.equal(folded[f"{v}.weight"], full.state_dict()[f"{v}.weight"])
    tile = folded[f"{v}.weight"][B : 2 * B, B : 2 * B]  # v_proj is 40×80: block (1, 1) is clipped to 8 rows
    assert torch.equal(tile, blocks[v][1][0][: tile.shape[0], : tile.shape[1]])


def test_a_merge_that_fails_midway_leaves_the_model_patched(monkeypatch):
    """Out of memory while dequantizing the 6th layer: every layer merged so far goes back, the blocks can still be
    saved, and a second merge works."""
    import smt_kernels

    model = quantize_base(tiny(torch.bfloat16, seed=3), "nf4", skip=("v_proj",))
    smt_kernels.patch(model, SELECTION, block_size=B, verbose=False)
    with torch.no_grad():
        for m in smt_kernels.patched_modules(model).values():
            m.block_weight.add_(1.0)
    types = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        want = model(**batch()).logits
    calls, real = [0], NF4Linear.to_linear

    def failing(self):
        calls[0] += 1
        if calls[0] == 6:
            raise torch.OutOfMemoryError("simulated: out of memory while dequantizing")
        return real(self)

    monkeypatch.setattr(NF4Linear, "to_linear", failing)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        smt_kernels.merge(model)
    assert {n: type(m) for n, m in model.named_modules()} == types and hasattr(model, "smt_config")
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, want)
    monkeypatch.setattr(NF4Linear, "to_linear", real)
    merged = smt_kernels.merge(model)
    assert not smt_kernels.patched_modules(merged) and not nf4_modules(merged)


def test_an_fp32_checkpoint_loads_as_the_model_loaded_in_the_compute_dtype(tmp_path):
    """fp32 checkpoint, bf16 run: the 4-bit codes and every other tensor are those of quantize_base on the model
    from_pretrained loads in bf16 (before, the codes came from the fp32 values and the layers recorded fp32, so a
    QLoRA merge gave fp32 layers inside a bf16 model), and a merged QLoRA model runs on bf16 inputs."""
    from smt_kernels.quant.lora import get_nf4_peft_model, nf4_lora_config

    tiny(torch.float32, seed=4).save_pretrained(tmp_path, max_shard_size="100KB")
    model = load_nf4_pretrained(tmp_path, device="cpu", compute_dtype=torch.bfloat16)
    want = quantize_base(LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16), "nf4")
    got, ref = model.state_dict(), want.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert all(m.weight_dtype == torch.bfloat16 for m in nf4_modules(model).values())
    peft = get_nf4_peft_model(model, nf4_lora_config(r=2, lora_alpha=4, target_modules=["q_proj"]))
    merged = peft.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        merged(**batch())
