"""Pipelined sweep vs the same points run one by one, in one process (Ray started once).

    python bench/sweep_bench.py OUT_DIR MODEL ACTORS SCHEDULE METHOD POINT [POINT ...]
    MODEL  = synthetic:ARCH:LAYERS (timing only) or demo (SmolLM2 + SOTU, the demo's data settings)
    POINT  = BIT:GROUP_SIZE, e.g. 4:128 3:128 4:64 3:64
    --pipelined-only: skip the separate runs (to time the pipelined sweep on another actor count)
    --transport T: dist.transport (auto, collective, object_store; default auto)

Prints, per mode, the wall time and every point's fake-quant PPL (they must agree between the modes: the
pipelined sweep is tested to equal separate runs bit for bit), then the speed-up.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmc_ray.config import build
from llmc_ray.run import run, run_many

SPECIAL = {"Awq": {"trans": True, "trans_version": "v2", "weight_clip": True, "clip_sym": True},
           "GPTQ": {"blocksize": 128, "percdamp": 0.01, "actorder": False, "static_groups": False,
                    "true_sequential": True},
           "RTN": {}}


def config(model: str, actors: int, schedule: str, method: str, bit: int, group: int, out: Path,
           transport: str = "auto"):
    data = ({"model": {"path": model, "torch_dtype": "bfloat16"},
             "calib": {"n_samples": 128, "seq_len": 512, "bs": 16},
             "eval": {"seq_len": 2048, "bs": 4, "num_samples": 8, "eval_pos": ["pretrain", "fake_quant"]}}
            if model.startswith("synthetic:") else _demo())
    return build({**data,
                  "quant": {"method": method, "weight": {"bit": bit, "group_size": group},
                            "special": SPECIAL[method], "quant_out": method != "RTN"},
                  "save": {"save_path": str(out / f"w{bit}g{group}"), "resume": False},
                  "dist": {"actors": actors, "device": "cuda", "cpus_per_actor": 4, "schedule": schedule,
                           "transport": transport},
                  "run": {"progress": False}})


def _demo():
    """The demo experiment's model and data sections (conf/experiment/demo.yaml), composed by Hydra."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from llmc_ray.config import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        cfg = compose("config", ["+experiment=demo"])
    d = OmegaConf.to_container(cfg, resolve=False)
    d["calib"].update(n_samples=128, bs=16)
    d["model"]["torch_dtype"] = "bfloat16"
    d["eval"]["eval_pos"] = ["pretrain", "fake_quant"]
    return {k: d[k] for k in ("model", "calib", "eval")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("model")
    ap.add_argument("actors", type=int)
    ap.add_argument("schedule", choices=["sequential", "parallel"])
    ap.add_argument("method")
    ap.add_argument("points", nargs="+", help="BIT:GROUP_SIZE")
    ap.add_argument("--pipelined-only", action="store_true")
    ap.add_argument("--transport", default="auto", choices=["auto", "collective", "object_store"])
    args = ap.parse_intermixed_args()
    out, model, actors, schedule, method, points, transport = (args.out, args.model, args.actors, args.schedule,
                                                              args.method, args.points, args.transport)
    pts = [tuple(int(x) for x in p.split(":")) for p in points]
    rows = {}
    if not args.pipelined_only:
        t0 = time.perf_counter()
        alone = [run(config(model, actors, schedule, method, b, g, out / "alone", transport)) for b, g in pts]
        rows["separate runs"] = (time.perf_counter() - t0, alone)
    t0 = time.perf_counter()
    swept = run_many([config(model, actors, schedule, method, b, g, out / "pipelined", transport) for b, g in pts])
    rows["pipelined sweep"] = (time.perf_counter() - t0, swept)
    print(f"\n{model}, {actors} actor(s), {schedule}, {method}, points {' '.join(points)}")
    print("| mode | wall s | calibrate s | fake-quant PPL per point |\n|---|---|---|---|")
    for mode, (wall, res) in rows.items():
        calib = sum(r["timings_s"].get("calibrate", 0) for r in res) if mode == "separate runs" \
            else res[0]["timings_s"].get("calibrate")
        ppl = ", ".join(f"{next(iter(r['eval'].values())).get('fake_quant', float('nan')):.4f}" for r in res)
        print(f"| {mode} | {wall:.1f} | {calib:.1f} | {ppl} |")
    if "separate runs" in rows:
        print(f"speed-up (wall): {rows['separate runs'][0] / rows['pipelined sweep'][0]:.2f}x")
    (out / "sweep_bench.json").write_text(json.dumps({k: {"wall_s": w, "results": r} for k, (w, r) in rows.items()},
                                                      default=str))


if __name__ == "__main__":
    main()
