"""Activations sent straight from one worker to the next with torch.distributed point-to-point ops (NCCL
between GPUs: over NVLink, never through host memory; gloo between CPU workers), instead of as host copies
through Ray's object store. Plain torch: the Ray layer only sets the group up and passes the small
`SentToPeer` markers that say what to receive.

Why it is safe to pair sends and receives by order: each worker sends only to the next one, Ray runs an
actor's calls in submission order, and the driver submits every consumer in the same order as its producer,
so the k-th send of worker r is the k-th receive of worker r+1. A producer sends as its very last step, so a
call that fails never leaves a send without its receive.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import List, Tuple

import torch
import torch.distributed as tdist

# how long joining the group, or a send waiting for its receive, may take before torch gives up: a receive is
# posted as soon as the next worker finishes its previous batch (seconds), so this only ends real hangs
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class SentToPeer:
    """Handed on through Ray instead of activations: what the next worker receives from this one."""
    shapes: Tuple[Tuple[int, ...], ...]
    dtype: str


class PeerLink:
    """This worker's place in the chain: receive from rank-1, send to rank+1."""

    def __init__(self, address: str, port: int, rank: int, world: int, device: torch.device):
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                 timeout=TIMEOUT, **kw)
        self.rank, self.world, self.device = rank, world, device
        self.pending: List[Tuple[tdist.Work, torch.Tensor]] = []  # sends in flight, with their tensors
        # NCCL sets a pair's communicator up on its first send/recv, which blocks until both sides join: do it
        # now, while every worker runs this call at once (later the receiver only starts once the send returned)
        if world > 1:
            got = self.receive(SentToPeer(((1,),), "float32")) if rank > 0 else None
            if rank < world - 1:
                self.send([torch.ones(1, device=device)])
            if got is not None and got[0].item() != 1.0:
                raise RuntimeError(f"worker {rank}: the link from worker {rank - 1} carried the wrong value")
            self.flush()

    def send(self, acts: List[torch.Tensor]) -> SentToPeer:
        """Start sending to the next worker (one op per micro-batch); the tensors are kept until it completes."""
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]
        for a in acts:
            a = a.contiguous()
            self.pending.append((tdist.isend(a, self.rank + 1), a))
        return SentToPeer(tuple(tuple(a.shape) for a in acts), str(acts[0].dtype).removeprefix("torch."))

    def receive(self, marker: SentToPeer) -> List[torch.Tensor]:
        """The activations the previous worker sent (ready on the current stream when this returns)."""
        dtype = getattr(torch, marker.dtype)
        out = [torch.empty(s, dtype=dtype, device=self.device) for s in marker.shapes]
        for w in [tdist.irecv(t, self.rank - 1) for t in out]:
            w.wait()
        return out

    def flush(self) -> None:
        """Wait for every send in flight."""
        for w, _ in self.pending:
            w.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.pending = []
