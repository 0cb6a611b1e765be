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
    experts: Tuple[str, ...] = ()  # the block's routed experts (module names), for the coverage report
    # the routed experts are calibrated elsewhere (Method.experts_apart): leave their layers alone and hand
    # back what each expert's module receives (BlockResult.routed_inputs)
    experts_apart: bool = False

    def module(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.block(x, **self.block_kwargs))

    def call(self, subset: Subset, x: torch.Tensor) -> torch.Tensor:
        """Run the subset's inspect module on its input x."""
        kwargs = self.block_kwargs if subset.inspect_kwargs else {}
        return first_tensor(self.module(subset.inspect)(x, **kwargs))

    def capture_inputs(self, names: List[str]) -> Dict[str, List[torch.Tensor]]:
        """Run the block over all inputs and record what each named module receives (a routed expert's
        linears: only the tokens routed to it; none if it got none)."""
        return self.capture(names)[0]

    def capture(self, names: List[str], outputs: Tuple[str, ...] = ()) -> Tuple[Dict[str, List[torch.Tensor]],
                                                                                 Dict[str, List[torch.Tensor]]]:
        """capture_inputs, plus what each module named in `outputs` returns (its first tensor), call by call."""
        seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        out: Dict[str, List[torch.Tensor]] = {n: [] for n in outputs}
        hooks = [self.module(n).register_forward_hook(lambda _m, _a, y, n=n: out[n].append(first_tensor(y).detach()))
                 for n in outputs]
        try:
            with forward_pre_hooks({n: self.module(n) for n in names}, lambda n, x: seen[n].append(x.detach())):
                with torch.no_grad():
                    for x in self.inputs:
                        self.forward(x)
        finally:
            for h in hooks:
                h.remove()
        return seen, out


@dataclass
class BlockResult:
    qparams: Dict[str, Optional[QParams]] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)  # small per-block numbers for the report
    # with BlockContext.experts_apart: each routed expert's inputs, one tensor per forward that routed it
    # tokens, as the block would have fed them to it at the point the method calibrates experts
    routed_inputs: Dict[str, List[torch.Tensor]] = field(default_factory=dict)


def first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def module_input(args: tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
    """A module's input: its first positional argument, or `hidden_states=` (transformers' decoder layers
    call attention with keywords)."""
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def forward_pre_hooks(modules: Dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """The one place hooks are registered: `fn(name, input)` before each call; they are removed however the
    block exits."""
    handles = [m.register_forward_pre_hook(lambda _m, args, kwargs, n=n: fn(n, module_input(args, kwargs)),
                                           with_kwargs=True) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def token_count(xs: List[torch.Tensor]) -> int:
    """Tokens (rows over the last dim) in a list of captured inputs."""
    return sum(x.numel() // x.shape[-1] for x in xs)


def expert_coverage(experts: Tuple[str, ...], tokens: Dict[str, int]) -> Dict[str, Any]:
    """Report entries for a MoE block: calibration tokens each routed expert got (from the token counts of
    its linears, `tokens[layer]`) and the experts that got none (their linears fall back to RTN)."""
    if not experts:
        return {}
    counts = {e: max([n for layer, n in tokens.items() if layer.startswith(e + ".")], default=0) for e in experts}
    return {"expert_tokens": counts, "experts_without_tokens": [e for e, n in counts.items() if n == 0]}


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[BlockContext], BlockResult]
    special: Type
    needs_calib: bool
    needs_grad: bool = False  # learnable methods (OmniQuant-style) run with autograd on
    # each routed expert's calibration depends only on the tokens routed to it, so it can run apart from its
    # block, on another actor (dist.spread_experts): the method honours BlockContext.experts_apart, and run on
    # the experts alone (worker.ExpertSet, subsets from models.only_experts) it gives what it gives in the block
    experts_apart: bool = False


ALGORITHMS: Dict[str, Method] = {}


def register(name: str, special: Type, needs_calib: bool = True, needs_grad: bool = False,
             experts_apart: bool = False):
    def deco(fn):
        ALGORITHMS[name.lower()] = Method(name, fn, special, needs_calib, needs_grad, experts_apart)
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
