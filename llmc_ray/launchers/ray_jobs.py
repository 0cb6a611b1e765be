"""Hydra launcher `hydra/launcher=ray_jobs`: every sweep point becomes a Ray Job on an existing Ray cluster.

    python -m llmc_ray --multirun hydra/launcher=ray_jobs hydra.launcher.address=http://HEAD:8265 \\
        hydra.sweep.dir=/shared/sweeps/w3w4 +experiment=demo quant.weight.bit=3,4

Each job is its own driver process on the cluster (`python -m llmc_ray <that job's overrides>
hydra.run.dir=<sweep dir>/<job num>`), with this project shipped as the job's working_dir. Jobs are detached
from this process: their state, logs and outputs live on the cluster. This process submits them (at most
`max_concurrent` at once), streams their logs with a `[job N]` prefix, writes `<job dir>/ray_job.log` and
`ray_job.json`, and returns one JobReturn per job (results.json's content when the job dir is readable here).
The sweep dir must be storage the cluster writes and this machine reads (the same disk for a local head).
Registered through hydra_plugins/llmc_ray_launchers (a Hydra plugin namespace package).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from omegaconf import OmegaConf

from ..sweep import RAY_JOB_FILE
from . import jobs
from .base import PointLauncher

log = logging.getLogger(__name__)


@dataclass
class RayJobsLauncherConf:
    _target_: str = "hydra_plugins.llmc_ray_launchers.ray_jobs_launcher.RayJobsLauncher"
    # the cluster's dashboard (Jobs API) address, e.g. http://head:8265; null: RAY_API_SERVER_ADDRESS or
    # RAY_ADDRESS from the environment, as `ray job submit` reads them
    address: Optional[str] = None
    python: str = "python"  # the interpreter on the cluster that has llmc_ray's dependencies
    working_dir: Optional[str] = None  # shipped with each job; null: this project's root (llmc_ray/ + conf/)
    excludes: List[str] = field(default_factory=lambda: list(jobs.DEFAULT_EXCLUDES))
    env_vars: Dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float = 0  # the driver only schedules; the actors reserve dist.cpus_per_actor each
    max_concurrent: int = 0  # jobs running at once; 0: all
    stream_logs: bool = True
    poll_s: float = 1.0


class RayJobsLauncher(PointLauncher):
    job_id_prefix = "ray_job"

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = RayJobsLauncherConf(**{k: v for k, v in params.items() if k != "_target_"})

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        p = self.params
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        client = jobs.job_client(p.address)
        env = jobs.runtime_env(p.working_dir, p.excludes, p.env_vars)
        log.info("Ray Jobs launcher: %d jobs to %s, working_dir %s, sweep dir %s", len(job_overrides),
                 p.address or "(RAY_API_SERVER_ADDRESS/RAY_ADDRESS)", env["working_dir"], sweep_dir)
        specs = []
        for k, overrides in enumerate(job_overrides):
            idx = initial_job_idx + k
            cfg = self._job_config(overrides, idx)
            out = Path(cfg.hydra.runtime.output_dir)
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            specs.append((idx, list(overrides), cfg, out))
        submitted: Dict[int, str] = {}
        try:
            finished = asyncio.run(self._run_all(client, env, specs, submitted))
        except BaseException:  # Ctrl-C or a client error: leave no orphan jobs running on the cluster
            for idx, sid in submitted.items():
                try:
                    client.stop_job(sid)
                except Exception:
                    pass
            raise
        rets = []
        for (idx, overrides, cfg, out), (sid, status, message) in zip(specs, finished):
            if status == "SUCCEEDED":
                res = out / "results.json"
                ret = self._job_return(cfg, overrides, out, json.loads(res.read_text()) if res.is_file() else None,
                                       ok=True)
            else:
                ret = self._job_return(cfg, overrides, out, RuntimeError(
                    f"Ray job {sid} (sweep job {idx}) {status}: {(message or '').strip()[-2000:]} "
                    f"[logs: {out / 'ray_job.log'}]"), ok=False)
            self.hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
            rets.append(ret)
        return rets

    async def _run_all(self, client, env: Dict[str, Any], specs, submitted: Dict[int, str]):
        p = self.params
        sem = asyncio.Semaphore(p.max_concurrent if p.max_concurrent > 0 else len(specs) or 1)
        submit_lock = asyncio.Lock()  # one upload of the working_dir package, then cache hits

        async def one(idx: int, overrides: List[str], cfg: DictConfig, out: Path):
            async with sem:
                out.mkdir(parents=True, exist_ok=True)
                sid = jobs.new_submission_id(str(idx))
                record = {"submission_id": sid, "overrides": overrides, "status": "SUBMITTING",
                          "address": p.address, "entrypoint": jobs.entrypoint(p.python, overrides, str(out))}
                jobs.write_json(out / RAY_JOB_FILE, record)
                async with submit_lock:
                    await asyncio.to_thread(client.submit_job, entrypoint=record["entrypoint"], runtime_env=env,
                                            submission_id=sid, entrypoint_num_cpus=p.entrypoint_num_cpus,
                                            metadata={"llmc_ray_sweep_job": str(idx)})
                submitted[idx] = sid
                log.info("#%d submitted as Ray job %s", idx, sid)
                if p.stream_logs:
                    await jobs.tail(client, sid, lambda ln: print(ln, flush=True), prefix=f"[job {idx}] ")
                status = await jobs.wait(client, sid, p.poll_s)
                info = await asyncio.to_thread(client.get_job_info, sid)
                logs = await asyncio.to_thread(client.get_job_logs, sid)
                (out / "ray_job.log").write_text(logs)
                record.update(status=status, message=getattr(info, "message", None))
                jobs.write_json(out / RAY_JOB_FILE, record)
                log.info("#%d %s (Ray job %s)", idx, status, sid)
                return sid, status, record["message"]

        return await asyncio.gather(*(one(*s) for s in specs))


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/launcher", name="ray_jobs", node=RayJobsLauncherConf,
                                 provider="llmc_ray")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m llmc_ray --multirun hydra/launcher=ray_jobs hydra.launcher.address=... ...")
