"""What our Hydra launchers share: each sweep point's composed config and output dir, as BasicLauncher makes
them, and the JobReturn Hydra's callbacks (SweepSummary) expect."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


class PointLauncher(Launcher):
    job_id_prefix = "job"

    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        """Job `idx`'s config with hydra.job.* and hydra.runtime.output_dir set (and made current, so
        ${hydra:runtime.output_dir} resolves to this job's dir)."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{self.job_id_prefix}_{idx}"
            cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)  # hydra.sweep.subdir may name hydra.job.*
        out = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out.resolve())
        HydraConfig.instance().set_config(cfg)
        return cfg

    @staticmethod
    def _job_return(cfg: DictConfig, overrides: Sequence[str], out: Path, value: Any, ok: bool) -> JobReturn:
        ret = JobReturn(overrides=list(overrides), working_dir=str(out), task_name=str(cfg.hydra.job.name))
        ret.hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra, resolve=False)})
        ret.cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        ret.status = JobStatus.COMPLETED if ok else JobStatus.FAILED
        ret.return_value = value
        return ret
