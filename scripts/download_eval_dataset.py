"""Download llmc's perplexity datasets from the HF hub and `save_to_disk` them under <save_path>/<name>.

For hosts without hub access: run this where the hub is reachable, copy the folder over, and set
`eval.path=<save_path>/<name>`. Splits are the eval ones (wikitext2/ptb: test, c4: the first validation
shard), the same as llmc's tools/download_eval_dataset.py. Keep calib and eval downloads in different
save_paths: both use <name>/ folders.

    python scripts/download_eval_dataset.py --dataset_name wikitext2 c4 --save_path ./eval_data
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling calib script holds the shared code

from download_calib_dataset import hub_load_dataset, run_cli  # noqa: E402

ROLE = "eval"
NAMES = ("c4", "wikitext2", "ptb")


def main(argv: Optional[Sequence[str]] = None, loader: Callable[..., Any] = hub_load_dataset) -> int:
    """CLI entry; `loader` stands in for `datasets.load_dataset` (tests pass a local one)."""
    return run_cli(argv, NAMES, __doc__, ROLE, loader)


if __name__ == "__main__":
    sys.exit(main())
