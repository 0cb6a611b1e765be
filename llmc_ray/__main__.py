"""`python -m llmc_ray +experiment=NAME [overrides...]`"""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import ConfigError, from_hydra, register_configs

register_configs()
log = logging.getLogger("llmc_ray")


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from .dist.schedule import ActorLost
    from .run import format_table, run

    try:
        rc = from_hydra(cfg)
        results = run(rc)
    except ConfigError as e:  # a user error: one line, no traceback
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this sweep point as failed and goes on with the others
        print(f"llmc_ray: config error: {e}", file=sys.stderr)
        sys.exit(2)
    except ActorLost as e:  # what was finished is on disk; say how to go on
        print(f"llmc_ray: {e}", file=sys.stderr)
        sys.exit(3)
    print(format_table(results))
    print(f"results: {rc.save.save_path}/results.json")


def _multirun_flag_first(argv: list) -> list:
    """`python -m llmc_ray a=1 --multirun b=1,2` works too: argparse wants overrides in one run, so the flag
    (which takes no value) moves in front of them."""
    flags = [a for a in argv[1:] if a in ("--multirun", "-m")]
    return argv[:1] + flags + [a for a in argv[1:] if a not in ("--multirun", "-m")]


if __name__ == "__main__":
    sys.argv = _multirun_flag_first(sys.argv)
    main()
