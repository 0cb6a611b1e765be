"""Model adapters as data: where a family keeps its blocks, embeddings, norm and head, and which linears
share an input (the AWQ/GPTQ subsets). No logic beyond naming modules (templates are expanded per block in
`subsets.py`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Subset:
    """Linears fed by one input.

    `prev_op` produced that input (a norm or a linear) and absorbs the inverse of a per-channel scale; None:
    the layers are quantized but never scaled (their input is not one module's per-channel output).
    `inspect` is the smallest module whose output covers all `layers`; `inspect_kwargs` says it needs the
    block's call kwargs (position embeddings, mask).
    `absorb`: modules that read prev_op's output too but are not quantized (MoE routers): when the input is
    divided by s, their weight columns are multiplied by s, so they compute the same thing.
    `input_groups`: layers that see the same tokens, when not all of them do (routed experts each see only
    the tokens routed to them); empty: every layer sees all of prev_op's output.
    `stage`: subsets with the same non-empty stage are independent of each other (each expert's own
    layers), so a true-sequential method may collect their inputs in one pass."""
    prev_op: Optional[str]
    layers: Tuple[str, ...]
    inspect: str
    inspect_kwargs: bool = False
    absorb: Tuple[str, ...] = ()
    input_groups: Tuple[Tuple[str, ...], ...] = ()
    stage: str = ""

    def groups(self) -> Tuple[Tuple[str, ...], ...]:
        return self.input_groups or (self.layers,)


@dataclass(frozen=True)
class ModelSpec:
    """`subsets` are templates: `{e}` in a name stands for each routed expert of the block (see subsets.py);
    a subset naming a module the block does not have is dropped for that block (dense vs MoE layers,
    q_proj vs q_a_proj)."""
    name: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    rotary: Optional[str]
    subsets: Tuple[Subset, ...]
    experts: Optional[str] = None  # path, inside a block, of the routed experts (a ModuleList once unfused)


def linears(subsets: Tuple[Subset, ...]) -> Tuple[str, ...]:
    """Every quantized linear of a block's resolved subsets, in subset order."""
    return tuple(n for s in subsets for n in s.layers)
