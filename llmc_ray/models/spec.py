"""Model adapters as data: where a family keeps its blocks, embeddings, norm and head, and which linears
share an input (the AWQ/GPTQ subsets). No logic beyond naming modules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Subset:
    """Linears fed by one input. `prev_op` produced that input (a norm or a linear) and absorbs the inverse
    of a per-channel scale; `inspect` is the smallest module whose output covers all `layers`;
    `inspect_kwargs` says it needs the block's call kwargs (position embeddings, mask)."""
    prev_op: str
    layers: Tuple[str, ...]
    inspect: str
    inspect_kwargs: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    rotary: Optional[str]
    subsets: Tuple[Subset, ...]

    @property
    def linears(self) -> Tuple[str, ...]:
        return tuple(n for s in self.subsets for n in s.layers)
