"""block_weight_grad GPU time (CUDA-graph replays, rotated inputs) under split policies and tile configs.

The probe behind the default split policy (block_grad_splits_probe.log; run from the repository root with
PYTHONPATH=. on the H200, tree of commit 4f2ccb6). Same logic as the run, reformatted for ruff.
"""

import torch
import triton

from benchmarks import common
from benchmarks.bench_layer import graphed, make_layout
from smt_kernels.kernels import triton_blocks as tb
from smt_kernels.layout import BlockLayout

DEV = torch.device("cuda")
BF = torch.bfloat16
N = K = 4096
B = 256
CONFIGS = {
    "t128m64w4s3": None,
    "t128m32w4s4": dict(TILE_R=128, TILE_C=128, TILE_M=32, num_warps=4, num_stages=4),
    "t128m64w8s3": dict(TILE_R=128, TILE_C=128, TILE_M=64, num_warps=8, num_stages=3),
}


def policies(sms: int, tiles: int, m: int, tile_m: int) -> dict[str, int]:
    most = max(1, m // (4 * tile_m))
    return {
        "ceil1": min(most, triton.cdiv(sms, tiles)),
        "floor1": min(most, max(1, sms // tiles)),
        "floor2": min(most, max(1, 2 * sms // tiles)),
        "floor3": min(most, max(1, 3 * sms // tiles)),
    }


def gpu_ms(fn, count: int, target_s: float) -> float:
    return common.summarize(common.time_steps(graphed(fn, count, DEV), DEV, warmup=3, target_s=target_s))["time_ms"]


def probe_tokens(m: int, sms: int, count: int = 3) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(m, K, generator=gen, device=DEV, dtype=BF) for _ in range(count)]
    dys = [torch.randn(m, N, generator=gen, device=DEV, dtype=BF) for _ in range(count)]
    dense = gpu_ms(lambda i: dys[i % count].t() @ xs[i % count], count, 0.2)
    dense_tflops = 2 * m * N * K / dense / 1e9
    print(f"M={m} dense dW {dense:.4f} ms {dense_tflops:.1f} TFLOP/s", flush=True)
    for n in (1, 2, 4, 8, 16, 32):
        lay = BlockLayout.build(make_layout("random", n, (16, 16), 0), N, K, B)
        idx, slot, cols = lay.indices.to(DEV), lay.col_slot.to(DEV), lay.col_blocks.to(DEV)
        xcols = [tb.gather_column_blocks(x, cols, B) for x in xs]
        ref = dys[0].float().view(m, -1, B)[:, idx[:, 0]].permute(1, 2, 0) @ xcols[0].float().view(m, -1, B)[
            :, slot
        ].permute(1, 0, 2)
        for cname, cfg in CONFIGS.items():
            tile_m = (cfg or {}).get("TILE_M", 64)
            tiles = n * (B // 128) ** 2
            seen = set()
            for pname, splits in policies(sms, tiles, m, tile_m).items():
                if splits in seen:
                    continue
                seen.add(splits)

                def fn(i, splits=splits, cfg=cfg, xcols=xcols, idx=idx, slot=slot):
                    return tb.block_weight_grad(
                        dys[i % count], xcols[i % count], idx, slot, B, BF, config=cfg, splits=splits
                    )

                err = (fn(0).float() - ref).abs().max().item() / ref.abs().max().item()
                t = gpu_ms(fn, count, 0.15)
                tflops = 2 * m * n * B * B / (t * 1e-3) / 1e12
                print(
                    f"M={m:6d} n={n:2d} {cname:12s} {pname:7s} splits={splits:3d} programs={tiles * splits:4d} "
                    f"{t * 1e3:8.1f} us {tflops:6.1f} TFLOP/s {100 * tflops / dense_tflops:5.1f}% "
                    f"relerr {err:.1e}",
                    flush=True,
                )


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("SMs", sms)
    for m in (16384, 65536):
        probe_tokens(m, sms)


if __name__ == "__main__":
    main()
