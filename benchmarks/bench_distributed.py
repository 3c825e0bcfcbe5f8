"""SMT data-parallel on several GPUs (DDP, FSDP2) against one GPU on the same global batch.

One GPU (``--mode single``) trains on the whole global batch as ``--world`` micro-batches with gradient
accumulation; ``--mode ddp`` and ``--mode fsdp2`` (per-decoder-layer ``fully_shard``, optional explicit
prefetching) give each rank one micro-batch of the same global batch. So the three runs take the same optimizer
steps on the same data from the same random weights and blocks: their loss curves must agree within bf16 noise,
and tokens/s per GPU compare directly. Every run saves its trained blocks and the logits of a fixed probe batch;
``--mode verify`` (one GPU) loads each saved block file onto a freshly built base model and checks that it
reproduces the logits of the run that saved it.

    python -m benchmarks.bench_distributed --mode single --out DIR
    torchrun --nproc-per-node 2 -m benchmarks.bench_distributed --mode ddp --out DIR
    torchrun --nproc-per-node 2 -m benchmarks.bench_distributed --mode fsdp2 --out DIR
    python -m benchmarks.bench_distributed --mode verify --out DIR

Each mode writes ``DIR/<mode>.json`` (rank 0). ``--model tiny --device cpu`` (gloo) is the CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.bench_model import MODELS, build_model, random_selection, set_checkpointing  # noqa: E402
from benchmarks.bench_nf4_model import build_4bit_model  # noqa: E402
from benchmarks.common import env_info, profile_table, sync_report, synchronize  # noqa: E402
from smt_kernels import load_blocks, patch  # noqa: E402
from smt_kernels.distributed import save_blocks_distributed, shard_model, wrap_ddp  # noqa: E402
from smt_kernels.select import PROJECTIONS  # noqa: E402

MODES = ("single", "ddp", "fsdp2", "verify")
PROBE_VOCAB = 2048  # logits columns kept for the reproduction check (the full vocab would be 128k per token)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--out", required=True, help="directory for <mode>.json, block files and probe logits")
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the preset")
    p.add_argument("--world", type=int, default=2, help="ranks of the data-parallel runs (single: micro-batches)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank (per micro-batch) and step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--ratio", type=float, default=0.01, help="fraction of all target blocks trained")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=16, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (also in the loss curve)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-ckpt", type=int, default=1, help="1: gradient checkpointing of every decoder layer")
    p.add_argument(
        "--prefetch", type=int, default=0, help="FSDP2: explicit prefetch of the next N layers (0: implicit)"
    )
    p.add_argument(
        "--layers-per-unit",
        type=int,
        default=1,
        help="FSDP2: consecutive decoder layers per fully_shard unit (fewer, larger all-gathers)",
    )
    p.add_argument(
        "--ddp-buffers",
        choices=("sync", "off"),
        default="sync",
        help="ddp: DDP's default per-forward buffer broadcast, or off (smt_kernels.distributed.wrap_ddp)",
    )
    p.add_argument(
        "--shard-embeddings",
        type=int,
        default=0,
        help="FSDP2: 1 gives embed_tokens and lm_head their own fully_shard units (freed between uses; the root "
        "unit keeps its parameters gathered from forward to backward)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "nf4"),
        default="none",
        help="nf4: a 4-bit base, built layer by layer and quantized on the device (benchmarks.bench_nf4_model)",
    )
    p.add_argument(
        "--shard-nf4-base",
        type=int,
        default=0,
        help="FSDP2 with --quantize nf4: 1 shards the 4-bit codes too (smt_kernels.distributed.shard_nf4_base)",
    )
    p.add_argument(
        "--compile-layers",
        type=int,
        default=0,
        help="1: torch.compile each decoder layer in place (module.compile(), before any wrapping; less host time "
        "per layer, FSDP2's hooks stay eager)",
    )
    p.add_argument("--profile", type=int, default=0, help="profile this many steps after the timed ones (table)")
    p.add_argument(
        "--sync-debug",
        type=int,
        default=0,
        help="run this many steps after the timed (and profiled) ones in torch.cuda's sync debug mode and list where "
        "the host waited for the GPU (sync_<tag>_rank<r>.txt)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda (one GPU per rank) or cpu (gloo smoke test)")
    p.add_argument("--tag", default=None, help="name of the output files instead of the mode")
    return p.parse_args(argv)


def _global_batch(step: int, args, vocab: int) -> torch.Tensor:
    """The step's (world·batch, seq) token ids, identical in every process."""
    gen = torch.Generator().manual_seed(args.seed * 100_003 + step)
    return torch.randint(0, vocab, (args.world * args.batch, args.seq), generator=gen)


def _probe(vocab: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, min(seq, 256)), generator=torch.Generator().manual_seed(12345))


def _build(args, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quantize == "nf4":  # a 70B base fits one GPU only in 4 bits: never built whole in 16
        model = build_4bit_model(args.model, "nf4", args, dtype, device)
    else:
        model = build_model(args.model, args.layers, args.seq, dtype, device, args.seed)
    selection = random_selection(model, args.ratio, args.block_size, args.seed, targets=PROJECTIONS)
    return model, selection


def _probe_logits(model, probe: torch.Tensor, device: torch.device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe.to(device)).logits
    model.train(was_training)
    return logits[0, :, :PROBE_VOCAB].float().cpu()


def train(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.shard_nf4_base and (args.quantize != "nf4" or args.mode != "fsdp2"):
        raise SystemExit("--shard-nf4-base 1 needs --quantize nf4 and --mode fsdp2")
    if args.quantize == "nf4" and args.mode == "ddp" and args.ddp_buffers != "off":
        raise SystemExit("--quantize nf4 with --mode ddp needs --ddp-buffers off (DDP would broadcast the 4-bit base)")
    if args.layers_per_unit < 1:
        raise SystemExit(f"--layers-per-unit must be at least 1, got {args.layers_per_unit}")
    if args.mode == "single" and world != 1:
        raise SystemExit("--mode single runs in one process (no torchrun)")
    if args.mode in ("ddp", "fsdp2") and world != args.world:
        raise SystemExit(
            f"--mode {args.mode} needs torchrun with --nproc-per-node {args.world}, got WORLD_SIZE={world}"
        )
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.mode in ("ddp", "fsdp2"):  # also with one rank (a process group without a partner)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    out = Path(args.out)
    tag = args.tag or args.mode
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, selection = _build(args, device)
    patch(model, selection, block_size=args.block_size, verbose=False)
    set_checkpointing(model, bool(args.grad_ckpt))
    vocab = model.config.vocab_size
    layers = list(model.model.layers)
    if args.compile_layers:
        # every layer has its own block counts: let shapes go dynamic instead of recompiling per layer up to the limit
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(layers))
        for layer in layers:
            layer.compile()
    if args.mode == "ddp":
        ddp_kwargs = dict(device_ids=[local] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        if args.ddp_buffers == "off":
            model = wrap_ddp(model, **ddp_kwargs)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    elif args.mode == "fsdp2":
        shard_model(  # refuses --shard-embeddings on tied embeddings, naming them
            model,
            layers_per_unit=args.layers_per_unit,
            shard_embeddings=bool(args.shard_embeddings),
            shard_4bit_base=bool(args.shard_nf4_base),
            prefetch=args.prefetch,
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # a DTensor's numel is the whole parameter's
    opt = torch.optim.AdamW(trainable, lr=args.lr, foreach=True)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    micro = range(args.world) if args.mode == "single" else [rank]
    if rank == 0:  # progress on stderr: a run cut short by a time limit still says how far it got
        print(f"[{tag}] set up in {setup_s:.1f} s", file=sys.stderr, flush=True)

    def train_step(step: int) -> tuple[torch.Tensor, float, float]:
        """One optimizer step on the step's global batch (this process's micro-batches); (loss, seconds, seconds
        until the host had issued all of the step's work: close to the step time when the GPU waits on the host)."""
        ids_all = _global_batch(step, args, vocab)
        synchronize(device)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for r in micro:
            ids = ids_all[r * args.batch : (r + 1) * args.batch].to(device, non_blocking=True)
            loss = model(input_ids=ids, labels=ids).loss / len(micro)
            loss.backward()
            step_loss += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        issued = time.perf_counter() - start
        synchronize(device)
        return step_loss, time.perf_counter() - start, issued

    losses: list[torch.Tensor] = []
    times: list[float] = []
    host_times: list[float] = []
    for step in range(args.warmup + args.steps):
        loss, seconds, issued = train_step(step)
        losses.append(loss)
        if step >= args.warmup:
            times.append(seconds)
            host_times.append(issued)
        if rank == 0:
            print(
                f"[{tag}] step {step}: {1000 * seconds:.0f} ms (host {1000 * issued:.0f} ms)",
                file=sys.stderr,
                flush=True,
            )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    curve = torch.stack(losses)
    if world > 1:  # the global batch's loss: the mean of the ranks' micro-batch losses
        dist.all_reduce(curve)
        curve /= world

    # the blocks and probe of the trained run, before any profiled step trains further
    save_blocks_distributed(model, out / f"blocks_{tag}")
    logits = _probe_logits(model, _probe(vocab, args.seq), device)
    if args.profile:  # more steps, profiled, after the timed ones: they change neither times nor curve nor files
        first = args.warmup + args.steps
        table = profile_table(train_step, range(first, first + args.profile), device)
        (out / f"profile_{tag}_rank{rank}.txt").write_text(f"{args.profile} steps after the timed ones\n{table}\n")
    if args.sync_debug:  # likewise after the timed ones
        first = args.warmup + args.steps + args.profile
        report = sync_report(train_step, range(first, first + args.sync_debug), device)
        (out / f"sync_{tag}_rank{rank}.txt").write_text(report)
    step_s = statistics.median(times)
    host_ms = round(1000 * statistics.median(host_times), 2)
    step_max_ms = round(1000 * max(times), 2)
    # per rank: each rank's host time is bounded by its own steps, not by rank 0's
    host_ms_ranks, step_max_ms_ranks = [host_ms], [step_max_ms]
    if world > 1:
        host_ms_ranks, step_max_ms_ranks = [None] * world, [None] * world
        dist.all_gather_object(host_ms_ranks, host_ms)
        dist.all_gather_object(step_max_ms_ranks, step_max_ms)
    tokens_per_gpu = len(micro) * args.batch * args.seq / step_s
    result = {
        "mode": args.mode,
        "tag": tag,
        "model": args.model,
        "layers": len(layers),
        "world": world,
        "batch_per_rank": args.batch,
        "global_batch": args.world * args.batch,
        "seq": args.seq,
        "grad_ckpt": bool(args.grad_ckpt),
        "prefetch": args.prefetch,
        "layers_per_unit": args.layers_per_unit,
        "shard_embeddings": bool(args.shard_embeddings),
        "ddp_buffers": args.ddp_buffers if args.mode == "ddp" else None,
        "quantize": args.quantize,
        "shard_nf4_base": bool(args.shard_nf4_base),
        "ratio": args.ratio,
        "block_size": args.block_size,
        "num_blocks": sum(len(v) for v in selection.values()),
        "trainable_params": n_trainable,
        "setup_s": round(setup_s, 2),
        "step_ms": round(1000 * step_s, 2),
        "step_ms_min": round(1000 * min(times), 2),
        "step_ms_max": step_max_ms,
        "step_ms_max_per_rank": step_max_ms_ranks,
        "host_ms": host_ms_ranks[0],
        "host_ms_per_rank": host_ms_ranks,
        "compile_layers": bool(args.compile_layers),
        "tokens_per_s_per_gpu": round(tokens_per_gpu, 1),
        "tokens_per_s_total": round(tokens_per_gpu * (world if args.mode != "single" else 1), 1),
        "peak_mem_gib": round(peak, 3) if peak is not None else None,
        "loss_curve": [round(float(v), 6) for v in curve.cpu()],
        "env": env_info(device, "benchmarks.bench_distributed"),
    }
    if rank == 0:
        torch.save(logits, out / f"probe_{tag}.pt")
        (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k not in ("env", "loss_curve")}), flush=True)
        print("loss", result["loss_curve"], flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def verify(args) -> int:
    """Each saved block file, loaded onto a fresh base model on one device, reproduces its run's probe logits;
    and the runs' loss curves agree with the one-GPU run."""
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    out = Path(args.out)
    runs = sorted(p.stem for p in out.glob("*.json") if p.stem != "verify")
    report: dict[str, dict] = {}
    single = json.loads((out / "single.json").read_text()) if (out / "single.json").exists() else None
    probe_single = torch.load(out / "probe_single.pt") if single is not None else None
    for tag in runs:
        res = json.loads((out / f"{tag}.json").read_text())
        model, _ = _build(args, device)
        load_blocks(model, out / f"blocks_{tag}")
        got = _probe_logits(model, _probe(model.config.vocab_size, args.seq), device)
        want = torch.load(out / f"probe_{tag}.pt")
        entry = {
            "probe_max_abs_diff": float((got - want).abs().max()),
            "probe_max_abs": float(want.abs().max()),
        }
        if single is not None and tag != "single":
            a, b = torch.tensor(res["loss_curve"]), torch.tensor(single["loss_curve"])
            entry["loss_max_abs_diff_vs_single"] = float((a - b).abs().max())
            entry["loss_final"] = res["loss_curve"][-1]
            entry["loss_final_single"] = single["loss_curve"][-1]
            entry["probe_max_abs_diff_vs_single"] = float((want - probe_single).abs().max())
        report[tag] = entry
        print(tag, json.dumps(entry), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (out / "verify.json").write_text(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return verify(args) if args.mode == "verify" else train(args)


if __name__ == "__main__":
    raise SystemExit(main())
