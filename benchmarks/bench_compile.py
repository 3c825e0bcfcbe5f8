"""Eager vs ``torch.compile``: training-step time of LLaMA-shaped models, and host time per layer call.

Sections:
  model   frozen floor / full fine-tuning / PEFT LoRA (equal parameters) / SMT, each eager and under
          ``torch.compile(model)`` (and, with --modes, other compile modes), forward + backward + AdamW step.
  host    host microseconds per call of nn.Linear vs SparseBlockLinear (forward, forward+backward), on shapes so
          small that the GPU waits for the host: what the Python layer costs per call.

Presets follow how the library is used: ``smollm2-135m`` in fp32 master weights under bf16 autocast (what
``smt-kernels finetune`` runs on CUDA), 64-blocks on 5 % of q/k/v; the larger shapes in bf16 with 256-blocks on
~1 % of q/k/v. Random weights: speed does not depend on the values.

    python -m benchmarks.bench_compile --out results/         # every preset, ~6 min on an H200
    python -m benchmarks.bench_compile --models smollm2-135m --sections model
    python -m benchmarks.bench_compile --device cpu --models tiny   # smoke test
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_model import (  # noqa: E402
    MODELS,
    apply_lora,
    apply_smt,
    build_model,
    make_batches,
    random_selection,
)
from smt_kernels import SparseBlockLinear  # noqa: E402


@dataclass(frozen=True)
class Preset:
    model: str
    batch: int
    seq: int
    master_dtype: torch.dtype  # weights; under autocast the GEMMs run in bf16
    autocast: bool
    block_size: int
    ratio: float
    layers: int | None = None


PRESETS = {
    "smollm2-135m": Preset("smollm2-135m", 16, 128, torch.float32, True, 64, 0.05),
    "llama-1.1b-1x1024": Preset("llama-1.1b", 1, 1024, torch.bfloat16, False, 256, 0.01),
    "llama-1.1b-8x1024": Preset("llama-1.1b", 8, 1024, torch.bfloat16, False, 256, 0.01),
    "llama2-7b-1x1024": Preset("llama2-7b", 1, 1024, torch.bfloat16, False, 256, 0.01, layers=8),
    "llama2-7b-8x1024": Preset("llama2-7b", 8, 1024, torch.bfloat16, False, 256, 0.01, layers=8),
    "tiny": Preset("tiny", 2, 32, torch.float32, False, 16, 0.1),
}
METHODS = ("frozen", "full", "lora", "smt")
FIELDS = common.ENV_FIELDS + [
    "section",
    "preset",
    "model",
    "layers",
    "batch",
    "seq",
    "dtype",
    "autocast",
    "block_size",
    "method",
    "mode",
    "trainable_params",
    "compile_s",
    "graph_breaks",
    "step_ms",
    "step_ms_p20",
    "step_ms_p80",
    "iters",
    "ratio_to_floor",
    "peak_mem_gib",
    "shape",
    "tokens",
    "layer",
    "pass",
    "host_us",
    "host_us_ratio",
    "status",
    "notes",
]


def prepare(method: str, preset: Preset, device, seed: int) -> nn.Module:
    model = build_model(preset.model, preset.layers, preset.seq, preset.master_dtype, device, seed)
    if method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    elif method in ("smt", "lora"):
        selection = random_selection(model, preset.ratio, preset.block_size, seed)
        if method == "smt":
            model, _ = apply_smt(model, selection, preset.block_size)
        else:  # the same number of trainable parameters as SMT's blocks
            budget = sum(len(blocks) for blocks in selection.values()) * preset.block_size**2
            model, _ = apply_lora(model, budget, preset.master_dtype)
    return model


def measure_model(model: nn.Module, preset: Preset, mode: str, device, args) -> dict:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda") if trainable else None
    run = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    batches = make_batches(model.config.vocab_size, preset.batch, preset.seq, device, args.seed)

    embed = model.get_input_embeddings()
    # the frozen floor still back-propagates through every layer: its input embeddings require grad. They are
    # looked up outside the compiled model for every method (transformers' enable_input_require_grads hook
    # breaks the graph). The floor thereby also computes layer 0's q/k/v input gradients, which SMT and LoRA
    # skip: three GEMMs of the whole backward, in their favour.
    floor = not trainable
    # full fine-tuning trains the embedding table: its lookup is part of the graph (before, it ran under no_grad
    # and the table got no gradient and no update)
    train_embed = embed.weight.requires_grad

    def step(i: int) -> None:
        ids = batches[i % len(batches)]
        with torch.set_grad_enabled(train_embed):
            embeds = embed(ids)
        if not train_embed:
            embeds.requires_grad_(floor)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.autocast):
            loss = run(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    step(0)  # compiles under torch.compile
    common.synchronize(device)
    first_s = time.perf_counter() - t0
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = common.time_steps(
        step, device, warmup=args.warmup, target_s=args.target_s, min_iters=args.steps, max_iters=max(args.steps, 50)
    )
    stats = common.summarize(times)
    res = {
        "step_ms": stats["time_ms"],
        "step_ms_p20": stats["time_ms_p20"],
        "step_ms_p80": stats["time_ms_p80"],
        "iters": stats["iters"],
        "trainable_params": sum(p.numel() for p in trainable),
        "compile_s": common.sig(first_s, 3) if mode != "eager" else "",
        "graph_breaks": breaks if mode != "eager" else "",
    }
    if device.type == "cuda":
        res["peak_mem_gib"] = common.sig(torch.cuda.max_memory_allocated(device) / 2**30, 4)
    return res


def run_models(args, env, device, sink) -> list[dict]:
    rows = []
    for pname in args.presets:
        preset = PRESETS[pname]
        floor: dict[str, float] = {}
        for mode in args.modes:
            for method in args.methods:
                base = {
                    **env,
                    "section": "model",
                    "preset": pname,
                    "model": preset.model,
                    "layers": preset.layers or MODELS[preset.model]["num_hidden_layers"],
                    "batch": preset.batch,
                    "seq": preset.seq,
                    "dtype": str(preset.master_dtype).removeprefix("torch."),
                    "autocast": "bf16" if preset.autocast else "",
                    "block_size": preset.block_size,
                    "method": method,
                    "mode": mode,
                }

                def go(method=method, mode=mode, preset=preset) -> dict:
                    torch._dynamo.reset()
                    model = prepare(method, preset, device, args.seed)
                    try:
                        return measure_model(model, preset, mode, device, args)
                    finally:
                        del model

                res = common.run_guarded(go, device)
                row = {**base, **res}
                if method == "frozen" and "step_ms" in res:
                    floor[mode] = res["step_ms"]
                if "step_ms" in res and mode in floor:
                    row["ratio_to_floor"] = common.sig(res["step_ms"] / floor[mode], 4)
                sink.write(row)
                rows.append(row)
                print(common.format_row(row, PRINT_MODEL), flush=True)
                common.free_memory(device)
    return rows


def _host_us(fn, device, calls: int) -> float:
    # per-call host time with the GPU idle enough to keep up: shapes are tiny, so the host is the bottleneck
    for _ in range(20):
        fn()
    common.synchronize(device)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t) / calls * 1e6)
        common.synchronize(device)
    return statistics.median(samples)


def _fwd_bwd(layer, x, wrt, dy):
    return torch.autograd.grad(layer(x), wrt, dy)


def run_host(args, env, device, sink) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ((1024, 1024, 16), (4096, 4096, 16)) if device.type == "cuda" else ((256, 256, 16),)  # CPU: smoke
    for n_out, n_in, tokens in shapes:
        torch.manual_seed(args.seed)
        lin = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        smt = SparseBlockLinear.from_linear(lin, [(0, 0), (1, 2)], block_size=min(256, n_in // 4))
        lin.weight.requires_grad_(False)
        x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, n_out, device=device, dtype=dtype)
        lin_full = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
        cases = {
            ("nn.Linear frozen", "forward"): functools.partial(lin, x),
            ("SparseBlockLinear", "forward"): functools.partial(smt, x),
            ("nn.Linear frozen", "forward+backward"): functools.partial(_fwd_bwd, lin, x, [x], dy),
            ("nn.Linear trainable", "forward+backward"): functools.partial(
                _fwd_bwd, lin_full, x, [x, lin_full.weight], dy
            ),
            ("SparseBlockLinear", "forward+backward"): functools.partial(_fwd_bwd, smt, x, [x, smt.block_weight], dy),
        }
        ref = {}
        for (layer, pas), fn in cases.items():
            us = _host_us(fn, device, args.host_calls)
            if layer == "nn.Linear frozen":
                ref[pas] = us
            row = {
                **env,
                "section": "host",
                "shape": f"{n_out}x{n_in}",
                "tokens": tokens,
                "layer": layer,
                "pass": pas,
                "dtype": str(dtype).removeprefix("torch."),
                "host_us": common.sig(us, 4),
                "host_us_ratio": common.sig(us / ref[pas], 3),
                "status": "ok",
                "notes": f"backend={smt.backend}",
            }
            sink.write(row)
            rows.append(row)
            print(common.format_row(row, PRINT_HOST), flush=True)
    return rows


PRINT_MODEL = [
    "preset",
    "method",
    "mode",
    "step_ms",
    "ratio_to_floor",
    "compile_s",
    "graph_breaks",
    "peak_mem_gib",
    "status",
]
PRINT_HOST = ["shape", "tokens", "layer", "pass", "host_us", "host_us_ratio"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(p)
    p.add_argument("--sections", default="host,model", help="host and/or model")
    p.add_argument("--presets", default=None, help=f"subset of {','.join(PRESETS)} (default: all but tiny)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument(
        "--modes",
        default="eager,default",
        help="eager and/or torch.compile modes (default, reduce-overhead, max-autotune-no-cudagraphs)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps at least (10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--target-s", type=float, default=1.0, help="timed seconds per configuration")
    p.add_argument("--host-calls", type=int, default=200)
    p.add_argument("--name", default="compile", help="CSV base name (default compile.csv)")
    args = p.parse_args(argv)
    args.device_obj = common.pick_device(args.device)
    cpu = args.device_obj.type == "cpu"
    args.sections = common.parse_list(args.sections)
    args.presets = (
        common.parse_list(args.presets) if args.presets else (["tiny"] if cpu else [k for k in PRESETS if k != "tiny"])
    )
    args.methods = common.parse_list(args.methods)
    args.modes = common.parse_list(args.modes)
    for bad in set(args.presets) - set(PRESETS):
        p.error(f"unknown preset {bad!r}; choose from {', '.join(PRESETS)}")
    for bad in set(args.methods) - set(METHODS):
        p.error(f"unknown method {bad!r}; choose from {', '.join(METHODS)}")
    if cpu:
        args.steps, args.target_s, args.host_calls = 2, 0.05, 20
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, _, env = common.start_run(args, "benchmarks.bench_compile", argv)
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['command']}", flush=True)
    sink = common.CsvSink(args.name, FIELDS, None if args.no_results else args.results_dir, args.out)
    if "host" in args.sections:
        print("\n## host time per call (µs)", flush=True)
        run_host(args, env, device, sink)
    if "model" in args.sections:
        print("\n## training step, eager vs torch.compile", flush=True)
        run_models(args, env, device, sink)
    sink.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
