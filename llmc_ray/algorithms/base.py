"""What every algorithm sees (a BlockContext) and gives back (a BlockResult), plus the registry.

An algorithm is one function `fn(ctx) -> BlockResult` that edits `ctx.block` in place into its
"transformed" fp weights and returns the qparams the fake-quant/real export must use for each linear
(None: recompute RTN qparams from the transformed weight). Algorithms never import Ray.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import nn

from ..models.spec import Subset
from ..quant.quantizer import QuantSpec

QParams = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class BlockContext:
    block: nn.Module
    inputs: List[torch.Tensor]  # hidden-state micro-batches [bs, seq, hidden], on the block's device
    block_kwargs: Dict[str, Any]  # what block(x, **kwargs) needs: position_embeddings, attention_mask, ...
    subsets: Tuple[Subset, ...]
    spec: QuantSpec
    special: Any  # the method's frozen settings dataclass
    index: int = 0  # block index, for error messages and reports

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.block(x, **self.block_kwargs))

    def call(self, subset: Subset, x: torch.Tensor) -> torch.Tensor:
        """Run the subset's inspect module on its input x."""
        kwargs = self.block_kwargs if subset.inspect_kwargs else {}
        return first_tensor(self.module(subset.inspect)(x, **kwargs))

    def capture_inputs(self, names: List[str]) -> Dict[str, List[torch.Tensor]]:
        """Run the block over all inputs and record what each named module receives."""
        seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        with forward_pre_hooks({n: self.module(n) for n in names},
                               lambda n, args: seen[n].append(args[0].detach())):
            with torch.no_grad():
                for x in self.inputs:
                    self.forward(x)
        return seen


@dataclass
class BlockResult:
    qparams: Dict[str, Optional[QParams]] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)  # small per-block numbers for the report


def first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def forward_pre_hooks(modules: Dict[str, nn.Module], fn: Callable[[str, tuple], None]) -> Iterator[None]:
    """The one place hooks are registered; they are removed however the block exits."""
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: fn(n, args)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[BlockContext], BlockResult]
    special: Type
    needs_calib: bool
    needs_grad: bool = False  # learnable methods (OmniQuant-style) run with autograd on


ALGORITHMS: Dict[str, Method] = {}


def register(name: str, special: Type, needs_calib: bool = True, needs_grad: bool = False):
    def deco(fn):
        ALGORITHMS[name.lower()] = Method(name, fn, special, needs_calib, needs_grad)
        return fn
    return deco


def resolve(method: str, special: Dict[str, Any]) -> Tuple[Method, Any]:
    """Method by (case-insensitive) name, with its `special` dict turned into the method's dataclass."""
    from ..config import ConfigError
    from . import awq, gptq, rtn  # noqa: F401  (fill the registry)

    m = ALGORITHMS.get(method.lower())
    if m is None:
        raise ConfigError(f"quant.method={method!r}: known methods are {sorted(x.name for x in ALGORITHMS.values())}")
    known = {f.name for f in dataclasses.fields(m.special)}
    unknown = sorted(set(special) - known)
    if unknown:
        raise ConfigError(f"quant.special has {unknown}, which {m.name} does not take: allowed {sorted(known)}")
    try:
        return m, m.special(**special)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"quant.special for {m.name}: {e}") from None
