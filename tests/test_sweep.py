"""Sweeps through the CLI: `--multirun` jobs in one process (one Ray), the summary callback, the Pareto front,
relaunching a finished sweep (every point reused), and a failed point listed as failed."""
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llmc_ray.sweep import bits_per_weight, pareto_front
from test_e2e import write_text

REPO = Path(__file__).resolve().parents[1]


def test_bits_per_weight_hand_values():
    assert bits_per_weight(4, "per_group", 128, symmetric=False) == 4 + (16 + 4) / 128 == 4.15625
    assert bits_per_weight(4, "per_group", 128, symmetric=True) == 4.125
    assert bits_per_weight(3, "per_group", 64) == 3 + 19 / 64 == 3.296875
    assert bits_per_weight(2, "per_group", 32, zero_bits=16) == 3.0  # fp16 scale + fp16 zero per 32 weights
    assert bits_per_weight(8, "per_channel", 128) == 8.0
    assert bits_per_weight(4, "per_tensor", 0) == 4.0


def brute_force_front(pts):
    return {i for i, (x, y) in enumerate(pts)
            if not any(a <= x and b <= y and (a, b) != (x, y) for a, b in pts)}


def test_pareto_front_equals_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 12)
        # few distinct values so that ties and exact duplicates happen often
        pts = [(rng.choice([2.5, 3.0, 3.25, 4.0, 4.125]), rng.choice([5.0, 6.0, 6.5, 9.0])) for _ in range(n)]
        front = pareto_front(pts)
        assert set(front) == brute_force_front(pts), pts
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)
    assert pareto_front([(3.3, 9.0), (3.6, 8.0), (4.3, 8.5), (4.6, 7.0)]) == [0, 1, 3]


def cli(args, sweep_args, timeout=300):
    # `--multirun` between the overrides, as people type it (argparse alone would reject that)
    return subprocess.run([sys.executable, "-m", "llmc_ray", *args, "--multirun", *sweep_args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def rtn_args(tiny_dir, ev, sweep_dir):
    """RTN (no calibration) and one eval position: the cheapest real run, ~4 s a job on a CPU."""
    return ["model=hf", f"model.path={tiny_dir}", "model.torch_dtype=float32", "quant=rtn", "calib=custom",
            f"eval.path={ev}", "eval.select=null", "eval.seq_len=128", "eval.num_samples=4",
            "eval.eval_pos=[pretrain,fake_quant]", "dist.cpus_per_actor=1", "run.progress=false",
            f"hydra.sweep.dir={sweep_dir}"]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("sweep_text") / "eval.txt", seed=4)


def test_multirun_2x2_summary_then_relaunch_reuses_every_point(tiny_dir, eval_text, tmp_path):
    sweep = tmp_path / "sweep"
    args = rtn_args(tiny_dir, eval_text, sweep), ["quant.weight.bit=3,4", "quant.weight.group_size=32,64"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Token authentication" not in proc.stderr + proc.stdout  # Ray's start-up warning stays quiet
    results = {}
    for job, (bit, g) in enumerate(itertools.product((3, 4), (32, 64))):
        res = json.loads((sweep / str(job) / "results.json").read_text())
        assert (res["config"]["quant"]["weight"]["bit"], res["config"]["quant"]["weight"]["group_size"]) == (bit, g)
        assert (sweep / str(job) / "report.md").is_file()
        results[str(job)] = res
    summary = json.loads((sweep / "summary.json").read_text())
    assert (summary["n_jobs"], summary["n_ok"], summary["n_failed"]) == (4, 4, 0)
    for row in summary["jobs"]:
        res = results[row["job"]]
        w = res["config"]["quant"]["weight"]
        assert row["status"] == "ok" and row["method"] == "RTN"
        assert (row["bit"], row["group_size"]) == (w["bit"], w["group_size"])
        assert f"quant.weight.bit={w['bit']}" in row["overrides"]
        assert f"quant.weight.group_size={w['group_size']}" in row["overrides"]
        assert row["ppl"] == res["eval"] and row["total_s"] == res["timings_s"]["total"]
        assert row["bits_per_weight"] == w["bit"] + (16 + w["bit"]) / w["group_size"]
    pts = [(r["bits_per_weight"], r["ppl"]["custom"]["fake_quant"]) for r in summary["jobs"]]
    assert {summary["jobs"][i]["job"] for i in pareto_front(pts)} == set(summary["pareto"])
    md = (sweep / "summary.md").read_text()
    for row in summary["jobs"]:
        assert f"{row['ppl']['custom']['fake_quant']:.4f}" in md
    png = (sweep / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    before = {j: (sweep / j / "results.json").read_bytes() for j in results}
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("reused finished run") == 4
    assert {j: (sweep / j / "results.json").read_bytes() for j in results} == before
    assert json.loads((sweep / "summary.json").read_text())["n_ok"] == 4


def test_failed_point_is_listed_not_dropped(tiny_dir, eval_text, tmp_path):
    sweep = tmp_path / "sweep"
    # 48 does not divide the tiny model's 128 in_features: that point fails validation, the other one runs
    proc = cli(rtn_args(tiny_dir, eval_text, sweep), ["quant.weight.group_size=64,48"])
    assert proc.returncode != 0
    summary = json.loads((sweep / "summary.json").read_text())
    rows = {r["job"]: r for r in summary["jobs"]}
    assert rows["0"]["status"] == "ok" and rows["1"]["status"] == "failed"
    assert "group_size=48" in rows["1"]["error"] and "quant.weight.group_size=48" in rows["1"]["overrides"]
    md = (sweep / "summary.md").read_text()
    assert "## Failed jobs" in md and "- job 1 " in md


def test_pipelined_launcher_matches_default_launcher(tiny_dir, eval_text, tmp_path):
    """`hydra/launcher=pipelined` runs every point through one set of actors; each point's PPLs equal the
    default launcher's (separate runs), failed points are listed, and every point has its own results."""
    ref, piped = tmp_path / "ref", tmp_path / "piped"
    two = ["dist.actors=2"]
    proc = cli(rtn_args(tiny_dir, eval_text, ref) + two, ["quant.weight.bit=3,4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli(rtn_args(tiny_dir, eval_text, piped) + two + ["hydra/launcher=pipelined"],
               ["quant.weight.bit=3,4", "quant.weight.group_size=64,48"])
    assert proc.returncode != 0  # the two group_size=48 points fail validation; the others run
    assert "pipelined launcher: 4 points" in proc.stdout + proc.stderr
    rows = {r["job"]: r for r in json.loads((piped / "summary.json").read_text())["jobs"]}
    assert [rows[j]["status"] for j in "0123"] == ["ok", "failed", "ok", "failed"]
    assert "group_size=48" in rows["1"]["error"] and "group_size=48" in rows["3"]["error"]
    for ref_job, piped_job in (("0", "0"), ("1", "2")):
        a = json.loads((ref / ref_job / "results.json").read_text())
        b = json.loads((piped / piped_job / "results.json").read_text())
        assert a["eval"] == b["eval"] and a["config"]["quant"] == b["config"]["quant"]
        assert b["pipelined_sweep"]["points"] == 2 and (piped / piped_job / "report.md").is_file()
        assert (piped / piped_job / ".hydra" / "overrides.yaml").is_file()
