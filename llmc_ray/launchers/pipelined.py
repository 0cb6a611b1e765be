"""Hydra launcher `hydra/launcher=pipelined`: every point of a --multirun shares one set of loaded actors.

    python -m llmc_ray --multirun hydra/launcher=pipelined +experiment=demo quant.weight.bit=3,4 \\
        quant.weight.group_size=32,64

The model is loaded once, the pretrain PPL measured once, and the points' calibrations are submitted one after
the other into the actor chain, so actor k works on point j+1 while actor k+1 works on point j (see
`llmc_ray.run.run_many`). Points may differ in quant/save/run (and calib under the sequential schedule); each
still gets its own output dir, results.json, report and saved models, and SweepSummary works as with the
default launcher. Each actor keeps one copy of its blocks per point: GPU memory grows with the point count.
Registered through hydra_plugins/llmc_ray_launchers (a Hydra plugin namespace package).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.utils import JobReturn, _save_config, configure_log, filter_overrides, setup_globals
from omegaconf import OmegaConf

from ..config import ConfigError, from_hydra
from .base import PointLauncher

log = logging.getLogger(__name__)


@dataclass
class PipelinedLauncherConf:
    _target_: str = "hydra_plugins.llmc_ray_launchers.pipelined_launcher.PipelinedLauncher"


class PipelinedLauncher(PointLauncher):
    job_id_prefix = "pipelined"

    def __init__(self, **params: Any) -> None:
        super().__init__()

    def _prepare(self, overrides: Sequence[str], idx: int):
        """The point's config, its output dir with .hydra/ written as BasicLauncher writes it, and the typed
        RunConfig (or the ConfigError that rules the point out)."""
        cfg = self._job_config(overrides, idx)
        out = Path(cfg.hydra.runtime.output_dir)
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        if cfg.hydra.output_subdir is not None:
            hydra_dir = out / str(cfg.hydra.output_subdir)
            _save_config(task_cfg, "config.yaml", hydra_dir)
            _save_config(OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra, resolve=False)}),
                         "hydra.yaml", hydra_dir)
            _save_config(cfg.hydra.overrides.task, "overrides.yaml", hydra_dir)
        try:
            run_cfg: Any = from_hydra(task_cfg)
        except ConfigError as e:
            run_cfg = e
        return cfg, out, run_cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ..run import run_many

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        log.info("pipelined launcher: %d points through one set of actors, sweep dir %s", len(job_overrides),
                 self.config.hydra.sweep.dir)
        points: List[tuple] = []
        for k, overrides in enumerate(job_overrides):
            idx = initial_job_idx + k
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            points.append((list(overrides), *self._prepare(overrides, idx)))
        runnable = [p for p in points if not isinstance(p[3], ConfigError)]
        try:
            outcome = iter(run_many([p[3] for p in runnable]) if runnable else [])
        except ConfigError as e:  # the points cannot share actors: every point fails with the reason
            outcome = iter([e] * len(runnable))
        rets = []
        for overrides, cfg, out, run_cfg in points:
            value = run_cfg if isinstance(run_cfg, ConfigError) else next(outcome)
            ret = self._job_return(cfg, overrides, out, value, ok=not isinstance(value, BaseException))
            self.hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
            rets.append(ret)
        return rets


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/launcher", name="pipelined", node=PipelinedLauncherConf,
                                 provider="llmc_ray")
