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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaForCausalLM

from smt_kernels import load_blocks, merge, patch, quantize_base, select_blocks, trainable_parameters
from smt_kernels.distributed import (
    fsdp2_shards_integer_parameters,
    select_blocks_distributed,
    shard_nf4_base,
    wrap_ddp,
)
from smt_kernels.quant import NF4Linear, NF4SparseBlockLinear, nf4_modules
from smt_kernels.quant.buffers import buffer_bytes, release_buffers, use_pooled_buffer
from smt_kernels.quant.module import CODE_NAMES as NF4_CODES

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2


# 16 code bytes whose float views hold special values (little-endian): bfloat16 sNaN 0x7F81, -qNaN 0xFFC1, denormal
# 0x0001, +inf 0x7F80, -denormal 0x8001, -0; float16 sNaN 0x7C01; float32 -NaN, sNaN 0x7F800001, -denormal, -0
FLOAT_SPECIALS = torch.tensor([0x81, 0x7F, 0xC1, 0xFF, 1, 0, 0x80, 0x7F, 1, 0x7C, 1, 0x80, 0, 0, 0, 0x80]).byte()


def with_float_specials(model):
    """Every NF4 layer's codes (any byte is a valid code) start each 64-byte run with ``FLOAT_SPECIALS``, so that
    holding them as a float bit view (shard_nf4_base) must move NaN, inf and denormal patterns bit for bit."""
    n = FLOAT_SPECIALS.numel()
    for m in nf4_modules(model).values():
        for codes in (m.weight_packed, m.weight_absmax_q):
            for start in range(0, codes.numel() - n + 1, 64):
                codes[start : start + n] = FLOAT_SPECIALS
    return model


def build(patched: bool = True) -> LlamaForCausalLM:
    """The tiny LLaMA of tests/test_distributed.py with every linear but lm_head in NF4 (fp32 compute; codes
    ``with_float_specials``), patched with its selection (fp32 blocks; k/v out 40 and the MLP's 144 leave clipped
    edge blocks)."""
    model = with_float_specials(quantize_base(tiny_llama(), "nf4", compute_dtype=torch.float32))
    return patch(model, SELECTION, B, block_dtype=torch.float32, verbose=False) if patched else model


def probe_logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model(input_ids=ids).logits


def nf4_base(model) -> dict[str, torch.Tensor]:
    """The frozen 4-bit base: every ``weight_*`` tensor of the NF4 layers' state (buffers, or parameters after
    ``shard_nf4_base``; FSDP2 shards as they are, e.g. float bit views of the codes)."""
    state = model.state_dict()
    return {k: v for n in nf4_modules(model) for k, v in state.items() if k.startswith(f"{n}.weight_")}


def gathered_base(model) -> dict[str, torch.Tensor]:
    """``nf4_base`` gathered (collective under FSDP2) and as the layers read it: codes held as a float bit view
    viewed back to their uint8 bytes (compared with torch.equal, which a NaN in a float view would fail)."""
    mods = nf4_modules(model)
    out = {}
    for k, v in nf4_base(model).items():
        name, _, attr = k.rpartition(".")
        v = full(v)
        out[k] = mods[name].codes_as_uint8(attr, v) if v.dtype != torch.uint8 and attr in NF4_CODES else v
    return out


@pytest.fixture(scope="module")
def reference():
    """One process on the concatenated batch: losses, blocks, the trained model and its probe logits."""
    model = build()
    initial = probe_logits(model)
    losses = train(model, slice(None))
    return {
        "losses": losses,
        "blocks": block_weights(model),
        "model": model,
        "logits": probe_logits(model),
        "initial_logits": initial,
    }


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


def _fsdp_rank(
    rank: int,
    save_dir: Path | None,
    reshard_after_forward: bool,
    micro: int = 1,
    base: bool = False,
    codes_dtype: torch.dtype | None = None,
):
    """FSDP2 training; ``base``: shard the 4-bit codes too (``shard_nf4_base(model, codes_dtype)``), else they stay
    replicated."""
    initial = gathered_base(build())
    model = build()
    if base:
        shard_nf4_base(model, codes_dtype)
    model = shard_fsdp(model, reshard_after_forward)
    codes = [p for n, p in model.named_parameters() if n.endswith(NF4_CODES)]
    release_buffers()
    use_pooled_buffer(True)  # so that the buffer's size can be checked: sharding adds none
    initial_logits = probe_logits(model)
    for m in model.modules():  # a forward without backward leaves reshard_after_forward=False layers unsharded,
        if isinstance(m, FSDPModule):  # and training would then read stale weights after the first step
            m.reshard()

    def sync(last):  # reduce-scatter the block gradients only after the last micro-batch
        model.set_requires_gradient_sync(last)
        return nullcontext()

    rows = micro * ROWS
    losses = train(model, local_rows(rank, rows), micro=micro, sync=sync, rows_per_step=rows)
    params = {
        n: (type(p).__name__, tuple(p.placements) if isinstance(p, DTensor) else None)
        for n, p in model.named_parameters()
    }
    gathered = gathered_base(model)
    res = {
        "losses": losses,
        "blocks": block_weights(model),
        "params": params,
        # the 4-bit base, never written: (placements or None, local elements, dtype, equal to the initial base)
        "base": {
            k: (
                tuple(v.placements) if isinstance(v, DTensor) else None,
                (v.to_local() if isinstance(v, DTensor) else v).numel(),
                v.dtype,
                torch.equal(gathered[k], initial[k]),
            )
            for k, v in nf4_base(model).items()
        },
        "initial_numel": {k: v.numel() for k, v in initial.items()},
        "codes_grad": [p.grad is not None for p in codes],
        "codes_require_grad": [p.requires_grad for p in codes],
        # one pooled dequantization buffer (fp32 compute) of the largest layer: sharding adds none
        "dequant_buffer": buffer_bytes(),
        "largest_layer": max(m.out_features * m.in_features for m in nf4_modules(model).values()) * 4,
        "initial_logits": initial_logits,
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
    return d, run_ranks(_fsdp_rank, d / "out", d, True, 1, True, torch.uint8)


@pytest.fixture(scope="module")
def fsdp_view_run(tmp_path_factory):
    """The codes sharded as a float32 bit view (what shard_nf4_base does where FSDP2 cannot shard uint8)."""
    d = tmp_path_factory.mktemp("fsdp_nf4_view")
    return d, run_ranks(_fsdp_rank, d / "out", d, True, 1, True, torch.float32)


# how each base mode holds the codes; float32 pads k/v's 50 absmax codes to 52 bytes (13 elements: uneven shards)
BASES = {
    "base_replicated": (False, {True: None, False: None}),
    "base_sharded": (True, {True: torch.uint8, False: torch.uint8}),
    "base_sharded_float_view": (True, {True: torch.float32, False: torch.float32}),
}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp2_nf4_matches_single_process(
    reshard_after_forward, base, fsdp_run, fsdp_base_run, fsdp_view_run, reference, tmp_path
):
    """With resharding after forward FSDP2 re-gathers block_weight (and, sharded, the 4-bit codes) before
    backward; the 4-bit op dequantizes the base with those (current) blocks in place again for dX, so nothing
    depends on a weight that saw them (the 16-bit op's re-scatter is not needed). All modes equal one process,
    and before training their logits equal its logits bit for bit."""
    shard, dtypes = BASES[base]
    if reshard_after_forward:
        ranks = {"base_replicated": fsdp_run, "base_sharded": fsdp_base_run, "base_sharded_float_view": fsdp_view_run}
        ranks = ranks[base][1]
    else:
        ranks = run_ranks(_fsdp_rank, tmp_path / "out", None, False, 1, shard, dtypes[False])
    assert_matches(ranks, reference)
    for res in ranks:
        assert torch.equal(res["initial_logits"], reference["initial_logits"])
        assert res["dequant_buffer"] == res["largest_layer"]
        assert all(unchanged for *_, unchanged in res["base"].values())
        codes = {dtype for k, (_, _, dtype, _) in res["base"].items() if k.endswith(NF4_CODES)}
        assert codes == {dtypes[reshard_after_forward] or torch.uint8}
        assert not any(res["codes_grad"])


def test_fsdp2_nf4_gradient_accumulation(tmp_path, reference_two_micro):
    """set_requires_gradient_sync(False) on all micro-batches but the last, resharding after every forward."""
    assert_matches(run_ranks(_fsdp_rank, tmp_path / "out", None, True, 2), reference_two_micro)


def _fsdp_checkpointed_rank(rank: int, codes_dtype):
    """FSDP2 (resharding after forward) with non-reentrant gradient checkpointing: the 4-bit layers run as two
    autograd nodes (ops.split_layer); the codes replicated (None) or sharded as ``codes_dtype``."""
    from smt_kernels import ops
    from smt_kernels.quant import ops as nf4_ops

    calls = []
    real = ops.saved_columns_relay
    nf4_ops.saved_columns_relay = lambda *a, **k: calls.append(1) or real(*a, **k)
    model = build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if codes_dtype is not None:
        shard_nf4_base(model, codes_dtype)
    model = shard_fsdp(model, True)
    losses = train(model, local_rows(rank))
    return {"losses": losses, "blocks": block_weights(model), "split_calls": len(calls)}


@pytest.mark.parametrize("codes_dtype", [None, torch.uint8, torch.float32], ids=["replicated", "uint8", "float32"])
def test_fsdp2_nf4_with_gradient_checkpointing(codes_dtype, tmp_path, reference):
    """Checkpointed 4-bit layers under FSDP2 (the base re-gathered for the recomputation and the backward) train
    what one process trains without checkpointing."""
    if codes_dtype == torch.uint8 and not fsdp2_shards_integer_parameters():
        pytest.skip(f"FSDP2 in torch {torch.__version__} cannot shard uint8 parameters")
    ranks = run_ranks(_fsdp_checkpointed_rank, tmp_path / "out", codes_dtype)
    assert_matches(ranks, reference)
    assert all(res["split_calls"] > 0 for res in ranks)


def test_fsdp2_nf4_base_replicated_parameters_sharded(fsdp_run):
    _, ranks = fsdp_run
    for res in ranks:
        assert res["base"].keys() == res["initial_numel"].keys() and res["base"]
        # plain tensors, whole on every rank
        assert all(p is None and n == res["initial_numel"][k] for k, (p, n, *_) in res["base"].items())
        # every parameter (blocks, embeddings, norms, lm_head) is a Shard(0) DTensor
        assert res["params"] and all(v == ("DTensor", (Shard(0),)) for v in res["params"].values()), res["params"]
        assert sum(n.endswith("block_weight") for n in res["params"]) == len(SELECTION)


@pytest.mark.parametrize("view", [False, True], ids=["uint8", "float32_view"])
def test_fsdp2_shard_nf4_base_shards_the_codes(view, fsdp_base_run, fsdp_view_run):
    """After shard_nf4_base the codes are Shard(0) parameters (each rank keeps its torch.chunk part of the uint8
    codes, or of their float32 view, NaN and denormal patterns included); the fp32 scales stay whole buffers. The
    codes stay frozen (a float one requiring grad would also break FSDP2's lazy init: "FSDP expects uniform original
    parameter dtype", with fp32 blocks) and get no gradient."""
    _, ranks = fsdp_view_run if view else fsdp_base_run
    initial = gathered_base(build())
    for rank, res in enumerate(ranks):
        codes = {k for k in res["base"] if k.endswith(NF4_CODES)}
        assert codes and codes < res["base"].keys()
        for k, (placements, local, dtype, unchanged) in res["base"].items():
            n = res["initial_numel"][k]
            assert unchanged, k
            if k in codes:
                assert dtype == (torch.float32 if view else torch.uint8)
                if view:
                    padded = torch.cat([initial[k], initial[k].new_zeros(-n % 4)])
                    bits = padded.view(torch.float32)
                    denormal = (bits != 0) & (bits.abs() < torch.finfo(torch.float32).tiny)
                    assert bits.isnan().any() and denormal.any(), k
                    n = -(-n // 4)
                assert placements == (Shard(0),) and local == torch.empty(n).chunk(WORLD)[rank].numel(), k
                assert res["params"][k] == ("DTensor", (Shard(0),))
            else:
                assert placements is None and local == n and k not in res["params"], k
        assert res["codes_require_grad"] == [False] * len(codes) and not any(res["codes_grad"])


# ----------------------------------------------------------------------------------------------- save and merge


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "fsdp2_base_sharded", "fsdp2_base_float_view"])
def test_nf4_save_blocks_and_merge_distributed(
    engine, ddp_run, fsdp_run, fsdp_base_run, fsdp_view_run, reference, tmp_path
):
    """save_blocks_distributed / merged_state_dict / save_merged on a 4-bit base: rank 0 writes once; the block
    files have the layout and fingerprint save_blocks writes in one process (the fingerprint samples the uint8
    codes, also when they were sharded as a float view); load_blocks onto a fresh 4-bit model reproduces the run's
    logits; the merged state dict and checkpoint equal merge() of that model."""
    runs = {
        "ddp": ddp_run,
        "fsdp2": fsdp_run,
        "fsdp2_base_sharded": fsdp_base_run,
        "fsdp2_base_float_view": fsdp_view_run,
    }
    save_dir, ranks = runs[engine]
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


@pytest.mark.parametrize("codes_dtype", [torch.uint8, torch.float32], ids=str)
def test_shard_nf4_base_keeps_the_parameter_count(codes_dtype):
    """The codes become parameters, but trainable_parameters counts a 4-bit weight once (out × in), as before."""
    model = build()
    before = trainable_parameters(model)
    shard_nf4_base(model, codes_dtype)
    assert any(n.endswith(NF4_CODES) for n, _ in model.named_parameters())
    assert trainable_parameters(model) == before


def test_shard_nf4_base_on_a_torch_whose_fsdp2_cannot_shard_integers(monkeypatch):
    """torch 2.11's fully_shard fails on uint8 parameters (seen on an H200): there the codes are held as a float32
    bit view by default; asking for uint8 or a 16-bit view is refused before the model is touched."""
    import smt_kernels.distributed.wrapping as distributed

    monkeypatch.setattr(distributed, "fsdp2_shards_integer_parameters", lambda: False)
    model = build()
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"torch .* cannot shard integer parameters.*codes_dtype=None"):
        shard_nf4_base(model, torch.uint8)
    for bad in (torch.float64, torch.int8, torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=f"codes_dtype {bad} is not one of torch.uint8, torch.float32$"):
            shard_nf4_base(model, bad)
    assert {n for n, _ in model.named_parameters()} == before  # nothing became a parameter
    state, logits = model.state_dict(), probe_logits(model)
    shard_nf4_base(model)
    codes = {n: p for n, p in model.named_parameters() if n.endswith(NF4_CODES)}
    assert len(codes) == 2 * len(nf4_modules(model))
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in codes.values())
    assert torch.equal(probe_logits(model), logits)
    after = model.state_dict()  # the uint8 codes, as before
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    monkeypatch.undo()
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        assert distributed.fsdp2_shards_integer_parameters()  # the gloo FSDP2 tests above shard the codes here
        assert all(p.dtype == torch.uint8 for n, p in shard_nf4_base(build()).named_parameters() if n in codes)


# ------------------------------------------------------------------------------ codes held as a float bit view


def _odd_layer(blocks: bool = True) -> NF4Linear:
    """A 3×66 4-bit layer, with a bias and one trainable 16×16 block (else frozen, without bias): 99 packed code
    bytes (odd: a float view pads them) and 4 absmax codes, ``FLOAT_SPECIALS`` among them."""
    torch.manual_seed(3)
    base = NF4Linear.from_linear(torch.nn.Linear(66, 3, bias=blocks), compute_dtype=torch.float32)
    base.weight_packed[: FLOAT_SPECIALS.numel()] = FLOAT_SPECIALS
    base.weight_absmax_q.copy_(FLOAT_SPECIALS[:4])
    return NF4SparseBlockLinear.from_nf4_linear(base, [(0, 1)], block_size=16) if blocks else base


def _grads(layer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.square().sum().backward()
    return out.detach(), x.grad, layer.block_weight.grad


@pytest.mark.parametrize("dtype", [torch.float32])
def test_codes_held_as_a_float_bit_view(dtype):
    """store_codes_as(float dtype): a (ceil(bytes / itemsize),) frozen parameter over the same bytes; the layer reads
    them back as uint8 (same outputs and gradients, bit for bit, also when the view requires grad, which gets no
    gradient); state_dict gives the uint8 codes unpadded and load_state_dict takes them; .to(dtype) / .half()
    leave the view alone; a cast view (what FSDP2 mixed precision of another param_dtype does) raises."""
    ref, layer = _odd_layer(), _odd_layer()
    x = torch.randn(5, 66, generator=torch.Generator().manual_seed(4))
    want, state = _grads(ref, x), ref.state_dict()
    layer.store_codes_as(dtype)
    size = dtype.itemsize
    for name, nbytes in (("weight_packed", 99), ("weight_absmax_q", 4)):
        p = layer._parameters[name]
        assert p.dtype == dtype and p.shape == (-(-nbytes // size),) and not p.requires_grad
        assert torch.equal(layer.nf4.tensors()[name.removeprefix("weight_")], getattr(ref, name))
    layer.weight_packed.requires_grad_(True)  # as a buggy FSDP2 might leave it: no gradient may reach the codes
    got = _grads(layer, x)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) and layer.weight_packed.grad is None
    layer.weight_packed.requires_grad_(False)
    assert trainable_parameters(torch.nn.Sequential(layer))[0] == trainable_parameters(torch.nn.Sequential(ref))[0]

    saved = layer.state_dict()
    assert list(saved) == [k for k in state if k in saved] and saved.keys() == state.keys()
    assert all(saved[k].dtype == v.dtype and torch.equal(saved[k], v) for k, v in state.items())
    other = _odd_layer()
    other.weight_packed.zero_()
    other.store_codes_as(dtype)
    other.load_state_dict(state)
    assert other.weight_packed.dtype == dtype and torch.equal(other.nf4.packed, ref.weight_packed)

    layer.to(torch.bfloat16).half()  # float64 blocks are refused; the view stays either way
    assert layer.weight_packed.dtype == dtype and torch.equal(layer.nf4.packed, ref.weight_packed)
    other = torch.bfloat16
    with torch.no_grad():
        layer.weight_absmax_q = torch.nn.Parameter(layer.weight_absmax_q.to(other), requires_grad=False)
    with pytest.raises(RuntimeError, match=f"bit view but arrived as {other}.*param_dtype other than {dtype}"):
        layer(x.half())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_16_bit_view_of_the_codes(dtype):
    """A 16-bit view is refused: a copy through fp32 (what CUDA's copy kernels may do with 16-bit floats) makes
    every NaN pattern the canonical NaN, so such a view loses code bytes (it did on the H200s); the float32 view's
    bytes survive the same round trip."""
    with pytest.raises(TypeError, match=f"store_codes_as: {dtype} is not one of torch.uint8, torch.float32"):
        _odd_layer().store_codes_as(dtype)
    codes = FLOAT_SPECIALS.clone()
    assert not torch.equal(codes.view(dtype).float().to(dtype).view(torch.uint8), codes)
    assert torch.equal(codes.view(torch.float32).clone().view(torch.uint8), codes)


@pytest.mark.parametrize("policy", [None, torch.bfloat16, torch.float32])
def test_float_bit_view_under_fsdp2_mixed_precision(policy):
    """FSDP2 casts a floating parameter whose dtype is not the MixedPrecisionPolicy's param_dtype in its
    all-gather: the float32 view under no policy or a float32 one gives the unsharded layer's output bit for bit
    (the NaN and denormal patterns gathered unchanged); under bfloat16 the layer refuses the cast codes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ref, layer = _odd_layer(blocks=False), _odd_layer(blocks=False)  # the codes are its only parameters
    x = torch.randn(5, 66, generator=torch.Generator().manual_seed(4)).to(policy or torch.float32)
    with torch.no_grad():
        want = ref(x)
    layer.store_codes_as(torch.float32)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.nf4.packed.clone()))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        sharded = fully_shard(layer, mp_policy=MixedPrecisionPolicy(param_dtype=policy))
        assert isinstance(sharded.weight_packed, DTensor)
        with torch.no_grad():
            if policy == torch.bfloat16:
                with pytest.raises(RuntimeError, match="as a torch.float32 bit view but arrived as torch.bfloat16"):
                    sharded(x)
                return
            got = sharded(x)
    finally:
        dist.destroy_process_group()
    assert torch.equal(seen[0], ref.weight_packed) and torch.equal(got, want)


def _fsdp2_as_in_torch_2_11(monkeypatch) -> None:
    """FSDPParam._init_sharded_param as torch 2.11 has it: the sharded parameter is created requiring grad, then set
    to the original's requires_grad (pytorch/pytorch#177844); on a torch that still has that code, as it is."""
    import inspect
    import textwrap

    import torch.distributed.fsdp._fully_shard._fsdp_param as fsdp_param

    src = textwrap.dedent(inspect.getsource(fsdp_param.FSDPParam._init_sharded_param))
    buggy = "self.sharded_param = nn.Parameter(self.to_sharded_dtensor(sharded_param))\n"
    fixed = "self.sharded_param = nn.Parameter(\n        self.to_sharded_dtensor(sharded_param),\n"
    if buggy in src:
        return
    if fixed + "        requires_grad=param.requires_grad,\n    )\n" not in src:
        pytest.skip("this torch's FSDPParam._init_sharded_param is neither 2.11's nor 2.13's")
    src = src.replace(
        fixed + "        requires_grad=param.requires_grad,\n    )\n",
        buggy + "    self.sharded_param.requires_grad_(param.requires_grad)\n",
    )
    scope = dict(vars(fsdp_param))
    exec(compile(src, fsdp_param.__file__, "exec"), scope)
    monkeypatch.setattr(fsdp_param.FSDPParam, "_init_sharded_param", scope["_init_sharded_param"])


def test_shard_nf4_base_under_fsdp2_as_in_torch_2_11(monkeypatch, reference):
    """With FSDP2's sharded-parameter creation as in torch 2.11 (one gloo rank): uint8 codes fail in fully_shard as
    on the H200; the float32 view (shard_nf4_base's default there) shards, stays frozen (so no optimizer or
    trainable count picks it up), computes the unsharded logits bit for bit and trains what one process trains."""
    import smt_kernels.distributed.wrapping as distributed

    _fsdp2_as_in_torch_2_11(monkeypatch)
    monkeypatch.setattr(distributed, "fsdp2_shards_integer_parameters", lambda: False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        uint8 = build()
        for m in nf4_modules(uint8).values():
            m.store_codes_as(torch.uint8)  # what shard_nf4_base held before: fully_shard fails on it
        with pytest.raises(RuntimeError, match="only Tensors of floating point dtype can require gradients"):
            shard_fsdp(uint8, True)
        model = shard_fsdp(shard_nf4_base(build()), True)
        codes = {n: p for n, p in model.named_parameters() if n.endswith(NF4_CODES)}
        assert codes and all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in codes.values())
        assert not any(p.requires_grad for p in codes.values())
        assert trainable_parameters(model)[0] == trainable_parameters(build())[0]
        assert torch.equal(probe_logits(model), reference["initial_logits"])
        losses = train(model, slice(None))
        assert_matches([{"losses": losses, "blocks": block_weights(model)}], reference)
    finally:
        dist.destroy_process_group()
