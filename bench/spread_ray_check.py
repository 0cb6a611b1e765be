"""dist.spread_experts end to end through Ray on a GPU machine: GPTQ on a DeepSeek-V2-Lite-shape model
(synthetic, 3 blocks: 1 dense + 2 MoE) with 1 actor, and with 2 actors spreading each MoE block's experts.
The two must agree exactly (fake-quant PPL on the run's random eval tokens, every linear's GPTQ loss).

    python bench/spread_ray_check.py OUT_DIR [--share-gpu]

--share-gpu: both actors on GPU 0 (a one-GPU machine: Ray is told of 2 GPUs and leaves CUDA_VISIBLE_DEVICES
alone), for correctness only — timings then mean nothing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if "--share-gpu" in sys.argv:
    os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
import ray  # noqa: E402

from llmc_ray.config import build  # noqa: E402
from llmc_ray.run import run  # noqa: E402


def config(out: Path, actors: int, spread: bool):
    return build({
        "model": {"path": "synthetic:deepseek-v2-lite:3", "torch_dtype": "bfloat16"},
        "calib": {"n_samples": 128, "seq_len": 512, "bs": 16},
        "eval": {"seq_len": 2048, "bs": 4, "num_samples": 8, "eval_pos": ["fake_quant"]},
        "quant": {"method": "GPTQ", "weight": {"bit": 4, "group_size": 64}, "quant_out": True},
        "save": {"save_path": str(out / f"a{actors}{'_spread' if spread else ''}"), "resume": False},
        "dist": {"actors": actors, "device": "cuda", "cpus_per_actor": 2, "spread_experts": spread},
        "run": {"progress": False},
    })


def main() -> None:
    out = Path(sys.argv[1])
    if "--share-gpu" in sys.argv:
        from llmc_ray.dist.cluster import ZERO_COPY_TENSORS

        os.environ.update(ZERO_COPY_TENSORS)  # as init_ray does for the Ray it starts
        ray.init(num_gpus=2, include_dashboard=False)
    res = {}
    for actors, spread in ((1, False), (2, True)):
        t0 = time.perf_counter()
        r = run(config(out, actors, spread))
        res[spread] = r
        blocks = [(b["block"], b["rank"], round(b["seconds"], 2), b["info"].get("experts_spread")) for b in r["blocks"]]
        print(f"actors={actors} spread={spread}: {time.perf_counter() - t0:.1f} s wall, calibrate "
              f"{r['timings_s']['calibrate']} s, blocks (index, owner, s, experts per actor) {blocks}", flush=True)
    a, b = res[False], res[True]
    same_ppl = a["eval"] == b["eval"]
    same_loss = all(x["info"]["loss"] == y["info"]["loss"] for x, y in zip(a["blocks"], b["blocks"]))
    print(f"fake-quant PPL equal: {same_ppl} ({a['eval']} vs {b['eval']}); every GPTQ loss equal: {same_loss}")


if __name__ == "__main__":
    main()
