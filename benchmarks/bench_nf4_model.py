"""Whole-model benchmark of the 4-bit base: SMT on an NF4 LLaMA against its NF4 frozen floor and QLoRA.

Methods (all with gradient checkpointing, AdamW, trainable parameters in ``--param-dtype``):
  nf4_frozen   4-bit base, nothing trainable, gradients still flow through every layer (the floor)
  nf4_select   smt_kernels.select_blocks on the 4-bit model (gradient score, train mode, 2 batches): its peak
  nf4_smt      ~``--ratio`` of the 256-blocks of all seven projections trainable (random blocks, global budget)
  qlora        PEFT LoRA on our NF4Linear (smt_kernels.quant.lora), rank matched to SMT's parameter count
  bnb_frozen   bitsandbytes Linear4bit base (NF4, double quantization), nothing trainable (needs bitsandbytes)
  bnb_qlora    PEFT LoRA on bitsandbytes Linear4bit: QLoRA as its users run it (needs bitsandbytes)
  bf16_frozen  the 16-bit model, nothing trainable
  bf16_smt     SMT on the 16-bit model, same blocks as nf4_smt
Models are random-init LLaMA shapes (benchmarks.bench_model.MODELS) built one decoder layer at a time on the
device and quantized there, so the 16-bit model never exists whole (LLaMA-3-70B: 141 GB in bf16). One 4-bit model
serves nf4_frozen, nf4_select, qlora (adapters removed again with PEFT's ``unload``) and nf4_smt, in that order.

    python -m benchmarks.bench_nf4_model --models llama3-70b --methods nf4_frozen,nf4_smt,qlora
    python -m benchmarks.bench_nf4_model --models llama3-8b          # every method, batch 4x1024
    python -m benchmarks.bench_nf4_model --device cpu                # tiny model, a smoke test
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_model import (  # noqa: E402
    MODELS,
    build_model,
    fill_random,
    make_batches,
    measure_selection,
    measure_training,
    meta_model,
    random_selection,
    rebuild_rotary,
    set_checkpointing,
)
from smt_kernels import finetune, patch  # noqa: E402
from smt_kernels.quant import quantize_base, release_buffers, use_pooled_buffer  # noqa: E402
from smt_kernels.select import PROJECTIONS  # noqa: E402

# the methods of each base, in run order (one model per base serves them all); "<base>_frozen" is its floor
BASES = {
    "nf4": ("nf4_frozen", "nf4_select", "qlora", "nf4_smt"),
    "bnb": ("bnb_frozen", "bnb_qlora"),
    "bf16": ("bf16_frozen", "bf16_smt"),
}
BASE_OF = {m: base for base, methods in BASES.items() for m in methods}
METHODS = tuple(BASE_OF)
# (batch, seq) per model unless --batch/--seq: the settings
SHAPES = {"llama3-70b": (1, 2048), "llama3-8b": (4, 1024), "tiny": (2, 32)}
FIELDS = common.ENV_FIELDS + [
    "model",
    "layers",
    "params",
    "batch",
    "seq",
    "method",
    "param_dtype",
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
    "static_mem_gib",
    "peak_requested_gib",
    "static_requested_gib",
    "build_s",
    "build_peak_gib",
    "status",
    "notes",
]
PRINT = ["model", "method", "trainable_pct", "step_ms", "tokens_per_s", "ratio_to_floor", "peak_mem_gib", "status"]


# ---------------------------------------------------------------- models


def _linear_to_bnb(linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` (double quantization, as QLoRA) holding ``linear``'s weight."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    new.weight = weight.to(linear.weight.device)  # quantizes on the weight's device
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new


def _quantize_layer(layer: nn.Module, base: str, dtype: torch.dtype) -> None:
    if base == "nf4":
        quantize_base(layer, "nf4", double_quant=True, compute_dtype=dtype)
        return
    for name, linear in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr, _linear_to_bnb(linear, dtype))


def build_4bit_model(name: str, base: str, args, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """LlamaForCausalLM of the named shape with a 4-bit base (``base``: "nf4" ours, "bnb" bitsandbytes), built on
    the meta device and materialised one decoder layer at a time: random values, then quantized on ``device``.
    Embeddings, final norm and lm_head stay in ``dtype``."""
    model = meta_model(name, args.layers, args.seq, dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for layer in model.model.layers:
        layer.to_empty(device=device)
        fill_random(layer, gen)
        _quantize_layer(layer, base, dtype)
    for module in model.modules():  # what is still on the meta device: embeddings, norms, lm_head
        own = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
        if any(t.is_meta for t in own):
            module.to_empty(device=device, recurse=False)
            fill_random(module, gen, recurse=False)
    model.tie_weights()
    rebuild_rotary(model, device)
    model.train()
    return model


# ---------------------------------------------------------------- methods


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _as_param_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Adapters in the run's trainable dtype (PEFT keeps them fp32 by default)."""
    for n, p in model.named_parameters():
        if "lora_" in n and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _lora_config(rank: int, nf4: bool):
    kwargs = dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(PROJECTIONS), bias="none")
    if nf4:
        from smt_kernels.quant.lora import nf4_lora_config

        return nf4_lora_config(**kwargs)
    from peft import LoraConfig

    return LoraConfig(**kwargs)


def _train_row(model: nn.Module, batches, device, args) -> dict:
    common.free_memory(device)
    return common.run_guarded(lambda: measure_training(model, batches, device, args), device)


def run_model(name: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Rows of every requested method on one model shape; each base is built once and freed before the next."""
    rows: list[dict] = []
    want = set(args.methods)
    for base, all_methods in BASES.items():
        methods = [m for m in all_methods if m in want]
        if methods:
            rows += _run_base(name, base, methods, args, device, dtype)
            release_buffers()
            common.free_memory(device)  # the model died with _run_base's frame
    return rows


def _run_base(name: str, base: str, methods: list[str], args, device, dtype) -> list[dict]:
    info: dict = {"model": name}
    try:
        common.free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if base == "bf16":
            model = build_model(name, args.layers, args.seq, dtype, device, args.seed)
        else:
            model = build_4bit_model(name, base, args, dtype, device)
        common.synchronize(device)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            info["build_peak_gib"] = common.sig(torch.cuda.max_memory_allocated(device) / 2**30, 4)
            info["static_mem_gib"] = common.sig(torch.cuda.memory_allocated(device) / 2**30, 4)
        total = _model_params(model)
        info.update(layers=model.config.num_hidden_layers, params=total)
        set_checkpointing(model, True)
        batches = make_batches(model.config.vocab_size, args.batch, args.seq, device, args.seed)
        selection = random_selection(model, args.ratio, args.block_size, args.seed, targets=PROJECTIONS)
        n_blocks = sum(len(v) for v in selection.values())
        budget = n_blocks * args.block_size**2
        _freeze(model)
    except Exception as err:  # noqa: BLE001 - building failed (OOM, or bitsandbytes missing)
        return [{**info, "method": m, **_failure(err)} for m in methods]
    rows = []
    for method in methods:
        row = {**info, "method": method}
        try:
            if method.endswith("_frozen"):
                model.enable_input_require_grads()  # every layer's input gradient, as under fine-tuning
                row.update(_train_row(model, batches, device, args))
                model.disable_input_require_grads()
            elif method == "nf4_select":
                row.update(
                    common.run_guarded(
                        functools.partial(
                            measure_selection,
                            model,
                            batches,
                            device,
                            ratio=args.ratio,
                            block_size=args.block_size,
                            num_batches=len(batches),
                            targets=PROJECTIONS,
                            training=True,  # gradient checkpointing, as the training step has it
                            warm_up=False,
                        ),
                        device,
                    )
                )
            elif method in ("qlora", "bnb_qlora"):
                from peft import get_peft_model

                from smt_kernels.quant.lora import get_nf4_peft_model

                rank = finetune.lora_rank(model, PROJECTIONS, budget)
                wrap = get_nf4_peft_model if method == "qlora" else get_peft_model
                peft_model = wrap(model, _lora_config(rank, nf4=method == "qlora"), autocast_adapter_dtype=False)
                _as_param_dtype(peft_model, args.param_dtype)
                row.update(lora_rank=rank, **_trainable(peft_model, total))
                row.update(_train_row(peft_model, batches, device, args))
                model = peft_model.unload()  # the same base back, adapters dropped
                del peft_model
            else:  # nf4_smt, bf16_smt
                block_dtype = args.param_dtype if base == "nf4" else None  # a 16-bit layer's blocks: its dtype
                model = patch(model, selection, block_size=args.block_size, verbose=False, block_dtype=block_dtype)
                row.update(n_blocks=n_blocks, notes="random blocks, global budget", **_trainable(model, total))
                row.update(_train_row(model, batches, device, args))
        except Exception as err:  # noqa: BLE001 - one method failing must not lose the others
            row.update(_failure(err))
        rows.append(row)
    return rows


def _model_params(model: nn.Module) -> int:
    """Parameters of the 16-bit model: a 4-bit weight counts its out × in elements (not its packed bytes)."""
    from smt_kernels.quant import NF4Linear
    from smt_kernels.quant.bnb import is_bnb_linear4bit

    four_bit = [m for m in model.modules() if isinstance(m, NF4Linear) or is_bnb_linear4bit(m)]
    packed = {id(m.weight) for m in four_bit if is_bnb_linear4bit(m)}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    return rest + sum(m.in_features * m.out_features for m in four_bit)


def _trainable(model: nn.Module, total: int) -> dict:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": n, "trainable_pct": common.sig(100 * n / total, 4)}


def _failure(err: BaseException) -> dict:
    status = "OOM" if common.is_oom(err) else "error"
    return {"status": status, "notes": f"{type(err).__name__}: {err}"[:300]}


def add_ratios(rows: list[dict]) -> None:
    """Step time over the frozen floor of the same base and model."""
    floors = {(r["model"], r["method"]): r for r in rows if r["method"].endswith("_frozen") and "step_ms" in r}
    for r in rows:
        if r.get("status") != "ok" or r["method"] == "nf4_select":
            continue
        floor = floors.get((r["model"], f"{BASE_OF[r['method']]}_frozen"))
        if floor and floor.get("status") == "ok":
            r["ratio_to_floor"] = common.sig(r["step_ms"] / floor["step_ms"], 4)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    common.add_output_args(p)
    p.add_argument("--models", default=None, help="llama3-70b, llama3-8b (default both; CPU: tiny)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default per model: 70B 1, 8B 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default per model: 70B 2048, 8B 1024)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 4; CPU 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; CPU 1)")
    p.add_argument("--ratio", type=float, default=0.01, help="share of the seven projections' blocks SMT trains")
    p.add_argument("--block-size", type=int, default=None, help="256 (CPU default 16)")
    p.add_argument("--param-dtype", default="bf16", choices=["bf16", "fp32"], help="SMT blocks and LoRA adapters")
    p.add_argument(
        "--pooled-buffer",
        action="store_true",
        help="NF4 layers dequantize into one pooled buffer (smt_kernels.quant.use_pooled_buffer) instead of a "
        "fresh tensor per call",
    )
    p.add_argument("--profile", type=int, default=0, help="profile this many more steps per method (--out: tables)")
    p.add_argument("--name", default="nf4_model", help="CSV base name (default nf4_model.csv)")
    args = p.parse_args(argv)
    args.device_obj = common.pick_device(args.device)
    cpu = args.device_obj.type == "cpu"
    args.models = common.parse_list(args.models or ("tiny" if cpu else "llama3-70b,llama3-8b"))
    args.methods = common.parse_list(args.methods)
    for bad in set(args.models) - set(MODELS):
        p.error(f"unknown model {bad!r}; choose from {', '.join(MODELS)}")
    for bad in set(args.methods) - set(METHODS):
        p.error(f"unknown method {bad!r}; choose from {', '.join(METHODS)}")
    args.steps = args.steps or (1 if cpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    args.block_size = args.block_size or (16 if cpu else 256)
    args.param_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.param_dtype]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_pooled_buffer(args.pooled_buffer)
    with common.smoke_threads(args.device_obj):
        device, dtype, env = common.start_run(args, "benchmarks.bench_nf4_model", argv)
        print(f"# {env['gpu']} | torch {env['torch']} | peft {env['peft']} | {env['command']}", flush=True)
        sink = common.CsvSink(args.name, FIELDS, None if args.no_results else args.results_dir, args.out)
        all_rows: list[dict] = []
        batch_arg, seq_arg = args.batch, args.seq
        for name in args.models:
            args.batch = batch_arg or SHAPES.get(name, (1, 2048))[0]
            args.seq = seq_arg or SHAPES.get(name, (1, 2048))[1]
            rows = run_model(name, args, device, dtype)
            add_ratios(rows)
            for r in rows:
                table = r.pop("profile", None)
                if table and args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / f"profile_{name}_{r['method']}.txt").write_text(f"{args.profile} steps\n{table}\n")
                r.update(env, batch=args.batch, seq=args.seq, block_size=args.block_size)
                r["param_dtype"] = str(args.param_dtype).removeprefix("torch.")
                if args.pooled_buffer and BASE_OF[r["method"]] == "nf4":
                    r["notes"] = "; ".join(filter(None, [r.get("notes"), "pooled dequantization buffer"]))
                r.setdefault("status", "ok")
                if r.get("status") == "ok" and r.get("step_ms") and r["method"] != "nf4_select":
                    r["tokens_per_s"] = common.sig(args.batch * args.seq / (r["step_ms"] * 1e-3), 4)
                sink.write(r)
                print(common.format_row(r, PRINT), flush=True)
            all_rows += rows
        extra = ["static_mem_gib", "peak_requested_gib", "build_peak_gib", "notes"]
        print(common.format_table(all_rows, PRINT + extra))
        sink.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
