"""GPTQ's column sweep three ways on one model's linear shapes (random weights, a Hessian from random
activations): launched from Python (eager), replayed as a CUDA graph, and as one fused Triton kernel per lazy
batch. Wall time per solve, and how the results compare with eager (bit-identical, or the share of weights
that differ and the largest difference).

    python bench/gptq_sweep_bench.py [qwen2-7b|smollm2-135m] [SWEEP ...]   (default: eager graph triton;
                                                                         the first one is the reference)
"""
from __future__ import annotations

import sys
import time

import torch

from llmc_ray.algorithms import gptq_kernel
from llmc_ray.algorithms.gptq import gptq_solve
from llmc_ray.quant.quantizer import QuantSpec

SHAPES = {
    "qwen2-7b": {"q,k,v stacked": (3584 + 512 + 512, 3584), "o_proj": (3584, 3584),
                 "gate,up stacked": (2 * 18944, 3584), "down_proj": (3584, 18944)},
    "smollm2-135m": {"q,k,v stacked": (576 + 192 + 192, 576), "o_proj": (576, 576),
                     "gate,up stacked": (2 * 1536, 576), "down_proj": (576, 1536)},
}
GROUP = {"qwen2-7b": 128, "smollm2-135m": 64}


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


def compare(a, b) -> str:
    if torch.equal(a.q, b.q) and torch.equal(a.row_loss, b.row_loss):
        return "identical"
    diff = a.q != b.q
    # GPTQ feeds each column's rounding error into the next ones, so one float difference early on changes
    # many later roundings; what must hold is the objective: the summed loss
    loss = (b.row_loss.sum() / a.row_loss.sum()).item() - 1
    return (f"{diff.float().mean().item():.2e} of weights differ, max {(a.q - b.q).abs().max().item():.2e}, "
            f"loss {loss:+.2e}")


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "qwen2-7b"
    spec = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=GROUP[arch])
    sweeps = sys.argv[2:] or ["eager", "graph", "triton"]
    if gptq_kernel.usable(torch.empty(1, device="cuda"), 128) is not None:
        sweeps = [s for s in sweeps if s != "triton"]
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{arch}, w4 g{GROUP[arch]}, blocksize 128; triton: {getattr(gptq_kernel.triton, '__version__', None)}")
    ref = sweeps[0]
    print("| linear | rows x cols | " + " | ".join(f"{s} s" for s in sweeps) + " | " +
          " | ".join(f"{s} vs {ref}" for s in sweeps[1:]) + " |")
    print("|---" * (2 + 2 * len(sweeps) - 1) + "|")
    total = dict.fromkeys(sweeps, 0.0)
    for name, (rows, cols) in SHAPES[arch].items():
        W = torch.randn(rows, cols, device="cuda", generator=g) * 0.02
        X = torch.randn(4096, cols, device="cuda", generator=g)
        H = 2 * X.t() @ X / X.shape[0]
        res = {s: timed(lambda s=s: gptq_solve(W, H, spec, sweep=s)) for s in sweeps}
        for s in sweeps:
            total[s] += res[s][0]
        print(f"| {name} | {rows} x {cols} | " + " | ".join(f"{res[s][0]:.4f}" for s in sweeps) + " | " +
              " | ".join(compare(res[ref][1], res[s][1]) for s in sweeps[1:]) + " |")
    print("| one block | | " + " | ".join(f"{total[s]:.4f}" for s in sweeps) + " | " +
          " | ".join(f"{total[ref] / total[s]:.1f}x faster" for s in sweeps[1:]) + " |")


if __name__ == "__main__":
    main()
