"""The benchmarks run end to end in their tiny CPU mode, and their baselines compute the right gradients."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_layer, bench_model, common, plot  # noqa: E402
from benchmarks.baselines import GatherBmmBlockLinear, PaperBlockLinear  # noqa: E402
from smt_kernels import SparseBlockLinear  # noqa: E402
from smt_kernels.kernels import triton_blocks  # noqa: E402


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("cls", [PaperBlockLinear, GatherBmmBlockLinear, SparseBlockLinear.from_linear])
def test_baselines_match_masked_dense_reference(cls):
    torch.manual_seed(0)
    b, blocks = 16, [(0, 1), (3, 0), (3, 2), (1, 1)]
    base = nn.Linear(48, 64, bias=False)
    layer = cls(base, blocks, block_size=b) if cls is SparseBlockLinear.from_linear else cls(base, blocks, b)
    x = torch.randn(2, 5, 48, requires_grad=True)
    dy = torch.randn(2, 5, 64)
    y = layer(x)
    gx, gb = torch.autograd.grad(y, [x, layer.block_weight], dy)

    w = base.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y_ref = x64 @ w.t()
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [x64, w], dy.double())
    gb_ref = torch.stack([gw_ref[r * b : (r + 1) * b, c * b : (c + 1) * b] for r, c in blocks])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-5, atol=1e-5)


def test_layouts_and_lora_rank():
    for kind in bench_layer.ALL_LAYOUTS:
        blocks = bench_layer.make_layout(kind, 7, (4, 5), seed=3)
        assert len(set(blocks)) == 7 and all(0 <= r < 4 and 0 <= c < 5 for r, c in blocks)
    assert len({r for r, _ in bench_layer.make_layout("row", 5, (4, 5), 1)}) == 1
    assert len({c for _, c in bench_layer.make_layout("col", 4, (4, 5), 1)}) == 1
    assert bench_layer.blocks_for("1", (16, 16)) == 1
    assert bench_layer.blocks_for("5%", (56, 16)) == 45
    assert bench_layer.blocks_for("0.5%", (4, 16)) == 1
    # 1 block of 256² on 4096×4096: 65536 / 8192 = rank 8
    assert bench_layer.lora_rank(1, 256, 4096, 4096) == 8


def test_saved_bytes_count_what_backward_keeps():
    base = nn.Linear(64, 32, bias=False)
    x = torch.randn(40, 64, requires_grad=True)
    full = nn.Linear(64, 32, bias=False)
    assert common.saved_tensor_bytes(lambda: full(x), exclude=full.parameters()) == x.numel() * 4
    frozen = nn.Linear(64, 32, bias=False).requires_grad_(False)
    assert common.saved_tensor_bytes(lambda: frozen(x), exclude=frozen.parameters()) == 0
    smt = SparseBlockLinear.from_linear(base, [(0, 1), (1, 1)], block_size=16)
    saved = common.saved_tensor_bytes(lambda: smt(x), exclude=smt.parameters())
    # one 16-wide input column block, plus the int64 index metadata
    assert 40 * 16 * 4 <= saved <= 40 * 16 * 4 + 64
    # the paper's views pin the whole input
    paper = PaperBlockLinear(base, [(0, 1)], 16)
    assert common.saved_tensor_bytes(lambda: paper(x), exclude=paper.parameters()) == x.numel() * 4


def test_layer_benchmark_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "torch")
    out = tmp_path / "out"
    argv = [
        "--device",
        "cpu",
        "--results-dir",
        str(tmp_path / "results"),
        "--out",
        str(out),
        "--shapes",
        "64x128",
        "--tokens",
        "64",
        "--blocks",
        "1,0.5%",
        "--kernel-n",
        "1,2",
        "--kernel-shapes",
        "64x128",
        "--kernel-tokens",
        "64",
        "--target-s",
        "0.001",
        "--warmup",
        "1",
        "--seq",
        "32",
    ]
    assert bench_layer.main(argv) == 0
    rows = _rows(out / "layer.csv")
    assert _rows(tmp_path / "results" / "layer.csv") == rows
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [r["notes"] for r in rows if r["status"] != "ok"]
    methods = {r["method"] for r in rows}
    assert set(bench_layer.METHODS) - {"lora"} <= methods
    # row and column layouts run at the main token count, as the default plan says
    assert {r["layout"] for r in rows} == {"-", "random", "row", "col"}
    # 0.5% of a 4×8 block grid is one block: reported under both labels, measured once
    assert [r["time_ms"] for r in rows if r["method"] == "smt" and r["layout"] == "random"] * 1 == [
        r["time_ms"] for r in rows if r["method"] == "smt" and r["layout"] == "random" and r["blocks"] == "1"
    ] * 2
    floor = next(r for r in rows if r["method"] == "frozen")
    assert float(floor["ratio_to_floor"]) == 1.0 and float(floor["saved_mib"]) == 0.0
    assert all(r["gpu"] == "cpu" and r["command"].startswith("python -m benchmarks.bench_layer") for r in rows)
    kernel = _rows(out / "layer_block_grad.csv")
    assert {r["method"] for r in kernel} == {
        "dense_dW_gemm",
        "dense_fwd_gemm",
        "block_weight_grad",
        "torch_bmm_gathered",
    }
    assert all(r["status"] == "ok" and float(r["tflops"]) > 0 for r in kernel)

    pngs = tmp_path / "png"
    assert plot.main([str(out / "layer.csv"), str(out / "layer_block_grad.csv"), "--out", str(pngs)]) == 0
    assert (pngs / "layer_M64_random_time.png").stat().st_size > 0
    assert (pngs / "layer_block_grad.png").stat().st_size > 0


@pytest.mark.skipif(not triton_blocks.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU CI) for Triton on CPU")
def test_layer_benchmark_triton_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "triton")
    argv = [
        "--device",
        "cpu",
        "--no-results",
        "--out",
        str(tmp_path),
        "--shapes",
        "64x128",
        "--tokens",
        "64",
        "--blocks",
        "1",
        "--layouts",
        "random",
        "--methods",
        "frozen,smt",
        "--kernel-n",
        "2",
        "--kernel-shapes",
        "64x128",
        "--kernel-tokens",
        "64",
        "--target-s",
        "0.001",
        "--warmup",
        "1",
        "--dtype",
        "bf16",
    ]
    assert bench_layer.main(argv) == 0
    assert all(r["status"] == "ok" for r in _rows(tmp_path / "layer.csv"))
    kernel = _rows(tmp_path / "layer_block_grad.csv")
    assert {r["backend"] for r in kernel} == {"triton"} and all(r["status"] == "ok" for r in kernel)


def test_model_build_keeps_tied_embeddings_and_rope(monkeypatch):
    monkeypatch.setitem(bench_model.MODELS, "tied", dict(bench_model.MODELS["tiny"], tie_word_embeddings=True))
    model = bench_model.build_model("tied", None, 32, torch.float32, torch.device("cpu"), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rope = model.model.rotary_emb.inv_freq
    assert rope.device.type == "cpu" and torch.isfinite(rope).all() and rope[0] == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_model_benchmark_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SMT_KERNELS_BACKEND", "torch")
    argv = [
        "--device",
        "cpu",
        "--no-results",
        "--out",
        str(tmp_path),
        "--steps",
        "1",
        "--warmup",
        "1",
        "--select-batches",
        "1",
        "--seq",
        "16",
    ]
    assert bench_model.main(argv) == 0
    rows = _rows(tmp_path / "model.csv")
    assert {r["status"] for r in rows} <= {"ok", "skipped"}, [r["notes"] for r in rows if r["status"] != "ok"]
    got = {(r["method"], r["grad_ckpt"]) for r in rows}
    assert {(m, c) for m in bench_model.METHODS for c in ("off", "on")} - {("lora", "off"), ("lora", "on")} <= got
    smt = [r for r in rows if r["method"] == "smt"]
    lora = [r for r in rows if r["method"] == "lora" and r["status"] == "ok"]
    assert all(int(r["n_blocks"]) >= 1 and int(r["trainable_params"]) == int(r["n_blocks"]) * 16 * 16 for r in smt)
    for r in lora:  # the rank that comes closest to SMT's trainable parameters
        rank, trainable = int(r["lora_rank"]), int(r["trainable_params"])
        assert rank == max(1, round(int(smt[0]["trainable_params"]) / (trainable / rank)))
    assert plot.main([str(tmp_path / "model.csv"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.png").stat().st_size > 0


def test_compile_benchmark_cpu_eager(tmp_path):
    """bench_compile's host and model sections on the CPU (eager only: compiling would take minutes here)."""
    from benchmarks import bench_compile

    argv = ["--device", "cpu", "--no-results", "--out", str(tmp_path), "--modes", "eager"]
    assert bench_compile.main(argv) == 0
    rows = _rows(tmp_path / "compile.csv")
    assert {r["status"] for r in rows} == {"ok"}, [r["notes"] for r in rows if r["status"] != "ok"]
    models = {r["method"]: r for r in rows if r["section"] == "model"}
    assert set(models) == set(bench_compile.METHODS)
    assert float(models["frozen"]["ratio_to_floor"]) == 1.0 and int(models["frozen"]["trainable_params"]) == 0
    # LoRA gets SMT's number of parameters, to within one rank's worth
    smt, lora = int(models["smt"]["trainable_params"]), int(models["lora"]["trainable_params"])
    assert smt > 0 and abs(lora - smt) < smt
    host = [r for r in rows if r["section"] == "host"]
    assert {r["layer"] for r in host} == {"nn.Linear frozen", "nn.Linear trainable", "SparseBlockLinear"}
    assert all(float(r["host_us"]) > 0 for r in host)


def test_bench_compile_full_fine_tuning_trains_the_embedding_table():
    """The input embedding of the `full` method gets its gradient and AdamW update in every step (its lookup ran
    under no_grad before: the row understated full fine-tuning's step time)."""
    import types

    from benchmarks import bench_compile

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    preset = bench_compile.PRESETS["tiny"]
    model = bench_compile.prepare("full", preset, cpu, 0)
    emb = model.get_input_embeddings().weight
    assert emb.requires_grad and emb is not model.get_output_embeddings().weight
    arrivals = []
    emb.register_post_accumulate_grad_hook(lambda p: arrivals.append(1))
    before = emb.detach().clone()
    res = bench_compile.measure_model(
        model, preset, "eager", cpu, types.SimpleNamespace(seed=0, warmup=1, target_s=0.01, steps=2)
    )
    assert len(arrivals) >= res["iters"] + 1 and not torch.equal(before, emb.detach())
