"""NF4 base: memory and time of one training step per layer, and the dequantize-and-overlay kernel's bandwidth.

For each LLaMA-3-8B projection shape (default) and M tokens, four layers run forward + backward on the same input
and output gradient:
- ``bf16_frozen``: nn.Linear with a frozen bf16 weight (input gradient only): the 16-bit floor;
- ``bf16_smt``:    SparseBlockLinear (bf16 weight, ~1 % of the b×b blocks trainable);
- ``nf4_frozen``:  NF4Linear (input gradient only): the 4-bit floor;
- ``nf4_smt``:     NF4SparseBlockLinear with the same blocks (fp32 blocks unless --block-dtype).
Columns: median step time (ms), resident bytes of the layer (weights, blocks, the shared dequantization buffer),
peak bytes a step allocates above that, and for the kernel alone its time and effective GB/s (bytes read:
packed codes + scales + blocks; written: the N×K output).

    python -m benchmarks.bench_nf4 --out DIR              # GPU: 8B shapes, M=4096 (batch 4×1024)
    python -m benchmarks.bench_nf4 --smoke --out DIR      # CPU: tiny shapes, seconds
Writes DIR/bench_nf4.csv (rows appended, with versions and the command) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import env_info, summarize, time_steps
from smt_kernels import SparseBlockLinear
from smt_kernels.quant import buffers
from smt_kernels.quant.dequant import block_slot_map, kernels_for
from smt_kernels.quant.module import NF4Linear, NF4SparseBlockLinear

logger = logging.getLogger("bench_nf4")

LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096), "down_proj": (4096, 14336)}
SMOKE = {"q_proj": (96, 80), "down_proj": (80, 136)}
METHODS = ("bf16_frozen", "bf16_smt", "nf4_frozen", "nf4_smt")


def pick_blocks(shape: tuple[int, int], block_size: int, ratio: float, seed: int) -> list[tuple[int, int]]:
    rows, cols = -(-shape[0] // block_size), -(-shape[1] // block_size)
    n = max(1, round(ratio * rows * cols))
    perm = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))[:n]
    return [(int(p) // cols, int(p) % cols) for p in perm]


def build(method: str, linear: nn.Linear, blocks, block_size: int, block_dtype: torch.dtype) -> nn.Module:
    if method == "bf16_frozen":
        return linear.requires_grad_(False)
    if method == "bf16_smt":
        return SparseBlockLinear.from_linear(linear, blocks, block_size)
    base = NF4Linear.from_linear(linear)
    if method == "nf4_frozen":
        return base
    return NF4SparseBlockLinear.from_nf4_linear(base, blocks, block_size, block_dtype)


def resident_bytes(layer: nn.Module) -> int:
    own = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    return own + (buffers.buffer_bytes() if isinstance(layer, NF4Linear) else 0)


def measure(method, shape, tokens, blocks, args, device, dtype) -> dict:
    torch.manual_seed(args.seed)
    linear = nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=dtype)
    layer = build(method, linear, blocks, args.block_size, args.block_dtype)
    del linear
    trainable = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(tokens, shape[1], device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, shape[0], device=device, dtype=dtype)

    def step(_i=0):
        y = layer(x)
        y.backward(dy)
        x.grad = None
        for p in trainable:
            p.grad = None

    step()  # warm: kernels compiled (and the pooled buffer allocated, if on)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    step()
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    row = {
        "method": method,
        "resident_mib": round(resident_bytes(layer) / 2**20, 4),
        "step_peak_mib": None if peak is None else round(peak / 2**20, 2),
        "trainable": sum(map(torch.numel, trainable)),
    }
    row.update(summarize(time_steps(step, device, warmup=1, target_s=args.target_s, max_iters=args.max_iters)))
    if isinstance(layer, NF4Linear):
        row.update(kernel_bandwidth(layer, device, dtype, args))
    buffers.release_buffers()  # the layer and its tensors go with this frame
    return row


def kernel_bandwidth(layer: NF4Linear, device, dtype, args) -> dict:
    """The dequantize-and-overlay launch alone into a dequantization buffer: time and effective GB/s."""
    q = layer.nf4
    kernels = kernels_for(device)
    out = buffers.dequant_buffer(device, q.shape, dtype)
    blocks = getattr(layer, "block_weight", None)
    idx = getattr(layer, "block_indices", None)
    bmap = getattr(layer, "block_map", None) if blocks is not None else None
    b = getattr(layer, "block_size", 0)
    if blocks is not None and bmap is None:
        bmap = block_slot_map(idx, q.shape, b)
    blocks = None if blocks is None else blocks.detach()
    times = time_steps(
        lambda _i: kernels.dequantize_overlay(q, out, blocks, idx, bmap, b),
        device,
        warmup=1,
        target_s=args.target_s,
        max_iters=args.max_iters,
    )
    moved = (
        q.nbytes()
        + out.numel() * out.element_size()
        + (0 if blocks is None else blocks.numel() * blocks.element_size())
    )
    ms = summarize(times)["time_ms"]
    return {"dequant_ms": ms, "dequant_gbps": round(moved / (ms * 1e-3) / 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a test of the script)")
    parser.add_argument("--tokens", type=int, default=None, help="M = batch·seq (default 4096; smoke 64)")
    parser.add_argument("--block-size", type=int, default=None, help="b (default 256; smoke 16)")
    parser.add_argument("--ratio", type=float, default=0.01, help="fraction of blocks trainable (default 0.01)")
    parser.add_argument("--block-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--target-s", type=float, default=0.3, help="seconds of timed steps per row")
    parser.add_argument("--max-iters", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the CSV")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = SMOKE if args.smoke else LLAMA3_8B
    tokens = args.tokens or (64 if args.smoke else 4096)
    args.block_size = args.block_size or (16 if args.smoke else 256)
    args.block_dtype = getattr(torch, args.block_dtype)
    if args.smoke:
        args.target_s, args.max_iters = 0.01, 3
    env = env_info(device, "benchmarks.bench_nf4", argv if argv is not None else sys.argv[1:])
    rows = []
    for name, shape in shapes.items():
        blocks = pick_blocks(shape, args.block_size, args.ratio, args.seed)
        for method in args.methods.split(","):
            row = {
                "layer": name,
                "N": shape[0],
                "K": shape[1],
                "M": tokens,
                "block_size": args.block_size,
                "blocks": len(blocks),
                **measure(method, shape, tokens, blocks, args, device, dtype),
            }
            rows.append(row)
            logger.info(
                "%-9s %-11s %8.3f ms  resident %9.2f MiB  step peak %s MiB  %s",
                name,
                method,
                row["time_ms"],
                row["resident_mib"],
                row["step_peak_mib"],
                f"dequant {row['dequant_ms']} ms {row['dequant_gbps']} GB/s" if "dequant_ms" in row else "",
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_nf4.csv"
    columns = [
        "layer",
        "N",
        "K",
        "M",
        "block_size",
        "blocks",
        "method",
        "time_ms",
        "time_ms_p20",
        "time_ms_p80",
        "iters",
        "resident_mib",
        "step_peak_mib",
        "trainable",
        "dequant_ms",
        "dequant_gbps",
        *env,
    ]
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    logger.info("wrote %d rows to %s", len(rows), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
