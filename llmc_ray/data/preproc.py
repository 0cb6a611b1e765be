"""Calibration preprocessors: texts -> LongTensor[n_samples, seq_len], one function per llmc `preproc` name.

Each follows the rule of llmc's function of the same name (llmc/data/dataset/specified_preproc.py, and
`general_preproc` in base_dataset.py), with two kinds of change, each noted where it happens:
- randomness comes from a local generator seeded with `calib.seed` (never the process-global one), and
  where llmc shuffles a `datasets.Dataset` we draw the same permutation that `Dataset.shuffle(seed)` draws;
- llmc may return fewer or ragged samples; ours always return exactly `n_samples` rows of `seq_len`
  (the block loop and the Ray payload want one dense tensor), or raise ConfigError saying what to change.
Texts are tokenized the way llmc does (`tokenizer(text)`: with the tokenizer's special tokens, e.g. BOS).
"""
from __future__ import annotations

import logging
import random
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Sequence, Set

import numpy as np
import torch

from ..config import ConfigError

log = logging.getLogger(__name__)

Preproc = Callable[[Sequence[str], Any, int, int, int], torch.Tensor]

_FIX = "lower calib.n_samples or calib.seq_len, or point calib.path at more text"


def encode(tokenizer: Any, text: str) -> List[int]:
    """Token ids of one text, special tokens included as the tokenizer adds them (llmc's `tokenizer(text)`)."""
    return list(tokenizer(text)["input_ids"])


def too_little(have: int, what: str, need: int, note: str = "") -> ConfigError:
    """The one-line error every preprocessor raises when the text cannot fill its rows."""
    return ConfigError(f"calibration text has {have} tokens{note}, {what} = {need} needs more: {_FIX}")


def _random_windows(ids: Sequence[int], n_samples: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    """GPTQ's sampler: n windows of seq_len with starts uniform in [0, len - seq_len - 1], with replacement.

    The start range excludes the last window, as GPTQ/llmc do (`randint(0, len - seq_len - 1)`), so the text
    needs seq_len + 1 tokens. Windows may overlap; fewer than n*seq_len tokens is allowed (llmc allows it)
    but logged, since such rows repeat each other.
    """
    need = seq_len + 1
    if len(ids) < need:
        raise too_little(len(ids), "calib.seq_len+1", need)
    if len(ids) < n_samples * seq_len:
        log.warning("calibration text has %d tokens < calib.n_samples*calib.seq_len = %d: windows will overlap",
                    len(ids), n_samples * seq_len)
    stream = torch.tensor(ids, dtype=torch.long)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n_samples)]
    return torch.stack([stream[s:s + seq_len] for s in starts])


def _dataset_shuffle_order(n: int, seed: int) -> List[int]:
    """The row order `datasets.Dataset.shuffle(seed=seed)` gives (numpy PCG64 permutation), from a local rng."""
    return np.random.default_rng(seed).permutation(n).tolist()


def wikitext2_gptq(texts: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """GPTQ's wikitext2 calibration: tokenize "\\n\\n".join(texts) once, take n random windows."""
    return _random_windows(encode(tokenizer, "\n\n".join(texts)), n_samples, seq_len, random.Random(seed))


def ptb_gptq(texts: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """GPTQ's ptb calibration: as wikitext2_gptq, but sentences are joined with a space."""
    return _random_windows(encode(tokenizer, " ".join(texts)), n_samples, seq_len, random.Random(seed))


def random_truncate_txt(texts: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int,
                        seed: int) -> torch.Tensor:
    """llmc(-tpu)'s custom-txt rule: shuffle the samples, join with "\\n\\n", take n random windows.

    A window falls inside a sample long enough to hold it, or spans several shorter ones: that is how short
    lines of a custom .txt get concatenated. One rng drives the shuffle and the window starts, as in llmc.
    """
    rng = random.Random(seed)
    shuffled = list(texts)
    rng.shuffle(shuffled)
    return _random_windows(encode(tokenizer, "\n\n".join(shuffled)), n_samples, seq_len, rng)


def c4_gptq(texts: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """GPTQ's c4 calibration: per row, draw random documents until one is long enough, then a random window.

    Long enough means seq_len + 1 tokens (GPTQ/llmc test `>= seq_len` and then crash on exactly seq_len, as
    their window start is drawn from [0, len - seq_len - 1]). The draw sequence is llmc's; documents found
    too short are remembered so that text with no long document raises instead of looping forever.
    """
    rng = random.Random(seed)
    need = seq_len + 1
    short: Set[int] = set()
    longest = 0
    if not texts:
        raise too_little(0, "calib.seq_len+1", need, note=" in its longest document")
    rows = []
    for _ in range(n_samples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            if i in short:
                continue
            ids = encode(tokenizer, texts[i])
            if len(ids) >= need:
                break
            short.add(i)
            longest = max(longest, len(ids))
            if len(short) == len(texts):
                raise too_little(longest, "calib.seq_len+1", need, note=" in its longest document")
        s = rng.randint(0, len(ids) - seq_len - 1)
        rows.append(torch.tensor(ids[s:s + seq_len], dtype=torch.long))
    return torch.stack(rows)


def pileval_awq(texts: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """AWQ's pile calibration: shuffled samples, each tokenized alone, concatenated, cut into seq_len blocks.

    As in llmc: the order is `Dataset.shuffle(seed)`'s, samples are stripped, samples of more than seq_len
    tokens (AutoAWQ: 512) and empty ones are skipped. llmc stops after n_samples *samples* and returns
    however many whole blocks they fill (usually far fewer than n_samples); we keep collecting samples until
    n_samples*seq_len tokens fill exactly n_samples blocks.
    """
    need = n_samples * seq_len
    stream: List[int] = []
    for i in _dataset_shuffle_order(len(texts), seed):
        line = texts[i].strip()
        if not line:
            continue
        ids = encode(tokenizer, line)
        if 0 < len(ids) <= seq_len:
            stream.extend(ids)
            if len(stream) >= need:
                break
    if len(stream) < need:
        raise too_little(len(stream), "calib.n_samples*calib.seq_len", need,
                         note=" in samples of at most calib.seq_len tokens")
    return torch.tensor(stream[:need], dtype=torch.long).view(n_samples, seq_len)


def general(texts: Sequence[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """llmc's `general`: shuffled samples (`Dataset.shuffle(seed)` order), each tokenized alone, first seq_len tokens.

    llmc drops every sample shorter than seq_len, which leaves nothing of a custom .txt of short lines. Here
    short samples are instead concatenated, in shuffled order, until they reach seq_len; that row keeps the
    first seq_len tokens and the rest of the last sample is dropped, so every row starts at a sample's start
    (with its BOS, as in llmc). Long samples give their first seq_len tokens, exactly as in llmc. Blank
    samples are skipped.
    """
    rows: List[List[int]] = []
    pending: List[int] = []
    seen = 0
    for i in _dataset_shuffle_order(len(texts), seed):
        if not texts[i].strip():
            continue
        ids = encode(tokenizer, texts[i])
        seen += len(ids)
        if len(ids) < seq_len:
            pending.extend(ids)
            if len(pending) < seq_len:
                continue
            ids, pending = pending, []
        rows.append(ids[:seq_len])
        if len(rows) == n_samples:
            return torch.tensor(rows, dtype=torch.long)
    raise too_little(seen, "calib.n_samples*calib.seq_len", n_samples * seq_len,
                     note=f" and fills {len(rows)} rows (each row starts at a sample)")


PREPROCESSORS: Mapping[str, Preproc] = MappingProxyType({
    "pileval_awq": pileval_awq,
    "wikitext2_gptq": wikitext2_gptq,
    "c4_gptq": c4_gptq,
    "ptb_gptq": ptb_gptq,
    "general": general,
    "random_truncate_txt": random_truncate_txt,
})


def get_preproc(name: str) -> Preproc:
    """The preprocessor called `name`, or a ConfigError listing the known ones."""
    if name not in PREPROCESSORS:
        raise ConfigError(f"calib.preproc={name!r}: use one of {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[name]
