"""`python -m llmc_ray +experiment=NAME [overrides...]`"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from .config import ConfigError, from_hydra, register_configs

register_configs()
log = logging.getLogger("llmc_ray")


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from .run import format_table, run

    try:
        rc = from_hydra(cfg)
        results = run(rc)
    except ConfigError as e:  # a user error: one line, no traceback
        print(f"llmc_ray: config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(results))
    print(f"results: {rc.save.save_path}/results.json")


if __name__ == "__main__":
    main()
