"""Kill an actor mid-calibration: the run stops with a message saying how to go on, finished blocks stay on
disk, and the relaunch (even with another actor count) gives exactly the uninterrupted run's result."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_text


def cli(tiny_dir, calib, ev, out, actors, crash_at=None, schedule="sequential"):
    env = dict(os.environ)
    env.pop("LLMC_RAY_CRASH_AT_BLOCK", None)
    if crash_at is not None:
        env["LLMC_RAY_CRASH_AT_BLOCK"] = str(crash_at)
    cmd = [sys.executable, "-m", "llmc_ray", "model=hf", f"model.path={tiny_dir}", "model.torch_dtype=float32",
           "quant=gptq", "quant.weight.group_size=64", "calib=custom", f"calib.path={calib}",
           "calib.n_samples=8", "calib.seq_len=64", f"eval.path={ev}", "eval.select=null", "eval.seq_len=128",
           "eval.num_samples=4", "eval.eval_pos=[fake_quant]", f"save.save_path={out}", "save.save_fake=true",
           f"dist.actors={actors}", "dist.cpus_per_actor=1", f"dist.schedule={schedule}", "run.progress=false"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def fake_weights(out):
    sd = {}
    for f in sorted((out / "fake_quant_model").glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_killed_actor_then_relaunch_equals_uninterrupted(schedule, tiny_dir, tmp_path):
    calib, ev = write_text(tmp_path / "c.txt", seed=5), write_text(tmp_path / "e.txt", seed=6)
    ref = cli(tiny_dir, calib, ev, tmp_path / "ref", actors=2, schedule=schedule)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "run"
    crashed = cli(tiny_dir, calib, ev, out, actors=2, crash_at=2, schedule=schedule)
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    msg = [l for l in crashed.stderr.splitlines() if l.startswith("llmc_ray:")]
    assert msg and "died while calibrating block 2" in msg[0] and "relaunch" in msg[0]
    saved = sorted(p.name for p in (out / "checkpoints").glob("block_*.safetensors"))
    assert saved == ["block_00000.safetensors", "block_00001.safetensors"]  # finished, whole files only
    assert not list((out / "checkpoints").glob("*.tmp")) and not (out / "fake_quant_model").exists()

    resumed = cli(tiny_dir, calib, ev, out, actors=1, schedule=schedule)  # another actor count resumes too
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: blocks 0..1" in resumed.stderr + resumed.stdout
    res = json.loads((out / "results.json").read_text())
    assert [b.get("resumed", False) for b in res["blocks"]] == [True, True, False, False]
    assert res["eval"] == json.loads((tmp_path / "ref" / "results.json").read_text())["eval"]
    a, b = fake_weights(tmp_path / "ref"), fake_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "checkpoints").exists()  # a finished run answers relaunches from results.json


def test_other_settings_discard_checkpoints(tiny_dir, tmp_path):
    from llmc_ray.config import build
    from llmc_ray.run import block_checkpoints

    base = {"model": {"path": str(tiny_dir)}, "save": {"save_path": str(tmp_path)}}
    cfg = build({**base, "quant": {"method": "GPTQ", "weight": {"group_size": 64}}})
    ckpt_dir, done = block_checkpoints(cfg, tmp_path, 4)
    (ckpt_dir / "block_00000.safetensors").write_bytes(b"x")
    assert block_checkpoints(cfg, tmp_path, 4)[1] == {0}
    other = build({**base, "quant": {"method": "GPTQ", "weight": {"group_size": 32}}})
    assert block_checkpoints(other, tmp_path, 4)[1] == set()
    assert not (ckpt_dir / "block_00000.safetensors").exists()
