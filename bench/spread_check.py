"""dist.spread_experts on a GPU, in one process (no Ray): a DeepSeek-V2-Lite-shape MoE block (synthetic,
full width) calibrated with GPTQ whole, and with its routed experts shipped to two other workers on the same
GPU (spread_block -> solve_experts x 2 -> finish_spread). Checks that both give the same weights and qparams
and prints where the time goes (the shipping here is host copies; through Ray the object store adds its own).

    python bench/spread_check.py [true_sequential=1]
"""
from __future__ import annotations

import sys
import time

import torch

from llmc_ray.checkpoint import resolve_model_dir
from llmc_ray.quant.quantizer import QuantSpec
from llmc_ray.synthetic import synthetic_tokens
from llmc_ray.worker import BlockWorker, CalibJob, WorkerPlan


def main() -> None:
    true_seq = (sys.argv[1] if len(sys.argv) > 1 else "1") == "1"
    path = str(resolve_model_dir("synthetic:deepseek-v2-lite:2"))
    spec = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=64)
    job = CalibJob("GPTQ", {"true_sequential": true_seq}, spec, quant_out=True, merge_tokens=65536)
    ids = synthetic_tokens(128, 512, 102400, 42)

    def worker(rank, blocks):
        w = BlockWorker(WorkerPlan(rank, blocks, rank == 0, False, path, "deepseek_v2", "bfloat16", "cuda"))
        w.load()
        return w

    def moe_inputs(w):  # block 1's inputs: block 0 (dense) calibrated the same way on both
        acts, _ = w.calibrate_block(0, w.calib_inputs(ids, 16), job)
        return acts

    def timed(fn, *a):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a)
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    warm = worker(0, (0, 1))  # compiles the kernels once, so neither timed side pays for it
    warm.calibrate_block(1, moe_inputs(warm), job, "none")
    del warm
    whole = worker(0, (0, 1))
    acts = moe_inputs(whole)
    (_, ref), t_whole = timed(whole.calibrate_block, 1, acts, job, "none")
    apart = worker(0, (0, 1))
    acts = moe_inputs(apart)
    helpers = [worker(1, (1,)), worker(2, (1,))]
    payloads, t_spread = timed(apart.spread_block, 1, acts, job, 2)
    solved, t_solve = [], []
    for h, p in zip(helpers, payloads):
        r, t = timed(h.solve_experts, p, job)
        solved.append(r)
        t_solve.append(t)
    (_, got), t_finish = timed(apart.finish_spread, 1, job, "none", *solved)
    a, b = whole.blocks[1].state_dict(), apart.blocks[1].state_dict()
    same_w = all(torch.equal(a[k], b[k]) for k in a)
    qa, qb = whole.variants[0].qparams[1], apart.variants[0].qparams[1]
    same_q = qa.keys() == qb.keys() and all(torch.equal(x, y) for k in qa for x, y in zip(qa[k], qb[k]))
    same_loss = got["info"]["loss"] == ref["info"]["loss"]
    print(f"true_sequential={true_seq}: weights equal {same_w}, qparams equal {same_q}, losses equal {same_loss}")
    print(f"experts per worker {got['info']['experts_spread']}")
    print(f"whole block {t_whole:.2f} s | spread: owner pass + payloads {t_spread:.2f} s, experts "
          f"{' + '.join(f'{t:.2f}' for t in t_solve)} s (in parallel on 2 GPUs: {max(t_solve):.2f}), "
          f"finish {t_finish:.2f} s -> {t_spread + max(t_solve) + t_finish:.2f} s with 2 helpers")


if __name__ == "__main__":
    main()
