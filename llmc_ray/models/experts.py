"""Per-expert linears in place of transformers' fused experts.

transformers 5.x keeps a MoE layer's routed experts as two 3-D parameters (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), while published checkpoints (and `save_pretrained`, which reverts the fusion) store
one `nn.Linear` weight per expert: `mlp.experts.E.{gate,up,down}_proj.weight`. Replacing the fused module by
`PerExpertLinears` makes the block's names those of the checkpoint, so loading, AWQ/GPTQ (which work on
`nn.Linear`s), block checkpoints and export need no special case. The router and the MoE block stay HF's.
"""
from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x)), like transformers' dense MLP."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertLinears(nn.ModuleList):
    """Drop-in for a fused experts module: same call `(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`, same output (transformers' eager loop). An expert that no token was routed
    to is not called at all, so hooks on its linears see exactly the tokens routed to it."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        # every (token, slot) sorted by expert once, with one read-back of the counts, instead of a where() and
        # a read-back per expert (64 host syncs per forward at DeepSeek-V2's width). The stable sort keeps each
        # expert's tokens in the order where() gives them, so the sums are the same, bit for bit.
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self)).tolist()
        token_of, slot_of = order // k, order % k
        start = 0
        for expert, n in zip(self, counts):
            if n:
                token_idx, k_pos = token_of[start:start + n], slot_of[start:start + n]
                y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
                out.index_add_(0, token_idx, y.to(out.dtype))
            start += n
        return out


def is_fused(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and isinstance(down, torch.Tensor) \
        and down.dim() == 3


def unfuse(fused: nn.Module) -> PerExpertLinears:
    """The per-expert equivalent of a fused experts module (gate rows first in gate_up_proj, as transformers
    chunks it); the weights are copied unless they are on the meta device."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    n, two_i, hidden = gate_up.shape
    inter = two_i // 2
    if down.shape != (n, hidden, inter):
        raise ValueError(f"fused experts: down_proj {tuple(down.shape)} does not match gate_up_proj "
                         f"{tuple(gate_up.shape)}")
    experts = PerExpertLinears(ExpertMLP(hidden, inter, fused.act_fn, gate_up.device, gate_up.dtype)
                               for _ in range(n))
    if gate_up.device.type != "meta":
        with torch.no_grad():
            for e, ex in enumerate(experts):
                ex.gate_proj.weight.copy_(gate_up[e, :inter])
                ex.up_proj.weight.copy_(gate_up[e, inter:])
                ex.down_proj.weight.copy_(down[e])
    return experts


def unfuse_experts(block: nn.Module, path: str) -> bool:
    """Replace the fused experts module at `path` in `block` (if there is one) by PerExpertLinears."""
    parent_name, _, leaf = path.rpartition(".")
    try:
        parent = block.get_submodule(parent_name) if parent_name else block
        fused = getattr(parent, leaf)
    except AttributeError:
        return False
    if not isinstance(fused, nn.Module) or not is_fused(fused):
        return False
    setattr(parent, leaf, unfuse(fused))
    return True


__all__ = ["ExpertMLP", "PerExpertLinears", "is_fused", "unfuse", "unfuse_experts"]
