"""AWQ's grid search as few memory passes as possible: two Triton kernels, each with its PyTorch reference.

Each of the 20 grid points re-quantizes the subset's weights and compares the inspect module's output with
the fp one. At 7B shape the matmuls of those forwards are the method's FLOP floor; the rest is elementwise
work on large tensors, which PyTorch runs as ~15 passes over fp32 copies:
  - `scaled_fake_quant`: Q(W * s) / s back in W's dtype (minmax per-group qparams): one read, one write;
  - `sq_err_sum`: sum((a - b)^2) over two half-precision outputs, accumulated in fp32: one read of each.
Same arithmetic as the references (IEEE divisions, round half away from zero), so under TRITON_INTERPRET=1
the fake-quant kernel is bit-identical to `scaled_fake_quant_reference` (the tests); the sum adds in
another order. Where a kernel cannot run (CPU, no Triton, a layout it does not take) the reference runs; a
kernel that fails to build or launch on a GPU is not tried again in this process (said once in the log).
"""
from __future__ import annotations

import torch

from ..quant.quantizer import MIN_RANGE, QuantSpec, fake_quant
from .triton_support import KernelSwitch, round_half_away, tl, triton

TILE = 4096  # elements per program
kernels = KernelSwitch("fused AWQ kernels", "AWQ uses PyTorch ops")


def _fused_layout(w: torch.Tensor, spec: QuantSpec) -> bool:
    g = spec.group_size
    return (spec.granularity == "per_group" and spec.calib_algo == "minmax" and g & (g - 1) == 0
            and g <= TILE and w.dim() == 2 and w.shape[1] % g == 0)


if triton is not None:

    @triton.jit
    def _to_bf16(x):
        """fp32 -> bf16, round to nearest even, spelled out in integer ops: the GPU's own conversion does the
        same, Triton's interpreter (the tests) truncates instead."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _scaled_fake_quant_kernel(w_ptr, s_ptr, o_ptr, rows, stride_w, stride_o, qmin, qmax, min_range,
                                  SYM: tl.constexpr, GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                                  OUT_BF16: tl.constexpr):
        r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        c = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        live = (r < rows)[:, None]
        s = tl.load(s_ptr + c)
        w = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=live, other=0.0).to(tl.float32) * s[None, :]
        hi = tl.max(w, axis=1)
        lo = tl.min(w, axis=1)
        if SYM:
            scale = tl.div_rn(tl.maximum(tl.maximum(tl.abs(hi), tl.abs(lo)), min_range), qmax)
            zero = tl.zeros_like(scale)
        else:
            scale = tl.div_rn(tl.maximum(hi - lo, min_range), qmax)
            zero = tl.minimum(tl.maximum(round_half_away(tl.div_rn(-lo, scale)), qmin), qmax)
        code = tl.minimum(tl.maximum(round_half_away(tl.div_rn(w, scale[:, None])) + zero[:, None], qmin), qmax)
        out = tl.div_rn((code - zero[:, None]) * scale[:, None], s[None, :])
        if OUT_BF16:
            out = _to_bf16(out)
        tl.store(o_ptr + r[:, None] * stride_o + c[None, :], out.to(o_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _sq_err_kernel(a_ptr, b_ptr, part_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        d = tl.load(a_ptr + offs, mask=live, other=0.0).to(tl.float32) - \
            tl.load(b_ptr + offs, mask=live, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid, tl.sum(d * d, axis=0))


def scaled_fake_quant_reference(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(W * s) / s in W's dtype, with s [in] fp32 scaling W's columns (AWQ's candidate weights)."""
    return (fake_quant(w.float() * s, spec) / s).to(w.dtype)


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`scaled_fake_quant_reference` in one pass where the kernel takes the layout (minmax per-group qparams
    with a power-of-two group size)."""
    if not (kernels.runs_on(w) and _fused_layout(w, spec)):
        return scaled_fake_quant_reference(w, s, spec)

    def fused() -> torch.Tensor:
        wc, sc = w.contiguous(), s.float().contiguous()
        out = torch.empty_like(wc)
        g = spec.group_size
        block_rows = max(1, TILE // g)
        grid = (triton.cdiv(wc.shape[0], block_rows), wc.shape[1] // g)
        _scaled_fake_quant_kernel[grid](wc, sc, out, wc.shape[0], wc.stride(0), out.stride(0), float(spec.qmin),
                                        float(spec.qmax), MIN_RANGE, SYM=spec.symmetric, GROUP=g,
                                        BLOCK_ROWS=block_rows, OUT_BF16=wc.dtype == torch.bfloat16)
        return out
    return kernels.attempt(fused, lambda: scaled_fake_quant_reference(w, s, spec))


def sq_err_sum_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).sum()


def sq_err_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum((a - b)^2) in fp32 as a 0-d tensor on a's device (not read back: no sync)."""
    if a.shape != b.shape:
        raise ValueError(f"sq_err_sum: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if not kernels.runs_on(a) or a.numel() == 0:
        return sq_err_sum_reference(a, b)

    def fused() -> torch.Tensor:
        fa, fb = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
        parts = torch.empty(triton.cdiv(fa.numel(), TILE), device=fa.device, dtype=torch.float32)
        _sq_err_kernel[(parts.numel(),)](fa, fb, parts, fa.numel(), BLOCK=TILE)
        return parts.sum()
    return kernels.attempt(fused, lambda: sq_err_sum_reference(a, b))
