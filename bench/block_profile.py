"""Where one block's calibration time goes: the sequential schedule run in-process (no Ray), phase by phase.

    python bench/block_profile.py MODEL METHOD BS [--blocks N] [--calib calib.pt] [--special k=v ...] [--trace]
                                  [--fresh-refs]

MODEL: an HF dir or synthetic:ARCH:LAYERS; METHOD: Awq | GPTQ; BS: calibration samples per forward.
Calibration: --calib (int64 [n, seq] tokens, e.g. from bench/llmcompressor/dump_tokens.py) or 128 x 512
random tokens. The first N blocks are calibrated like `calibrate_sequential` does (quant_out on), with a
CUDA sync around each timed phase, so phases add up to the block time. Prints per-phase seconds summed over
blocks and, with --trace, torch.profiler's top ops for the second block (the first pays one-off costs).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import time
from collections import defaultdict
from typing import Dict

import torch

from llmc_ray.algorithms import awq as awq_mod
from llmc_ray.algorithms import base as base_mod
from llmc_ray.algorithms import gptq as gptq_mod
from llmc_ray.config import build
from llmc_ray.dist.cluster import plan_workers
from llmc_ray.synthetic import synthetic_tokens
from llmc_ray.validate import make_plan
from llmc_ray.worker import BlockWorker, CalibJob

PHASES: Dict[str, float] = defaultdict(float)
CALLS: Dict[str, int] = defaultdict(int)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(owner, name: str, label: str) -> None:
    """Wrap owner.name so its (synced) wall time adds to PHASES[label]; nested phases count in both."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        sync()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sync()
            PHASES[label] += time.perf_counter() - t0
            CALLS[label] += 1

    is_static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    setattr(owner, name, staticmethod(wrapper) if is_static else wrapper)


def instrument() -> None:
    timed(base_mod.BlockContext, "capture", "awq: capture (inputs, inspect outputs)")
    timed(awq_mod, "search_scale", "awq: search_scale")
    timed(awq_mod, "search_clip", "awq: search_clip")
    timed(awq_mod, "sample_tokens", "awq: sample_tokens")
    timed(gptq_mod, "collect_hessians", "gptq: collect_hessians")
    timed(gptq_mod, "gptq_solve", "gptq: gptq_solve")
    timed(BlockWorker, "_propagate", "worker: propagate (quant_out forward)")
    timed(BlockWorker, "_weight_errors", "worker: weight_errors")
    timed(BlockWorker, "_fill_qparams", "worker: fill_qparams")
    timed(BlockWorker, "_to_dev", "worker: to_dev")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("method", choices=("Awq", "GPTQ"))
    ap.add_argument("bs", type=int)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=128, help="random calibration rows (without --calib)")
    ap.add_argument("--special", nargs="*", default=[], help="k=v (true/false/int/float)")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--merge-tokens", type=int, default=65536, help="calib.merge_tokens (0: no merging)")
    ap.add_argument("--fresh-refs", action="store_true",
                    help="AWQ: compute every search's reference afresh (as before the capture kept them)")
    args = ap.parse_args()
    if args.fresh_refs:
        capture = base_mod.BlockContext.capture
        base_mod.BlockContext.capture = lambda self, names, outputs=(): capture(self, names, ())

    def value(v: str):
        low = v.lower()
        if low in ("true", "false"):
            return low == "true"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    special = {k: value(v) for k, v in (s.split("=", 1) for s in args.special)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = build({
        "model": {"path": args.model, "torch_dtype": "bfloat16" if device == "cuda" else "float32"},
        "calib": {"n_samples": args.n_samples, "seq_len": 512, "bs": args.bs},
        "eval": {"eval_pos": []},
        "quant": {"method": args.method, "weight": {"bit": 4, "group_size": args.group_size}, "special": special,
                  "quant_out": True},
        "dist": {"actors": 1, "device": device, "cpus_per_actor": 4},
        "run": {"progress": False},
    })
    plan = make_plan(cfg)
    wplan = plan_workers(plan.ckpt, plan.spec, plan.n_layers, cfg.dist, plan.model_type, plan.dtype)[0]
    worker = BlockWorker(wplan)
    worker.load()
    if args.calib:
        ids = torch.load(args.calib)
    else:
        ids = synthetic_tokens(args.n_samples, 512, plan.ckpt.raw_config()["vocab_size"], 42)
    job = CalibJob(plan.method.name, special, plan.qspec, quant_out=True, merge_tokens=args.merge_tokens or None)
    instrument()
    acts = worker.calib_inputs(ids, args.bs)
    n = min(args.blocks, plan.n_layers)
    per_block = []
    for i in range(n):
        prof = None
        if args.trace and i == min(1, n - 1):
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else []))
            prof.__enter__()
        sync()
        t0 = time.perf_counter()
        acts, rep = worker.calibrate_block(i, acts, job)
        sync()
        per_block.append(time.perf_counter() - t0)
        if prof is not None:
            prof.__exit__(None, None, None)
            sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            if device == "cuda":
                print(prof.key_averages().table(sort_by=sort, row_limit=15))
            launches = sum(e.count for e in prof.key_averages() if e.key.startswith("cudaLaunchKernel"))
            print(f"block {i}: cudaLaunchKernel calls {launches}")
    total = sum(per_block)
    print(f"\n{args.model} {args.method} bs={args.bs} merge_tokens={args.merge_tokens} special={special}: {n} blocks, {total:.2f} s "
          f"(per block: {', '.join(f'{t:.2f}' for t in per_block)})")
    print("| phase | s (all blocks) | calls | share |\n|---|---|---|---|")
    for k, v in sorted(PHASES.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {CALLS[k]} | {v / total:.0%} |")


if __name__ == "__main__":
    main()
