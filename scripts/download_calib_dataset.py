"""Download llmc's calibration datasets from the HF hub and `save_to_disk` them under <save_path>/<name>.

For hosts without hub access: run this where the hub is reachable, copy the folder over, and set
`calib.path=<save_path>/<name>`. The hub ids, shards and splits are the ones `llmc_ray.data.sources` (and
llmc's tools/download_calib_dataset.py) use, so what is saved is what an online run would read.

    python scripts/download_calib_dataset.py --dataset_name pileval wikitext2 --save_path ./calib_data
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a checkout

from llmc_ray.data.sources import HUB_SOURCES  # noqa: E402

ROLE = "calib"
NAMES = ("pileval", "c4", "wikitext2", "ptb")
log = logging.getLogger("download_calib_dataset")


def hub_load_dataset(*args: Any, **kwargs: Any) -> Any:
    """The real loader: `datasets.load_dataset` (imported late so `--help` works without datasets)."""
    from datasets import load_dataset

    return load_dataset(*args, **kwargs)


def download(names: Sequence[str], save_path: Path, role: str,
             loader: Callable[..., Any] = hub_load_dataset) -> List[Path]:
    """Load each dataset's `role` split with `loader` and save it to save_path/<name>; return the folders.

    Each is written to a sibling temp folder first and renamed into place, so an interrupted download never
    leaves a half-written dataset where a run would read it.
    """
    written = []
    for name in names:
        args, kwargs = HUB_SOURCES[name].request(role)
        log.info("loading %s: load_dataset(%s, %s)", name, args, kwargs)
        ds = loader(*args, **kwargs)
        dest = save_path / name
        tmp = save_path / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        log.info("saved %s (%d rows) to %s", name, len(ds), dest)
        written.append(dest)
    return written


def parse_args(argv: Optional[Sequence[str]], names: Sequence[str], doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--dataset_name", nargs="+", default=list(names), choices=list(names),
                        help=f"one or more of {', '.join(names)} (default: all)")
    parser.add_argument("--save_path", type=Path, required=True, help="folder to hold <name>/ subfolders")
    return parser.parse_args(argv)


def run_cli(argv: Optional[Sequence[str]], names: Sequence[str], doc: str, role: str,
            loader: Callable[..., Any]) -> int:
    """The shared body of both download scripts: parse, download each name, print the config key to set."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv, names, doc)
    args.save_path.mkdir(parents=True, exist_ok=True)
    for dest in download(args.dataset_name, args.save_path, role, loader):
        print(f"{role}.path={dest}")
    return 0


def main(argv: Optional[Sequence[str]] = None, loader: Callable[..., Any] = hub_load_dataset) -> int:
    """CLI entry; `loader` stands in for `datasets.load_dataset` (tests pass a local one)."""
    return run_cli(argv, NAMES, __doc__, ROLE, loader)


if __name__ == "__main__":
    sys.exit(main())
