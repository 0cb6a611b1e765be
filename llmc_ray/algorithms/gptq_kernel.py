"""GPTQ's column sweep for one lazy batch as a single Triton kernel.

The sweep quantizes a batch's columns one after the other and pushes each column's error onto the later ones:
in PyTorch that is ~12 tiny kernels per column (a CUDA graph only removes their Python launch cost, not their
GPU launch latency). Here one program holds BLOCK_ROWS rows x WIDTH columns in registers and walks the
columns itself, so a lazy batch is one launch. Rows are independent given Hinv, so programs never talk.

Same arithmetic as `gptq.column_sweep` (round half away from zero, IEEE divisions); the compiler may fuse a
multiply and a subtract into one FMA in the update, so on a GPU results can differ from the eager sweep in
the last bit of some weights (and then, rarely, in a rounded code). Under TRITON_INTERPRET=1 the kernel runs
on CPU tensors with NumPy: that is how the tests check it against the eager sweep.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .triton_support import KernelSwitch, interpreting, round_half_away, tl, triton

BLOCK_ROWS = 16
kernels = KernelSwitch("fused GPTQ sweep", "GPTQ uses the CUDA-graph sweep (eager on a CPU; "
                       "quant.special.sweep=graph avoids trying it)")


def usable(t: torch.Tensor, width: int) -> Optional[str]:
    """None when the fused sweep can run on tensors like `t` with lazy batches of `width` columns, else why not."""
    if triton is None:
        return "triton is not installed"
    if kernels.broken:
        return kernels.broken
    if not (t.is_cuda or interpreting()):
        return "the tensors are not on a CUDA device"
    if width < 1 or width & (width - 1) or width > 256:
        return f"blocksize {width} is not a power of two <= 256"
    return None


if triton is not None:

    @triton.jit
    def _sweep_kernel(w_ptr, h_ptr, s_ptr, z_ptr, q_ptr, l_ptr, e_ptr, rows, stride_w, stride_h, stride_s,
                      stride_z, stride_q, stride_l, stride_e, qmin, qmax,
                      WIDTH: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        live = r < rows
        c = tl.arange(0, WIDTH)
        w = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=live[:, None], other=0.0)
        for i in range(WIDTH):
            wi = tl.sum(tl.where(c[None, :] == i, w, 0.0), axis=1)  # column i of the updated batch
            s = tl.load(s_ptr + r * stride_s + i, mask=live, other=1.0)
            z = tl.load(z_ptr + r * stride_z + i, mask=live, other=0.0)
            x = tl.div_rn(wi, s)
            code = tl.minimum(tl.maximum(round_half_away(x) + z, qmin), qmax)
            q = (code - z) * s
            d = tl.load(h_ptr + i * stride_h + i)
            diff = wi - q
            tl.store(q_ptr + r * stride_q + i, q, mask=live)
            tl.store(l_ptr + r * stride_l + i, tl.div_rn(tl.div_rn(diff * diff, d * d), 2.0), mask=live)
            err = tl.div_rn(diff, d)
            tl.store(e_ptr + r * stride_e + i, err, mask=live)
            h = tl.load(h_ptr + i * stride_h + c, mask=c >= i, other=0.0)  # row i of Hinv, from column i on
            w = w - err[:, None] * h[None, :]


def fused_sweep(W1: torch.Tensor, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor, qmin: float,
                qmax: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, L1, Err1) of one lazy batch, as `gptq.column_sweep` returns them; W1 [rows, n] fp32 with n a power
    of two (pad a narrower batch with `gptq.pad_lazy_batch`). W1 itself is not modified."""
    rows, n = W1.shape
    why = usable(W1, n)
    if why:
        raise RuntimeError(f"fused GPTQ sweep: {why}")
    W1, Hinv1, S, Z = (t.contiguous().float() for t in (W1, Hinv1, S, Z))
    Q1, L1, E1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    grid = (triton.cdiv(rows, BLOCK_ROWS),)
    _sweep_kernel[grid](W1, Hinv1, S, Z, Q1, L1, E1, rows, W1.stride(0), Hinv1.stride(0), S.stride(0),
                        Z.stride(0), Q1.stride(0), L1.stride(0), E1.stride(0), float(qmin), float(qmax),
                        WIDTH=n, BLOCK_ROWS=BLOCK_ROWS)
    return Q1, L1, E1
