"""GPTQ's Hessian on the GPU: bf16 inputs into a GEMM with fp32 output (accumulate_hessian's CUDA path)
against the reference's formula (upcast to fp32, scale by sqrt(2/n), fp32 GEMM). Time and difference, on
Qwen2-7B's two input widths, 4 micro-batches of 16 x 512 tokens.

    python bench/hessian_check.py
"""
import time

import torch

from llmc_ray.algorithms.gptq import accumulate_hessian
g = torch.Generator(device="cuda").manual_seed(0)
for cols in (3584, 18944):  # warm-up: library start-up out of the timings
    w = torch.randn(64, cols, device="cuda")
    accumulate_hessian(torch.zeros(cols, cols, device="cuda"), 0, w.bfloat16()), w.t() @ w
for cols in (3584, 18944):
    xs = [torch.randn(16, 512, cols, device="cuda", generator=g).bfloat16() for _ in range(4)]
    H1, n1 = torch.zeros(cols, cols, device="cuda"), 0
    H2, n2 = torch.zeros(cols, cols, device="cuda"), 0
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for x in xs: H1, n1 = accumulate_hessian(H1, n1, x)
    torch.cuda.synchronize(); t1 = time.perf_counter()
    for x in xs:  # the reference's formula: fp32 inputs take accumulate_hessian's upcast path
        H2, n2 = accumulate_hessian(H2, n2, x.float())
    torch.cuda.synchronize(); t2 = time.perf_counter()
    rel = ((H1 - H2).norm() / H2.norm()).item()
    print(f"cols {cols}: half path {t1 - t0:.3f} s, fp32 path {t2 - t1:.3f} s, rel diff {rel:.2e}, max {(H1 - H2).abs().max().item():.2e}")
