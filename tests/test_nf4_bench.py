"""benchmarks/bench_nf4.py runs end to end in its tiny CPU mode and writes one row per layer and method."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_nf4  # noqa: E402


def test_bench_nf4_smoke(tmp_path):
    assert bench_nf4.main(["--smoke", "--out", str(tmp_path)]) == 0
    with (tmp_path / "bench_nf4.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["layer"], r["method"]) for r in rows] == [
        (layer, m) for layer in bench_nf4.SMOKE for m in bench_nf4.METHODS
    ]
    for r in rows:
        assert float(r["time_ms"]) > 0 and float(r["resident_mib"]) > 0
        assert (r["dequant_gbps"] != "") == r["method"].startswith("nf4")
        assert (int(r["trainable"]) > 0) == r["method"].endswith("smt")


def test_bench_nf4_model_smoke(tmp_path):
    """Every method of the whole-model benchmark on the tiny model: one 4-bit model serves the floor, selection,
    QLoRA (removed again) and SMT; the 4-bit and 16-bit models count the same parameters."""
    from benchmarks import bench_nf4_model

    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    assert bench_nf4_model.main(["--device", "cpu", "--no-results", "--out", str(tmp_path)]) == 0
    with (tmp_path / "nf4_model.csv").open(newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert list(rows) == list(bench_nf4_model.METHODS)
    for method, r in rows.items():
        if method.startswith("bnb") and not has_bnb:
            assert r["status"] == "error" and "bitsandbytes" in r["notes"], r
            continue
        assert r["status"] == "ok", r
        assert float(r["step_ms"]) > 0
        if method.endswith("_frozen"):
            assert float(r["ratio_to_floor"]) == 1.0 and r["trainable_params"] == ""
    assert len({r["params"] for r in rows.values() if r["status"] == "ok"}) == 1
    assert rows["nf4_smt"]["trainable_params"] == rows["bf16_smt"]["trainable_params"] != ""
    assert int(rows["nf4_select"]["n_blocks"]) == int(rows["nf4_smt"]["n_blocks"])
    assert rows["qlora"]["trainable_params"] != "" and int(rows["qlora"]["lora_rank"]) >= 1
    if has_bnb:  # the same rank rule on both 4-bit bases
        assert rows["bnb_qlora"]["trainable_params"] == rows["qlora"]["trainable_params"]


def test_bench_nf4_kernel_launch_is_the_shipped_launch():
    """benchmarks/bench_nf4_kernel.py launches the kernel itself (to vary its configuration): with the shipped
    configuration, and with the per-element overlay of before, it writes what dequantize_overlay writes."""
    import torch

    from benchmarks import bench_nf4_kernel
    from smt_kernels.kernels import nf4_dequant
    from smt_kernels.quant.dequant import block_slot_map
    from smt_kernels.quant.nf4 import quantize_nf4

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the Triton interpreter
    n, k, b = 70, 128, 64  # 64 | b | K: the per-absmax-block overlay; clipped last block row
    g = torch.Generator().manual_seed(0)
    q = quantize_nf4((torch.randn(n, k, generator=g) * 0.05).to(dev), double_quant=True)
    idx = torch.tensor([[1, 1], [0, 0]], device=dev)
    bw = torch.randn(2, b, b, generator=g).to(dev)
    bmap = block_slot_map(idx, (n, k), b)
    want = nf4_dequant.dequantize_overlay(q, torch.full((n, k), float("nan"), device=dev), bw, idx, bmap, b)
    for qblocks, warps, runs in ((nf4_dequant.QBLOCKS, nf4_dequant.NUM_WARPS, True), (32, 4, False)):
        out = torch.full((n, k), float("nan"), device=dev)
        bench_nf4_kernel.launch(q, out, bw, bmap, b, qblocks, warps, runs)
        assert torch.equal(out, want), (qblocks, warps, runs)
