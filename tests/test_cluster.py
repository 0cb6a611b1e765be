"""Clusters: the `ray_jobs` Hydra launcher and scripts/submit.py against a real local Ray head (Jobs API in
its dashboard), and the Slurm launcher config composing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_e2e import write_text
from test_sweep import rtn_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("aiohttp", reason="Ray Jobs need ray[default] (the dashboard)")
    pytest.importorskip("aiohttp_cors", reason="Ray Jobs need ray[default] (the dashboard)")
    from ray_head import RayHead

    head = RayHead(num_cpus=2)
    yield head
    head.stop()


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("cluster_text") / "eval.txt", seed=4)


def test_ray_jobs_launcher_runs_each_point_as_a_ray_job(ray_head, tiny_dir, eval_text, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "llmc_ray", "--multirun", "hydra/launcher=ray_jobs",
           f"hydra.launcher.address={ray_head.address}", f"hydra.launcher.python={sys.executable}",
           *rtn_args(tiny_dir, eval_text, sweep), "quant.weight.group_size=32,64,48"]  # 48: fails validation
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "a failed sweep point must fail the multirun"
    assert "Ray Jobs launcher: 3 jobs" in out
    for job in ("0", "1"):
        rec = json.loads((sweep / job / "ray_job.json").read_text())
        assert rec["status"] == "SUCCEEDED", out[-3000:]
        res = json.loads((sweep / job / "results.json").read_text())
        assert res["config"]["quant"]["weight"]["group_size"] == (32, 64)[int(job)]
        assert res["config"]["save"]["save_path"] == str(sweep / job)  # hydra.run.dir came through
        log = (sweep / job / "ray_job.log").read_text()
        assert f"{res['eval']['custom']['fake_quant']:.4f}" in log  # the job's own table, collected
        assert f"[job {job}] " in proc.stdout  # and streamed here with a prefix
    rec = json.loads((sweep / "2" / "ray_job.json").read_text())
    assert rec["status"] == "FAILED" and "group_size=48" in (sweep / "2" / "ray_job.log").read_text()
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(r["job"], r["status"]) for r in summary["jobs"]] == [("0", "ok"), ("1", "ok"), ("2", "failed")]
    assert "group_size=48" in summary["jobs"][2]["error"]


def test_submit_script_streams_and_downloads(ray_head, tiny_dir, eval_text, tmp_path):
    out, dl = tmp_path / "on_cluster", tmp_path / "here"
    cmd = [sys.executable, str(REPO / "scripts" / "submit.py"), "--address", ray_head.address,
           "--python", sys.executable, "--output-dir", str(out), "--download", str(dl), "--",
           *rtn_args(tiny_dir, eval_text, tmp_path / "unused")[:-1]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # not from the repo
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "PPL (fake_quant)" in proc.stdout and "SUCCEEDED" in proc.stdout  # the job's log, streamed
    assert "@@llmc_ray.results@@" not in proc.stdout
    ran = json.loads((out / "results.json").read_text())
    assert json.loads((dl / "results.json").read_text()) == ran
    assert (dl / "report.md").is_file() and (dl / "job.log").is_file()
    assert ran["config"]["save"]["save_path"] == str(out)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmc_ray.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'llmc-ray[cluster]'")
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model.path=/m"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.tasks_per_node) == ("gpu", 240, 1)


def test_ray_jobs_launcher_config_composes():
    cfg = compose(["hydra/launcher=ray_jobs", "hydra.launcher.address=http://head:8265", "model.path=/m"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.llmc_ray_launchers.ray_jobs_launcher.RayJobsLauncher"
    assert cfg.hydra.launcher.address == "http://head:8265" and cfg.hydra.launcher.entrypoint_num_cpus == 0
