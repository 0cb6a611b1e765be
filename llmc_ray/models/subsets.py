"""A block's subsets, from the adapter's templates and the modules that block really has.

`{e}` stands for a routed expert's index. A subset whose prev_op or inspect names `{e}` is repeated for each
expert (each expert's up_proj -> its down_proj); `{e}` inside `layers`/`input_groups` only is expanded in
place (the post-attention norm feeds every expert). A template that mentions `{e}` is dropped in a block
without experts, and any subset naming a module the block lacks is dropped, so dense and MoE blocks (and
MLA with or without q_lora) resolve from one spec. The same rules run on a built block (the worker) and on
checkpoint tensor names (validation, before any weight is read).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, List, Optional, Tuple

from torch import nn

from .spec import ModelSpec, Subset

Has = Callable[[str], bool]  # does the block have a module of this (block-relative) name?
E = "{e}"


def expert_names(spec: ModelSpec, has: Has) -> Tuple[str, ...]:
    """The block's routed experts, `experts.0`, `experts.1`, ... as far as they go."""
    if spec.experts is None:
        return ()
    out: List[str] = []
    while has(f"{spec.experts}.{len(out)}"):
        out.append(f"{spec.experts}.{len(out)}")
    return tuple(out)


def _mentions_experts(t: Subset) -> bool:
    return any(E in n for n in (t.prev_op or "", t.inspect, *t.layers, *t.absorb,
                                *(x for g in t.input_groups for x in g)))


def _fill(name: str, e: int) -> str:
    return name.replace(E, str(e))


def _in_place(names: Iterable[str], n: int) -> Tuple[str, ...]:
    return tuple(x for name in names for x in ([_fill(name, e) for e in range(n)] if E in name else [name]))


def expand(t: Subset, n_experts: int) -> List[Subset]:
    if not _mentions_experts(t):
        return [t]
    if n_experts == 0:
        return []
    if E in (t.prev_op or "") or E in t.inspect:  # one subset per expert, independent of each other
        return [Subset(_fill(t.prev_op, e) if t.prev_op else None, tuple(_fill(x, e) for x in t.layers),
                       _fill(t.inspect, e), t.inspect_kwargs, tuple(_fill(x, e) for x in t.absorb),
                       tuple(tuple(_fill(x, e) for x in g) for g in t.input_groups), stage=t.inspect)
                for e in range(n_experts)]
    groups: List[Tuple[str, ...]] = []
    for g in t.input_groups:
        groups += [tuple(_fill(x, e) for x in g) for e in range(n_experts)] if any(E in x for x in g) else [g]
    return [dataclasses.replace(t, layers=_in_place(t.layers, n_experts), absorb=_in_place(t.absorb, n_experts),
                                input_groups=tuple(groups))]


def modules_of(s: Subset) -> Tuple[str, ...]:
    return tuple(n for n in (s.prev_op, s.inspect, *s.layers, *s.absorb) if n)


def resolve_subsets(spec: ModelSpec, has: Has) -> Tuple[Subset, ...]:
    n = len(expert_names(spec, has))
    return tuple(s for t in spec.subsets for s in expand(t, n) if all(has(m) for m in modules_of(s)))


def module_has(block: nn.Module) -> Has:
    def has(name: str) -> bool:
        try:
            block.get_submodule(name)
        except AttributeError:
            return False
        return True
    return has


def names_has(tensor_names: Iterable[str], prefix: str) -> Has:
    """`has` over checkpoint tensor names: a module exists if some tensor lives under it."""
    modules = set()
    start = prefix + "."
    for name in tensor_names:
        if name.startswith(start):
            parts = name[len(start):].split(".")
            modules.update(".".join(parts[:k]) for k in range(1, len(parts)))
    return modules.__contains__


def block_subsets(spec: ModelSpec, block: nn.Module) -> Tuple[Subset, ...]:
    return resolve_subsets(spec, module_has(block))


def in_experts(name: Optional[str], experts: Iterable[str]) -> bool:
    """Is this module inside one of these routed experts (`experts.3.up_proj` is inside `experts.3`)?"""
    return bool(name) and any(name.startswith(e + ".") for e in experts)


def without_experts(subsets: Tuple[Subset, ...], experts: Tuple[str, ...]) -> Tuple[Subset, ...]:
    """The block's subsets minus the routed experts' layers (subsets left with no layer are dropped): what
    stays with the block's owner when the experts are calibrated elsewhere."""
    out = []
    for s in subsets:
        layers = tuple(n for n in s.layers if not in_experts(n, experts))
        if layers:
            groups = tuple(g for g in s.input_groups if not any(in_experts(n, experts) for n in g))
            out.append(dataclasses.replace(s, layers=layers, input_groups=groups))
    return tuple(out)


def only_experts(subsets: Tuple[Subset, ...], experts: Tuple[str, ...]) -> Tuple[Subset, ...]:
    """What `without_experts` leaves out, for these experts: their input groups of a shared subset (gate/up,
    fed by the block's norm: one subset of those groups, no prev_op) and their own subsets (up -> down), in the
    block's order and stages, so a method run on the experts alone walks them as it would in the block."""
    def within_one(s: Subset) -> bool:
        return any(all(in_experts(n, (e,)) for n in s.layers) for e in experts)

    out = []
    for s in subsets:
        if within_one(s):
            out.append(s)
            continue
        groups = tuple(g for g in s.groups() if all(in_experts(n, experts) for n in g))
        if groups:
            out.append(Subset(None, tuple(n for g in groups for n in g), "", input_groups=groups))
    return tuple(out)


def renamed(s: Subset, rename: Callable[[str], str]) -> Subset:
    """The subset with every module name passed through `rename`."""
    return dataclasses.replace(s, prev_op=rename(s.prev_op) if s.prev_op else None, layers=tuple(map(rename, s.layers)),
                               inspect=rename(s.inspect) if s.inspect else "", absorb=tuple(map(rename, s.absorb)),
                               input_groups=tuple(tuple(map(rename, g)) for g in s.input_groups))
