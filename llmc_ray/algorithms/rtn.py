"""Round-to-nearest: no calibration; the transformed weights are the original ones."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BlockContext, BlockResult, register


@dataclass(frozen=True)
class RtnSpecial:
    pass


@register("RTN", RtnSpecial, needs_calib=False)
def rtn(ctx: BlockContext) -> BlockResult:
    # qparams None: fake-quant/export derive them from the (unchanged) weights
    return BlockResult(qparams={name: None for s in ctx.subsets for name in s.layers})
