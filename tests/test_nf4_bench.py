"""benchmarks/bench_nf4.py runs end to end in its tiny CPU mode and writes one row per layer and method."""

from __future__ import annotations

import csv
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
