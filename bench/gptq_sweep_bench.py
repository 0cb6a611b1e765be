"""GPTQ's column sweep launched from Python vs replayed as a CUDA graph, on Qwen2-7B's linear shapes (random
weights, a Hessian from random activations): wall time per solve and whether the results are bit-identical.

    python bench/gptq_sweep_bench.py
"""
from __future__ import annotations

import time

import torch

from llmc_ray.algorithms.gptq import gptq_solve
from llmc_ray.quant.quantizer import QuantSpec

SHAPES = {"q,k,v stacked": (3584 + 512 + 512, 3584), "o_proj": (3584, 3584), "gate,up stacked": (2 * 18944, 3584),
          "down_proj": (3584, 18944)}


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], out


def main() -> None:
    spec = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=128)
    g = torch.Generator(device="cuda").manual_seed(0)
    print("| linear | rows x cols | eager s | CUDA graph s | speed-up | identical |\n|---|---|---|---|---|---|")
    total = [0.0, 0.0]
    for name, (rows, cols) in SHAPES.items():
        W = torch.randn(rows, cols, device="cuda", generator=g) * 0.02
        X = torch.randn(4096, cols, device="cuda", generator=g)
        H = 2 * X.t() @ X / X.shape[0]
        t_eager, a = timed(lambda: gptq_solve(W, H, spec, use_graph=False))
        t_graph, b = timed(lambda: gptq_solve(W, H, spec, use_graph=True))
        same = torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.row_loss, b.row_loss)
        total[0] += t_eager
        total[1] += t_graph
        print(f"| {name} | {rows} x {cols} | {t_eager:.3f} | {t_graph:.3f} | {t_eager / t_graph:.1f}x | {same} |")
    print(f"| one Qwen2-7B block | | {total[0]:.3f} | {total[1]:.3f} | {total[0] / total[1]:.1f}x | |")


if __name__ == "__main__":
    main()
