"""Integer weight quantizer: pure tensor -> tensor functions.

Weights are HF Linear layout [out, in]. Groups are `group_size` consecutive input elements of one output row
(per_channel = one group per row, per_tensor = one group for the whole tensor). qparams have shape
[out, n_groups] (per_tensor: [1, 1]).

Formulas (llmc's, which TPU-MLIR's asymmetric W4 re-quantizer shares):
  asymmetric: s = max(max - min, 1e-5) / (2^b - 1), zp = clamp(-round(min / s), 0, 2^b - 1),
              q = clamp(round(w / s) + zp, 0, 2^b - 1), w' = (q - zp) * s
  symmetric:  s = max(absmax, 1e-5) / (2^(b-1) - 1), zp = 0, q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)
Rounding is half away from zero (TPU-MLIR's); torch.round's half-to-even would flip codes on exact ties.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

MIN_RANGE = 1e-5


@dataclass(frozen=True)
class QuantSpec:
    bit: int = 4
    symmetric: bool = False
    granularity: str = "per_group"  # per_tensor | per_channel | per_group
    group_size: int = 128
    calib_algo: str = "minmax"  # minmax | mse

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bit - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bit - 1) - 1 if self.symmetric else 2**self.bit - 1

    def group_len(self, in_features: int) -> int:
        if self.granularity == "per_group":
            return self.group_size
        return in_features

    @classmethod
    def from_config(cls, w) -> "QuantSpec":
        return cls(bit=w.bit, symmetric=w.symmetric, granularity=w.granularity,
                   group_size=w.group_size, calib_algo=w.calib_algo)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def to_groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g] (per_tensor: [1, 1, out*in])."""
    out_f, in_f = w.shape
    if spec.granularity == "per_tensor":
        return w.reshape(1, 1, -1)
    g = spec.group_len(in_f)
    assert in_f % g == 0, f"group_size {g} does not divide in_features {in_f}"
    return w.reshape(out_f, in_f // g, g)


def qparams_from_range(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each group from its (clip) range."""
    if spec.symmetric:
        absmax = torch.maximum(wmax.abs(), wmin.abs()).clamp(min=MIN_RANGE)
        scale = absmax / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (wmax - wmin).clamp(min=MIN_RANGE) / spec.qmax
        zero = round_half_away(-wmin / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def _quant_dequant_groups(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = (round_half_away(wg / s) + z).clamp(spec.qmin, spec.qmax)
    return (q - z) * s


def minmax_qparams(w: torch.Tensor, spec: QuantSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    wg = to_groups(w.float(), spec)
    return qparams_from_range(wg.amin(-1), wg.amax(-1), spec)


def mse_qparams(w: torch.Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8,
                norm: float = 2.4) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shrink each group's range by p in (1 - max_shrink, 1] and keep the p with least |w - q(w)|^norm
    (the GPTQ repo's `mse` search, defaults grid=100, maxshrink=0.8, norm=2.4)."""
    wg = to_groups(w.float(), spec)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    best_err = torch.full_like(wmin, float("inf"))
    best_s, best_z = qparams_from_range(wmin, wmax, spec)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s, z = qparams_from_range(p * wmin, p * wmax, spec)
        err = (_quant_dequant_groups(wg, s, z, spec) - wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    if spec.calib_algo == "mse":
        return mse_qparams(w, spec)
    return minmax_qparams(w, spec)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes, shape of w (int32)."""
    wg = to_groups(w.float(), spec)
    q = (round_half_away(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(spec.qmin, spec.qmax)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = to_groups(q.float(), spec)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape).to(dtype)


def fake_quant(w: torch.Tensor, spec: QuantSpec, scale: Optional[torch.Tensor] = None,
               zero: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dequant(quant(w)) in w's dtype; qparams computed from w unless given."""
    if scale is None:
        scale, zero = compute_qparams(w, spec)
    wg = to_groups(w.float(), spec)
    return _quant_dequant_groups(wg, scale, zero, spec).reshape(w.shape).to(w.dtype)


def fake_quant_columns(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize a few columns [out, k] that all sit in one group whose qparams ([out] each) are given:
    the inner step of GPTQ's column sweep."""
    q = (round_half_away(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(spec.qmin, spec.qmax)
    return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
