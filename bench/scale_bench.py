"""Scale benchmark on synthetic full-width models (seeded random weights: timings and memory only, never PPL).

    python bench/scale_bench.py OUT_DIR [--eval-windows N] [--transport T] CASE [CASE ...]
    CASE = arch:layers:method:schedule:actors[:calib_bs[:group_size]]   e.g. qwen2-7b:4:Awq:parallel:2:16
           (group_size 128 by default; DeepSeek-V2-Lite needs 64: its dense down_proj has 10944 inputs)
           method RTN runs eval only (N windows of 2048 tokens, default 32, 4 per batch) and measures the eval
           pipeline: the pretrain pass, then the same windows again on the RTN blocks (warm: no first-call costs).
    --transport: dist.transport for every case (auto, collective, object_store; default auto).
    --spread-experts: dist.spread_experts=true for every case (MoE blocks' experts calibrated on every actor).

Each case is one `llmc_ray.run.run` in this process (Ray started once); prints one table row per case and
appends the full results to OUT_DIR/scale.jsonl.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from llmc_ray.config import build
from llmc_ray.run import run

QUANT = {"Awq": {"trans": True, "trans_version": "v2", "weight_clip": True, "clip_sym": True},
         "GPTQ": {"blocksize": 128, "percdamp": 0.01, "actorder": False, "static_groups": False,
                  "true_sequential": True},
         "RTN": {}}


def case_config(case: str, out: Path, eval_windows: int = 32, transport: str = "auto", spread: bool = False):
    arch, layers, method, schedule, actors, *rest = case.split(":")
    calib_bs = int(rest[0]) if rest else 16
    group = int(rest[1]) if len(rest) > 1 else 128
    eval_only = method == "RTN"
    return build({
        "model": {"path": f"synthetic:{arch}:{layers}", "torch_dtype": "bfloat16"},
        "calib": {"n_samples": 128, "seq_len": 512, "bs": calib_bs},
        "eval": {"seq_len": 2048, "bs": 4, "num_samples": eval_windows if eval_only else 4,
                 "eval_pos": ["pretrain", "fake_quant"] if eval_only else []},
        "quant": {"method": method, "weight": {"bit": 4, "group_size": group}, "special": QUANT[method],
                  "quant_out": not eval_only},
        "save": {"save_path": str(out / case.replace(":", "_"))},
        "dist": {"actors": int(actors), "device": "cuda", "cpus_per_actor": 4, "schedule": schedule,
                 "transport": transport, "spread_experts": spread},
        "run": {"progress": False},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--transport", default="auto", choices=["auto", "collective", "object_store"])
    ap.add_argument("--spread-experts", action="store_true")
    args = ap.parse_intermixed_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        t0 = time.perf_counter()
        res = run(case_config(case, out, args.eval_windows, args.transport, args.spread_experts))
        wall = time.perf_counter() - t0
        t = res["timings_s"]
        blocks = res["blocks"]
        per_block = sorted(b["seconds"] for b in blocks)
        gpu = max((m.get("gpu_peak_bytes", 0) for m in res["memory"]), default=0) / 2**30
        host = max((m.get("host_peak_bytes", 0) for m in res["memory"]), default=0) / 2**30
        row = {"case": case, "wall_s": round(wall, 1), "load_s": t.get("load"), "calibrate_s": t.get("calibrate"),
               "eval_s": t.get("eval_pretrain"), "eval_warm_s": t.get("eval_fake_quant"),
               "block_median_s": round(per_block[len(per_block) // 2], 2) if per_block else None,
               "gpu_peak_gib_max_actor": round(gpu, 1),
               "gpu_peak_gib_per_actor": [round(m.get("gpu_peak_bytes", 0) / 2**30, 1) for m in res["memory"]], "actor_host_peak_gib": round(host, 1),
               "driver_host_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}
        rows.append(row)
        with open(out / "scale.jsonl", "a") as fh:
            fh.write(json.dumps({**row, "results": res}, default=str) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\ntransport {args.transport}, eval windows {args.eval_windows}")
    print("| case | wall s | load s | calibrate s | eval s | eval warm s | block median s | GPU peak GiB | actor host GiB | "
          "driver host GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['wall_s']} | {r['load_s']} | {r['calibrate_s']} | {r['eval_s']} | {r['eval_warm_s']} | "
              f"{r['block_median_s']} | {r['gpu_peak_gib_max_actor']} | {r['actor_host_peak_gib']} | "
              f"{r['driver_host_peak_gib']} |")


if __name__ == "__main__":
    main()
