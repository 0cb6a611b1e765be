"""Write the calibration and eval tokens of an llmc-ray run to .pt files, so another tool sees exactly them.

    PYTHONPATH=. python bench/llmcompressor/dump_tokens.py --out DIR [hydra overrides, e.g. +experiment=demo]

The config is composed from conf/ with the given overrides exactly as `python -m llmc_ray` composes it, built
into a RunConfig with `llmc_ray.config.build`, and the tokens come from llmc-ray's own data path
(`load_calib_tokens`, `load_eval_tokens`) with the tokenizer of the resolved model directory (a GGUF is
converted once into a cached HF directory, which is also what `--model` of run_llmcompressor.py should be).
Writes DIR/calib.pt (int64 [n_samples, seq_len]), DIR/eval.pt (int64 [windows, seq_len]) and DIR/tokens.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from llmc_ray.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    # save.save_path interpolates the Hydra run dir, which exists only inside a Hydra run: not needed here
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "calib", "eval", "quant", "run")}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of an llmc-ray run, e.g. +experiment=demo")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from llmc_ray.checkpoint import resolve_model_dir
    from llmc_ray.config import build
    from llmc_ray.data import load_calib_tokens, load_eval_tokens

    cfg = build(compose(args.overrides))
    model_dir = resolve_model_dir(cfg.model.path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calib_tokens(cfg.calib, tok)
    evals = load_eval_tokens(cfg.eval, tok)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(calib, args.out / "calib.pt")
    torch.save(evals, args.out / "eval.pt")
    meta = {"overrides": args.overrides, "model_dir": str(model_dir),
            "calib": {"shape": list(calib.shape), "sha256_16": digest(calib), "name": cfg.calib.name,
                      "path": cfg.calib.path, "select": cfg.calib.select, "preproc": cfg.calib.preproc,
                      "seed": cfg.calib.seed},
            "eval": {"shape": list(evals.shape), "sha256_16": digest(evals), "name": cfg.eval.name,
                     "path": cfg.eval.path, "select": cfg.eval.select}}
    (args.out / "tokens.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
