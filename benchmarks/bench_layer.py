"""Layer benchmark: one linear layer, forward+backward, SparseBlockLinear against its floor and the baselines.

Methods (all bf16 by default, input gradient always computed, as inside a network):
  full        nn.Linear, weight trainable (3 GEMMs)
  frozen      nn.Linear, weight frozen: the floor an SMT layer can reach (2 GEMMs)
  smt         smt_kernels.SparseBlockLinear
  paper_loop  the SMT paper's per-block Python loop (benchmarks/baselines.py)
  gather_bmm  torch: gathered input columns, one batched matmul (benchmarks/baselines.py)
  lora        PEFT LoRA with the rank that gives the same number of trainable parameters

Each row: median time (device events, warm-up, inputs rotated among buffers that overflow the L2 cache), ratio to
the frozen floor, peak memory of one step above the resident tensors, and bytes saved for backward (parameters
excluded). A second table ("block_grad") times the block-gradient kernel alone against dense GEMMs in TFLOP/s.

    python -m benchmarks.bench_layer                 # default grid, ~6 min on an H200 (--budget-s caps it)
    python -m benchmarks.bench_layer --quick         # 2 shapes, M=16384, a minute
    python -m benchmarks.bench_layer --device cpu    # tiny sizes, a smoke test
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `smt_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.baselines import GatherBmmBlockLinear, PaperBlockLinear  # noqa: E402
from smt_kernels import SparseBlockLinear, finetune  # noqa: E402
from smt_kernels.kernels.backend import kernels, resolve_backend  # noqa: E402
from smt_kernels.layout import BlockLayout  # noqa: E402

ALL_SHAPES = "4096x4096,1024x4096,14336x4096,4096x14336,11008x4096,4096x11008"
ALL_TOKENS = "4096,16384,65536"
ALL_BLOCKS = "1,0.5%,1%,5%"
ALL_LAYOUTS = ("random", "row", "col")
METHODS = ("frozen", "full", "smt", "paper_loop", "gather_bmm", "lora")
DENSE_METHODS = ("frozen", "full")  # depend on the shape and M only
BLOCK_METHODS = ("smt", "paper_loop", "gather_bmm")  # depend on the layout too
CPU_SHAPES = "128x128,64x128,128x64"

LAYER_FIELDS = common.ENV_FIELDS + [
    "dtype",
    "block_size",
    "shape",
    "N",
    "K",
    "M",
    "blocks",
    "n_blocks",
    "pct_blocks",
    "layout",
    "method",
    "trainable_params",
    "lora_rank",
    "time_ms",
    "time_ms_p20",
    "time_ms_p80",
    "iters",
    "floor_ms",
    "ratio_to_floor",
    "peak_mem_mib",
    "saved_mib",
    "status",
    "notes",
]
KERNEL_FIELDS = common.ENV_FIELDS + [
    "dtype",
    "block_size",
    "backend",
    "shape",
    "N",
    "K",
    "M",
    "n_blocks",
    "method",
    "time_ms",
    "time_ms_p20",
    "time_ms_p80",
    "iters",
    "tflops",
    "pct_of_dense",
    "status",
    "notes",
]


# ---------------------------------------------------------------- layouts


def blocks_for(label: str, grid: tuple[int, int]) -> int:
    """'1' -> 1 block; '0.5%' -> that share of the grid's blocks, at least 1."""
    total = grid[0] * grid[1]
    if label.endswith("%"):
        return max(1, min(total, round(float(label[:-1]) / 100 * total)))
    return max(1, min(total, int(label)))


def make_layout(kind: str, n: int, grid: tuple[int, int], seed: int) -> list[tuple[int, int]]:
    """n distinct blocks of an R×C block grid: random, packed in one block-row, or packed in one block-column.

    Packed layouts start at a random row (column) and spill into the next ones when n exceeds its length.
    """
    rows, cols = grid
    rng = random.Random(seed)
    if kind == "random":
        return [divmod(i, cols) for i in sorted(rng.sample(range(rows * cols), n))]
    if kind == "row":
        start = rng.randrange(rows) * cols
        return [divmod((start + i) % (rows * cols), cols) for i in range(n)]
    if kind == "col":
        start = rng.randrange(cols) * rows
        return [tuple(reversed(divmod((start + i) % (rows * cols), rows))) for i in range(n)]
    raise ValueError(f"layout must be one of {ALL_LAYOUTS}, got {kind!r}")


def lora_rank(n_blocks: int, block_size: int, n_out: int, n_in: int) -> int:
    """LoRA rank with about the trainable parameters of n b×b blocks: r·(N+K) ≈ n·b².

    ``smt_kernels.finetune.lora_rank``'s rule (one source of truth), which reads the shapes from a model: here
    one N×K layer on the meta device (no memory), since the benchmark knows only the shape.
    """
    layer = nn.ModuleDict({"proj": nn.Linear(n_in, n_out, bias=False, device="meta")})
    return finetune.lora_rank(layer, ("proj",), n_blocks * block_size * block_size)


# ---------------------------------------------------------------- modules


def build_method(method: str, base: nn.Linear, blocks, block_size: int, rank: int) -> tuple[nn.Module, list]:
    """The layer for ``method`` made from a copy of ``base``, and its trainable tensors."""
    if method in DENSE_METHODS:
        layer = nn.Linear(
            base.in_features, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype
        )
        with torch.no_grad():
            layer.weight.copy_(base.weight)
        layer.weight.requires_grad_(method == "full")
    elif method == "smt":
        layer = SparseBlockLinear.from_linear(base, blocks, block_size=block_size)
    elif method == "paper_loop":
        layer = PaperBlockLinear(base, blocks, block_size)
    elif method == "gather_bmm":
        layer = GatherBmmBlockLinear(base, blocks, block_size)
    elif method == "lora":
        layer = _peft_lora(base, rank)
    else:
        raise ValueError(f"unknown method {method!r}")
    return layer, [p for p in layer.parameters() if p.requires_grad]


def _peft_lora(base: nn.Linear, rank: int) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.proj = nn.Linear(
        base.in_features, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype
    )
    with torch.no_grad():
        holder.proj.weight.copy_(base.weight)
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"], bias="none")
    holder = inject_adapter_in_model(cfg, holder)
    # adapters in the layer's dtype (PeftModel's default would upcast them to fp32): same precision as SMT's blocks
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.to(base.weight.dtype)
    return holder.proj


# ---------------------------------------------------------------- measurement


@dataclass
class Buffers:
    """Rotating inputs and output gradients for one (shape, M): more bytes than the L2 cache holds."""

    xs: list[torch.Tensor]
    dys: list[torch.Tensor]


def make_buffers(n_out: int, n_in: int, tokens: int, seq: int, dtype, device, seed: int) -> Buffers:
    per_set = tokens * (n_in + n_out) * torch.finfo(dtype).bits // 8
    count = max(2, min(6, math.ceil(4 * common.l2_cache_bytes(device) / per_set)))
    gen = torch.Generator(device=device).manual_seed(seed)
    lead = (tokens // seq, seq) if tokens % seq == 0 else (tokens,)
    xs = [torch.randn(*lead, n_in, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(count)]
    dys = [torch.randn(*lead, n_out, generator=gen, device=device, dtype=dtype) for _ in range(count)]
    return Buffers(xs, dys)


def measure_layer(layer: nn.Module, trainable: list, bufs: Buffers, device, args) -> dict:
    def step(i: int) -> None:
        x = bufs.xs[i % len(bufs.xs)]
        y = layer(x)
        # autograd.grad, not backward: fresh gradients each step, as after zero_grad(set_to_none=True)
        torch.autograd.grad(y, [x, *trainable], bufs.dys[i % len(bufs.dys)])

    timed = graphed(step, len(bufs.xs), device) if args.cuda_graphs else step
    times = common.time_steps(timed, device, warmup=args.warmup, target_s=args.target_s, min_iters=args.min_iters)
    peak = common.peak_memory_bytes(lambda: step(0), device)
    saved = common.saved_tensor_bytes(lambda: layer(bufs.xs[0]), exclude=list(layer.parameters()))
    res = {**common.summarize(times), "peak_mem_mib": common.mib(peak), "saved_mib": common.mib(saved)}
    if args.cuda_graphs:
        res["notes"] = "time of CUDA-graph replays"
    return res


def graphed(step, n_inputs: int, device) -> Callable[[int], None]:
    """``step`` captured once per rotated input in CUDA graphs: replays cost GPU time only, no host launches.

    Separates what the kernels cost on the GPU from the host's launch time, which bounds small shapes.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture needs warmed-up kernels and allocator state, made off the main stream
        for i in range(2):
            step(i)
    torch.cuda.current_stream(device).wait_stream(side)
    graphs: list[torch.cuda.CUDAGraph] = []
    for i in range(n_inputs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=graphs[0].pool() if graphs else None):
            step(i)
        graphs.append(g)
    return lambda i: graphs[i % n_inputs].replay()


# ---------------------------------------------------------------- the layer grid


def plan(args) -> list[tuple[int, str]]:
    """(M, layout) pairs in priority order, so that a budget cut drops the least important ones.

    By default the row/column layouts run only at the main token count (16384); --full or --layouts runs every pair.
    """
    main = 16384 if 16384 in args.tokens else args.tokens[0]
    others = [m for m in args.tokens if m != main]
    layouts = args.layouts
    pairs = [(main, lay) for lay in layouts]
    pairs += [(m, "random") for m in others if "random" in layouts]
    if args.full or args.layouts_given:
        pairs += [(m, lay) for m in others for lay in layouts if lay != "random"]
    return pairs


def run_layer_grid(args, env: dict, device, dtype, sink: common.CsvSink) -> list[dict]:
    rows: list[dict] = []
    budget = common.Budget(args.budget_s)
    floor: dict[tuple, dict] = {}  # frozen result per (shape, M), the denominator of every ratio
    done: set[tuple] = set()  # dense per (shape, M), LoRA per (shape, M, label): layout-independent rows
    b = args.block_size
    skipped = 0

    def emit(row: dict, common_row: dict) -> None:
        ref = floor.get((common_row["shape"], common_row["M"]), {})
        if row.get("status") == "ok" and ref.get("status") == "ok":
            row["ratio_to_floor"] = round(row["time_ms"] / ref["time_ms"], 4)
            row["floor_ms"] = ref["time_ms"]
        rows.append({**common_row, **row})
        sink.write(rows[-1])
        print(common.format_row(rows[-1], PRINT_COLUMNS), flush=True)

    for tokens, layout in plan(args):
        for n_out, n_in in args.shapes:
            if budget.exhausted():
                skipped += 1
                continue
            grid = (-(-n_out // b), -(-n_in // b))
            shape = f"{n_out}x{n_in}"
            common_row = {
                **env,
                "dtype": args.dtype,
                "block_size": b,
                "shape": shape,
                "N": n_out,
                "K": n_in,
                "M": tokens,
            }
            base = nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                gen = torch.Generator(device=device).manual_seed(args.seed)
                base.weight.copy_(torch.randn(n_out, n_in, generator=gen, device=device) * n_in**-0.5)
            bufs = make_buffers(n_out, n_in, tokens, args.seq, dtype, device, args.seed)

            for method in DENSE_METHODS:  # frozen first: it is the floor of every ratio
                if method in args.methods and (shape, tokens, method) not in done:
                    done.add((shape, tokens, method))
                    res = _measure_method(method, base, [], b, 0, bufs, device, args)
                    res.update(method=method, blocks="-", layout="-", n_blocks=0)
                    if method == "frozen":
                        floor[(shape, tokens)] = res
                    emit(res, common_row)

            measured: dict[int, tuple[str, list[dict]]] = {}  # n -> (first label, its rows)
            for label in args.blocks:
                n = blocks_for(label, grid)
                label_row = {"blocks": label, "n_blocks": n, "pct_blocks": round(100 * n / (grid[0] * grid[1]), 3)}
                want_lora = "lora" in args.methods and (shape, tokens, label) not in done
                if n in measured:  # same block count as an earlier label (small matrices): reuse, do not re-measure
                    first, earlier = measured[n]
                    for r in earlier:
                        if r["method"] != "lora" or want_lora:
                            emit({**r, **label_row, "notes": f"same n as '{first}'"}, common_row)
                    done.add((shape, tokens, label))
                    continue
                if budget.exhausted():
                    skipped += 1
                    continue
                blocks = make_layout(layout, n, grid, args.seed)
                rank = lora_rank(n, b, n_out, n_in)
                results = []
                if "frozen" in args.methods:
                    # the GPU's clock drifts under sustained GEMM load (seen: ±10% within a minute on an H200):
                    # the ratios of this label's rows use a floor measured right next to them
                    adjacent = _measure_method("frozen", base, [], b, 0, bufs, device, args)
                    if adjacent.get("status") == "ok":
                        floor[(shape, tokens)] = adjacent
                if want_lora:
                    done.add((shape, tokens, label))
                    res = _measure_method("lora", base, blocks, b, rank, bufs, device, args)
                    results.append({**res, **label_row, "method": "lora", "layout": "-", "lora_rank": rank})
                for method in BLOCK_METHODS:
                    if method in args.methods:
                        res = _measure_method(method, base, blocks, b, rank, bufs, device, args)
                        results.append({**res, **label_row, "method": method, "layout": layout})
                for r in results:
                    emit(dict(r), common_row)
                measured[n] = (label, results)
            del bufs, base
            common.free_memory(device)
    if skipped:
        print(
            f"budget of {args.budget_s:.0f} s reached: {skipped} configurations skipped "
            "(raise --budget-s or narrow the grid)",
            flush=True,
        )
    return rows


def _measure_method(method, base, blocks, block_size, rank, bufs, device, args) -> dict:
    def go() -> dict:
        layer, trainable = build_method(method, base, blocks, block_size, rank)
        if args.compile:
            torch._dynamo.reset()  # each layer compiled on its own: no recompile limits, no cross-talk
            layer = torch.compile(layer, mode=None if args.compile == "default" else args.compile)
        res = measure_layer(layer, trainable, bufs, device, args)
        if args.compile:
            res["notes"] = (res.get("notes", "") + f"; torch.compile mode={args.compile}").lstrip("; ")
        res["trainable_params"] = sum(p.numel() for p in trainable)
        return res

    if method == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return {"status": "skipped", "notes": "peft not installed"}
    return common.run_guarded(go, device)


PRINT_COLUMNS = [
    "shape",
    "M",
    "blocks",
    "n_blocks",
    "layout",
    "method",
    "time_ms",
    "ratio_to_floor",
    "peak_mem_mib",
    "saved_mib",
    "status",
]


# ---------------------------------------------------------------- block-gradient kernel alone


def run_kernel_bench(args, env: dict, device, dtype, sink: common.CsvSink) -> list[dict]:
    """block_weight_grad in TFLOP/s (2·M·n·b² flops) next to torch's bmm on pre-gathered blocks and dense GEMMs."""
    rows = []
    for n_out, n_in in args.kernel_shapes:
        rows += _kernel_shape(args, env, device, dtype, n_out, n_in, sink)
        common.free_memory(device)
    return rows


def _kernel_shape(args, env: dict, device, dtype, n_out: int, n_in: int, sink: common.CsvSink) -> list[dict]:
    backend = resolve_backend(device)
    impl = kernels(backend)
    b, m = args.block_size, args.kernel_tokens
    grid = (-(-n_out // b), -(-n_in // b))
    base_row = {
        **env,
        "dtype": args.dtype,
        "block_size": b,
        "backend": backend,
        "shape": f"{n_out}x{n_in}",
        "N": n_out,
        "K": n_in,
        "M": m,
    }
    per_set = m * (n_in + n_out) * torch.finfo(dtype).bits // 8
    count = max(2, min(6, math.ceil(4 * common.l2_cache_bytes(device) / per_set)))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    xs = [torch.randn(m, n_in, generator=gen, device=device, dtype=dtype) for _ in range(count)]
    dys = [torch.randn(m, n_out, generator=gen, device=device, dtype=dtype) for _ in range(count)]
    w = torch.randn(n_out, n_in, generator=gen, device=device, dtype=dtype)
    rows: list[dict] = []

    def record(fn: Callable[[int], object], flops: float, ref: float | None = None, **fields) -> dict:
        def go() -> dict:
            timed = graphed(fn, count, device) if args.cuda_graphs else fn
            res = common.summarize(
                common.time_steps(timed, device, warmup=args.warmup, target_s=args.target_s, min_iters=args.min_iters)
            )
            if args.cuda_graphs:
                res["notes"] = f"{fields.get('notes', '')}; time of CUDA-graph replays".lstrip("; ")
            res["tflops"] = common.sig(flops / (res["time_ms"] * 1e-3) / 1e12, 4)
            if ref:
                res["pct_of_dense"] = common.sig(100 * res["tflops"] / ref, 3)
            return res

        rows.append({**base_row, **fields, **common.run_guarded(go, device)})
        sink.write(rows[-1])
        print(common.format_row(rows[-1], KERNEL_PRINT), flush=True)
        return rows[-1]

    dense_flops = 2.0 * m * n_out * n_in
    ref = record(
        lambda i: dys[i % count].t() @ xs[i % count],
        dense_flops,
        method="dense_dW_gemm",
        n_blocks=0,
        notes="dYᵀ·X: reduces over M like the block gradient",
    ).get("tflops")
    record(lambda i: xs[i % count] @ w.t(), dense_flops, method="dense_fwd_gemm", n_blocks=0, notes="X·Wᵀ")
    for n in args.kernel_n:
        if n > grid[0] * grid[1]:
            continue
        lay = BlockLayout.build(make_layout("random", n, grid, args.seed), n_out, n_in, b)
        idx, slot = lay.indices.to(device), lay.col_slot.to(device)
        xcols = [impl.gather_column_blocks(x, lay.col_blocks.to(device), b) for x in xs]
        flops = 2.0 * m * n * b * b
        record(
            lambda i, xcols=xcols, idx=idx, slot=slot: impl.block_weight_grad(
                dys[i % count], xcols[i % count], idx, slot, b, dtype
            ),
            flops,
            ref,
            method="block_weight_grad",
            n_blocks=n,
            notes=f"smt_kernels {backend} backend",
        )
        # torch's best effort on the same work: operands gathered beforehand (untimed), one bmm
        dyg = [d.view(m, -1, b).index_select(1, idx[:, 0]).permute(1, 2, 0).contiguous() for d in dys]
        xg = [c.view(m, -1, b).index_select(1, slot).permute(1, 0, 2).contiguous() for c in xcols]
        record(
            lambda i, dyg=dyg, xg=xg: torch.bmm(dyg[i % count], xg[i % count]),
            flops,
            ref,
            method="torch_bmm_gathered",
            n_blocks=n,
            notes="operands gathered beforehand (untimed)",
        )
    return rows


KERNEL_PRINT = ["shape", "M", "n_blocks", "method", "time_ms", "tflops", "pct_of_dense", "status"]


# ---------------------------------------------------------------- summary and CLI


def summary_table(rows: list[dict]) -> str:
    """One line per (shape, M, blocks, layout): each method's time and its ratio to the frozen floor."""
    dense = {(r["shape"], r["M"], r["method"]): r for r in rows if r["method"] in DENSE_METHODS}
    lora = {(r["shape"], r["M"], r["n_blocks"]): r for r in rows if r["method"] == "lora"}
    keys = []
    for r in rows:
        if r["method"] in BLOCK_METHODS:
            key = (r["shape"], r["M"], r["blocks"], r["n_blocks"], r["layout"])
            if key not in keys:
                keys.append(key)
    if not keys:  # only dense methods were asked for
        keys = list(dict.fromkeys((r["shape"], r["M"], "-", 0, "-") for r in rows))
    by_key = {(r["shape"], r["M"], r["blocks"], r["n_blocks"], r["layout"], r["method"]): r for r in rows}
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    out = []
    for shape, tokens, label, n, layout in keys:
        line = {"shape": shape, "M": tokens, "blocks": label, "n": n, "layout": layout}
        for m in methods:
            if m in DENSE_METHODS:
                r = dense.get((shape, tokens, m))
            elif m == "lora":
                r = lora.get((shape, tokens, n))
            else:
                r = by_key.get((shape, tokens, label, n, layout, m))
            if r is None:
                line[m] = ""
            elif r.get("status") != "ok":
                line[m] = r.get("status", "")
            else:
                ratio = r.get("ratio_to_floor")
                line[m] = f"{r['time_ms']:.3f}" + (f" ({ratio:.2f}x)" if isinstance(ratio, float) else "")
        out.append(line)
    return common.format_table(out, ["shape", "M", "blocks", "n", "layout", *methods])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    common.add_output_args(p)
    p.add_argument("--shapes", default=None, help=f"OUTxIN list (default {ALL_SHAPES})")
    p.add_argument("--tokens", default=None, help=f"token counts M (default {ALL_TOKENS})")
    p.add_argument(
        "--blocks",
        default=ALL_BLOCKS,
        help=f"block counts: an integer or a share of the matrix (default {ALL_BLOCKS.replace('%', '%%')})",
    )
    p.add_argument("--layouts", default=None, help="random,row,col (default: all three at M=16384, random elsewhere)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--block-size", type=int, default=None, help="256 (CPU default 16)")
    p.add_argument("--seq", type=int, default=None, help="sequence length: inputs are (M/seq, seq, K) (default 2048)")
    p.add_argument("--sections", default="kernel,layer", help="kernel (block_weight_grad alone), layer, or both")
    p.add_argument("--kernel-n", default="1,2,8,32", help="block counts for the kernel section")
    p.add_argument("--kernel-tokens", type=int, default=None, help="M of the kernel section (default 16384)")
    p.add_argument("--kernel-shapes", default=None, help="shapes of the kernel section (default 4096x4096)")
    p.add_argument("--quick", action="store_true", help="2 shapes, M=16384, 1 block and 1%%, random layout")
    p.add_argument("--full", action="store_true", help="every (M, layout) pair and every kernel shape")
    p.add_argument(
        "--budget-s",
        type=float,
        default=400.0,
        help="stop starting new layer configurations after this many seconds (default 400)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--target-s", type=float, default=0.2, help="timed seconds per measurement (at most 50 calls)")
    p.add_argument("--min-iters", type=int, default=None, help="timed calls per measurement at least (5; CPU 2)")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA-graph replays of each step (GPU time without host launch time); CUDA only",
    )
    p.add_argument(
        "--compile",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="time every layer under torch.compile with this mode (default: eager)",
    )
    p.add_argument("--name", default="layer", help="CSV base name: <name>.csv and <name>_block_grad.csv")
    args = p.parse_args(argv)

    args.device_obj = common.pick_device(args.device)
    cpu = args.device_obj.type == "cpu"
    if args.quick:
        args.shapes = args.shapes or ("128x128,64x128" if cpu else "4096x4096,1024x4096")
        args.tokens = args.tokens or ("64" if cpu else "16384")
        args.blocks = "1,1%" if args.blocks == ALL_BLOCKS else args.blocks
        args.layouts = args.layouts or "random"
    args.shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes or (CPU_SHAPES if cpu else ALL_SHAPES))]
    args.tokens = common.parse_list(args.tokens or ("64,128" if cpu else ALL_TOKENS), int)
    args.blocks = common.parse_list(args.blocks)
    args.layouts_given = args.layouts is not None and not args.quick
    args.layouts = common.parse_list(args.layouts) if args.layouts else list(ALL_LAYOUTS)
    args.methods = common.parse_list(args.methods)
    args.sections = common.parse_list(args.sections)
    args.block_size = args.block_size or (16 if cpu else 256)
    args.seq = args.seq or (32 if cpu else 2048)
    args.kernel_n = common.parse_list(args.kernel_n, int)
    args.kernel_tokens = args.kernel_tokens or (128 if cpu else 16384)
    default_kshapes = args.shapes if args.full else [(128, 128)] if cpu else [(4096, 4096)]
    args.kernel_shapes = (
        [common.parse_shape(s) for s in common.parse_list(args.kernel_shapes)]
        if args.kernel_shapes
        else default_kshapes
    )
    for bad in set(args.methods) - set(METHODS):
        p.error(f"unknown method {bad!r}; choose from {', '.join(METHODS)}")
    for bad in set(args.layouts) - set(ALL_LAYOUTS):
        p.error(f"unknown layout {bad!r}; choose from {', '.join(ALL_LAYOUTS)}")
    for bad in set(args.sections) - {"kernel", "layer"}:
        p.error(f"unknown section {bad!r}; choose kernel and/or layer")
    if args.cuda_graphs and cpu:
        p.error("--cuda-graphs needs a CUDA device")
    if cpu and args.target_s == 0.2:
        args.target_s = 0.02  # smoke runs prove the code path, not the numbers
    args.min_iters = args.min_iters or (2 if cpu else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with common.smoke_threads(args.device_obj):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    device, dtype, env = common.start_run(args, "benchmarks.bench_layer", argv)
    results_dir = None if args.no_results else args.results_dir
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['command']}", flush=True)
    if "kernel" in args.sections:
        print("\n## block-gradient kernel alone", flush=True)
        print(common.format_row({c: c for c in KERNEL_PRINT}, KERNEL_PRINT), flush=True)
        ksink = common.CsvSink(f"{args.name}_block_grad", KERNEL_FIELDS, results_dir, args.out)
        run_kernel_bench(args, env, device, dtype, ksink)
        ksink.report()
    if "layer" in args.sections:
        print("\n## layer forward+backward", flush=True)
        print(common.format_row({c: c for c in PRINT_COLUMNS}, PRINT_COLUMNS), flush=True)
        sink = common.CsvSink(args.name, LAYER_FIELDS, results_dir, args.out)
        rows = run_layer_grid(args, env, device, dtype, sink)
        print("\n## summary: median ms (ratio to the frozen floor)")
        print(summary_table(rows))
        sink.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
