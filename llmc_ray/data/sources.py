"""Where calibration and evaluation text comes from: local files, `save_to_disk` copies, or the HF hub.

Everything here ends in a plain `list[str]` of samples; tokenization lives in `preproc.py` / `__init__.py`.
Hub datasets are read exactly as llmc reads them (same ids, shards and splits, every row kept — GPTQ's
wikitext2 perplexity counts the empty lines joined by "\\n\\n"), so the same settings give llmc's numbers.
Custom text is dropped of blank samples, since a blank calibration sample carries nothing.

`role` ("calib" or "eval") picks the split and names the config section in error messages.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..config import ConfigError

log = logging.getLogger(__name__)

ROLES = ("calib", "eval")
HUB_NAMES = ("pileval", "wikitext2", "c4", "ptb")
TXT_GLOB = "*.txt"
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*$")


@dataclass(frozen=True)
class HubSource:
    """How llmc fetches one hub dataset (llmc/data/dataset/base_dataset.py, llmc/eval/eval_base.py)."""

    repo: str
    config_name: Optional[str]
    splits: Mapping[str, str]  # role -> split
    column: str = "text"
    data_files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # role -> {split: file}

    def request(self, role: str) -> Tuple[Tuple[str, ...], Dict[str, Any]]:
        """Positional and keyword arguments for `datasets.load_dataset` for this role."""
        args = (self.repo,) if self.config_name is None else (self.repo, self.config_name)
        kwargs: Dict[str, Any] = {"split": self.splits[role]}
        if role in self.data_files:
            kwargs["data_files"] = dict(self.data_files[role])
        return args, kwargs


HUB_SOURCES: Mapping[str, HubSource] = {
    "pileval": HubSource("mit-han-lab/pile-val-backup", None, {"calib": "validation", "eval": "validation"}),
    "wikitext2": HubSource("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}),
    "c4": HubSource("allenai/c4", None, {"calib": "train", "eval": "validation"},
                    data_files={"calib": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                "eval": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}),
    "ptb": HubSource("ptb_text_only", "penn_treebank", {"calib": "train", "eval": "test"}, column="sentence"),
}

HubLoader = Callable[..., Any]  # datasets.load_dataset's signature


def load_texts(name: str, path: Optional[str], split_role: str, select: Optional[str] = None, *,
               hub_loader: Optional[HubLoader] = None) -> List[str]:
    """The samples of dataset `name` for `split_role`, read from `path` (or the hub when a hub name has none).

    `select` narrows what is read: a glob on file names for a directory of .txt files, otherwise a slice
    "a:b" over samples (so calibration and evaluation can take disjoint parts of one corpus).
    `hub_loader` replaces `datasets.load_dataset` (tests; other mirrors).
    """
    if split_role not in ROLES:
        raise ValueError(f"split_role={split_role!r}: use one of {ROLES}")
    if name != "custom" and name not in HUB_SOURCES:
        raise ConfigError(f"{split_role}.name={name!r}: use custom or one of {HUB_NAMES}")
    if path:
        texts = _read_path(name, Path(path).expanduser(), split_role, select)
    elif name == "custom":
        raise ConfigError(f"{split_role}.name=custom needs {split_role}.path "
                          "(a .txt with one sample a line, a .jsonl, a directory of .txt, or a save_to_disk dataset)")
    else:
        texts = _apply_slice(_read_hub(name, split_role, hub_loader), select, split_role)
    if not texts:
        raise ConfigError(f"{split_role}.path={path!r} (select={select!r}) holds no text: "
                          f"point {split_role}.path at non-empty data or widen {split_role}.select")
    return texts


# ---------------------------------------------------------------- local paths

def _read_path(name: str, path: Path, role: str, select: Optional[str]) -> List[str]:
    """Dispatch on what `path` is; hub names only accept a `save_to_disk` copy (what the scripts write)."""
    if not path.exists():
        raise ConfigError(f"{role}.path={str(path)!r} does not exist: fix the path"
                          + ("" if name == "custom" else
                             f" or run scripts/download_{role}_dataset.py --dataset_name {name} --save_path DIR"))
    if _is_saved_dataset(path):
        return _apply_slice(_read_saved(name, path, role), select, role)
    if name != "custom":
        raise ConfigError(f"{role}.name={name} reads a datasets.save_to_disk directory, but {role}.path={str(path)!r} "
                          f"is not one: run scripts/download_{role}_dataset.py, or use {role}.name=custom")
    if path.is_dir():
        return _read_txt_dir(path, role, select)
    if path.suffix == ".txt":
        return _apply_slice(_read_txt_lines(path), select, role)
    if path.suffix == ".jsonl":
        return _apply_slice(_read_jsonl(path, role), select, role)
    raise ConfigError(f"{role}.path={str(path)!r}: expected a .txt, a .jsonl, a directory of .txt files "
                      "or a directory written by datasets' save_to_disk")


def _is_saved_dataset(path: Path) -> bool:
    """save_to_disk leaves state.json (Dataset) or dataset_dict.json (DatasetDict) at the top."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _read_txt_lines(path: Path) -> List[str]:
    """llmc-tpu's custom format: one sample a line; blank lines are no samples."""
    with path.open(encoding="utf-8") as f:
        return [s for s in (line.strip() for line in f) if s]


def _read_jsonl(path: Path, role: str) -> List[str]:
    """One JSON object a line with a `text` string; blank lines skipped, blank texts dropped."""
    texts: List[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{role}.path={str(path)!r} line {lineno}: expected a JSON object with a "
                                  "\"text\" field") from None
            if not isinstance(text, str):
                raise ConfigError(f"{role}.path={str(path)!r} line {lineno}: \"text\" must be a string")
            if text.strip():
                texts.append(text)
    return texts


def _read_txt_dir(path: Path, role: str, select: Optional[str]) -> List[str]:
    """Each file one document, in file-name order; `select` is a glob on names (or a slice over files)."""
    files = sorted(p for p in path.glob(TXT_GLOB if select is None or _SLICE.match(select) else select)
                   if p.is_file())
    if select is not None and _SLICE.match(select):
        files = _apply_slice(files, select, role)
    if not files:
        raise ConfigError(f"{role}.path={str(path)!r} has no files matching {role}.select="
                          f"{select or TXT_GLOB!r}: fix the glob (it matches file names, e.g. \"19*.txt\")")
    texts = [p.read_text(encoding="utf-8").strip() for p in files]
    return [t for t in texts if t]


def _apply_slice(items: Sequence[Any], select: Optional[str], role: str) -> List[Any]:
    """`select="a:b"` keeps items[a:b]; anything else is an error outside a directory of .txt files."""
    if select is None:
        return list(items)
    m = _SLICE.match(select)
    if not m:
        raise ConfigError(f"{role}.select={select!r}: here select is a slice \"start:stop\" over samples "
                          "(globs like \"19*.txt\" apply to a directory of .txt files)")
    lo, hi = (int(g) if g is not None else None for g in m.groups())
    return list(items[lo:hi])


# ---------------------------------------------------------------- save_to_disk copies

def _read_saved(name: str, path: Path, role: str) -> List[str]:
    """A Dataset or DatasetDict from save_to_disk: pick this role's split, then the text column."""
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds[_pick_split(name, list(ds.keys()), role, path)]
    else:
        _check_split(name, ds.split, role, path)
    return _column(ds, name, role, path)


def _expected_split(name: str, role: str) -> Optional[str]:
    return HUB_SOURCES[name].splits[role] if name in HUB_SOURCES else None


def _pick_split(name: str, splits: List[str], role: str, path: Path) -> str:
    """Hub names: llmc's split (pileval: the only one will do). Custom: train for calib, test/validation for eval."""
    want = _expected_split(name, role)
    prefs = [want] if want else (["train"] if role == "calib" else ["test", "validation"])
    for s in prefs:
        if s in splits:
            return s
    if len(splits) == 1 and (name in ("custom", "pileval")):
        return splits[0]
    raise ConfigError(f"{role}.path={str(path)!r} has splits {splits}, none of {prefs} that {role} "
                      f"{name} reads: save that split there")


def _check_split(name: str, split: Any, role: str, path: Path) -> None:
    """A lone saved Dataset remembers its split: warn when calibration would read the eval split or vice versa."""
    want = _expected_split(name, role)
    if want and split is not None and str(split) != want:
        log.warning("%s.path=%s holds split %r, but %s %s reads %r (llmc's choice)", role, path, str(split),
                    role, name, want)


def _column(ds: Any, name: str, role: str, path: Path) -> List[str]:
    """The text column (ptb: `sentence`), every row kept as is so hub joins match llmc's."""
    want = HUB_SOURCES[name].column if name in HUB_SOURCES else "text"
    for col in (want, "text", "sentence"):
        if col in ds.column_names:
            return [t if t is not None else "" for t in ds.select_columns([col]).to_dict()[col]]  # honours indices
    raise ConfigError(f"{role}.path={str(path)!r} has columns {ds.column_names}, no {want!r}: "
                      f"rename the text column to {want!r}")


# ---------------------------------------------------------------- the hub

def _read_hub(name: str, role: str, hub_loader: Optional[HubLoader]) -> List[str]:
    """llmc's `load_dataset` call; any failure (no network, no access) becomes a one-line fix-it message."""
    if hub_loader is None:
        from datasets import load_dataset as hub_loader
    args, kwargs = HUB_SOURCES[name].request(role)
    try:
        ds = hub_loader(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, auth and cache errors all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{role}.name={name} with no {role}.path loads {args[0]} from the Hugging Face hub, "
                          f"which failed ({type(e).__name__}: {first}): run scripts/download_{role}_dataset.py "
                          f"--dataset_name {name} --save_path DIR on a machine with hub access, then set "
                          f"{role}.path=DIR/{name}") from None
    return _column(ds, name, role, Path(args[0]))

