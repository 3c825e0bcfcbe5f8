"""Model benchmark: training-step throughput and peak memory of a random-initialised LLaMA-shaped model.

Methods, each with gradient checkpointing off and on:
  frozen      every weight frozen, gradients still flow to the embeddings' output (the floor)
  smt         ~1% of the q/k/v blocks (random, global) trainable through smt_kernels.patch, AdamW
  lora        PEFT LoRA on q/k/v with the same number of trainable parameters, AdamW
  full        every weight trainable, AdamW
plus "smt_select": smt_kernels.select_blocks (gradient score) on a few warm-up batches of the unpatched model.

Models are built on the meta device and materialised on the GPU in bf16 (random weights: speed and memory do not
depend on the values). A configuration that does not fit is recorded as OOM.

    python -m benchmarks.bench_model                         # llama3.2-1b, llama2-7b, llama3-8b, ~6 min on an H200
    python -m benchmarks.bench_model --models llama2-7b --layers 8
    python -m benchmarks.bench_model --device cpu            # tiny model, a smoke test
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from smt_kernels import SparseBlockLinear, finetune  # noqa: E402
from smt_kernels.select import find_target_linears  # noqa: E402

MODELS = {
    # Llama-3.2-1B
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # only with a 4-bit base on one GPU (benchmarks/bench_nf4_model.py): 141 GB in bf16
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # SmolLM2-135M (what `smt-kernels finetune` trains by default) and TinyLlama-1.1B
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # CPU smoke test: every projection a multiple of the 16-wide CPU block
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
METHODS = ("frozen", "full", "smt", "lora")  # the references first: later rows' ratios use them
TARGETS = ("q_proj", "k_proj", "v_proj")

MODEL_FIELDS = common.ENV_FIELDS + [
    "dtype",
    "model",
    "layers",
    "params",
    "attn",
    "batch",
    "seq",
    "tokens_per_step",
    "method",
    "grad_ckpt",
    "block_size",
    "n_blocks",
    "lora_rank",
    "trainable_params",
    "trainable_pct",
    "step_ms",
    "step_ms_p20",
    "step_ms_p80",
    "iters",
    "tokens_per_s",
    "ratio_to_floor",
    "peak_mem_gib",
    "mem_vs_full",
    "static_mem_gib",
    "peak_requested_gib",
    "static_requested_gib",
    "status",
    "notes",
]
PRINT_COLUMNS = ["model", "method", "grad_ckpt", "trainable_pct", "step_ms", "tokens_per_s", "peak_mem_gib", "status"]


# ---------------------------------------------------------------- model construction


def meta_model(name: str, layers: int | None, seq: int, dtype: torch.dtype) -> nn.Module:
    """LlamaForCausalLM of the named shape on the meta device, its tensors typed ``dtype`` (no memory yet)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(MODELS[name])
    if layers:
        shape["num_hidden_layers"] = min(layers, shape["num_hidden_layers"])
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 2048), use_cache=False, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # so that to_empty allocates bf16 directly (an 8B model in fp32 is 32 GB)
    try:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def build_model(name: str, layers: int | None, seq: int, dtype: torch.dtype, device: torch.device, seed: int):
    """LlamaForCausalLM of the named shape: built on the meta device, materialised on ``device`` with random values."""
    model = meta_model(name, layers, seq, dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own new tensor: tied embeddings would come apart
    fill_random(model, torch.Generator(device=device).manual_seed(seed))
    rebuild_rotary(model, device)
    model.train()
    return model


def fill_random(module: nn.Module, gen: torch.Generator, recurse: bool = True) -> None:
    """Matrices N(0, 0.02), vectors (RMSNorm scales) 1: speed and memory do not depend on the values."""
    with torch.no_grad():
        for p in module.parameters(recurse=recurse):
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)


def rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Rebuild the rotary-embedding modules: their non-persistent buffers (inverse frequencies) are garbage after
    ``to_empty``."""
    for mname, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = mname.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model,
                attr,
                type(module)(config=model.config).to(device),
            )


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing of every decoder layer on or off, non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, where the old name warns
        try:
            model.activation_checkpointing_enable(kwargs) if on else model.activation_checkpointing_disable()
            return
        except TypeError:
            pass
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def random_selection(
    model: nn.Module, ratio: float, block_size: int, seed: int, targets: tuple[str, ...] = TARGETS
) -> dict[str, list[tuple[int, int]]]:
    """About ``ratio`` of all blocks of ``targets``, drawn uniformly over every target matrix (a global budget)."""
    candidates = []
    for name, lin in find_target_linears(model, targets).items():
        rows, cols = -(-lin.out_features // block_size), -(-lin.in_features // block_size)
        candidates += [(name, r, c) for r in range(rows) for c in range(cols)]
    k = max(1, round(ratio * len(candidates)))
    chosen = random.Random(seed).sample(candidates, k)
    selection: dict[str, list[tuple[int, int]]] = {}
    for name, r, c in sorted(chosen):
        selection.setdefault(name, []).append((r, c))
    return selection


def apply_smt(model: nn.Module, selection: dict, block_size: int) -> tuple[nn.Module, str]:
    """Patch with smt_kernels.patch when the package has it, else swap the modules here; returns (model, how)."""
    try:
        from smt_kernels import patch
    except ImportError:
        patch = None
    if patch is not None:
        return patch(model, selection, block_size=block_size, verbose=False), "smt_kernels.patch"
    for p in model.parameters():
        p.requires_grad_(False)
    for name, blocks in selection.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, SparseBlockLinear.from_linear(getattr(parent, attr), blocks, block_size=block_size))
    return model, "SparseBlockLinear.from_linear (no smt_kernels.patch)"


def apply_lora(model: nn.Module, trainable_budget: int, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """PEFT LoRA on q/k/v at the rank whose A and B hold about ``trainable_budget`` parameters."""
    from peft import LoraConfig, get_peft_model

    rank = finetune.lora_rank(model, TARGETS, trainable_budget)  # the rule smt-kernels finetune uses
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")
    # adapters in the model's dtype (PEFT would upcast them to fp32): every method trains in bf16 here
    peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    for n, p in peft_model.named_parameters():
        if "lora_" in n and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return peft_model, rank


# ---------------------------------------------------------------- measurement


def make_batches(vocab: int, batch: int, seq: int, device, seed: int, count: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(count)]


def measure_training(model: nn.Module, batches: list[torch.Tensor], device, args) -> dict:
    """Median step time and peak memory of forward + backward + AdamW step (no optimizer when nothing trains)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = None
    if trainable:
        opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    def step(i: int) -> None:
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = common.time_steps(step, device, warmup=args.warmup, probe=1, min_iters=args.steps, max_iters=args.steps)
    stats = common.summarize(times)
    res = {
        "step_ms": stats["time_ms"],
        "step_ms_p20": stats["time_ms_p20"],
        "step_ms_p80": stats["time_ms_p80"],
        "iters": stats["iters"],
    }
    if device.type == "cuda":
        res["peak_mem_gib"] = common.sig(torch.cuda.max_memory_allocated(device) / 2**30, 4)
        # weights + optimizer state, what stays resident between steps
        res["static_mem_gib"] = common.sig(torch.cuda.memory_allocated(device) / 2**30, 4)
        # what the tensors asked for, without the caching allocator's rounding of each block (up to ~1 MiB per
        # large tensor that fills a segment's end): tells a real difference from allocation granularity
        stats = torch.cuda.memory_stats(device)
        if "requested_bytes.all.peak" in stats:
            res["peak_requested_gib"] = common.sig(stats["requested_bytes.all.peak"] / 2**30, 6)
            res["static_requested_gib"] = common.sig(stats["requested_bytes.all.current"] / 2**30, 6)
    if getattr(args, "profile", 0):  # more steps, after the measured ones: the operator table (not a CSV column)
        res["profile"] = common.profile_table(step, range(args.profile), device)
    return res


def measure_selection(
    model: nn.Module,
    batches: list[torch.Tensor],
    device,
    *,
    ratio: float,
    block_size: int,
    num_batches: int,
    targets: tuple[str, ...] = TARGETS,
    training: bool = False,
    warm_up: bool = True,
) -> dict:
    """Wall time per warm-up batch and peak memory of smt_kernels.select_blocks (gradient score) on ``num_batches``
    batches (``batches`` repeated); ``training``: train mode (gradient checkpointing on, if the model has it);
    ``warm_up``: one untimed selection first (kernels and allocator)."""
    from smt_kernels import select_blocks

    warm = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in batches]
    warm = (warm * max(1, -(-num_batches // len(warm))))[:num_batches]
    kwargs = dict(ratio=ratio, targets=targets, block_size=block_size, training=training, progress=False)
    if warm_up:
        select_blocks(model, warm[:1], **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    common.synchronize(device)
    t = time.perf_counter()
    sel = select_blocks(model, warm, **kwargs)
    common.synchronize(device)
    per_batch_ms = (time.perf_counter() - t) * 1e3 / len(warm)
    mode = "train mode (gradient checkpointing)" if training else "eval mode"
    res = {
        "step_ms": common.sig(per_batch_ms),
        "iters": len(warm),
        "n_blocks": sel.num_blocks,
        "notes": f"{len(warm)} warm-up batches ({mode}), score abs_mean; step_ms = wall time per batch",
    }
    if device.type == "cuda":
        res["peak_mem_gib"] = common.sig(torch.cuda.max_memory_allocated(device) / 2**30, 4)
    return res


def run_method(name: str, method: str, args, env: dict, device, dtype, budget: common.Budget) -> list[dict]:
    """Rows for one (model, method): one per gradient-checkpointing setting, plus the selection row for smt.

    The model lives only in this frame: the caller frees memory once it returns.
    """
    rows: list[dict] = []
    info: dict = {"model": name, "method": method}
    try:
        model = build_model(name, args.layers, args.seq, dtype, device, args.seed)
        hf_model = model
        total = sum(p.numel() for p in model.parameters())
        info.update(
            layers=model.config.num_hidden_layers, params=total, attn=getattr(model.config, "_attn_implementation", "")
        )
        batches = make_batches(model.config.vocab_size, args.batch, args.seq, device, args.seed)
        if method == "smt" and not args.no_select:
            try:
                import smt_kernels

                has_select = hasattr(smt_kernels, "select_blocks")
            except ImportError:
                has_select = False
            sel_row = {"status": "skipped", "notes": "smt_kernels.select_blocks not available"}
            if has_select:
                sel_row = common.run_guarded(
                    lambda: measure_selection(
                        model,
                        batches,
                        device,
                        ratio=args.smt_ratio,
                        block_size=args.block_size,
                        num_batches=args.select_batches,
                    ),
                    device,
                )
            rows.append({**info, "method": "smt_select", "grad_ckpt": "off", **sel_row})
        selection = random_selection(model, args.smt_ratio, args.block_size, args.seed)
        n_blocks = sum(len(v) for v in selection.values())
        budget_params = n_blocks * args.block_size**2
        if method == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            model.enable_input_require_grads()  # gradients flow through every layer, as under any fine-tuning
        elif method == "smt":
            model, how = apply_smt(model, selection, args.block_size)
            info.update(n_blocks=n_blocks, notes=f"random blocks; {how}")
        elif method == "lora":
            model, rank = apply_lora(model, budget_params, dtype)
            info.update(lora_rank=rank)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info.update(trainable_params=trainable, trainable_pct=common.sig(100 * trainable / total, 4))
        for ckpt in args.ckpt:
            if budget.exhausted():
                rows.append({**info, "grad_ckpt": ckpt, "status": "skipped", "notes": "time budget"})
                continue
            set_checkpointing(hf_model, ckpt == "on")
            res = common.run_guarded(lambda: measure_training(model, batches, device, args), device)
            rows.append({**info, "grad_ckpt": ckpt, **res})
    except Exception as err:  # building or patching failed (OOM for the largest models)
        status = "OOM" if common.is_oom(err) else "error"
        note = "" if status == "OOM" else f"{type(err).__name__}: {err}"[:300]
        done = {r["grad_ckpt"] for r in rows if r["method"] == method}
        rows += [{**info, "grad_ckpt": c, "status": status, "notes": note} for c in args.ckpt if c not in done]
    tokens = args.batch * args.seq
    for r in rows:
        r.update(
            {k: v for k, v in env.items()},
            dtype=args.dtype,
            batch=args.batch,
            seq=args.seq,
            tokens_per_step=tokens,
            block_size=args.block_size,
        )
        if r.get("status") == "ok":
            r["tokens_per_s"] = common.sig(tokens / (r["step_ms"] * 1e-3), 4)
        print(common.format_row(r, PRINT_COLUMNS), flush=True)
    return rows


def add_ratios(row: dict, earlier: list[dict]) -> None:
    """Step time over the frozen floor's, and peak memory over full fine-tuning's, same model and grad_ckpt."""
    if row.get("status") != "ok":
        return
    ref = {
        r["method"]: r
        for r in earlier
        if r.get("status") == "ok" and (r.get("model"), r.get("grad_ckpt")) == (row.get("model"), row.get("grad_ckpt"))
    }
    floor, full = ref.get("frozen"), ref.get("full")
    if row["method"] == "frozen":
        floor = row
    if floor:
        row["ratio_to_floor"] = common.sig(row["step_ms"] / floor["step_ms"], 4)
    if row["method"] == "full":
        full = row
    if full and row.get("peak_mem_gib") and full.get("peak_mem_gib"):
        row["mem_vs_full"] = common.sig(row["peak_mem_gib"] / full["peak_mem_gib"], 4)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    common.add_output_args(p)
    p.add_argument("--models", default=None, help=f"subset of {','.join(MODELS)} (default: all but tiny)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--ckpt", default="off,on", help="gradient checkpointing settings to run (off,on)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (for time)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; CPU 32)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5; CPU 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smt-ratio", type=float, default=0.01, help="share of the q/k/v blocks SMT trains (0.01)")
    p.add_argument("--block-size", type=int, default=None, help="256 (CPU default 16)")
    p.add_argument("--select-batches", type=int, default=4, help="warm-up batches of the smt_select row")
    p.add_argument("--no-select", action="store_true", help="skip the smt_select row")
    p.add_argument(
        "--budget-s", type=float, default=420.0, help="start no new configuration after this many seconds (default 420)"
    )
    p.add_argument("--name", default="model", help="CSV base name (default model.csv)")
    args = p.parse_args(argv)
    args.device_obj = common.pick_device(args.device)
    cpu = args.device_obj.type == "cpu"
    args.models = common.parse_list(args.models or ("tiny" if cpu else "llama3.2-1b,llama2-7b,llama3-8b"))
    args.methods = common.parse_list(args.methods)
    args.ckpt = common.parse_list(args.ckpt)
    args.seq = args.seq or (32 if cpu else 2048)
    args.batch = args.batch or 2
    args.steps = args.steps or (2 if cpu else 5)
    args.block_size = args.block_size or (16 if cpu else 256)
    for bad in set(args.models) - set(MODELS):
        p.error(f"unknown model {bad!r}; choose from {', '.join(MODELS)}")
    for bad in set(args.methods) - set(METHODS):
        p.error(f"unknown method {bad!r}; choose from {', '.join(METHODS)}")
    for bad in set(args.ckpt) - {"off", "on"}:
        p.error(f"--ckpt takes off and/or on, got {bad!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with common.smoke_threads(args.device_obj):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    device, dtype, env = common.start_run(args, "benchmarks.bench_model", argv)
    print(
        f"# {env['gpu']} | torch {env['torch']} | transformers {env['transformers']} | peft {env['peft']} | "
        f"{env['command']}",
        flush=True,
    )
    print(common.format_row({c: c for c in PRINT_COLUMNS}, PRINT_COLUMNS), flush=True)
    budget = common.Budget(args.budget_s)
    sink = common.CsvSink(args.name, MODEL_FIELDS, None if args.no_results else args.results_dir, args.out)
    rows: list[dict] = []
    for name in args.models:
        for method in args.methods:
            if budget.exhausted():
                new = [
                    {
                        **env,
                        "model": name,
                        "method": method,
                        "grad_ckpt": c,
                        "status": "skipped",
                        "notes": "time budget",
                    }
                    for c in args.ckpt
                ]
            else:
                new = run_method(name, method, args, env, device, dtype, budget)
                common.free_memory(device)
            for r in new:
                add_ratios(r, rows)
                rows.append(r)
                sink.write(r)
    print("\n## summary (ratio_to_floor: step time / frozen step time; mem_vs_full: peak / full FT peak)")
    print(
        common.format_table(
            rows,
            [
                "model",
                "method",
                "grad_ckpt",
                "trainable_pct",
                "step_ms",
                "tokens_per_s",
                "ratio_to_floor",
                "peak_mem_gib",
                "mem_vs_full",
                "status",
            ],
        )
    )
    sink.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
