"""Helpers shared by the benchmarks: timing, memory, saved-for-backward bytes, time budget, CSV and tables."""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import gc
import hashlib
import importlib.metadata
import math
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from smt_kernels import finetune

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_FIELDS = [
    "run_id",
    "date",
    "device",
    "gpu",
    "torch",
    "triton",
    "transformers",
    "peft",
    "commit",
    "code_sha256",
    "command",
]


# ---------------------------------------------------------------- environment


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent
    )


def _git_commit() -> str:
    try:
        out = _git("rev-parse", "--short", "HEAD")
        if out.returncode != 0:
            return ""
        dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the package's and the benchmarks' source files: identifies the code that ran
    where ``commit`` cannot (a device copy's .git can be absent or stale: "+dirty" only says files differ)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted((root / "smt_kernels").rglob("*.py")) + sorted((root / "benchmarks").glob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def env_info(device: torch.device, module: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    """The columns every CSV row carries: when, where, with which versions, and the command that made it."""
    now = _dt.datetime.now(_dt.timezone.utc)
    argv = ["-m", module, *(sys.argv[1:] if argv is None else argv)]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "commit": _git_commit(),
        "code_sha256": code_fingerprint(),
        "command": "python " + shlex.join(argv),
    }


def start_run(args, module: str, argv: Sequence[str] | None) -> tuple[torch.device, torch.dtype, dict[str, str]]:
    """Resolve the dtype (written back to ``args.dtype`` as a name), seed torch, and read the environment row."""
    device = args.device_obj
    dtype = parse_dtype(args.dtype, device)
    args.dtype = str(dtype).removeprefix("torch.")
    torch.manual_seed(args.seed)
    return device, dtype, env_info(device, module, argv)


def pick_device(name: str | None) -> torch.device:
    """--device by ``smt_kernels.finetune.pick_device``'s rule (auto, cpu or cuda[:N], checked), unset meaning
    auto. Kept as a thin adapter because a benchmark exits with the message instead of a FinetuneError traceback."""
    try:
        return finetune.pick_device(name or "auto")
    except finetune.FinetuneError as err:
        raise SystemExit(str(err)) from None


@contextlib.contextmanager
def smoke_threads(device: torch.device):
    """One CPU thread for CPU smoke runs (tiny ops; with 2 threads on a busy machine they run 100× slower)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype as a torch dtype; unset means bf16 on CUDA and fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise SystemExit(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def parse_list(text: str, cast: Callable = str) -> list:
    """'a,b,c' -> [cast(a), cast(b), cast(c)] (empty items dropped)."""
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def parse_shape(text: str) -> tuple[int, int]:
    """'14336x4096' -> (N, K) = (out_features, in_features)."""
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"shape must look like OUTxIN (e.g. 4096x14336), got {text!r}") from err
    return n, k


# ---------------------------------------------------------------- budget


class Budget:
    """A wall-clock allowance; benchmarks check it between measurements and record what they skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def exhausted(self) -> bool:
        return self.elapsed() >= self.seconds


# ---------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[int], object],
    device: torch.device,
    *,
    warmup: int = 2,
    target_s: float = 0.25,
    min_iters: int = 5,
    max_iters: int = 50,
    probe: int = 3,
) -> list[float]:
    """Milliseconds of each timed call ``step(i)``: warm-up, then enough iterations to fill ``target_s``.

    On CUDA each call is bracketed by events (device time, including any gap the host leaves, which is real cost
    for launch-bound code); on the CPU by perf_counter. The caller rotates inputs by ``i`` so caches do not flatter.
    """
    for i in range(warmup):  # compiles kernels, warms the allocator and cuBLAS heuristics
        step(i)
    synchronize(device)
    # calibrate: a few calls give the per-call time, which sets the iteration count
    t0 = time.perf_counter()
    for i in range(probe):
        step(warmup + i)
    synchronize(device)
    per_call = (time.perf_counter() - t0) / probe
    iters = max(min_iters, min(max_iters, math.ceil(target_s / max(per_call, 1e-6))))
    first = warmup + probe
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            step(first + i)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    times = []
    for i in range(iters):
        t = time.perf_counter()
        step(first + i)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def profile_table(step: Callable[[int], object], steps: range, device: torch.device, row_limit: int = 40) -> str:
    """torch.profiler over ``step(i)`` for i in ``steps``: the operator table, by self CUDA time on a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    with torch.profiler.profile(activities=activities) as profiler:
        for i in steps:
            step(i)
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=row_limit)


def sync_report(step: Callable[[int], object], steps: range, device: torch.device) -> str:
    """The host-device synchronisations during ``step(i)`` for i in ``steps``, caught with
    ``torch.cuda.set_sync_debug_mode("warn")``: one line per Python place that triggered one (the innermost
    Python frame of the call), most frequent first, with its count. A step whose host time equals its GPU time either
    issues work that slowly or waits in one of these."""
    if device.type != "cuda":
        return "sync debug mode needs CUDA\n"
    counts: Counter[str] = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in steps:
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        text = str(w.message)
        if "synchroniz" in text:
            counts[f"{w.filename}:{w.lineno}: {text.splitlines()[0][:100]}"] += 1
    lines = [f"{n:6d}  {where}" for where, n in counts.most_common()]
    return f"{sum(counts.values())} synchronising calls in {len(steps)} steps\n" + "\n".join(lines) + "\n"


def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """Median and the 20th/80th percentiles (the spread tells a noisy row from a real difference)."""
    ordered = sorted(times_ms)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]

    return {
        "time_ms": sig(statistics.median(ordered)),
        "time_ms_p20": sig(pct(0.2)),
        "time_ms_p80": sig(pct(0.8)),
        "iters": len(ordered),
    }


def sig(value: float, digits: int = 5) -> float:
    """``value`` rounded to ``digits`` significant digits (CSV files stay readable)."""
    return float(f"{value:.{digits}g}")


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one ``step()`` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        step()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_tensor_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd saves for backward during ``forward()``: distinct storages, ``exclude`` (parameters) left out.

    Whole storages are counted, so a saved view that pins a large tensor costs what it really keeps alive.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def run_guarded(fn: Callable[[], dict], device: torch.device) -> dict:
    """``{**fn(), status: ok}``, or a row saying OOM / error: one failed configuration must not stop a run.

    After a failure, memory is released (the traceback, which pins the failed step's tensors, is dropped first);
    on success, what ``fn`` allocated is freed when it returns.
    """
    failed = False
    try:
        return {**fn(), "status": "ok"}
    except Exception as err:
        failed = True
        if is_oom(err):
            return {"status": "OOM"}
        return {"status": "error", "notes": f"{type(err).__name__}: {err}"[:300]}
    finally:
        if failed:  # frames of the traceback form cycles that only the collector frees
            free_memory(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    """Collect cycles and return cached blocks (a full collection is slow once transformers is loaded)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def l2_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 20
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))


def mib(nbytes: int | None) -> float | str:
    return "" if nbytes is None else round(nbytes / 2**20, 3)


# ---------------------------------------------------------------- output


class CsvSink:
    """Appends rows, as they are measured, to ``<results_dir>/<name>.csv`` and ``<out_dir>/<name>.csv``.

    Each row is written and the file closed at once, so a run cut short (a time limit) keeps what it measured.
    A file whose header differs from ``fields`` is left alone; its rows go to ``<name>-<run_id>.csv`` instead.
    """

    def __init__(self, name: str, fields: Sequence[str], results_dir: Path | None, out_dir: Path | None) -> None:
        self.name = name
        self.fields = list(fields)
        # one folder given twice (--out equal to --results-dir) must not get every row twice
        self.folders = list(dict.fromkeys(f.resolve() for f in (results_dir, out_dir) if f is not None))
        self.paths: list[Path] = []

    def _open_paths(self, run_id: str) -> None:
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{self.name}.csv"
            if path.exists():
                with path.open(newline="") as fh:
                    header = next(csv.reader(fh), None)
                if header != self.fields:
                    path = folder / f"{self.name}-{run_id}.csv"
                    print(f"note: {folder / (self.name + '.csv')} has other columns; writing {path}", file=sys.stderr)
            self.paths.append(path)

    def write(self, row: dict) -> None:
        if not self.paths:
            self._open_paths(str(row.get("run_id", "new")))
        for path in self.paths:
            new = not path.exists()
            with path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.fields, restval="", extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)

    def report(self) -> None:
        for path in self.paths:
            print(f"wrote {path}")


WIDTHS = {"method": 18, "shape": 11, "model": 10, "status": 8}


def format_row(row: dict, columns: Sequence[str]) -> str:
    """One fixed-width line (for rows printed as they are measured, under a ``format_row(header)`` line)."""
    cells = []
    for c in columns:
        v = row.get(c, "")
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        cells.append(text.ljust(max(WIDTHS.get(c, 9), len(c))))
    return "  ".join(cells).rstrip()


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Fixed-width text table of ``columns`` (floats shown with 3 significant decimals)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def add_output_args(parser) -> None:
    """The flags both benchmarks share: where results go and how long they may run."""
    parser.add_argument("--out", type=Path, default=None, help="also write the CSV files into this folder")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"folder of the cumulative CSV files (default {RESULTS_DIR})",
    )
    parser.add_argument("--no-results", action="store_true", help="do not append to --results-dir")
    parser.add_argument(
        "--device", default=None, help="auto (default: cuda when present), cuda[:N] or cpu (tiny smoke sizes)"
    )
    parser.add_argument(
        "--dtype", default=None, help="bf16 (CUDA default), fp16 or fp32 (CPU default: CPU bf16 matmuls are slow)"
    )
    parser.add_argument("--seed", type=int, default=0)
