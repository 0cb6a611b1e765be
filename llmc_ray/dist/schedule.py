"""How work flows through the actor chain. The driver only ever `ray.get`s small results (NLL sums,
block reports); activations go from actor to actor as ObjectRefs."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import ray
import torch

from ..worker import block_ranges
from .cluster import ActorGroup

log = logging.getLogger(__name__)


class ActorLost(RuntimeError):
    """An actor died mid-run (killed, out of memory); finished blocks are checkpointed for a relaunch."""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm stays quiet when stderr is not a terminal (CI, log files), shows bars otherwise
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


def perplexities(group: ActorGroup, windows: torch.Tensor, bs: int, variants: Sequence[Optional[int]], desc: str,
                 progress: bool = True) -> List[float]:
    """PPL of each variant (None: the loaded fp blocks). Batches are submitted ahead of the results: Ray runs
    each actor's calls in order, so actor k works on batch b while actor k+1 works on batch b-1 (a pipeline
    with no extra scheduling code), and the sweep points follow each other through the same chain.
    At most `ahead` batches are in flight: each holds one hand-off per actor boundary (in host memory, or on
    the sender's GPU until received with the collective transport)."""
    batches = [(v, start) for v in variants for start in range(0, windows.shape[0], bs)]
    ahead = 2 * len(group.actors) + 2

    def submit(k: int) -> Any:
        v, start = batches[k]
        ids = ray.put(windows[start:start + bs])
        x: Any = ids
        for actor in group.actors:
            x = actor.stage.remote(x, ids, bs, v)
        return x

    sums: List[Any] = [None] * len(batches)
    where: Dict[Any, int] = {}
    with _progress(len(batches), desc, progress) as bar:
        for k in range(len(batches)):
            if len(where) >= ahead:
                done, _ = ray.wait(list(where), num_returns=1)
                sums[where.pop(done[0])] = ray.get(done[0])
                bar.update(1)
            where[submit(k)] = k
        for ref, k in where.items():
            sums[k] = ray.get(ref)
            bar.update(1)
    per = len(sums) // len(variants)
    return [math.exp(sum(nll for nll, _ in part) / sum(n for _, n in part))
            for part in (sums[k * per:(k + 1) * per] for k in range(len(variants)))]


def _actor_lost(group: ActorGroup, job, block: int, done: Sequence[int], e: Exception) -> ActorLost:
    rank = next(p.rank for p in group.plans if block in p.blocks)
    saved = f"; blocks {block_ranges(done)} are saved in {job.checkpoint_dir}" if job.checkpoint_dir and done else ""
    return ActorLost(f"actor {rank} died while calibrating block {block}{saved}: relaunch the same command to "
                     f"resume ({type(e).__name__})")


def settle_checkpoints(group: ActorGroup) -> None:
    """Wait until the live actors have written their block checkpoints (written in the background while the
    next block calibrates); dead actors are skipped, failed writes logged (a relaunch recomputes those)."""
    refs = [a.flush_checkpoints.remote() for a in group.actors]
    for ref in refs:
        try:
            for msg in ray.get(ref):
                log.warning(msg)
        except ray.exceptions.RayActorError:
            pass


def _collect(group: ActorGroup, jobs: Sequence[Any], report_refs: List[List[Any]], desc: str,
             progress: bool) -> List[Any]:
    """Per job: its block reports in block order, or the exception of its first failing block (the other jobs
    go on). The bar ticks as reports complete (the parallel schedule finishes blocks out of order). An actor
    that died stops everything: ActorLost names the first block lost with it and the saved ones."""
    where = {ref: (j, b) for j, refs in enumerate(report_refs) for b, ref in enumerate(refs)}
    got: List[Dict[int, Any]] = [{} for _ in jobs]
    with _progress(len(where), desc, progress) as bar:
        pending = list(where)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            j, b = where[ready[0]]
            try:
                rep = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                # let the job's other blocks settle (live actors finish theirs, and checkpoint them), then
                # name the first block lost with the actor
                lost = {b}
                for ref in (r for r in pending if where[r][0] == j):
                    try:
                        got[j][where[ref][1]] = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        lost.add(where[ref][1])
                    except ray.exceptions.RayTaskError as t:
                        got[j][where[ref][1]] = t
                finished = sorted(i for i, r in got[j].items() if not isinstance(r, BaseException))
                settle_checkpoints(group)
                raise _actor_lost(group, jobs[j], min(lost), finished, e) from None
            except ray.exceptions.RayTaskError as e:
                rep = e.as_instanceof_cause()
            else:
                bar.set_postfix_str(f"block {rep['block']} on actor {rep['rank']}" +
                                    (f" (point {j})" if len(jobs) > 1 else ""))
            got[j][b] = rep
            bar.update(1)
    # the last blocks' checkpoint writes may still be in flight: the run waits for them at its end
    # (settle_checkpoints), so they overlap the evals and exports
    out: List[Any] = []
    for reps in got:
        ordered = [reps[b] for b in sorted(reps)]
        out.append(next((r for r in ordered if isinstance(r, BaseException)), ordered))
    return out


def calibrate_sequential(group: ActorGroup, calib: Sequence[torch.Tensor], bs: int, jobs: Sequence[Any],
                         n_blocks: int, progress: bool = True, done: Sequence[int] = (),
                         spread_experts: bool = False) -> List[Any]:
    """llmc's order: block i calibrates on block i-1's (transformed or fake-quant) outputs. The activations
    ref hops from block to block and actor to actor; the driver only gets each block's report.
    Several jobs (sweep points, each with its calibration tokens) are submitted one after the other: while
    actor k+1 works on job j, actor k already works on job j+1 — a pipeline over the sweep.
    Blocks below done[j] were finished by an earlier run: they are restored from their checkpoints.
    spread_experts: each block's owner hands its routed experts (when the method can leave them apart) to
    every actor, itself included, and finishes the block with their results; the calls are submitted in an
    order where each depends only on earlier ones, and each actor runs its calls in order, so this cannot
    deadlock, also with other sweep points queued in between."""
    report_refs = []
    for j, job in enumerate(jobs):
        # block 0 always lives on the first actor: the embedded tokens stay on its device
        acts = group.first.calib_inputs.remote(ray.put(calib[j]), bs, job.variant)
        refs = []
        for i in range(n_blocks):
            owner = group.owner[i]
            # the next block on the same actor takes the outputs straight from the device; the last block's
            # outputs feed nothing (not even computed)
            hand_on = "none" if i + 1 == n_blocks else "device" if group.owner[i + 1] is owner else "host"
            if i < (done[j] if done else 0):
                acts, rep = owner.restore_block.options(num_returns=2).remote(i, acts, job, hand_on)
            elif spread_experts and len(group.actors) > 1:
                payloads = owner.spread_block.options(num_returns=len(group.actors)).remote(i, acts, job,
                                                                                           len(group.actors))
                solved = [a.solve_experts.remote(p, job) for a, p in zip(group.actors, payloads)]
                acts, rep = owner.finish_spread.options(num_returns=2).remote(i, job, hand_on, *solved)
            else:
                acts, rep = owner.calibrate_block.options(num_returns=2).remote(i, acts, job, hand_on)
            refs.append(rep)
        report_refs.append(refs)
    return _collect(group, jobs, report_refs, f"calibrate {jobs[0].method}", progress)


def capture_all(group: ActorGroup, calib_ids: torch.Tensor, bs: int, chunk_samples: int,
                skip: Sequence[int] = (), merge_tokens: Optional[int] = None) -> None:
    """Parallel schedule, pass 1: one pipelined fp pass; every actor keeps its blocks' inputs (except blocks
    in `skip`). Chunks of calibration samples are submitted at once, so actor k captures chunk c while actor
    k+1 takes chunk c-1."""
    done = []
    for start in range(0, calib_ids.shape[0], chunk_samples):
        x: Any = ray.put(calib_ids[start:start + chunk_samples])
        for actor in group.actors:
            x = actor.capture.remote(x, bs, skip, merge_tokens)
        done.append(x)
    ray.get(done)


def calibrate_parallel(group: ActorGroup, calib_ids: torch.Tensor, bs: int, jobs: Sequence[Any], n_blocks: int,
                       progress: bool = True, done: Sequence[Sequence[int]] = ()) -> List[Any]:
    """Every block calibrates on the fp outputs of the unquantized blocks before it, so all actors work at
    once (each runs its own blocks in order). Differs from llmc's sequential semantics: see README.
    One capture serves every job (sweep point); blocks in done[j] are restored from checkpoints instead."""
    finished = [set(d) for d in done] if done else [set() for _ in jobs]
    everywhere = set.intersection(*finished) if finished else set()
    capture_all(group, calib_ids, bs, max(bs, calib_ids.shape[0] // (2 * len(group.actors))),
                skip=tuple(sorted(everywhere)), merge_tokens=jobs[0].merge_tokens)  # jobs share calib (run.check_shared)
    report_refs = []
    for j, job in enumerate(jobs):
        refs = []
        for i in range(n_blocks):
            if i in finished[j]:
                refs.append(group.owner[i].restore_block.options(num_returns=2).remote(i, None, job)[1])
            else:
                refs.append(group.owner[i].calibrate_stored.remote(i, job))
        report_refs.append(refs)
    return _collect(group, jobs, report_refs, f"calibrate {jobs[0].method} (parallel)", progress)


def export_hf(group: ActorGroup, out_dir: Path, src_dir: Path, tokenizer, extra_config: Dict[str, Any] = None,
              dtype: str = "float32", variant: int = 0) -> Path:
    """Each actor writes its own shard; the driver writes index + config + tokenizer; then one atomic
    rename publishes the directory (a crash leaves no half-written model)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(group.actors)
    names = [f"model-{r + 1:05d}-of-{n:05d}.safetensors" for r in range(n)]
    keys = ray.get([a.write_shard.remote(str(tmp / f), variant) for a, f in zip(group.actors, names)])
    weight_map = {k: f for f, ks in zip(names, keys) for k in ks}
    total = sum(os.path.getsize(tmp / f) for f in names)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = json.loads((src_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    config.update(extra_config or {})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if (src_dir / "generation_config.json").is_file():
        shutil.copy(src_dir / "generation_config.json", tmp / "generation_config.json")
    if tokenizer is not None:  # synthetic models have none
        tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir
