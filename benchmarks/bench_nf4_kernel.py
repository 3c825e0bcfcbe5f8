"""Launch-configuration sweep of the NF4 dequantize-and-overlay kernel (GPU only): time and effective GB/s of
every (QBLOCKS, num_warps) pair at LLaMA-3 weight shapes, with and without 1 % trained blocks, each with and
without the per-program hit flags (``program_hit_flags`` built for that QBLOCKS; column ``hits``), each checked
bit for bit against the output of the configuration shipped before (QBLOCKS 32, 4 warps, per-element map).
The rows ``shipped`` = True are the configuration ``dequantize_overlay`` launches; a summary of them is printed last.

    python -m benchmarks.bench_nf4_kernel --out DIR        # DIR/nf4_kernel.csv

Timing: ``triton.testing.do_bench`` (the L2 cache is flushed before each launch), median. GB/s counts the packed
codes, the absmax tables, the blocks read and the output written once.
"""

from __future__ import annotations

import argparse
import csv
import functools
import sys
from pathlib import Path

import torch
import triton

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_nf4 import pick_blocks  # noqa: E402
from benchmarks.common import env_info  # noqa: E402
from smt_kernels.kernels import nf4_dequant  # noqa: E402
from smt_kernels.quant.dequant import block_slot_map, program_hit_flags  # noqa: E402
from smt_kernels.quant.nf4 import quantize_nf4  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (28672, 8192), (8192, 28672))
CONFIGS = [(q, w) for q in (16, 32, 64, 128) for w in (2, 4, 8, 16)]


def launch(q, out, bw, bmap, block_size: int, qblocks: int, num_warps: int, runs: bool = True, hits=None) -> None:
    """The shipped launch (nf4_dequant.dequantize_overlay) with QBLOCKS, num_warps and the overlay path as given;
    hits: uint8 (P,) ``program_hit_flags`` for this qblocks, or None (every program reads the map)."""
    t = q.tensors()
    dq = q.double_quant
    has = bw is not None
    absmax = q.packed if dq else t["absmax"]
    aq, sc, code, off = (
        (t["absmax_q"], t["absmax_scale"], t["absmax_code"], t["absmax_offset"]) if dq else (q.packed,) * 4
    )
    grid = (nf4_dequant.num_programs(q.numel, qblocks),)
    use_hits = has and hits is not None
    assert not use_hits or hits.shape == grid, (tuple(hits.shape), grid)
    nf4_dequant._nf4_dequant_overlay_kernel[grid](
        q.packed, absmax, aq, sc, code, off, nf4_dequant.nf4_code(out.device), out,
        bw if has else out, bmap if has else q.packed, hits if use_hits else q.packed, q.numel, q.shape[1],
        bmap.shape[1] if has else 1, DOUBLE_QUANT=dq, HAS_BLOCKS=has, HAS_HITS=use_hits,
        BLOCK_SIZE=block_size if has else 16, QBLOCKS=qblocks,
        WIDE=q.numel + qblocks * 64 >= 2**31, WIDE_ROWS=q.shape[1] >= qblocks * 64,
        RUNS=runs and has and nf4_dequant.runs_fit(q.shape[1], block_size),
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument(
        "--configs",
        default=None,
        help="QBLOCKSxWARPS pairs to sweep, e.g. 64x2,32x4 (default: every pair of 16/32/64/128 x 2/4/8/16)",
    )
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="HBM bandwidth for the %% column (H200: 4.8 TB/s)")
    args = p.parse_args(argv)
    configs = CONFIGS
    if args.configs:
        try:
            configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
        except ValueError:
            p.error(f"--configs must be QBLOCKSxWARPS pairs like 64x2,32x4, got {args.configs!r}")
        if any(len(c) != 2 for c in configs):
            p.error(f"--configs must be QBLOCKSxWARPS pairs like 64x2,32x4, got {args.configs!r}")
    device = torch.device("cuda")
    env = env_info(device, "benchmarks.bench_nf4_kernel", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    shipped = (nf4_dequant.QBLOCKS, nf4_dequant.NUM_WARPS)
    for n, k in SHAPES:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w, double_quant=True)
        del w
        blocks = pick_blocks((n, k), args.block_size, args.ratio, 0)
        idx = torch.tensor(blocks, device=device, dtype=torch.int64)
        bw = torch.randn(len(blocks), args.block_size, args.block_size, device=device, dtype=torch.bfloat16)
        bmap = block_slot_map(idx, (n, k), args.block_size)
        # built once per layout in the layer; here once per program span
        flags = {qb: program_hit_flags(bmap, (n, k), args.block_size, qblocks=qb) for qb, _ in [*configs, (32, 4)]}
        for with_blocks in (False, True):
            b_w, b_m = (bw, bmap) if with_blocks else (None, None)
            ref = torch.empty(n, k, device=device, dtype=torch.bfloat16)
            launch(q, ref, b_w, b_m, args.block_size, 32, 4, runs=False)  # as shipped until 2026-11-30
            moved = q.nbytes() + ref.numel() * 2 + (bw.numel() * 2 if with_blocks else 0)
            sweep = [(qb, nw, True, use) for use in (True, False) for qb, nw in configs]
            for qb, nw, runs, use in [*sweep, (32, 4, False, False)]:
                hits = flags[qb] if use else None
                out = torch.full_like(ref, float("nan"))
                try:
                    launch(q, out, b_w, b_m, args.block_size, qb, nw, runs, hits)
                    same = bool(torch.equal(out, ref))
                    ms = triton.testing.do_bench(
                        functools.partial(launch, q, out, b_w, b_m, args.block_size, qb, nw, runs, hits),
                        warmup=25,
                        rep=100,
                    )
                    gbps = moved / (ms * 1e-3) / 1e9
                    row = dict(status="ok", equal=same, ms=round(ms, 5), gbps=round(gbps, 1))
                    row["pct_of_peak"] = round(100 * gbps / args.peak_gbps, 1)
                except Exception as err:  # noqa: BLE001 - a config that does not compile is a row, not the end
                    row = dict(status=f"{type(err).__name__}: {err}"[:200])
                row = dict(
                    shape=f"{n}x{k}",
                    blocks=len(blocks) if with_blocks else 0,
                    hit_programs=int(flags[qb].sum()) if with_blocks else 0,
                    programs=flags[qb].numel(),
                    qblocks=qb,
                    num_warps=nw,
                    runs=runs,
                    hits=use,
                    shipped=(qb, nw) == shipped and runs,
                    **row,
                )
                rows.append(row)
                print(row, flush=True)
    print(f"shipped configuration (QBLOCKS {shipped[0]}, {shipped[1]} warps): % of peak without -> with hit flags")
    for r in rows:
        if r["shipped"] and r["hits"]:
            key = (r["shape"], r["blocks"])
            o = next(o for o in rows if o["shipped"] and not o["hits"] and (o["shape"], o["blocks"]) == key)
            print(
                f"  {r['shape']:>12} blocks={r['blocks']:<3} {o.get('pct_of_peak')} -> {r.get('pct_of_peak')}", end=""
            )
            print(f"  equal: {o.get('equal')} / {r.get('equal')}")
    fields = ["shape", "blocks", "hit_programs", "programs", "qblocks", "num_warps", "runs", "hits", "shipped"]
    fields += ["status", "equal", "ms", "gbps", "pct_of_peak"]
    with (args.out / "nf4_kernel.csv").open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=[*fields, *env])
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, **env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
