"""Calibration and evaluation tokens: config section + tokenizer -> one dense LongTensor.

The driver calls these once and `ray.put`s the result; nothing downstream sees text or datasets.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from ..config import CalibConfig, ConfigError, EvalConfig
from .preproc import PREPROCESSORS, encode, get_preproc
from .sources import HUB_SOURCES, load_texts

C4_EVAL_DOCS = 1100  # GPTQ/llmc: c4 perplexity reads the first 1100 validation documents ...
C4_EVAL_WINDOWS = 256  # ... and keeps the first 256 * seq_len tokens of them


def load_calib_tokens(cfg: CalibConfig, tokenizer: Any) -> torch.Tensor:
    """LongTensor[n_samples, seq_len] of calibration tokens, made by the `cfg.preproc` preprocessor."""
    preproc = get_preproc(cfg.preproc)
    texts = load_texts(cfg.name, cfg.path, "calib", cfg.select)
    tokens = preproc(texts, tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed)
    if tokens.dtype != torch.long or tuple(tokens.shape) != (cfg.n_samples, cfg.seq_len):
        raise AssertionError(f"preproc {cfg.preproc} returned {tokens.dtype}{tuple(tokens.shape)}, "
                             f"expected torch.int64{(cfg.n_samples, cfg.seq_len)}")
    return tokens


def _join_c4(texts: List[str]) -> str:
    return " ".join(texts[:C4_EVAL_DOCS])


EVAL_JOIN: Dict[str, Callable[[List[str]], str]] = {
    "wikitext2": "\n\n".join,  # GPTQ: the whole test split, empty lines included
    "c4": _join_c4,
    "ptb": " ".join,  # sentences
    "custom": "\n\n".join,
}


def load_eval_tokens(cfg: EvalConfig, tokenizer: Any) -> torch.Tensor:
    """LongTensor[n_windows, seq_len]: the eval text tokenized once and cut into non-overlapping windows.

    This is GPTQ/llmc's perplexity setup (the tail shorter than seq_len is dropped; c4 keeps only its first
    256 windows' worth of tokens), so the same model and seq_len give llmc's perplexity.
    """
    if cfg.num_samples is not None and cfg.num_samples <= 0:
        raise ConfigError(f"eval.num_samples={cfg.num_samples}: use a positive number of windows, or null for all")
    texts = load_texts(cfg.name, cfg.path, "eval", cfg.select)
    ids = encode(tokenizer, EVAL_JOIN[cfg.name](texts))
    if cfg.name == "c4":
        ids = ids[:C4_EVAL_WINDOWS * cfg.seq_len]
    n = len(ids) // cfg.seq_len
    if n == 0:
        raise ConfigError(f"eval text has {len(ids)} tokens, eval.seq_len = {cfg.seq_len} needs more: "
                          "lower eval.seq_len or point eval.path at more text")
    if cfg.num_samples is not None:
        n = min(n, cfg.num_samples)
    return torch.tensor(ids[:n * cfg.seq_len], dtype=torch.long).view(n, cfg.seq_len)


__all__ = ["HUB_SOURCES", "PREPROCESSORS", "get_preproc", "load_calib_tokens", "load_eval_tokens", "load_texts"]
