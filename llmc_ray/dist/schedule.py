"""How work flows through the actor chain. The driver only ever `ray.get`s small results (NLL sums,
block reports); activations go from actor to actor as ObjectRefs."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List

import ray
import torch

from .cluster import ActorGroup


class ActorLost(RuntimeError):
    """An actor died mid-run (killed, out of memory); finished blocks are checkpointed for a relaunch."""


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm stays quiet when stderr is not a terminal (CI, log files), shows bars otherwise
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


def gather(refs: List[Any], desc: str, progress: bool,
           on_result: Callable[[Any, Any], None] = lambda bar, r: None) -> List[Any]:
    """Results of `refs`, in the order of `refs` (so float sums over them are reproducible), with one progress
    tick as each completes (the driver only gets small results)."""
    position = {ref: i for i, ref in enumerate(refs)}
    out: List[Any] = [None] * len(refs)
    with _progress(len(refs), desc, progress) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            out[position[done[0]]] = ray.get(done[0])
            on_result(bar, out[position[done[0]]])
            bar.update(1)
    return out


def perplexity(group: ActorGroup, windows: torch.Tensor, bs: int, desc: str, progress: bool = True) -> float:
    """Every eval batch is submitted up front: Ray runs each actor's calls in order, so actor k works on
    batch b while actor k+1 works on batch b-1 (a pipeline with no extra scheduling code)."""
    results = []
    for start in range(0, windows.shape[0], bs):
        ids = ray.put(windows[start:start + bs])
        x: Any = ids
        for actor in group.actors:
            x = actor.stage.remote(x, ids, bs)
        results.append(x)
    sums = gather(results, desc, progress)
    return math.exp(sum(nll for nll, _ in sums) / sum(n for _, n in sums))


def calibrate_sequential(group: ActorGroup, calib_ids: torch.Tensor, bs: int, job, n_blocks: int,
                         progress: bool = True, done: int = 0) -> List[Dict[str, Any]]:
    """llmc's order: block i calibrates on block i-1's (transformed or fake-quant) outputs. The activations
    ref hops from block to block and actor to actor; the driver waits only for each block's report.
    Blocks below `done` were finished by an earlier run: they are restored from their checkpoints."""
    acts = group.first.calib_inputs.remote(ray.put(calib_ids), bs)
    reports = []
    with _progress(n_blocks, f"calibrate {job.method}", progress) as bar:
        for i in range(n_blocks):
            actor = group.owner[i]
            step = actor.restore_block if i < done else actor.calibrate_block
            acts, rep_ref = step.options(num_returns=2).remote(i, acts, job)
            try:
                rep = ray.get(rep_ref)
            except ray.exceptions.RayActorError as e:
                where = f"; blocks 0..{i - 1} are saved in {job.checkpoint_dir}" if job.checkpoint_dir and i else ""
                rank = next(p.rank for p in group.plans if i in p.blocks)
                raise ActorLost(f"actor {rank} died while calibrating block {i}{where}: relaunch the same "
                                   f"command to resume ({type(e).__name__})") from None
            reports.append(rep)
            bar.set_postfix_str(f"block {i} on actor {rep['rank']}")
            bar.update(1)
    return reports


def capture_all(group: ActorGroup, calib_ids: torch.Tensor, bs: int, chunk_samples: int) -> None:
    """Parallel schedule, pass 1: one pipelined fp pass; every actor keeps its blocks' inputs. Chunks of
    calibration samples are submitted at once, so actor k captures chunk c while actor k+1 takes chunk c-1."""
    done = []
    for start in range(0, calib_ids.shape[0], chunk_samples):
        x: Any = ray.put(calib_ids[start:start + chunk_samples])
        for actor in group.actors:
            x = actor.capture.remote(x, bs)
        done.append(x)
    ray.get(done)


def calibrate_parallel(group: ActorGroup, calib_ids: torch.Tensor, bs: int, job, n_blocks: int,
                       progress: bool = True) -> List[Dict[str, Any]]:
    """Every block calibrates on the fp outputs of the unquantized blocks before it, so all actors work at
    once (each runs its own blocks in order). Differs from llmc's sequential semantics: see README."""
    capture_all(group, calib_ids, bs, chunk_samples=max(bs, calib_ids.shape[0] // (2 * len(group.actors))))
    refs = [group.owner[i].calibrate_stored.remote(i, job) for i in range(n_blocks)]
    reports = gather(refs, f"calibrate {job.method} (parallel)", progress,
                     lambda bar, rep: bar.set_postfix_str(f"block {rep['block']} on actor {rep['rank']}"))
    return reports  # block order: refs were submitted block by block


def export_hf(group: ActorGroup, out_dir: Path, src_dir: Path, tokenizer, extra_config: Dict[str, Any] = None,
              dtype: str = "float32") -> Path:
    """Each actor writes its own shard; the driver writes index + config + tokenizer; then one atomic
    rename publishes the directory (a crash leaves no half-written model)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(group.actors)
    names = [f"model-{r + 1:05d}-of-{n:05d}.safetensors" for r in range(n)]
    keys = ray.get([a.write_shard.remote(str(tmp / f)) for a, f in zip(group.actors, names)])
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
