"""BlockWorker: owns a contiguous range of decoder blocks (plus embeddings on the first, norm + head on the
last) on one device. Plain Python: `dist/` wraps it in a Ray actor, tests can drive it directly.

Activations travel between workers as a list of CPU tensors [bs, seq, hidden] (one per micro-batch).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .algorithms.base import BlockContext, resolve, token_count
from .checkpoint import TORCH_DTYPES, Checkpoint, materialize, meta_model
from .models import block_subsets, expert_names, get_spec, linears, module_has, only_experts, renamed
from .models.spec import Subset
from .peer import PeerLink, SentToPeer
from .quant.quantizer import QuantSpec, compute_qparams, fake_quant

log = logging.getLogger(__name__)
Acts = List[torch.Tensor]


@dataclass(frozen=True)
class WorkerPlan:
    rank: int
    blocks: Tuple[int, ...]
    first: bool  # holds the embeddings
    last: bool  # holds final norm + lm_head
    model_dir: str
    model_type: str
    dtype: str
    device: str
    threads: int = 0
    spill_dir: Optional[str] = None  # parallel schedule: captured block inputs go to files here, not host RAM


@dataclass(frozen=True)
class CalibJob:
    """What a worker needs to calibrate: names and numbers only, resolved inside the worker."""
    method: str
    special: Dict[str, Any]
    spec: QuantSpec
    quant_out: bool
    checkpoint_dir: Optional[str] = None  # where each finished block is saved (None: not saved)
    variant: int = 0  # which sweep point's copy of the blocks this job transforms
    merge_tokens: Optional[int] = None  # join micro-batches into forwards of up to this many tokens (calib.merge_tokens)


@dataclass(frozen=True)
class KeptOnDevice:
    """Handed on instead of activations when the next block lives on the same actor: the outputs stay on the
    device (no copy to host, no trip through Ray's object store) until that block takes them."""
    variant: int
    block: int  # the block whose inputs these are


def merge_batches(acts: Acts, max_tokens: Optional[int]) -> Acts:
    """Consecutive micro-batches of the same shape joined along the batch dim into chunks of at most
    `max_tokens` tokens (a micro-batch already larger stays whole). Order is kept; every calibration
    statistic is a sum over tokens, so only the number of forwards changes."""
    if not max_tokens or len(acts) < 2:
        return acts
    out: Acts = []
    run: Acts = []
    run_tokens = 0
    for a in acts:
        tokens = token_count([a])
        if run and (a.shape[1:] != run[0].shape[1:] or run_tokens + tokens > max_tokens):
            out.append(torch.cat(run) if len(run) > 1 else run[0])
            run, run_tokens = [], 0
        run.append(a)
        run_tokens += tokens
    out.append(torch.cat(run) if len(run) > 1 else run[0])
    return out


class Variant:
    """One configuration's view of the worker's blocks: its transformed copies, qparams and eval mode.

    A run has one variant that edits the loaded blocks in place. A pipelined sweep has one per point: each
    copies a block the first time it touches it, except the last, which takes the loaded block itself; the
    actor runs calls in submission order and the driver submits point by point, so by then every other point
    has made its copy (checked: copying a block the last point already changed is an error)."""

    def __init__(self, source: Dict[int, nn.Module], owns_source: bool, taken: set):
        self.source, self.owns_source, self.taken = source, owns_source, taken
        self.blocks: Dict[int, nn.Module] = {}
        self.qparams: Dict[int, Dict[str, Any]] = {}
        self.spec: Optional[QuantSpec] = None
        self.mode = "pretrain"

    def block(self, index: int) -> nn.Module:
        if index not in self.blocks:
            if self.owns_source:
                self.taken.add(index)
                self.blocks[index] = self.source[index]
            else:
                if index in self.taken:
                    raise RuntimeError(f"block {index}: the fp weights were already changed by another sweep point")
                self.blocks[index] = copy.deepcopy(self.source[index])
        return self.blocks[index]


def _under(named: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """The entries named under `prefix`, with the prefix taken off."""
    return {n[len(prefix):]: v for n, v in named.items() if n.startswith(prefix)}


class ExpertSet(nn.Module):
    """Routed experts calibrated together, away from their block (dist.spread_experts). Forward step j runs
    every expert on its j-th chunk of routed inputs (if it has one): each expert sees its chunks in the order
    its block fed them, which is all its statistics depend on."""

    def __init__(self, experts: Dict[str, nn.Module], inputs: Dict[str, Acts]):
        super().__init__()
        self.experts = nn.ModuleDict(experts)
        self.inputs = inputs

    def steps(self) -> Acts:
        return [torch.tensor(j) for j in range(max(len(xs) for xs in self.inputs.values()))]

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        j = int(step)
        for k, expert in self.experts.items():
            if j < len(self.inputs[k]):
                expert(self.inputs[k][j])
        return step


class BlockWorker:
    def __init__(self, plan: WorkerPlan):
        self.plan = plan
        self.blocks: Dict[int, nn.Module] = {}  # the loaded fp blocks (pretrain eval, parallel capture)
        self.subsets: Dict[int, Tuple[Subset, ...]] = {}  # each block's resolved subsets (dense and MoE differ)
        self.experts: Dict[int, Tuple[str, ...]] = {}  # each block's routed experts (module names)
        # parallel schedule: each block's captured fp inputs, in host memory or (spill_dir) as files
        self.stored: Dict[int, List[Any]] = {}
        # sequential schedule: a block's outputs kept on the device for the next block on this actor
        self.kept: Dict[int, Tuple[int, Acts]] = {}  # variant -> (block they feed, activations)
        # block checkpoints are written by one background thread while the next block calibrates (a 7B block
        # is ~0.5 GB); at most one write is in flight, so host memory holds at most one extra block
        self._writer: Optional[ThreadPoolExecutor] = None
        self._writing: Optional[Future] = None
        self._write_errors: List[str] = []
        self.link: Optional[PeerLink] = None  # direct sends to the next worker (dist.transport=collective)
        self.spreading: Dict[int, Tuple[int, Any, Acts, float]] = {}  # variant -> block whose experts are out
        self.set_variants(1)

    def set_variants(self, n: int) -> None:
        """n configurations will be calibrated on these blocks (a pipelined sweep when n > 1)."""
        taken: set = set()
        self.variants = [Variant(self.blocks, owns_source=v == n - 1, taken=taken) for v in range(n)]

    # -- setup -------------------------------------------------------------------------------------------
    def load(self) -> Dict[str, Any]:
        t0 = time.perf_counter()
        p = self.plan
        if p.threads:
            torch.set_num_threads(p.threads)
        self.device = torch.device("cuda", torch.cuda.current_device()) if p.device == "cuda" else torch.device("cpu")
        ckpt = Checkpoint(Path(p.model_dir))
        self.config = ckpt.config()
        self.mspec = get_spec(p.model_type)
        dtype = TORCH_DTYPES[p.dtype]
        self.dtype = dtype
        meta = meta_model(self.config, self.mspec)  # fused experts already per-expert linears
        where = dict(device=self.device, dtype=dtype)

        def build(name: str, module: nn.Module, state=None) -> nn.Module:
            return materialize(module, state if state is not None else ckpt.load_prefix(name, **where),
                               self.device, dtype, name)

        layers = meta.get_submodule(self.mspec.blocks)
        for i in p.blocks:
            self.blocks[i] = build(f"{self.mspec.blocks}.{i}", layers[i])
            self.subsets[i] = block_subsets(self.mspec, self.blocks[i])
            self.experts[i] = expert_names(self.mspec, module_has(self.blocks[i]))
        if p.first:
            self.embed = build(self.mspec.embed, meta.get_submodule(self.mspec.embed))
        if p.last:
            self.norm = build(self.mspec.final_norm, meta.get_submodule(self.mspec.final_norm))
            head_state = ckpt.load_prefix(self.mspec.lm_head, **where) or ckpt.load_prefix(self.mspec.embed, **where)
            self.head = build(self.mspec.lm_head, meta.get_submodule(self.mspec.lm_head), head_state)  # or tied
        rotary_cls = type(meta.get_submodule(self.mspec.rotary))
        self.rotary = rotary_cls(config=self.config).to(self.device)  # inv_freq computed on CPU, like HF
        self._kwargs_cache: Dict[int, Dict[str, Any]] = {}
        mem = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        return {"rank": p.rank, "blocks": list(p.blocks), "load_s": time.perf_counter() - t0, "gpu_bytes": mem}

    def block_kwargs(self, x: torch.Tensor) -> Dict[str, Any]:
        """Position embeddings for a full causal sequence of x's length (no padding: mask is implied): (cos, sin)
        in the model's dtype, or as the rotary module gives them when it gives one tensor (DeepSeek-V2's
        complex freqs_cis, which its attention applies in fp32)."""
        seq = x.shape[1]
        if seq not in self._kwargs_cache:
            pos = torch.arange(seq, device=self.device).unsqueeze(0)
            pe = self.rotary(x, pos)
            if isinstance(pe, tuple):
                pe = tuple(t.to(self.dtype) for t in pe)
            self._kwargs_cache[seq] = {"position_embeddings": pe, "position_ids": pos, "attention_mask": None}
        return self._kwargs_cache[seq]

    def connect(self, address: str, port: int, world: int) -> None:
        """Join the chain's process group (every worker at once, after load): eval batches and parallel-schedule
        captures then go to the next worker directly (see peer.py), not through host memory."""
        self.link = PeerLink(address, port, self.plan.rank, world, self.device)

    # -- forward -----------------------------------------------------------------------------------------
    def _from_prev(self, x: Any) -> Acts:
        """A streamed stage's input from the previous worker: received directly, or host copies."""
        return self.link.receive(x) if isinstance(x, SentToPeer) else self._to_dev(x)

    def _to_next(self, acts: Acts) -> Any:
        """A streamed stage's output for the next worker (the call's last step: see peer.py)."""
        return self.link.send(acts) if self.link is not None else self._to_cpu(acts)

    def _to_dev(self, acts: Acts) -> Acts:
        return [a.to(self.device, self.dtype) for a in acts]

    @staticmethod
    def _to_cpu(acts: Acts, pin: bool = True) -> Acts:
        """Host copies. Short-lived ones (hand-offs, checkpoint copies) go through pinned buffers, several times
        faster than pageable copies; long-lived ones (pin=False: stored captures) must not lock host memory."""
        if pin and acts and acts[0].is_cuda:
            out = [torch.empty(a.shape, dtype=a.dtype, pin_memory=True).copy_(a, non_blocking=True) for a in acts]
            torch.cuda.current_stream(acts[0].device).synchronize()
            return out
        return [a.to("cpu") for a in acts]

    def _host_tree(self, tree: Any) -> Any:
        """The same nested dicts/lists/tuples with every tensor a host copy of its own, made in one go (one wait
        for the device, not one per tensor); on a CPU worker, copies all the same (never the block's own)."""
        leaves, spec = tree_flatten(tree)
        where = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        host = self._to_cpu([leaves[i].detach() for i in where])
        if self.device.type == "cpu":
            host = [t.clone() for t in host]
        for i, h in zip(where, host):
            leaves[i] = h
        return tree_unflatten(leaves, spec)

    def _take(self, acts: Any, index: int) -> Optional[Acts]:
        """A block's inputs on the device: activations from another actor, or the ones this actor kept."""
        if isinstance(acts, KeptOnDevice):
            held = self.kept.get(acts.variant)
            if held is None or held[0] != index or acts.block != index:
                raise RuntimeError(f"block {index}: no activations were kept on this actor for it "
                                   f"(kept for block {held[0] if held else None})")
            return self.kept.pop(acts.variant)[1]
        return self._to_dev(acts) if acts is not None else None

    def _hand_on(self, out: Acts, index: int, job: "CalibJob", hand_on: str) -> Any:
        """The next block's inputs: kept on the device when that block is ours, else host copies."""
        if hand_on == "device":
            self.kept[job.variant] = (index + 1, out)
            return KeptOnDevice(job.variant, index + 1)
        return self._to_cpu(out)

    @torch.no_grad()
    def _run_block(self, block: nn.Module, acts: Acts) -> Acts:
        out = []
        for x in acts:
            y = block(x, **self.block_kwargs(x))
            out.append(y[0] if isinstance(y, tuple) else y)
        return out

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor, bs: int) -> Acts:
        ids = ids.to(self.device)
        return [self.embed(ids[i:i + bs]) for i in range(0, ids.shape[0], bs)]

    @torch.no_grad()
    def stage(self, x: Any, ids: Optional[torch.Tensor] = None, bs: int = 1, variant: Optional[int] = None) -> Any:
        """One pipeline stage of an eval batch: tokens (first worker) or activations in; activations out,
        or (sum of token NLL, token count) from the last worker. variant None: the loaded fp blocks."""
        acts = self.embed_tokens(x, bs) if self.plan.first else self._from_prev(x)
        for i in self.plan.blocks:
            block = self.blocks[i] if variant is None else self.variants[variant].block(i)
            acts = self._run_block(block, acts)
        if not self.plan.last:
            return self._to_next(acts)
        return self._nll(acts, ids.to(self.device))

    def _nll(self, acts: Acts, ids: torch.Tensor) -> Tuple[float, int]:
        total, count, row = 0.0, 0, 0
        for h in acts:
            logits = self.head(self.norm(h)).float()
            labels = ids[row:row + h.shape[0]]
            row += h.shape[0]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   reduction="sum")
            total += loss.item()
            count += labels[:, 1:].numel()
        return total, count

    # -- calibration -------------------------------------------------------------------------------------
    def calib_inputs(self, ids: torch.Tensor, bs: int, variant: Optional[int] = None) -> Any:
        """Inputs of the first block: the embedded calibration tokens (first worker only). With `variant`
        they stay on the device for block 0 (always this worker's) and a KeptOnDevice marker is returned."""
        acts = self.embed_tokens(ids, bs)
        if variant is None:
            return self._to_cpu(acts)
        self.kept[variant] = (0, acts)
        return KeptOnDevice(variant, 0)

    def calibrate_block(self, index: int, acts: Any, job: CalibJob,
                        hand_on: str = "host") -> Tuple[Any, Dict[str, Any]]:
        """Sequential schedule: transform block `index` on its inputs (host activations, or KeptOnDevice);
        return the next block's inputs (this block's transformed, or with quant_out fake-quantized, outputs)
        and a report. `hand_on` says where the next block is (HAND_ON): "device" (this actor: KeptOnDevice),
        "host" (another actor: host copies) or "none" (the last block: its outputs are not computed)."""
        _check_hand_on(hand_on)
        dev = self._take(acts, index)
        out, report = self._calibrate(index, dev, job, propagate=dev is not None and hand_on != "none")
        return (self._hand_on(out, index, job, hand_on) if out is not None else None), report

    def capture(self, x: Any, bs: int = 1, skip: Tuple[int, ...] = (), merge_tokens: Optional[int] = None) -> Optional[Acts]:
        """Parallel schedule, pass 1: keep every own block's fp inputs for this chunk of calibration data
        (tokens on the first worker, activations elsewhere) and hand the outputs to the next worker.
        Blocks in `skip` (restored from checkpoints) need no inputs. Micro-batches are merged first, as for
        calibration (`merge_batches`)."""
        acts = merge_batches(self.embed_tokens(x, bs) if self.plan.first else self._from_prev(x), merge_tokens)
        for i in self.plan.blocks:
            if i not in skip:
                self._store(i, self._to_cpu(acts, pin=False))
            acts = self._run_block(self.blocks[i], acts)
        return None if self.plan.last else self._to_next(acts)

    def calibrate_stored(self, index: int, job: CalibJob) -> Dict[str, Any]:
        """Parallel schedule, pass 2: transform block `index` on the fp inputs captured for it (the last sweep
        point frees them)."""
        last = job.variant == len(self.variants) - 1
        _, report = self._calibrate(index, self._to_dev(self._stored(index)), job, propagate=False)
        if last:
            self._drop_stored(index)
        return report

    def _store(self, index: int, acts: Acts) -> None:
        if not self.plan.spill_dir:
            self.stored.setdefault(index, []).extend(acts)
            return
        path = Path(self.plan.spill_dir) / f"block_{index:05d}_{len(self.stored.get(index, [])):05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(acts, path)
        self.stored.setdefault(index, []).append(path)

    def _stored(self, index: int) -> Acts:
        if not self.plan.spill_dir:
            return self.stored[index]
        return [a for path in self.stored[index] for a in torch.load(path)]

    def _drop_stored(self, index: int) -> None:
        for item in self.stored.pop(index):
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        if self.plan.spill_dir and not self.stored:  # the last block of this actor: leave no directory behind
            shutil.rmtree(self.plan.spill_dir, ignore_errors=True)
            try:
                Path(self.plan.spill_dir).parent.rmdir()  # the run's dir, once every actor has left it
            except OSError:
                pass

    def _calibrate(self, index: int, dev_acts: Optional[Acts], job: CalibJob, propagate: bool):
        """Transform block `index` on its inputs (on the device); the next block's inputs (on the device)
        when `propagate`, and the report."""
        result, dev_acts, t0 = self._solve(index, dev_acts, job)
        return self._finish(index, job, result, dev_acts, propagate, t0)

    def _solve(self, index: int, dev_acts: Optional[Acts], job: CalibJob,
               experts_apart: bool = False) -> Tuple[Any, Acts, float]:
        """The method's pass over block `index`: (its BlockResult, the merged inputs, start time)."""
        if os.environ.get("LLMC_RAY_CRASH_AT_BLOCK") == str(index):
            os._exit(1)  # fault injection for the resume tests: dies like an OOM-killed actor
        t0 = time.perf_counter()
        method, special = resolve(job.method, job.special)
        var = self.variants[job.variant]
        var.spec = job.spec
        block = var.block(index)
        dev_acts = merge_batches(dev_acts or [], job.merge_tokens)
        with self._block_errors(index, job, dev_acts):
            ctx = BlockContext(block=block, inputs=dev_acts,
                               block_kwargs=self.block_kwargs(dev_acts[0]) if dev_acts else {},
                               subsets=self.subsets[index], spec=job.spec, special=special, index=index,
                               experts=self.experts[index], experts_apart=experts_apart)
            with torch.no_grad() if not method.needs_grad else torch.enable_grad():
                result = method.fn(ctx)
        return result, dev_acts, t0

    def _finish(self, index: int, job: CalibJob, result: Any, dev_acts: Acts, propagate: bool, t0: float):
        """After the method: qparams for every linear, weight errors, the next block's inputs, the report and
        the block checkpoint."""
        var = self.variants[job.variant]
        block = var.block(index)
        with self._block_errors(index, job, dev_acts):
            var.qparams[index] = self._fill_qparams(index, block, result.qparams, var.spec)
            errors = self._weight_errors(var, index)
            out = self._propagate(var, index, dev_acts, job.quant_out) if propagate else None
        var.mode = "transformed"
        report = {"block": index, "rank": self.plan.rank, "seconds": time.perf_counter() - t0,
                  "weight_rel_err": errors, "info": _small(result.info)}
        if job.checkpoint_dir:
            self._save_block(var, index, report, Path(job.checkpoint_dir))
        return out, report

    @contextlib.contextmanager
    def _block_errors(self, index: int, job: CalibJob, dev_acts: Acts):
        """Say where an error happened (keeping its type and traceback), with a hint for running out of memory."""
        try:
            yield
        except Exception as e:
            hint = ""
            if isinstance(e, torch.OutOfMemoryError):
                tokens = max((token_count([a]) for a in dev_acts), default=0)
                hint = (f" (forwards of {tokens} tokens: lower calib.merge_tokens, now {job.merge_tokens}, "
                        f"or calib.bs, or spread the blocks over more actors)")
            raise type(e)(f"block {index} ({job.method}): {e}{hint}") from e

    # -- a MoE block's experts over several actors (dist.spread_experts) --------------------------------
    def spread_block(self, index: int, acts: Any, job: CalibJob, shares: int) -> Tuple[Dict[str, Any], ...]:
        """Sequential schedule: calibrate block `index` except its routed experts (when the method can leave
        them apart), and return `shares` payloads, one per actor, each a set of experts balanced by routed
        tokens: the expert module and its routed inputs as host copies, and the share's subsets.
        solve_experts runs a payload; finish_spread puts the results back. A dense block (or another method)
        gives empty payloads."""
        dev = self._take(acts, index)
        method, _ = resolve(job.method, job.special)
        apart = method.experts_apart and bool(self.experts[index])
        result, dev, t0 = self._solve(index, dev, job, experts_apart=apart)
        shared: List[Dict[str, Any]] = [{} for _ in range(shares)]
        load = [0] * shares
        block = self.variants[job.variant].block(index)
        for e, xs in sorted(result.routed_inputs.items(), key=lambda kv: -token_count(kv[1])):
            if not xs:
                continue  # a starved expert keeps its weights and gets RTN qparams, as in its block
            k = load.index(min(load))
            load[k] += token_count(xs)
            shared[k][e] = (block.get_submodule(e), xs)
        result.routed_inputs = {}
        # each expert as a host module: its structure, with its tensors (and its inputs) as pinned host copies
        host = self._host_tree([{e: (m.state_dict(), xs) for e, (m, xs) in p.items()} for p in shared])
        for k, p in enumerate(host):
            for e, (state, xs) in p.items():
                module = copy.deepcopy(shared[k][e][0]).to("meta")
                module.load_state_dict(state, assign=True)
                shared[k][e] = (module, xs)
        self.spreading[job.variant] = (index, result, dev, t0)
        return tuple({"index": index, "experts": p, "subsets": only_experts(self.subsets[index], tuple(p))}
                     for p in shared)

    def solve_experts(self, payload: Dict[str, Any], job: CalibJob) -> Dict[str, Any]:
        """Calibrate a payload's experts together, as one block of their own (ExpertSet) on their routed inputs:
        per expert, its new weights, its qparams and its report info (host copies)."""
        out: Dict[str, Any] = {}
        if not payload["experts"]:
            return {"rank": self.plan.rank, "experts": out}
        method, special = resolve(job.method, job.special)
        key = {e: e.replace(".", "_") for e in payload["experts"]}
        modules, inputs = {}, {}
        for e, (module, xs) in payload["experts"].items():
            modules[key[e]] = module.to(self.device)
            inputs[key[e]] = self._to_dev(xs)
        experts = ExpertSet(modules, inputs)

        def local(n: str) -> str:
            e = next(e for e in key if n.startswith(e + "."))
            return f"experts.{key[e]}{n[len(e):]}"

        ctx = BlockContext(block=experts, inputs=experts.steps(), block_kwargs={},
                           subsets=tuple(renamed(x, local) for x in payload["subsets"]), spec=job.spec,
                           special=special, index=payload["index"])
        routed = [x for xs in inputs.values() for x in xs]
        with self._block_errors(payload["index"], job, routed), torch.no_grad():
            result = method.fn(ctx)
        host = self._host_tree({"state": dict(experts.experts.state_dict()), "qparams": result.qparams})
        for e, k in key.items():  # per expert: its tensors, qparams and report entries, named inside it
            info = {name: _under(value, f"experts.{k}.") for name, value in result.info.items()
                    if isinstance(value, dict)}
            out[e] = (_under(host["state"], f"{k}."), _under(host["qparams"], f"experts.{k}."), info)
        return {"rank": self.plan.rank, "experts": out}

    def finish_spread(self, index: int, job: CalibJob, hand_on: str,
                      *shares: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
        """The experts' results back into block `index`, then what calibrate_block does after the method."""
        _check_hand_on(hand_on)
        held, result, dev, t0 = self.spreading.pop(job.variant)
        if held != index:
            raise RuntimeError(f"block {index}: the block spread on this actor was {held}")
        block = self.variants[job.variant].block(index)
        spread = {}
        for share in shares:
            if share["experts"]:
                spread[share["rank"]] = len(share["experts"])
            for e, (state, qparams, info) in share["experts"].items():
                block.get_submodule(e).load_state_dict(state)
                result.qparams.update({f"{e}.{n}": None if qp is None else tuple(t.to(self.device) for t in qp)
                                       for n, qp in qparams.items()})
                for key, value in info.items():  # per-layer entries (losses, ...) join the block's, full names
                    if isinstance(value, dict):
                        result.info.setdefault(key, {}).update({f"{e}.{n}": v for n, v in value.items()})
        if spread:
            result.info["experts_spread"] = spread  # actor rank -> routed experts it calibrated
        out, report = self._finish(index, job, result, dev, bool(dev) and hand_on != "none", t0)
        return (self._hand_on(out, index, job, hand_on) if out is not None else None), report

    def _save_block(self, var: Variant, index: int, report: Dict[str, Any], ckpt_dir: Path) -> None:
        """Transformed weights + qparams of one block, written aside then renamed (never half-written)."""
        from safetensors.torch import save_file

        self._wait_for_write()  # one write in flight: the previous block's host copy is freed first
        # host copies now (the block's device weights may change later, e.g. a fake-quant eval), through pinned
        # buffers: torch's host cache hands the previous block's buffers back, so only the first block pays for
        # pinning. Pageable copies cost ~0.4 s per 7B block here; made on the writer thread instead (a side
        # stream) they slowed the next blocks down (bench/RESULTS.md, fourth round). The file write goes to the
        # background thread.
        tensors = {f"w.{k}": v.detach() for k, v in var.block(index).state_dict().items()}
        for name, (scale, zero) in var.qparams[index].items():
            tensors[f"scale.{name}"] = scale
            tensors[f"zero.{name}"] = zero
        tensors = dict(zip(tensors, (t.contiguous() for t in self._to_cpu(list(tensors.values())))))
        final = block_checkpoint(ckpt_dir, index)
        metadata = {"report": json.dumps(report)}

        def write() -> None:
            tmp = final.with_name(final.name + ".tmp")
            try:
                save_file(tensors, str(tmp), metadata=metadata)
                tmp.replace(final)
            except Exception as e:  # resume then recomputes this block; the run itself is not harmed
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                self._write_errors.append(f"block {index}: checkpoint not written to {final} ({e})")

        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-checkpoint")
        self._writing = self._writer.submit(write)

    def _wait_for_write(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None

    def flush_checkpoints(self) -> List[str]:
        """Wait for the checkpoint write in flight; the failed writes since the last flush (then forgotten)."""
        self._wait_for_write()
        errors, self._write_errors = self._write_errors, []
        return errors

    def restore_block(self, index: int, acts: Any, job: CalibJob,
                      hand_on: str = "host") -> Tuple[Any, Dict[str, Any]]:
        """Resume: load a block finished by an earlier run instead of calibrating it, then hand on the same
        outputs the original run handed on (transformed or, with quant_out, fake-quantized; see
        calibrate_block for `hand_on`)."""
        from safetensors import safe_open

        _check_hand_on(hand_on)
        dev = self._take(acts, index)

        path = block_checkpoint(Path(job.checkpoint_dir), index)
        with safe_open(str(path), framework="pt") as fh:
            report = json.loads(fh.metadata()["report"])
            t = {k: fh.get_tensor(k).to(self.device) for k in fh.keys()}
        var = self.variants[job.variant]
        block = var.block(index)
        block.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("w.")})
        var.spec = job.spec
        var.qparams[index] = {n: (t[f"scale.{n}"], t[f"zero.{n}"]) for n in linears(self.subsets[index])}
        var.mode = "transformed"
        if dev is None or hand_on == "none":
            return None, {**report, "resumed": True}
        out = self._propagate(var, index, merge_batches(dev, job.merge_tokens), job.quant_out)
        return self._hand_on(out, index, job, hand_on), {**report, "resumed": True}

    def _propagate(self, var: Variant, index: int, dev_acts: Acts, quant_out: bool) -> Acts:
        """The next block's inputs (on the device): this block's output, fake-quantized first when quant_out
        (llmc)."""
        src = self._fake_block(var, index) if quant_out else var.block(index)
        return self._run_block(src, dev_acts)

    def _fill_qparams(self, index: int, block: nn.Module, given: Dict[str, Any], spec: QuantSpec) -> Dict[str, Any]:
        """qparams for every linear of the block: the algorithm's, or RTN from the (transformed) weight."""
        out = {}
        for name in linears(self.subsets[index]):
            qp = given.get(name)
            if qp is None:
                qp = compute_qparams(block.get_submodule(name).weight.data, spec)
            out[name] = tuple(t.detach() for t in qp)
        return out

    def _fake_block(self, var: Variant, index: int) -> nn.Module:
        block = copy.deepcopy(var.block(index))
        self._fake_quant_inplace(var, block, index)
        return block

    @staticmethod
    def _fake_quant_inplace(var: Variant, block: nn.Module, index: int) -> None:
        for name, (scale, zero) in var.qparams[index].items():
            lin = block.get_submodule(name)
            lin.weight.data = fake_quant(lin.weight.data, var.spec, scale, zero)

    @staticmethod
    def _weight_errors(var: Variant, index: int) -> Dict[str, float]:
        """||W - q(W)|| / ||W|| per linear: the per-block quantization error plotted in the report."""
        errs = []
        for name, (scale, zero) in var.qparams[index].items():
            w = var.block(index).get_submodule(name).weight.data.float()
            errs.append((w - fake_quant(w, var.spec, scale, zero)).norm() / w.norm().clamp(min=1e-12))
        # one read-back for the block (each .item() would wait for the GPU)
        return dict(zip(var.qparams[index], torch.stack(errs).tolist())) if errs else {}

    def rtn_all(self, spec: QuantSpec, variant: int = 0) -> None:
        """Quantize without calibration data: every block gets RTN qparams from its weights."""
        var = self.variants[variant]
        var.spec = spec
        for i in self.plan.blocks:
            var.qparams[i] = self._fill_qparams(i, var.block(i), {}, spec)
        var.mode = "transformed"

    def to_fake_quant(self, variant: int = 0) -> None:
        """Replace transformed weights by their fake-quantized values (one way: evals run in this order)."""
        var = self.variants[variant]
        if var.mode == "fake_quant":
            return
        for i in self.plan.blocks:
            self._fake_quant_inplace(var, var.block(i), i)
        var.mode = "fake_quant"

    # -- export ------------------------------------------------------------------------------------------
    def state_for_export(self, variant: int = 0) -> Dict[str, torch.Tensor]:
        """This worker's tensors under their HF names, on CPU."""
        sd: Dict[str, torch.Tensor] = {}
        for i in self.plan.blocks:
            for k, v in self.variants[variant].block(i).state_dict().items():
                sd[f"{self.mspec.blocks}.{i}.{k}"] = v
        if self.plan.first:
            sd[f"{self.mspec.embed}.weight"] = self.embed.weight
        if self.plan.last:
            sd[f"{self.mspec.final_norm}.weight"] = self.norm.weight
            if not getattr(self.config, "tie_word_embeddings", False):
                sd[f"{self.mspec.lm_head}.weight"] = self.head.weight
        return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    def write_shard(self, path: str, variant: int = 0) -> List[str]:
        from safetensors.torch import save_file

        sd = self.state_for_export(variant)
        save_file(sd, path, metadata={"format": "pt"})
        return sorted(sd)

    def qparams_for_export(self, variant: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
        return {f"{self.mspec.blocks}.{i}.{n}": {"scale": s.cpu(), "zero": z.cpu()}
                for i, qp in self.variants[variant].qparams.items() for n, (s, z) in qp.items()}

    def memory(self) -> Dict[str, int]:
        """Peak host RSS of this actor's process, and peak GPU memory allocated by torch."""
        import resource

        out = {"rank": self.plan.rank, "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            out["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out


HAND_ON = ("device", "host", "none")  # where a calibrated block's outputs go: see calibrate_block


def _check_hand_on(hand_on: str) -> None:
    if hand_on not in HAND_ON:
        raise ValueError(f"hand_on={hand_on!r}: use one of {HAND_ON}")


def block_checkpoint(ckpt_dir: Path, index: int) -> Path:
    return ckpt_dir / f"block_{index:05d}.safetensors"


def block_ranges(blocks) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'"""
    out: List[List[int]] = []
    for b in sorted(blocks):
        if out and b == out[-1][1] + 1:
            out[-1][1] = b
        else:
            out.append([b, b])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in out)


def _small(info: Dict[str, Any]) -> Dict[str, Any]:
    """Keep report payloads small and JSON-friendly (tensors become lists only when tiny)."""
    out = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist() if v.numel() <= 64 else f"tensor{tuple(v.shape)}"
        out[k] = v
    return out
