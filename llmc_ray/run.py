"""One run, as a short script over the pieces: validate → tokens → actors → eval → calibrate → eval → save."""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .config import ConfigError, RunConfig
from .report import write_report
from .validate import make_plan
from .worker import CalibJob, block_checkpoint, block_ranges

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


def block_checkpoints(cfg: RunConfig, out_dir: Path, n_blocks: int) -> Tuple[Optional[Path], Set[int]]:
    """The checkpoint dir for this run and the blocks an earlier run already finished there. Checkpoints made
    with other settings are discarded."""
    if not cfg.save.resume:
        return None, set()
    ckpt_dir = out_dir / CHECKPOINTS
    fp_file = ckpt_dir / "fingerprint.json"
    fingerprint = calibration_fingerprint(cfg)
    if ckpt_dir.exists() and (not fp_file.is_file() or json.loads(fp_file.read_text()) != fingerprint):
        log.warning("discarding block checkpoints in %s: they were made with other settings", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(fp_file, fingerprint)
    finished = {i for i in range(n_blocks) if block_checkpoint(ckpt_dir, i).is_file()}
    if finished:
        log.info("resuming: blocks %s were finished by an earlier run (%s)", block_ranges(finished), ckpt_dir)
    return ckpt_dir, finished


def leading(finished: Set[int]) -> int:
    """How many blocks from block 0 on are finished (the sequential schedule resumes after them)."""
    n = 0
    while n in finished:
        n += 1
    return n


# sections every point of a pipelined sweep shares: one loaded model, one eval set, one actor chain
SHARED_SECTIONS = ("model", "eval", "dist")


def check_shared(cfgs: Sequence[RunConfig]) -> None:
    """Points of one pipelined sweep may differ only in quant, save, run (and calib, when sequential)."""
    first = asdict(cfgs[0])
    for k, cfg in enumerate(cfgs[1:], 1):
        d = asdict(cfg)
        sections = SHARED_SECTIONS + (("calib",) if cfg.dist.schedule == "parallel" else ())
        diff = [f"{sec}.{key}" for sec in sections for key in first[sec] if first[sec][key] != d[sec][key]]
        if diff:
            raise ConfigError(f"sweep point {k} differs from point 0 in {', '.join(diff)}: the points of a "
                              f"pipelined sweep share one loaded model, eval set and actor chain (and, with "
                              f"dist.schedule=parallel, one calibration capture); sweep these keys with the "
                              f"default launcher instead")


@dataclass
class Point:
    """One configuration of a run or of a pipelined sweep, and what became of it."""
    cfg: RunConfig
    variant: int = 0  # its copy of the blocks on every actor
    plan: Any = None
    results: Dict[str, Any] = field(default_factory=dict)
    error: Optional[BaseException] = None
    calib_ids: Any = None
    in_sweep: bool = False
    timer: Timer = field(default_factory=Timer)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.save.save_path)


def run(cfg: RunConfig) -> Dict[str, Any]:
    out = run_many([cfg])[0]
    if isinstance(out, BaseException):
        raise out
    return out


def run_many(cfgs: Sequence[RunConfig]) -> List[Any]:
    """Run several configurations on one set of loaded actors (a pipelined sweep; one config is a plain run).
    Returns, per config, its results dict or the exception that stopped it (the others go on)."""
    outcome: List[Any] = [finished_results(cfg) for cfg in cfgs]
    todo = [k for k, o in enumerate(outcome) if o is None]
    if todo:
        check_shared([cfgs[k] for k in todo])
        points = [Point(cfgs[k], in_sweep=len(todo) > 1) for k in todo]
        _run_points(points)
        for k, pt in zip(todo, points):
            outcome[k] = pt.error if pt.error is not None else pt.results
    return outcome


def _fail(pt: Point, e: BaseException) -> None:
    if pt.in_sweep:  # say so now, the other points go on (a single run raises it instead)
        log.error("sweep point %s failed: %s", pt.out_dir, e)
    pt.error = e


def _run_points(points: List[Point]) -> None:
    from transformers import AutoTokenizer

    from .data import load_calib_tokens, load_eval_tokens
    from .dist import cluster, schedule
    from .synthetic import synthetic_tokens

    timer = Timer()  # shared stages; each point adds its own saves
    t_start = time.perf_counter()
    # everything that can fail on user input happens before Ray starts
    with timer("plan"):
        for pt in points:
            try:
                pt.plan = make_plan(pt.cfg)
            except ConfigError as e:
                _fail(pt, e)
        live = [pt for pt in points if pt.error is None]
        if not live:
            return
        # RTN points first: their blocks are copied before any calibration changes the loaded ones in place
        for v, pt in enumerate(sorted(live, key=lambda pt: pt.plan.method.needs_calib)):
            pt.variant = v
        cfg0, plan0 = live[0].cfg, live[0].plan
        calib_of: Dict[str, Any] = {}  # one tokenization per distinct calib section
        if plan0.ckpt.synthetic:  # random weights: random tokens serve for timing, never for quality
            tokenizer, vocab = None, plan0.ckpt.raw_config()["vocab_size"]
            eval_ids = synthetic_tokens(cfg0.eval.num_samples or 8, cfg0.eval.seq_len, vocab, cfg0.calib.seed + 1)

            def tokens(c):
                return synthetic_tokens(c.n_samples, c.seq_len, vocab, c.seed)
        else:
            tokenizer = AutoTokenizer.from_pretrained(plan0.ckpt.dir)
            eval_ids = load_eval_tokens(cfg0.eval, tokenizer) if cfg0.eval.eval_pos else None

            def tokens(c):
                return load_calib_tokens(c, tokenizer)
        for pt in live:
            if pt.plan.method.needs_calib:
                key = json.dumps(asdict(pt.cfg.calib), sort_keys=True)
                if key not in calib_of:
                    calib_of[key] = tokens(pt.cfg.calib)
                pt.calib_ids = calib_of[key]
    ev, dist, progress = cfg0.eval, cfg0.dist, cfg0.run.progress
    for pt in live:
        pt.out_dir.mkdir(parents=True, exist_ok=True)
        pt.results = {"eval": {ev.name: {}}, "timings_s": {}, "blocks": [], "config": asdict(pt.cfg),
                      "model_dir": str(pt.plan.ckpt.dir)}
        if len(points) > 1:
            pt.results["pipelined_sweep"] = {"points": len(live), "variant": pt.variant}

    def checkpoint(pts: List[Point]) -> None:
        for pt in pts:
            pt.results["timings_s"] = {**timer.timings, **pt.timer.timings}
            write_json_atomic(pt.out_dir / "results.json", pt.results)

    def evaluate(pos: str, pts: List[Point]) -> None:
        if pos in ev.eval_pos and pts:
            with timer(f"eval_{pos}"):
                variants = [None] if pos == "pretrain" else [pt.variant for pt in pts]
                ppls = schedule.perplexities(group, eval_ids, ev.bs, variants, f"eval {pos}", progress)
            for pt, ppl in zip(pts, ppls * len(pts) if pos == "pretrain" else ppls):
                pt.results["eval"][ev.name][pos] = ppl
                log.info("%s PPL (%s)%s: %.4f", ev.name, pos, f" [point {pt.variant}]" if len(points) > 1 else "", ppl)
            checkpoint(pts)

    def export(kind: str, pts: List[Point]) -> None:
        for pt in pts:
            if getattr(pt.cfg.save, f"save_{kind}"):
                with pt.timer(f"save_{kind}"):
                    name = "transformed_model" if kind == "trans" else "fake_quant_model"
                    schedule.export_hf(group, pt.out_dir / name, plan0.ckpt.dir, tokenizer, dtype=plan0.dtype,
                                       variant=pt.variant)

    cluster.init_ray(dist)
    with timer("load"):
        plans = cluster.plan_workers(plan0.ckpt, plan0.spec, plan0.n_layers, dist, plan0.model_type, plan0.dtype)
        group = cluster.ActorGroup(plans, dist)
        actors = group.load()
        group.call_all("set_variants", len(live))
    try:
        for pt in live:
            pt.results["actors"] = actors
        evaluate("pretrain", live)
        with timer("calibrate"):
            for pt in live:
                if not pt.plan.method.needs_calib:
                    group.call_all("rtn_all", pt.plan.qspec, pt.variant)
            _calibrate(group, [pt for pt in live if pt.plan.method.needs_calib], dist.schedule, progress)
        live = [pt for pt in live if pt.error is None]
        evaluate("transformed", live)
        export("trans", live)
        for pt in live:
            if "fake_quant" in ev.eval_pos or pt.cfg.save.save_fake:
                group.call_all("to_fake_quant", pt.variant)
        evaluate("fake_quant", live)
        export("fake", live)
        memory = group.call_all("memory")
    finally:
        schedule.settle_checkpoints(group)  # block checkpoints still being written (also when a stage failed)
        group.shutdown()
    timer.timings["total"] = round(time.perf_counter() - t_start, 3)
    for pt in live:
        pt.results["memory"] = memory
    checkpoint(live)
    for pt in live:
        shutil.rmtree(pt.out_dir / CHECKPOINTS, ignore_errors=True)  # finished: results.json answers a relaunch
        write_report(pt.results, pt.out_dir)


def _calibrate(group, pts: List[Point], schedule_name: str, progress: bool) -> None:
    """Calibrate every point that needs data, all submitted at once (see dist/schedule.py)."""
    from .dist import schedule

    if not pts:
        return
    pts = sorted(pts, key=lambda pt: pt.variant)  # the point that owns the loaded blocks goes last
    n_layers = pts[0].plan.n_layers
    jobs, finished = [], []
    for pt in pts:
        ckpt_dir, done = block_checkpoints(pt.cfg, pt.out_dir, n_layers)
        finished.append(done)
        jobs.append(CalibJob(pt.plan.method.name, dict(pt.cfg.quant.special), pt.plan.qspec, pt.cfg.quant.quant_out,
                             str(ckpt_dir) if ckpt_dir else None, variant=pt.variant,
                             merge_tokens=pt.cfg.calib.merge_tokens))
    bs = pts[0].cfg.calib.bs
    if schedule_name == "sequential":
        reports = schedule.calibrate_sequential(group, [pt.calib_ids for pt in pts], bs, jobs, n_layers, progress,
                                                done=[leading(f) for f in finished],
                                                spread_experts=pts[0].cfg.dist.spread_experts)
    else:
        reports = schedule.calibrate_parallel(group, pts[0].calib_ids, bs, jobs, n_layers, progress, done=finished)
    for pt, rep in zip(pts, reports):
        if isinstance(rep, BaseException):
            _fail(pt, rep)
        else:
            pt.results["blocks"] = rep


def format_table(results: Dict[str, Any]) -> str:
    rows = ["| eval | " + " | ".join(("pretrain", "transformed", "fake_quant")) + " |", "|---|---|---|---|"]
    for name, by_pos in results["eval"].items():
        cells = [f"{by_pos[p]:.4f}" if p in by_pos else "-" for p in ("pretrain", "transformed", "fake_quant")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    t = results["timings_s"]
    rows.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    return "\n".join(rows)
