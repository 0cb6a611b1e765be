"""One run, as a short script over the pieces: validate → tokens → actors → eval → calibrate → eval → save."""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .config import RunConfig
from .report import write_report
from .validate import make_plan
from .worker import CalibJob, block_checkpoint

log = logging.getLogger(__name__)


class Timer:
    def __init__(self):
        self.timings: Dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def finished_results(cfg: RunConfig) -> Optional[Dict[str, Any]]:
    """A finished results.json in save_path with this very config (a relaunched sweep point), else None."""
    path = Path(cfg.save.save_path) / "results.json"
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # "total" is written only at the very end: a run that died after an eval left a partial file
    if "total" not in prev.get("timings_s", {}) or prev.get("config") != json.loads(json.dumps(asdict(cfg))):
        return None
    saved = {"transformed_model": cfg.save.save_trans, "fake_quant_model": cfg.save.save_fake}
    if not all((path.parent / d / "config.json").is_file() for d, on in saved.items() if on):
        return None
    log.info("reused finished run: %s has the same config, nothing to do", path)
    return prev


CHECKPOINTS = "checkpoints"


def calibration_fingerprint(cfg: RunConfig) -> Dict[str, Any]:
    """What decides the calibrated blocks (not eval, save or the actor count: N actors give identical blocks)."""
    d = asdict(cfg)
    return json.loads(json.dumps({"model": d["model"], "calib": d["calib"], "quant": d["quant"],
                                  "target": d["run"]["target"]}))


def block_checkpoints(cfg: RunConfig, out_dir: Path, n_blocks: int) -> Tuple[Optional[Path], int]:
    """The checkpoint dir for this run and how many leading blocks an earlier run already finished there.
    Checkpoints made with other settings are discarded."""
    if not cfg.save.resume:
        return None, 0
    ckpt_dir = out_dir / CHECKPOINTS
    fp_file = ckpt_dir / "fingerprint.json"
    fingerprint = calibration_fingerprint(cfg)
    if ckpt_dir.exists() and (not fp_file.is_file() or json.loads(fp_file.read_text()) != fingerprint):
        log.warning("discarding block checkpoints in %s: they were made with other settings", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fp_file, fingerprint)
    done = 0
    while done < n_blocks and block_checkpoint(ckpt_dir, done).is_file():
        done += 1
    if done:
        log.info("resuming: blocks 0..%d were finished by an earlier run (%s)", done - 1, ckpt_dir)
    return ckpt_dir, done


def run(cfg: RunConfig) -> Dict[str, Any]:
    if (done := finished_results(cfg)) is not None:
        return done
    from transformers import AutoTokenizer

    from .data import load_calib_tokens, load_eval_tokens
    from .dist import cluster, schedule
    from .synthetic import synthetic_tokens

    timer = Timer()
    t_start = time.perf_counter()
    out_dir = Path(cfg.save.save_path)
    # everything that can fail on user input happens before Ray starts
    with timer("plan"):
        plan = make_plan(cfg)
        if plan.ckpt.synthetic:  # random weights: random tokens serve for timing, never for quality
            tokenizer, vocab = None, plan.ckpt.raw_config()["vocab_size"]
            calib_ids = synthetic_tokens(cfg.calib.n_samples, cfg.calib.seq_len, vocab, cfg.calib.seed)
            eval_ids = synthetic_tokens(cfg.eval.num_samples or 8, cfg.eval.seq_len, vocab, cfg.calib.seed + 1)
        else:
            tokenizer = AutoTokenizer.from_pretrained(plan.ckpt.dir)
            calib_ids = load_calib_tokens(cfg.calib, tokenizer) if plan.method.needs_calib else None
            eval_ids = load_eval_tokens(cfg.eval, tokenizer) if cfg.eval.eval_pos else None
    out_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"eval": {}, "timings_s": timer.timings, "blocks": [],
                               "config": asdict(cfg), "model_dir": str(plan.ckpt.dir)}
    ppl = results["eval"].setdefault(cfg.eval.name, {})
    progress = cfg.run.progress

    def evaluate(pos: str) -> None:
        if pos in cfg.eval.eval_pos:
            with timer(f"eval_{pos}"):
                ppl[pos] = schedule.perplexity(group, eval_ids, cfg.eval.bs, f"eval {pos}", progress)
            log.info("%s PPL (%s): %.4f", cfg.eval.name, pos, ppl[pos])
            write_json_atomic(out_dir / "results.json", results)

    cluster.init_ray(cfg.dist)
    with timer("load"):
        plans = cluster.plan_workers(plan.ckpt, plan.spec, plan.n_layers, cfg.dist, plan.model_type, plan.dtype)
        group = cluster.ActorGroup(plans, cfg.dist)
        results["actors"] = group.load()
    try:
        evaluate("pretrain")
        with timer("calibrate"):
            if plan.method.needs_calib:
                sequential = cfg.dist.schedule == "sequential"  # only llmc's order checkpoints blocks (for now)
                ckpt_dir, done = block_checkpoints(cfg, out_dir, plan.n_layers) if sequential else (None, 0)
                job = CalibJob(plan.method.name, dict(cfg.quant.special), plan.qspec, cfg.quant.quant_out,
                               str(ckpt_dir) if ckpt_dir else None)
                if sequential:
                    results["blocks"] = schedule.calibrate_sequential(group, calib_ids, cfg.calib.bs, job,
                                                                      plan.n_layers, progress, done=done)
                else:
                    results["blocks"] = schedule.calibrate_parallel(group, calib_ids, cfg.calib.bs, job,
                                                                    plan.n_layers, progress)
            else:
                group.call_all("rtn_all", plan.qspec)
        evaluate("transformed")
        if cfg.save.save_trans:
            with timer("save_trans"):
                schedule.export_hf(group, out_dir / "transformed_model", plan.ckpt.dir, tokenizer, dtype=plan.dtype)
        if "fake_quant" in cfg.eval.eval_pos or cfg.save.save_fake:
            group.call_all("to_fake_quant")
        evaluate("fake_quant")
        if cfg.save.save_fake:
            with timer("save_fake"):
                schedule.export_hf(group, out_dir / "fake_quant_model", plan.ckpt.dir, tokenizer, dtype=plan.dtype)
        results["memory"] = group.call_all("memory")
    finally:
        group.shutdown()
    timer.timings["total"] = round(time.perf_counter() - t_start, 3)
    write_json_atomic(out_dir / "results.json", results)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # finished: results.json now answers a relaunch
    write_report(results, out_dir)
    return results


def format_table(results: Dict[str, Any]) -> str:
    rows = ["| eval | " + " | ".join(("pretrain", "transformed", "fake_quant")) + " |", "|---|---|---|---|"]
    for name, by_pos in results["eval"].items():
        cells = [f"{by_pos[p]:.4f}" if p in by_pos else "-" for p in ("pretrain", "transformed", "fake_quant")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    t = results["timings_s"]
    rows.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(rows)
