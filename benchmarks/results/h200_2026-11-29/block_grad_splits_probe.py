"""block_weight_grad GPU time (CUDA-graph replays, rotated inputs) under split policies and tile configs."""
import torch, triton
from benchmarks.bench_layer import graphed, make_layout
from benchmarks import common
from smt_kernels.layout import BlockLayout
from smt_kernels.kernels import triton_blocks as tb

dev = torch.device("cuda"); bf = torch.bfloat16
S = torch.cuda.get_device_properties(0).multi_processor_count
N = K = 4096; b = 256
print("SMs", S)
def policies(tiles, M, tile_m):
    mx = max(1, M // (4 * tile_m))
    return {"ceil1": min(mx, triton.cdiv(S, tiles)), "floor1": min(mx, max(1, S // tiles)),
            "floor2": min(mx, max(1, 2 * S // tiles)), "floor3": min(mx, max(1, 3 * S // tiles))}
configs = {"t128m64w4s3": None,
           "t128m32w4s4": dict(TILE_R=128, TILE_C=128, TILE_M=32, num_warps=4, num_stages=4),
           "t128m64w8s3": dict(TILE_R=128, TILE_C=128, TILE_M=64, num_warps=8, num_stages=3)}
for M in (16384, 65536):
    count = 3
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(M, K, generator=gen, device=dev, dtype=bf) for _ in range(count)]
    dys = [torch.randn(M, N, generator=gen, device=dev, dtype=bf) for _ in range(count)]
    dense = common.summarize(common.time_steps(graphed(lambda i: dys[i % count].t() @ xs[i % count], count, dev), dev, warmup=3, target_s=0.2))["time_ms"]
    print(f"M={M} dense dW {dense:.4f} ms {2*M*N*K/dense/1e9:.1f} TFLOP/s", flush=True)
    for n in (1, 2, 4, 8, 16, 32):
        lay = BlockLayout.build(make_layout("random", n, (16, 16), 0), N, K, b)
        idx, slot, cb = lay.indices.to(dev), lay.col_slot.to(dev), lay.col_blocks.to(dev)
        xcols = [tb.gather_column_blocks(x, cb, b) for x in xs]
        ref = (dys[0].float().view(M, -1, b)[:, idx[:, 0]].permute(1, 2, 0) @ xcols[0].float().view(M, -1, b)[:, slot].permute(1, 0, 2))
        for cname, cfg in configs.items():
            tile_m = (cfg or {}).get("TILE_M", 64)
            tiles = n * (b // 128) ** 2
            seen = set()
            for pname, sp in policies(tiles, M, tile_m).items():
                if sp in seen:
                    continue
                seen.add(sp)
                fn = lambda i, sp=sp, cfg=cfg: tb.block_weight_grad(dys[i % count], xcols[i % count], idx, slot, b, bf, config=cfg, splits=sp)
                out = fn(0).float()
                err = (out - ref).abs().max().item() / ref.abs().max().item()
                t = common.summarize(common.time_steps(graphed(fn, count, dev), dev, warmup=3, target_s=0.15))["time_ms"]
                fl = 2 * M * n * b * b / (t * 1e-3) / 1e12
                print(f"M={M:6d} n={n:2d} {cname:12s} {pname:7s} splits={sp:3d} programs={tiles*sp:4d} {t*1e3:8.1f} us {fl:6.1f} TFLOP/s {100*fl/(2*M*N*K/dense/1e9):5.1f}% relerr {err:.1e}", flush=True)
    del xs, dys
