"""SMT on a 4-bit NF4 base under DDP and FSDP2 on CPU: 2 forked processes, gloo, a tiny random LLaMA.

The 4-bit base (``quantize_base``) is held in buffers, not parameters: DDP and FSDP2 keep it replicated and
shard or synchronise only the parameters (``block_weight``, embeddings, norms, lm_head). Every distributed run
is compared with one process trained on the concatenated batch (losses and blocks after 3 AdamW steps);
saving and merging write once and equal what the single-process functions give; selection equals one process.
The helpers (training loop, forking, reference data) are those of tests/test_distributed.py.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_distributed import (
    ROWS,
    SELECTION,
    SEQ,
    VOCAB,
    B,
    _save_and_merge,
    assert_close_dicts,
    assert_matches,
    block_weights,
    free_port,
    full,
    global_batches,
    local_rows,
    patch_mod,
    run_ranks,
    shard_fsdp,
    tiny_llama,
    train,
    warmup_batches,
)
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaForCausalLM

from smt_kernels import load_blocks, merge, patch, quantize_base, select_blocks
from smt_kernels.distributed import select_blocks_distributed, shard_nf4_base, wrap_ddp
from smt_kernels.quant import NF4Linear, NF4SparseBlockLinear, nf4_modules
from smt_kernels.quant.buffers import buffer_bytes, release_buffers, use_pooled_buffer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2


def build(patched: bool = True) -> LlamaForCausalLM:
    """The tiny LLaMA of tests/test_distributed.py with every linear but lm_head in NF4 (fp32 compute), patched
    with its selection (fp32 blocks; k/v out 40 and the MLP's 144 leave clipped edge blocks)."""
    model = quantize_base(tiny_llama(), "nf4", compute_dtype=torch.float32)
    return patch(model, SELECTION, B, block_dtype=torch.float32, verbose=False) if patched else model


def probe_logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model(input_ids=ids).logits


def nf4_base(model) -> dict[str, torch.Tensor]:
    """The frozen 4-bit base: every ``weight_*`` tensor of the NF4 layers' state (buffers, or parameters after
    ``shard_nf4_base``)."""
    state = model.state_dict()
    return {k: v for n in nf4_modules(model) for k, v in state.items() if k.startswith(f"{n}.weight_")}


@pytest.fixture(scope="module")
def reference():
    """One process on the concatenated batch: losses, blocks, the trained model and its probe logits."""
    model = build()
    losses = train(model, slice(None))
    return {"losses": losses, "blocks": block_weights(model), "model": model, "logits": probe_logits(model)}


@pytest.fixture(scope="module")
def reference_two_micro():
    """One process on the concatenated batches of 2 micro-batches per step."""
    model = build()
    return {"losses": train(model, slice(None), rows_per_step=2 * ROWS), "blocks": block_weights(model)}


# ------------------------------------------------------------------------------------------------------------ DDP


def _ddp_rank(rank: int, save_dir: Path | None, wrapped: bool):
    model = build()
    ddp = wrap_ddp(model) if wrapped else DDP(model)
    sent = []  # bytes of every buffer broadcast after construction (i.e. at the start of a forward)
    real = ddp._distributed_broadcast_coalesced

    def counting(tensors, size, src=0):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return real(tensors, size, src)

    ddp._distributed_broadcast_coalesced = counting
    before = {k: v.clone() for k, v in nf4_base(model).items()}
    losses = train(ddp, local_rows(rank))
    res = {
        "losses": losses,
        "blocks": block_weights(model),
        "sent": sent,
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
        "base_unchanged": all(torch.equal(v, nf4_base(model)[k]) for k, v in before.items()),
        "logits": probe_logits(model),
    }
    if save_dir is not None:
        res.update(_save_and_merge(rank, ddp, save_dir))
    return res


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_nf4")
    return d, run_ranks(_ddp_rank, d / "out", d, True)


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrap_ddp", "default_ddp"])
def test_ddp_nf4_matches_single_process(wrapped, ddp_run, reference, tmp_path):
    """Both DDP setups train what one process trains. Default DDP broadcasts every buffer, the whole 4-bit base
    included, at the start of every forward (harmless: equal values, written without bumping autograd's version
    counters, but all of it every step); wrap_ddp sends nothing after construction."""
    ranks = ddp_run[1] if wrapped else run_ranks(_ddp_rank, tmp_path / "out", None, False)
    assert_matches(ranks, reference)
    for res in ranks:
        assert res["base_unchanged"]
        if wrapped:
            assert res["sent"] == []
        else:
            assert res["sent"] == [res["buffer_bytes"]] * len(global_batches())


# ---------------------------------------------------------------------------------------------------------- FSDP2


def _fsdp_rank(rank: int, save_dir: Path | None, reshard_after_forward: bool, micro: int = 1, base: bool = False):
    """FSDP2 training; ``base``: shard the 4-bit codes too (``shard_nf4_base``), else they stay replicated."""
    initial = {k: v.clone() for k, v in nf4_base(build()).items()}
    model = build()
    if base:
        shard_nf4_base(model)
    model = shard_fsdp(model, reshard_after_forward)
    release_buffers()
    use_pooled_buffer(True)  # so that the buffer's size can be checked: sharding adds none

    def sync(last):  # reduce-scatter the block gradients only after the last micro-batch
        model.set_requires_gradient_sync(last)
        return nullcontext()

    rows = micro * ROWS
    losses = train(model, local_rows(rank, rows), micro=micro, sync=sync, rows_per_step=rows)
    params = {
        n: (type(p).__name__, tuple(p.placements) if isinstance(p, DTensor) else None)
        for n, p in model.named_parameters()
    }
    res = {
        "losses": losses,
        "blocks": block_weights(model),
        "params": params,
        # the 4-bit base, never written: (placements or None, local elements, equal to the initial base)
        "base": {
            k: (
                tuple(v.placements) if isinstance(v, DTensor) else None,
                (v.to_local() if isinstance(v, DTensor) else v).numel(),
                torch.equal(full(v), initial[k]),
            )
            for k, v in nf4_base(model).items()
        },
        "initial_numel": {k: v.numel() for k, v in initial.items()},
        # one pooled dequantization buffer (fp32 compute) of the largest layer: sharding adds none
        "dequant_buffer": buffer_bytes(),
        "largest_layer": max(m.out_features * m.in_features for m in nf4_modules(model).values()) * 4,
        "logits": probe_logits(model),
    }
    if save_dir is not None:
        res.update(_save_and_merge(rank, model, save_dir))
    return res


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_nf4")
    return d, run_ranks(_fsdp_rank, d / "out", d, True)  # FSDP2's (and accelerate's) default


@pytest.fixture(scope="module")
def fsdp_base_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_nf4_base")
    return d, run_ranks(_fsdp_rank, d / "out", d, True, 1, True)


@pytest.mark.parametrize("base", [False, True], ids=["base_replicated", "base_sharded"])
@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp2_nf4_matches_single_process(reshard_after_forward, base, fsdp_run, fsdp_base_run, reference, tmp_path):
    """With resharding after forward FSDP2 re-gathers block_weight (and, sharded, the 4-bit codes) before
    backward; the 4-bit op dequantizes the base with those (current) blocks in place again for dX, so nothing
    depends on a weight that saw them (the 16-bit op's re-scatter is not needed). All modes equal one process."""
    if reshard_after_forward:
        ranks = (fsdp_base_run if base else fsdp_run)[1]
    else:
        ranks = run_ranks(_fsdp_rank, tmp_path / "out", None, False, 1, base)
    assert_matches(ranks, reference)
    for res in ranks:
        assert res["dequant_buffer"] == res["largest_layer"]
        assert all(unchanged for *_, unchanged in res["base"].values())


def test_fsdp2_nf4_gradient_accumulation(tmp_path, reference_two_micro):
    """set_requires_gradient_sync(False) on all micro-batches but the last, resharding after every forward."""
    assert_matches(run_ranks(_fsdp_rank, tmp_path / "out", None, True, 2), reference_two_micro)


def test_fsdp2_nf4_base_replicated_parameters_sharded(fsdp_run):
    _, ranks = fsdp_run
    for res in ranks:
        assert res["base"].keys() == res["initial_numel"].keys() and res["base"]
        # plain tensors, whole on every rank
        assert all(p is None and n == res["initial_numel"][k] for k, (p, n, _) in res["base"].items())
        # every parameter (blocks, embeddings, norms, lm_head) is a Shard(0) DTensor
        assert res["params"] and all(v == ("DTensor", (Shard(0),)) for v in res["params"].values()), res["params"]
        assert sum(n.endswith("block_weight") for n in res["params"]) == len(SELECTION)


def test_fsdp2_shard_nf4_base_shards_the_codes(fsdp_base_run):
    """After shard_nf4_base the uint8 codes are Shard(0) parameters (each rank keeps its torch.chunk part); the
    fp32 scales stay whole buffers."""
    _, ranks = fsdp_base_run
    for rank, res in enumerate(ranks):
        codes = {k for k in res["base"] if k.endswith((".weight_packed", ".weight_absmax_q"))}
        assert codes and codes < res["base"].keys()
        for k, (placements, local, _) in res["base"].items():
            n = res["initial_numel"][k]
            if k in codes:
                assert placements == (Shard(0),) and local == torch.empty(n).chunk(WORLD)[rank].numel(), k
                assert res["params"][k] == ("DTensor", (Shard(0),))
            else:
                assert placements is None and local == n and k not in res["params"], k


# ----------------------------------------------------------------------------------------------- save and merge


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp2_base_sharded"])
def test_nf4_save_blocks_and_merge_distributed(engine, ddp_run, fsdp_run, fsdp_base_run, reference, tmp_path):
    """save_blocks_distributed / merged_state_dict / save_merged on a 4-bit base: rank 0 writes once; the block
    files have the layout and fingerprint save_blocks writes in one process; load_blocks onto a fresh 4-bit model
    reproduces the run's logits; the merged state dict and checkpoint equal merge() of that model."""
    save_dir, ranks = {"ddp": ddp_run, "fsdp2": fsdp_run, "fsdp2_base_sharded": fsdp_base_run}[engine]
    assert [res["writes"] for res in ranks] == [{"blocks": 2, "merged": 1}, {"blocks": 0, "merged": 0}]
    assert ranks[1]["merged"] == {}

    patch_mod.save_blocks(reference["model"], tmp_path / "single")
    got = json.loads((save_dir / "blocks" / patch_mod.META_FILE).read_text())
    want = json.loads((tmp_path / "single" / patch_mod.META_FILE).read_text())
    for key in ("block_size", "num_blocks", "modules", "fingerprint"):
        assert got[key] == want[key], key
    assert any(k.endswith(".weight_packed") for k in got["fingerprint"])  # the 4-bit base is fingerprinted
    saved = load_file(save_dir / "blocks" / got["blocks_file"])
    assert_close_dicts(saved, reference["blocks"], "saved blocks")

    loaded = load_blocks(build(patched=False), save_dir / "blocks")
    assert all(isinstance(m, NF4SparseBlockLinear) for m in nf4_modules(loaded, trainable=True).values())
    assert torch.equal(probe_logits(loaded), ranks[0]["logits"])

    merged = merge(loaded).state_dict()
    assert not any(isinstance(m, NF4Linear) for m in loaded.modules())
    assert list(ranks[0]["merged"]) == list(merged)  # the plain model's keys, in its order
    for k, v in merged.items():
        assert torch.equal(ranks[0]["merged"][k], v), k
    checkpoint = LlamaForCausalLM.from_pretrained(save_dir / "merged").state_dict()
    for k, v in merged.items():
        assert torch.equal(checkpoint[k], v), k
    torch.testing.assert_close(probe_logits(loaded), reference["logits"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- selection

SCORES = ("abs_mean", "l2", "activation")
SELECT_KW = dict(num_blocks=7, targets=("q_proj", "k_proj", "v_proj", "down_proj"), block_size=B, progress=False)


def _select_rank(rank: int):
    model = build(patched=False)
    out = {}
    for score in SCORES:
        sel = select_blocks_distributed(model, warmup_batches(local_rows(rank)), score=score, **SELECT_KW)
        out[score] = (dict(sel), sel.scores, sel.num_batches)
    # gradient checkpointing re-runs the 4-bit forwards in backward: each gradient is still averaged once
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sel = select_blocks_distributed(model, warmup_batches(local_rows(rank)), training=True, **SELECT_KW)
    out["checkpointed"] = (dict(sel), sel.scores)
    out["fold_restored"] = all(m.weight_grad_fold is None for m in nf4_modules(model).values())
    out["hooks_left"] = sum(len(m._forward_pre_hooks) for m in model.modules())
    return out


def test_select_blocks_distributed_on_nf4_equals_single_process(tmp_path):
    """4-bit targets hand their dense gradients to select_blocks' fold function, not to a .grad: those are
    averaged over ranks before folding, so every score equals one process's on the concatenated batches."""
    ranks = run_ranks(_select_rank, tmp_path / "out")
    for score in SCORES:
        ref = select_blocks(build(patched=False), warmup_batches(), score=score, **SELECT_KW)
        for r, res in enumerate(ranks):
            blocks, scores, num_batches = res[score]
            assert blocks == dict(ref), f"{score}: rank {r} chose other blocks than one process"
            assert num_batches == 2 * WORLD
            assert scores.keys() == ref.scores.keys()
            for name in ref.scores:
                torch.testing.assert_close(scores[name], ref.scores[name], rtol=1e-5, atol=1e-9)
    for res in ranks:
        blocks, scores = res["checkpointed"]
        assert blocks == res["abs_mean"][0]
        for name, want in res["abs_mean"][1].items():
            torch.testing.assert_close(scores[name], want, rtol=1e-6, atol=1e-12)
        assert res["fold_restored"] and res["hooks_left"] == 0


# ------------------------------------------------------------------------------------------ without a process group


def test_merged_state_dict_of_a_mixed_model_equals_merge(tmp_path):
    """One process, no process group: 4-bit layers with biases (Qwen2's q/k/v; bf16 compute over an fp32 model,
    so merge's bias is bf16), a 16-bit target left out of quantize_base, frozen 4-bit layers: merged_state_dict
    and save_merged equal merge() tensor for tensor, in the plain model's key order and dtypes."""
    from tiny_models import tiny

    from smt_kernels.distributed import merged_state_dict, save_merged

    assert not dist.is_initialized()
    model = quantize_base(tiny("qwen2", 0, torch.float32), "nf4", skip=("v_proj",), compute_dtype=torch.bfloat16)
    sel = {
        "model.layers.0.self_attn.q_proj": [(0, 0), (2, 2)],
        "model.layers.0.self_attn.v_proj": [(1, 1)],
        "model.layers.1.mlp.down_proj": [(2, 4)],
    }
    patch(model, sel, 32, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("block_weight"):
                p.add_(0.25)
    got = merged_state_dict(model)
    save_merged(model, tmp_path / "merged")
    assert any(isinstance(m, NF4Linear) for m in model.modules())  # the model is left as it is
    want = merge(model).state_dict()
    assert list(got) == list(want)
    assert got["model.layers.0.self_attn.q_proj.bias"].dtype == torch.bfloat16
    assert got["model.layers.0.self_attn.v_proj.weight"].dtype == torch.float32
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    from transformers import Qwen2ForCausalLM

    saved = Qwen2ForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").state_dict()
    for k, v in want.items():
        assert torch.equal(saved[k].to(v.dtype), v), k


def test_shard_nf4_base_refuses_a_model_it_cannot_shard():
    from torch.distributed.fsdp import fully_shard

    with pytest.raises(ValueError, match="has no NF4 layers; quantize_base"):
        shard_nf4_base(LlamaForCausalLM(build().config))
    model = shard_nf4_base(shard_nf4_base(build()))  # a second call changes nothing
    codes = [n for n, p in model.named_parameters() if n.endswith((".weight_packed", ".weight_absmax_q"))]
    assert len(codes) == 2 * len(nf4_modules(model)) and not any(
        p.requires_grad for n, p in model.named_parameters() if n in codes
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="must run before fully_shard"):
            shard_nf4_base(fully_shard(build()))
    finally:
        dist.destroy_process_group()


def test_shard_nf4_base_refuses_a_torch_whose_fsdp2_cannot_shard_integers(monkeypatch):
    """torch 2.11's fully_shard fails on uint8 parameters (seen on an H200): say so before touching the model."""
    import smt_kernels.distributed as distributed

    monkeypatch.setattr(distributed, "fsdp2_shards_integer_parameters", lambda: False)
    model = build()
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"cannot shard integer parameters.*replicated"):
        shard_nf4_base(model)
    assert {n for n, _ in model.named_parameters()} == before  # nothing became a parameter
    monkeypatch.undo()
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        assert distributed.fsdp2_shards_integer_parameters()  # the gloo FSDP2 tests above shard the codes here
