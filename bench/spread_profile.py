"""Where a spread MoE block's time goes (one GPU, no Ray): the whole block, the owner's spread_block and one
helper's solve_experts, each with GPTQ's Hessian collection and solves timed apart. Run twice: the second
round is warm (kernels compiled, pinned buffers cached).

    python bench/spread_profile.py
"""
import time

import torch

from llmc_ray.algorithms import gptq as G
from llmc_ray.checkpoint import resolve_model_dir
from llmc_ray.quant.quantizer import QuantSpec
from llmc_ray.synthetic import synthetic_tokens
from llmc_ray.worker import BlockWorker, CalibJob, WorkerPlan

T = {}


def sync():
    torch.cuda.synchronize()
    return time.perf_counter()


def timed_in(mod, name):
    f = getattr(mod, name)

    def g(*a, **k):
        t0 = sync()
        r = f(*a, **k)
        T[name] = T.get(name, 0) + sync() - t0
        return r
    setattr(mod, name, g)


def main():
    for n in ("collect_hessians", "quantize_subset"):
        timed_in(G, n)
    path = str(resolve_model_dir("synthetic:deepseek-v2-lite:2"))
    spec = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=64)
    job = CalibJob("GPTQ", {}, spec, quant_out=True, merge_tokens=65536)
    ids = synthetic_tokens(128, 512, 102400, 42)

    def worker(rank, blocks):
        w = BlockWorker(WorkerPlan(rank, blocks, rank == 0, False, path, "deepseek_v2", "bfloat16", "cuda"))
        w.load()
        return w

    w = worker(0, (0, 1))
    acts, _ = w.calibrate_block(0, w.calib_inputs(ids, 16), job)
    host = w._to_cpu(w._take(acts, 1))
    for rep in range(2):
        whole, owner, helper = worker(0, (1,)), worker(0, (1,)), worker(1, (1,))
        payloads = []
        for label, fn in (("whole block", lambda: whole.calibrate_block(1, host, job, "none")),
                          ("spread_block", lambda: payloads.append(owner.spread_block(1, host, job, 2))),
                          ("solve_experts (half)", lambda: helper.solve_experts(payloads[-1][0], job))):
            T.clear()
            t0 = sync()
            fn()
            print(f"round {rep} {label}: {sync() - t0:.2f} s", {k: round(v, 2) for k, v in T.items()}, flush=True)

if __name__ == "__main__":
    main()
