"""Ray start-up and the actor group: thin actors around BlockWorker, set up by explicit calls in order."""
from __future__ import annotations

import logging
import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import ray

from ..checkpoint import Checkpoint
from ..config import ConfigError, DistConfig
from ..worker import BlockWorker, WorkerPlan
from .planner import partition

log = logging.getLogger(__name__)


# GPU actors pass host tensors (activation hand-offs, spread experts) through the object store. By default
# Ray pickles a torch tensor's bytes in band (a copy on each side); with this it sends them as out-of-band
# buffers and the receiver gets a view of the store's shared memory. Such a view is read-only: GPU actors only
# ever copy what they receive to their device, so this is set for them only, never for CPU actors (which
# compute on what they receive; a later CPU run in the same process reuses this Ray: run it in its own
# process); on an existing cluster, set it in the cluster's or the job's env.
ZERO_COPY_TENSORS = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}


def init_ray(dist: DistConfig) -> None:
    if ray.is_initialized():  # later jobs of a multirun (one process), tests: reuse this process's Ray
        return
    # Ray's own start-up chatter stays out of the user's console; actors' errors still surface via exceptions
    kw: Dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                              configure_logging=True)
    if dist.address or os.environ.get("RAY_ADDRESS"):
        # an existing cluster: dist.address, or RAY_ADDRESS as a Ray Job's driver has it; the cluster's auth rules
        ray.init(address=dist.address or None, **kw)
    else:
        # A new local Ray turns token auth on by default and warns about it on every start ("Token
        # authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out"). Choosing
        # that same mode explicitly (RAY_AUTH_MODE=token) keeps the behaviour and drops the warning; a user's
        # own RAY_AUTH_MODE wins. Ray caches the mode at import, so the env var alone comes too late here:
        # Ray's own switch sets it and refreshes the cache (what ray.init does itself, minus the warning).
        if "RAY_AUTH_MODE" not in os.environ:
            try:
                from ray._private.authentication.authentication_token_setup import _enable_token_auth
            except ImportError:  # a Ray without token auth: nothing to silence
                pass
            else:
                _enable_token_auth()
        if dist.device == "cuda":
            # the workers of the Ray started here inherit this process's env (a runtime_env would do the same
            # through Ray's env agent, seconds slower to start actors); an existing cluster keeps its own
            for k, v in ZERO_COPY_TENSORS.items():
                os.environ.setdefault(k, v)
        # "local": start our own, never attach to another `ray start` cluster found in /tmp/ray by chance
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, dist.actors * dist.cpus_per_actor), **kw)


def plan_workers(ckpt: Checkpoint, spec, n_layers: int, dist: DistConfig, model_type: str,
                 dtype: str) -> List[WorkerPlan]:
    sizes = [ckpt.bytes_under(f"{spec.blocks}.{i}.") for i in range(n_layers)]
    head = ckpt.bytes_under(spec.lm_head + ".") or ckpt.bytes_under(spec.embed + ".")
    ranges = partition(sizes, dist.actors, first_extra=ckpt.bytes_under(spec.embed + "."),
                       last_extra=head + ckpt.bytes_under(spec.final_norm + "."))
    threads = dist.cpus_per_actor if dist.device == "cpu" else 0
    run_id = uuid.uuid4().hex[:8]  # runs sharing a spill_dir never share files
    spill = lambda r: str(Path(dist.spill_dir) / f"run_{run_id}" / f"actor_{r}") if dist.spill_dir else None  # noqa: E731
    return [WorkerPlan(rank=r, blocks=rg, first=r == 0, last=r == len(ranges) - 1, model_dir=str(ckpt.dir),
                       model_type=model_type, dtype=dtype, device=dist.device, threads=threads, spill_dir=spill(r))
            for r, rg in enumerate(ranges)]


class BlockActor(BlockWorker):
    """BlockWorker plus what only Ray knows: where this actor runs (to set the chain's process group up)."""

    def __init__(self, plan: WorkerPlan):
        super().__init__(plan)
        # Ray (sending) and torch (receiving) warn once per process that zero-copy tensors must be treated as
        # read-only: they are (see ZERO_COPY_TENSORS), so the warnings would only alarm users
        warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def node_address(self) -> Tuple[str, int]:
        """This node's address as Ray sees it, and a port free on it."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]


# auto picks NCCL sends between GPU actors: measured on two H200s (bench/RESULTS.md, session 7), the 7B-shape
# eval gave the same PPL to the last digit as one GPU and ran 4 % faster than through the object store
COLLECTIVE_BY_DEFAULT_ON_GPUS = True


def resolve_transport(dist: DistConfig) -> str:
    """auto: direct sends between GPU actors (COLLECTIVE_BY_DEFAULT_ON_GPUS), else the object store: CPU actors
    gain nothing from gloo's loopback TCP over Ray's shared memory."""
    if dist.transport != "auto":
        return dist.transport
    on_gpus = dist.device == "cuda" and dist.actors > 1
    return "collective" if on_gpus and COLLECTIVE_BY_DEFAULT_ON_GPUS else "object_store"


class ActorGroup:
    """The chain of block actors, first to last."""

    def __init__(self, plans: List[WorkerPlan], dist: DistConfig):
        if dist.device == "cuda":
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < len(plans):
                raise ConfigError(f"dist.actors={len(plans)} with dist.device=cuda needs {len(plans)} GPUs; "
                                  f"the Ray cluster has {gpus:g}")
        remote = ray.remote(num_cpus=dist.cpus_per_actor, num_gpus=1 if dist.device == "cuda" else 0,
                            max_restarts=0)(BlockActor)
        self.plans = plans
        self.actors = [remote.options(name=None).remote(p) for p in plans]
        self.owner = {i: a for a, p in zip(self.actors, plans) for i in p.blocks}
        self.transport = resolve_transport(dist)

    @property
    def first(self):
        return self.actors[0]

    @property
    def last(self):
        return self.actors[-1]

    def load(self) -> List[Dict[str, Any]]:
        """Every actor loads its blocks; then, with the collective transport, the chain's process group forms."""
        loaded = ray.get([a.load.remote() for a in self.actors])
        if self.transport == "collective" and len(self.actors) > 1:
            address, port = ray.get(self.first.node_address.remote())
            try:
                self.call_all("connect", address, port, len(self.actors))
            except ray.exceptions.RayTaskError as e:
                raise RuntimeError(f"the actors could not form a torch.distributed group for direct sends "
                                   f"({e.as_instanceof_cause()}); set dist.transport=object_store to pass "
                                   f"activations through Ray's object store instead") from None
        return loaded

    def call_all(self, method: str, *args) -> List[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
