"""SMT under DDP and FSDP2 on CPU: 2 forked processes, gloo, a tiny random LLaMA patched with 16×16 blocks.

Every distributed run is compared with one process trained on the concatenated batch (same initial weights,
same data): losses and blocks after a few AdamW steps, with and without gradient accumulation; frozen weights
stay frozen (and sharded under FSDP2); selection is the same on every rank and equals the single-process one;
save_blocks / merge write once and load back into a plain single-process model.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig, LlamaForCausalLM

from smt_kernels import SMTConfig, load_blocks, merge, patch, select_blocks
from smt_kernels.distributed import (
    merged_state_dict,
    save_blocks_distributed,
    save_merged,
    select_blocks_distributed,
)

WORLD = 2
B = 16
VOCAB = 128
ROWS, SEQ = 4, 12  # global batch per step: ROWS sequences, split evenly over the ranks
STEPS = 3
LR = 1e-2
# k/v out 40 is not a multiple of 16 (v_proj's block-row 2 is clipped); modules with 1 block leave one FSDP2
# rank an empty shard of block_weight
SELECTION = {}
for _layer in range(2):
    _p = f"model.layers.{_layer}."
    SELECTION.update(
        {
            _p + "self_attn.q_proj": [(0, 0), (3, 2)],
            _p + "self_attn.k_proj": [(1, 4)],
            _p + "self_attn.v_proj": [(2, 1)],  # rows 32..39 of 40: clipped
            _p + "self_attn.o_proj": [(1, 4), (4, 0)],
            _p + "mlp.down_proj": [(4, 8), (0, 1), (2, 2)],  # (4, 8): the last block of the 80×144 weight
        }
    )
TOL = dict(rtol=1e-4, atol=2e-6)

# the package's `patch` attribute is the function; the module is needed to count save_blocks' writes
patch_mod = importlib.import_module("smt_kernels.block_files")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


# --------------------------------------------------------------------------------------------------- helpers


def tiny_llama() -> LlamaForCausalLM:
    """The seeded tiny LLaMA every distributed test trains (k/v out 40 and the MLP's 144: clipped edge blocks)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=80,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def build(patched: bool = True) -> LlamaForCausalLM:
    model = tiny_llama()
    return patch(model, SELECTION, B, verbose=False) if patched else model


def global_batches(steps: int = STEPS, rows: int = ROWS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (rows, SEQ), generator=g) for _ in range(steps)]


def mean_over_ranks(t: torch.Tensor) -> float:
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def train(model, rows: slice, micro: int = 1, sync=None, rows_per_step: int = ROWS, probe=None) -> list[float]:
    """AdamW on ``rows`` of each step's global batch, in ``micro`` micro-batches; returns the loss per step.

    ``sync(last)`` is entered around each micro-batch (no_sync / set_requires_gradient_sync);
    ``probe(model)`` runs after the first micro-batch of the first step.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    losses = []
    for step, ids in enumerate(global_batches(rows=rows_per_step)):
        total = torch.zeros(())
        chunks = ids[rows].chunk(micro)
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with sync(last) if sync else nullcontext():
                loss = model(input_ids=chunk, labels=chunk).loss / micro
                loss.backward()
            total += loss.detach()
            if probe is not None and step == 0 and i == 0:
                probe(model)
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(total))
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def block_weights(model) -> dict[str, torch.Tensor]:
    return {n: full(p) for n, p in model.named_parameters() if n.endswith("block_weight")}


def frozen_report(model) -> dict[str, tuple]:
    """Per frozen parameter: (requires_grad, has grad, is a DTensor, placements, local shape)."""
    return {
        n: (
            p.requires_grad,
            p.grad is not None,
            isinstance(p, DTensor),
            tuple(p.placements) if isinstance(p, DTensor) else None,
            tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape),
        )
        for n, p in model.named_parameters()
        if not n.endswith("block_weight")
    }


def raw_state(model) -> dict[str, torch.Tensor]:
    """The full state dict as the engine holds it (FSDP2: gathered from the shards); collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_fsdp(model, reshard_after_forward: bool):
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    return fully_shard(model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, out: Path, args: tuple) -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores; also keeps the forked child off the parent's OpenMP pool
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=90)
    )
    try:
        torch.save(fn(rank, *args), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, out: Path, *args) -> list:
    """Run ``fn(rank, *args)`` in WORLD forked processes under a gloo group; their return values, by rank.

    Fork, not spawn: the children inherit the imported torch/transformers (a spawn costs ~10 s per process
    here). A failing rank raises here with its traceback and the others are terminated.
    """
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_entry, args=(fn, free_port(), out, args), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def local_rows(rank: int, rows: int = ROWS) -> slice:
    per = rows // WORLD
    return slice(rank * per, (rank + 1) * per)


def assert_close_dicts(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def assert_matches(ranks: list, ref: dict) -> None:
    """Every rank's blocks and per-step losses equal the single-process run's."""
    for r, res in enumerate(ranks):
        assert_close_dicts(res["blocks"], ref["blocks"], f"rank {r} blocks")
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)


def outside_blocks_mask(name: str, shape) -> torch.Tensor:
    keep = torch.ones(shape, dtype=torch.bool)
    for r, c in SELECTION[name]:
        keep[r * B : (r + 1) * B, c * B : (c + 1) * B] = False
    return keep


# ---------------------------------------------------------------------------------------- single-process reference


@pytest.fixture(scope="module")
def reference():
    """One process on the concatenated batch: losses, blocks, merged state dict, for 1 and 2 micro-batches."""
    torch.manual_seed(0)
    out = {}
    for micro, rows in ((1, ROWS), (2, 2 * ROWS)):
        model = build()
        losses = train(model, slice(None), rows_per_step=rows)  # the whole batch in one forward
        out[micro] = {"losses": losses, "blocks": block_weights(model), "model": model}
    initial = build(patched=False).state_dict()
    out["initial"] = {k: v.clone() for k, v in initial.items()}
    return out


# ------------------------------------------------------------------------------------------------------------ DDP


def _ddp_rank(rank: int, save_dir: Path, micro: int):
    model = build()
    ddp = DDP(model)
    probe_out = {}

    def probe(m):  # after a no_sync micro-batch each rank holds only its own gradient
        probe_out["grad"] = {n: p.grad.clone() for n, p in m.module.named_parameters() if p.grad is not None}

    sync = (lambda last: nullcontext() if last else ddp.no_sync()) if micro > 1 else None
    losses = train(
        ddp,
        local_rows(rank, micro * ROWS),
        micro=micro,
        sync=sync,
        rows_per_step=micro * ROWS,
        probe=probe if micro > 1 else None,
    )
    raw = raw_state(model)  # every rank calls it: it may gather
    res = {
        "losses": losses,
        "blocks": block_weights(model),
        "frozen": frozen_report(model),
        "raw": raw if rank == 0 else None,
        "probe": probe_out,
    }
    if micro == 1:
        res.update(_save_and_merge(rank, ddp, save_dir))
    return res


def _save_and_merge(rank: int, model, save_dir: Path) -> dict:
    """save_blocks_distributed + save_merged + merged_state_dict, counting the writes of this rank."""
    writes = {"blocks": 0, "merged": 0}
    real_write, inner = patch_mod._atomic_write, model.module if isinstance(model, DDP) else model
    real_save = inner.save_pretrained

    def counting_write(path, write):
        writes["blocks"] += 1
        real_write(path, write)

    def counting_save(*a, **k):
        writes["merged"] += 1
        return real_save(*a, **k)

    patch_mod._atomic_write = counting_write
    inner.save_pretrained = counting_save
    try:
        save_blocks_distributed(model, save_dir / "blocks")
        save_merged(model, save_dir / "merged")
        merged = merged_state_dict(model)
    finally:
        patch_mod._atomic_write = real_write
        del inner.save_pretrained
    return {"writes": writes, "merged": merged}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    return d, run_ranks(_ddp_rank, d / "out", d, 1)


def test_ddp_matches_single_process(ddp_run, reference):
    _, ranks = ddp_run
    assert_matches(ranks, reference[1])


def test_ddp_frozen_weights_stay_frozen(ddp_run, reference):
    _, ranks = ddp_run
    for res in ranks:
        for name, (requires_grad, has_grad, *_) in res["frozen"].items():
            assert not requires_grad and not has_grad, name
    raw, initial = ranks[0]["raw"], reference["initial"]
    for key, before in initial.items():
        module = key.removesuffix(".weight")
        if module in SELECTION:  # the weight holds the current blocks in place; everything else is untouched
            keep = outside_blocks_mask(module, before.shape)
            assert torch.equal(raw[key][keep], before[keep]), key
        else:
            assert torch.equal(raw[key], before), key


def test_ddp_no_sync_accumulation(tmp_path, reference):
    ranks = run_ranks(_ddp_rank, tmp_path / "out", tmp_path, 2)
    assert_matches(ranks, reference[2])
    # no_sync really skipped the all-reduce: after the first micro-batch the ranks' gradients differ
    g0, g1 = ranks[0]["probe"]["grad"], ranks[1]["probe"]["grad"]
    assert g0.keys() == g1.keys() and len(g0) == sum(len(v) > 0 for v in SELECTION.values())
    assert all(not torch.allclose(g0[k], g1[k]) for k in g0)


# ---------------------------------------------------------------------------------------------------------- FSDP2


def _fsdp_rank(rank: int, save_dir: Path | None, micro: int, reshard_after_forward: bool):
    model = shard_fsdp(build(), reshard_after_forward)
    probe_out = {}

    def sync(last):
        model.set_requires_gradient_sync(last)
        return nullcontext()

    def probe(m):  # with gradient sync off nothing has been reduce-scattered into the sharded gradients yet
        probe_out["sharded_grads"] = [p.grad is not None for p in m.parameters() if p.requires_grad]

    losses = train(
        model,
        local_rows(rank, micro * ROWS),
        micro=micro,
        sync=sync if micro > 1 else None,
        rows_per_step=micro * ROWS,
        probe=probe if micro > 1 else None,
    )
    res = {"losses": losses, "blocks": block_weights(model), "frozen": frozen_report(model), "probe": probe_out}
    raw = raw_state(model)
    res["raw"] = raw if rank == 0 else None
    if save_dir is not None:
        res.update(_save_and_merge(rank, model, save_dir))
    return res


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    return d, run_ranks(_fsdp_rank, d / "out", d, 1, True)  # FSDP2's (and accelerate's) default


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp2_matches_single_process(reshard_after_forward, fsdp_run, reference, tmp_path):
    """Both FSDP2 modes. With resharding after forward, the unsharded weight is re-gathered before backward
    from shards that never saw the trained blocks: the op's backward must write the blocks into it again, or
    every input gradient below a patched layer is computed with the base weights (from step 2 on)."""
    if reshard_after_forward:
        _, ranks = fsdp_run
    else:
        ranks = run_ranks(_fsdp_rank, tmp_path / "out", None, 1, False)
    assert_matches(ranks, reference[1])


def test_fsdp2_frozen_weights_stay_frozen_and_sharded(fsdp_run, reference):
    _, ranks = fsdp_run
    initial = reference["initial"]
    for rank, res in enumerate(ranks):
        for name, (requires_grad, has_grad, is_dtensor, placements, local_shape) in res["frozen"].items():
            assert not requires_grad and not has_grad, name
            assert is_dtensor and placements == (Shard(0),), name
            # Shard(0) splits like torch.chunk: this rank keeps its part of the rows only
            assert local_shape == initial[name].chunk(WORLD)[rank].shape, name
    # the shards never change: the gathered weights are the base weights everywhere, blocks included
    raw = ranks[0]["raw"]
    for key, before in initial.items():
        assert torch.equal(raw[key], before), key


def test_fsdp2_gradient_accumulation(tmp_path, reference):
    ranks = run_ranks(_fsdp_rank, tmp_path / "out", None, 2, True)
    assert_matches(ranks, reference[2])
    for res in ranks:
        assert res["probe"]["sharded_grads"] and not any(res["probe"]["sharded_grads"])


def _fsdp_checkpointed_rank(rank: int, reshard_after_forward: bool):
    """FSDP2 with non-reentrant gradient checkpointing: the patched layers run as two autograd nodes there
    (``ops.split_layer``); counts how often the split's first node ran."""
    from smt_kernels import ops

    calls = []
    real = ops.saved_columns_relay

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    ops.saved_columns_relay = counted
    model = build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard_fsdp(model, reshard_after_forward)
    losses = train(model, local_rows(rank))
    return {"losses": losses, "blocks": block_weights(model), "split_calls": len(calls)}


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp2_with_gradient_checkpointing(reshard_after_forward, tmp_path, reference):
    """Checkpointed layers run as two autograd nodes whose GEMM node writes the blocks into the weight again
    before dX (FSDP2 re-gathered it from shards without them); the last layer's GEMM is not recomputed. Equal to
    one process without checkpointing."""
    ranks = run_ranks(_fsdp_checkpointed_rank, tmp_path / "out", reshard_after_forward)
    assert_matches(ranks, reference[1])
    assert all(res["split_calls"] > 0 for res in ranks)


def _shard_model_rank(rank: int):
    """shard_model with every option that changes the units: both decoder layers in one unit, embeddings and
    lm_head in units of their own, explicit prefetch."""
    from smt_kernels.distributed import shard_model

    model = shard_model(build(), layers_per_unit=2, shard_embeddings=True, prefetch=1)
    units = [type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)]
    return {"losses": train(model, local_rows(rank)), "blocks": block_weights(model), "units": units}


def test_shard_model_matches_single_process(tmp_path, reference):
    ranks = run_ranks(_shard_model_rank, tmp_path / "out")
    assert_matches(ranks, reference[1])
    # the root, embed_tokens, lm_head and the two decoder layers (one unit, two FSDP modules)
    assert sorted(ranks[0]["units"]) == sorted(
        ["LlamaForCausalLM", "Embedding", "Linear", "LlamaDecoderLayer", "LlamaDecoderLayer"]
    )


def test_shard_model_refuses_what_it_cannot_shard():
    from smt_kernels.distributed import shard_model

    with pytest.raises(ValueError, match="layers_per_unit must be at least 1, got 0"):
        shard_model(build(), layers_per_unit=0)
    with pytest.raises(ValueError, match="prefetch must be at least 0, got -1"):
        shard_model(build(), prefetch=-1)
    with pytest.raises(ValueError, match="has no decoder layers at .model.layers"):
        shard_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    tied = build()
    tied.lm_head.weight = tied.model.embed_tokens.weight
    with pytest.raises(ValueError, match="shard_embeddings needs untied embeddings"):
        shard_model(tied, shard_embeddings=True)


# ----------------------------------------------------------------------------------------------- save and merge


def _check_saved(save_dir: Path, ranks: list, reference) -> None:
    ref = reference[1]
    assert [res["writes"] for res in ranks] == [{"blocks": 2, "merged": 1}, {"blocks": 0, "merged": 0}]
    assert ranks[1]["merged"] == {}
    # the blocks load (fingerprint checked) into a plain single-process model and equal the reference's
    plain = load_blocks(build(patched=False), save_dir / "blocks", strict=True)
    assert_close_dicts(block_weights(plain), ref["blocks"], "loaded blocks")
    # the merged state dict and checkpoint equal merge() of the reference model
    want = merge(build()).state_dict()
    for name, block in ref["blocks"].items():
        module = name.removesuffix(".block_weight")
        w = want[f"{module}.weight"]
        for k, (r, c) in enumerate(SELECTION[module]):
            tile = w[r * B : (r + 1) * B, c * B : (c + 1) * B]
            tile.copy_(block[k, : tile.shape[0], : tile.shape[1]])
    assert_close_dicts(ranks[0]["merged"], want, "merged state dict")
    loaded = LlamaForCausalLM.from_pretrained(save_dir / "merged")
    assert_close_dicts(loaded.state_dict(), want, "merged checkpoint")


def test_ddp_save_blocks_and_merge_write_once(ddp_run, reference):
    save_dir, ranks = ddp_run
    _check_saved(save_dir, ranks, reference)


def test_fsdp2_save_blocks_and_merge_write_once(fsdp_run, reference):
    save_dir, ranks = fsdp_run
    _check_saved(save_dir, ranks, reference)


def test_fsdp2_saved_files_equal_single_process_save(fsdp_run, reference, tmp_path):
    """Same JSON (layout, fingerprint) as save_blocks on the reference model trained in one process."""
    save_dir, _ = fsdp_run
    patch_mod.save_blocks(reference[1]["model"], tmp_path)
    got = json.loads((save_dir / "blocks" / patch_mod.META_FILE).read_text())
    want = json.loads((tmp_path / patch_mod.META_FILE).read_text())
    for key in ("block_size", "num_blocks", "modules", "fingerprint"):
        assert got[key] == want[key], key


# ---------------------------------------------------------------------------------------------------- selection

SCORES = ("abs_mean", "l2", "activation")
SELECT_KW = dict(num_blocks=7, targets=("q_proj", "k_proj", "v_proj", "down_proj"), block_size=B, progress=False)


def warmup_batches(rows: slice | None = None) -> list[dict]:
    return [
        {"input_ids": ids[rows or slice(None)], "labels": ids[rows or slice(None)]} for ids in global_batches(steps=2)
    ]


def _select_rank(rank: int):
    model = build(patched=False)
    out = {}
    for score in SCORES:
        sel = select_blocks_distributed(model, warmup_batches(local_rows(rank)), score=score, **SELECT_KW)
        out[score] = (dict(sel), sel.scores, sel.num_batches)
    # unequal batch counts are refused on every rank before any per-batch collective could hang
    try:
        select_blocks_distributed(model, warmup_batches(local_rows(rank))[: rank + 1], **SELECT_KW)
    except ValueError as err:
        out["mismatch"] = str(err)
    try:
        select_blocks_distributed(DDP(build(patched=False)), warmup_batches(local_rows(rank)), **SELECT_KW)
    except ValueError as err:
        out["wrapped"] = str(err)
    return out


def test_selection_identical_on_every_rank_and_equal_to_single_process(tmp_path):
    ranks = run_ranks(_select_rank, tmp_path / "out")
    for score in SCORES:
        ref = select_blocks(build(patched=False), warmup_batches(), score=score, **SELECT_KW)
        for r, res in enumerate(ranks):
            blocks, scores, num_batches = res[score]
            assert blocks == dict(ref), f"{score}: rank {r} chose other blocks than one process"
            assert num_batches == 2 * WORLD
            assert scores.keys() == ref.scores.keys()
            for name in ref.scores:  # the reduced statistics, not just the broadcast choice
                torch.testing.assert_close(scores[name], ref.scores[name], rtol=1e-5, atol=1e-9)
    for res in ranks:
        assert "between 1 and 2 warm-up batches" in res["mismatch"]
        assert "before wrapping" in res["wrapped"]


CONFIG_CASES = {  # settings through config= (or None for "the default") select what the keywords would
    "config targets": dict(config=SMTConfig(targets=("q_proj", "down_proj"), num_blocks=5, block_size=B)),
    "config activation": dict(config=SMTConfig(score="activation", num_blocks=5, block_size=B)),
    "None defaults": dict(num_blocks=5, block_size=B, score=None, targets=None),
}


def _config_and_errors_rank(rank: int, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build(patched=False)
    out = {}
    for case, kw in CONFIG_CASES.items():
        sel = select_blocks_distributed(model, warmup_batches(local_rows(rank)), progress=False, **kw)
        out[case] = (dict(sel), sel.scores, sel.num_batches, sel.config)
    try:
        select_blocks_distributed(model, warmup_batches(local_rows(rank)), num_batches=0, num_blocks=5, block_size=B)
    except ValueError as err:
        out["num_batches"] = str(err)
    # a failure of rank 0's write reaches every rank, at once (no rank waits for the group's timeout)
    try:
        save_blocks_distributed(model, out_dir / "unpatched")  # not patched: refused on every rank
    except ValueError as err:
        out["unpatched"] = str(err)
    (out_dir / "a_file").write_text("")
    patched = build()
    for what, call in (
        ("blocks", lambda: save_blocks_distributed(patched, out_dir / "a_file" / "blocks")),
        ("merged", lambda: save_merged(patched, out_dir / "a_file" / "merged")),
    ):
        try:
            call()
        except (OSError, RuntimeError) as err:
            out[what] = f"{type(err).__name__}: {err}"
    save_blocks_distributed(patched, out_dir / "blocks")  # the group is still in step: this save works
    out["saved"] = (out_dir / "blocks" / "smt_blocks.json").is_file()
    return out


def test_selection_settings_from_config_and_errors_on_every_rank(tmp_path):
    ranks = run_ranks(_config_and_errors_rank, tmp_path / "out", tmp_path / "files")
    for case, kw in CONFIG_CASES.items():
        ref = select_blocks(build(patched=False), warmup_batches(), progress=False, **kw)
        for r, res in enumerate(ranks):
            blocks, scores, num_batches, config = res[case]
            assert blocks == dict(ref), f"{case}: rank {r} chose other blocks than one process"
            assert num_batches == 2 * WORLD and config == ref.config is not None
            for name in ref.scores:
                torch.testing.assert_close(scores[name], ref.scores[name], rtol=1e-5, atol=1e-9)
    for rank, res in enumerate(ranks):
        assert "num_batches must be >= 1, got 0" in res["num_batches"]
        assert "needs a model patched" in res["unpatched"]
        for what in ("blocks", "merged"):
            assert ("NotADirectoryError" if rank == 0 else "RuntimeError: rank 0 failed: NotADirectoryError") in res[
                what
            ], res[what]
        assert res["saved"]


def test_selection_without_process_group_is_select_blocks():
    assert not dist.is_initialized()
    got = select_blocks_distributed(build(patched=False), warmup_batches(), **SELECT_KW)
    want = select_blocks(build(patched=False), warmup_batches(), **SELECT_KW)
    assert dict(got) == dict(want)


# -------------------------------------------------------------------------------------------------- HF Trainer


class _Rows(torch.utils.data.Dataset):
    """The rows of ``global_batches()`` in order: with sequential sampling Trainer's step t sees batch t."""

    def __init__(self) -> None:
        self.ids = torch.cat(global_batches())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_rank(rank: int, out_dir: Path):
    from transformers import Trainer, TrainingArguments

    # what torchrun would set; accelerate reads them and finds the gloo group already initialised
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=ROWS // WORLD,
        max_steps=STEPS,
        learning_rate=LR,
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    model = build()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    save_blocks_distributed(trainer.model, out_dir / "blocks")
    return {"blocks": block_weights(model), "wrapper": type(trainer.model_wrapped).__name__}


def test_hf_trainer_ddp_matches_single_process(tmp_path, reference):
    """HF Trainer on 2 CPU processes (accelerate's MULTI_CPU: DDP over gloo) trains what one process trains."""
    ranks = run_ranks(_trainer_rank, tmp_path / "out", tmp_path)
    for r, res in enumerate(ranks):
        assert res["wrapper"] == "DistributedDataParallel"
        assert_close_dicts(res["blocks"], reference[1]["blocks"], f"rank {r} blocks")
    loaded = load_blocks(build(patched=False), tmp_path / "blocks")
    assert_close_dicts(block_weights(loaded), reference[1]["blocks"], "saved blocks")
