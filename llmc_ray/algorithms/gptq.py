"""GPTQ: quantize a linear column by column, spreading each column's rounding error onto the columns not yet
quantized through the inverse Hessian of the layer's reconstruction loss (H = 2/n X X^T).

Follows the GPTQ paper and its reference (IST-DASLab/gptq `gptq.py`) as llmc does
(`llmc/compression/quantization/gptq.py`): lazy batch updates of `blocksize` columns, damping
percdamp * mean(diag H), dead inputs (diag H == 0) pinned to 1 with their weight columns zeroed, the upper
Cholesky factor of H^-1, act-order (columns by diag H, descending) and static groups.
The transformed weight is Q itself (dequantized, on the grid of the returned qparams).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..models.spec import Subset
from ..models.subsets import in_experts, without_experts
from ..quant.quantizer import QuantSpec, compute_qparams, fake_quant_columns
from . import gptq_kernel
from .base import BlockContext, BlockResult, QParams, expert_coverage, forward_pre_hooks, register, token_count

SWEEPS = ("graph", "triton", "eager")


@dataclass(frozen=True)
class GptqSpecial:
    blocksize: int = 128  # columns per lazy batch update
    percdamp: float = 0.01  # damping, as a fraction of mean(diag H)
    actorder: bool = False  # quantize columns in order of decreasing diag H
    static_groups: bool = False  # per_group: all group qparams from the original W, before any update
    true_sequential: bool = True  # capture each subset's input with the earlier subsets already quantized
    # how a lazy batch's column sweep runs on a GPU: "triton" runs it as one fused kernel (gptq_kernel.py;
    # falls back to the graph where Triton or a power-of-two blocksize is missing, or where the kernel does
    # not build on the GPU: said once in the log); "graph" replays it as a CUDA graph (bit-identical to
    # "eager", PyTorch ops launched from Python). On a CPU it is always eager.
    sweep: str = "triton"

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError(f"blocksize={self.blocksize} must be >= 1")
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep={self.sweep!r}: use one of {SWEEPS}")
        if not 0.0 <= self.percdamp:
            raise ValueError(f"percdamp={self.percdamp} must be >= 0 (the reference uses 0.01)")


# ---------------------------------------------------------------- Hessian statistics


def accumulate_hessian(H: torch.Tensor, n: int, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Running H = 2/n sum x x^T over all tokens, n counting samples (rows of x's batch dim) like the
    reference; a 2-D x is one sample. Returns the new (H, n); H is updated in place."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    batch = x.shape[0]
    x = x.reshape(-1, x.shape[-1])
    H.mul_(n / (n + batch))
    n += batch
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        # half inputs straight into the tensor cores with fp32 accumulation: a product of two half values is
        # exact in fp32, so this equals the fp32 GEMM of the upcast inputs up to summation order, at the half
        # GEMM rate (~15x the fp32 one on an H100; this GEMM is most of GPTQ's Hessian pass at 7B width)
        H.add_(torch.mm(x.t(), x, out_dtype=torch.float32), alpha=2 / n)
        return H, n
    x = math.sqrt(2 / n) * x.t().float()
    H.add_(x @ x.t())
    return H, n


class HessianStats:
    """H of one linear's input, fed micro-batch by micro-batch (no activations are kept). `tokens` counts
    the rows seen (a routed expert's linear sees only its tokens, possibly none)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        self.H, self.n = accumulate_hessian(self.H, self.n, x.detach())
        self.tokens += x.numel() // x.shape[-1]


# ---------------------------------------------------------------- the solver


class GptqOutput(NamedTuple):
    q: torch.Tensor  # [out, in] fp32, dequantized, original column order
    scale: torch.Tensor  # [out, n_groups] ([1, 1] per_tensor); group k's columns are those with g_idx == k
    zero: torch.Tensor
    g_idx: torch.Tensor  # [in] long: the qparams group of each column (arange(in) // g unless act-order groups)
    perm: Optional[torch.Tensor]  # act-order column order, or None
    row_loss: torch.Tensor  # [out]: per row, sum of (w - q)^2 / (2 d^2), the solver's estimate of the added loss
    failed: torch.Tensor  # 0-d bool: the Cholesky factorisation failed (only when solved with check=False)

    @property
    def loss(self) -> float:
        return self.row_loss.sum().item()


def inverse_cholesky(H: torch.Tensor, percdamp: float, check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H), and a 0-d bool tensor that is
    True when a factorisation failed (H not positive definite). H is damped in place. check=False leaves that
    test to the caller: reading the flag back waits for the GPU, so a block reads all its flags at once."""
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    U, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    failed = (info != 0) | (info_inv != 0)
    if check and failed.item():
        raise not_positive_definite(percdamp)
    return U, failed


def not_positive_definite(percdamp: float, where: str = "") -> torch.linalg.LinAlgError:
    return torch.linalg.LinAlgError(f"GPTQ{where}: the damped Hessian is not positive definite; raise "
                                    f"special.percdamp (now {percdamp})")


def _col(qp: QParams, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One column's qparams as [rows] vectors ([out, 1] per row, or [1, 1] broadcast)."""
    return qp[0].reshape(-1).expand(rows), qp[1].reshape(-1).expand(rows)


def column_sweep(W1: torch.Tensor, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
                 spec: QuantSpec) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One lazy batch: quantize its columns one by one with the given per-column qparams S, Z [rows, n], each
    column's error pushed onto the batch's later columns. W1 is updated in place. Returns Q1 (the quantized
    columns), L1 (per-element loss) and Err1 (the scaled errors, for the update of the later batches)."""
    Q1, L1, Err1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    for i in range(W1.shape[1]):
        w, d = W1[:, i], Hinv1[i, i]
        q = fake_quant_columns(w.unsqueeze(1), S[:, i], Z[:, i], spec).squeeze(1)
        Q1[:, i] = q
        L1[:, i] = (w - q) ** 2 / d**2 / 2
        err = (w - q) / d
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, L1, Err1


class _GraphedSweep:
    """column_sweep captured once as a CUDA graph for one (rows, n, quant grid) and replayed per lazy batch:
    the sweep is ~10 tiny kernels per column, so launching them from Python is what costs time on a GPU. The
    same kernels run on the same values, so results equal the eager sweep's."""

    def __init__(self, rows: int, n: int, spec: QuantSpec, device: torch.device):
        self.W1 = torch.zeros(rows, n, device=device)
        self.Hinv1 = torch.eye(n, device=device)
        self.S, self.Z = torch.ones(rows, n, device=device), torch.zeros(rows, n, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
            column_sweep(self.W1.clone(), self.Hinv1, self.S, self.Z, spec)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = column_sweep(self.W1, self.Hinv1, self.S, self.Z, spec)

    def __call__(self, W1, Hinv1, S, Z):
        for dst, src in ((self.W1, W1), (self.Hinv1, Hinv1), (self.S, S), (self.Z, Z)):
            dst.copy_(src)
        self.graph.replay()
        return self.out  # valid until the next replay: the caller consumes it first


_GRAPHS: Dict[tuple, _GraphedSweep] = {}


def pad_lazy_batch(W1, Hinv1, S, Z, width: int):
    """A lazy batch narrower than `width` (a layer's last) padded with zero columns whose Hinv is the identity
    (scale 1, zero point 0): they quantize to 0 with 0 error and get no updates from the real columns (Hinv
    is 0 between them), so the sweep gives the real columns the same values."""
    n = W1.shape[1]
    if n >= width:
        return W1, Hinv1, S, Z
    pad = width - n
    eye = torch.eye(width, device=Hinv1.device, dtype=Hinv1.dtype)
    eye[:n, :n] = Hinv1
    return (F.pad(W1, (0, pad)), eye, F.pad(S, (0, pad), value=1.0), F.pad(Z, (0, pad)))


def padded_sweep(run, W1, Hinv1, S, Z, width: int):
    """`run(W1, Hinv1, S, Z)`, a sweep over exactly `width` columns, on a batch padded to that width (the fused
    kernel and the CUDA graph take fixed widths); the real columns of (Q1, L1, Err1) back."""
    n = W1.shape[1]
    return tuple(t[:, :n] for t in run(*pad_lazy_batch(W1, Hinv1, S, Z, width)))


def _fused_sweep(W1, Hinv1, S, Z, spec: QuantSpec, width: int):
    return gptq_kernel.kernels.attempt(
        lambda: padded_sweep(lambda *t: gptq_kernel.fused_sweep(*t, spec.qmin, spec.qmax), W1, Hinv1, S, Z, width),
        lambda: _plain_sweep(W1, Hinv1, S, Z, spec, width))


def _plain_sweep(W1, Hinv1, S, Z, spec: QuantSpec, width: int):
    """The sweep without the fused kernel: a CUDA graph on a GPU, launched from Python on a CPU."""
    if W1.is_cuda:
        return graphed_sweep(W1, Hinv1, S, Z, spec, width)
    return column_sweep(W1, Hinv1, S, Z, spec)


def graphed_sweep(W1, Hinv1, S, Z, spec: QuantSpec, width: int):
    """The sweep as a CUDA graph, batches padded to `width` columns: one graph per row count serves them all."""
    key = (W1.shape[0], width, W1.device, spec.qmin, spec.qmax)
    if key not in _GRAPHS:
        if len(_GRAPHS) >= 16:  # shapes of one model are few; a long-lived actor may see many models
            _GRAPHS.clear()
        _GRAPHS[key] = _GraphedSweep(W1.shape[0], width, spec, W1.device)
    return padded_sweep(_GRAPHS[key], W1, Hinv1, S, Z, width)


def gptq_solve(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
               actorder: bool = False, static_groups: bool = False, sweep: str = "triton",
               check: bool = True) -> GptqOutput:
    """GPTQ one weight [out, in] given its input Hessian [in, in] (neither is modified). `sweep` says how each
    lazy batch's column sweep runs on a GPU (GptqSpecial.sweep). check=False: a Hessian that is not positive
    definite is reported in `failed` instead of raising."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    grouped = spec.granularity == "per_group"
    gs = spec.group_size if grouped else cols
    if cols % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {cols}")
    col_spec = dataclasses.replace(spec, granularity="per_channel")  # qparams of a slice of columns

    # per_channel/per_tensor: from the whole W before dead columns are zeroed (reference order)
    qp: Optional[QParams] = None if grouped else compute_qparams(W, spec)
    dead = torch.diag(H) == 0
    # masked fills, not boolean indexing: indexing with a mask waits for the GPU to count it
    H.diagonal().masked_fill_(dead, 1)
    W.masked_fill_(dead.unsqueeze(0), 0)
    static = [compute_qparams(W[:, c:c + gs], col_spec) for c in range(0, cols, gs)] \
        if grouped and static_groups else None
    if static is not None:
        static_scale, static_zero = torch.cat([s for s, _ in static], 1), torch.cat([z for _, z in static], 1)

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, failed = inverse_cholesky(H, percdamp, check)

    Q, losses = torch.zeros_like(W), torch.zeros_like(W)
    found: List[QParams] = []  # dynamic group qparams, in sweep order
    if sweep == "eager":
        run_sweep = functools.partial(column_sweep, spec=spec)
    elif sweep == "triton" and gptq_kernel.usable(W, blocksize) is None:
        run_sweep = functools.partial(_fused_sweep, spec=spec, width=blocksize)
    else:
        run_sweep = functools.partial(_plain_sweep, spec=spec, width=blocksize)
    cur = qp
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # every column's qparams of this lazy batch are known before its sweep: a dynamic group's come from W
        # at the group's first column, and W (unlike W1) changes only between lazy batches — the reference's
        # (and llmc's) choice, kept for identical results
        S = torch.empty(rows, i2 - i1, device=W.device)
        Z = torch.empty_like(S)
        if static is not None:
            order = perm[i1:i2] if perm is not None else torch.arange(i1, i2, device=W.device)
            S[:], Z[:] = static_scale[:, order // gs], static_zero[:, order // gs]
        else:
            c = i1
            while c < i2:
                if grouped and c % gs == 0:
                    cur = compute_qparams(W[:, c:c + gs], col_spec)
                    found.append(cur)
                end = min(i2, (c // gs + 1) * gs) if grouped else i2
                s_c, z_c = _col(cur, rows)
                S[:, c - i1:end - i1], Z[:, c - i1:end - i1] = s_c[:, None], z_c[:, None]
                c = end
        Q1, L1, Err1 = run_sweep(W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], S, Z)
        Q[:, i1:i2], losses[:, i1:i2] = Q1, L1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = torch.arange(cols, device=W.device) // gs
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        if grouped and static is None:
            g_idx = invperm // gs  # group k holds the columns quantized k-th in act order
    groups = static if static is not None else found
    scale, zero = (torch.cat([s for s, _ in groups], 1), torch.cat([z for _, z in groups], 1)) if grouped else qp
    return GptqOutput(Q, scale, zero, g_idx, perm, losses.sum(1), failed)


# ---------------------------------------------------------------- the block method


def collect_hessians(ctx: BlockContext, subsets: Sequence[Subset],
                     routed: Optional[Dict[str, List[torch.Tensor]]] = None) -> Dict[str, HessianStats]:
    """One forward of the current block over all inputs, accumulating H at each input group's first layer
    (layers of a group share their input). `routed`: also keep what each of these expert modules receives."""
    names = [g[0] for s in subsets for g in s.groups()]
    stats = {n: HessianStats(ctx.module(n).weight.shape[1], ctx.module(n).weight.device) for n in names}
    routed = routed if routed is not None else {}

    def seen(n: str, x: torch.Tensor) -> None:
        if n in stats:
            stats[n].add_batch(x)
        else:
            routed[n].append(x.detach())

    with forward_pre_hooks({n: ctx.module(n) for n in [*names, *routed]}, seen):
        with torch.no_grad():
            for x in ctx.inputs:
                ctx.forward(x)
    return stats


def quantize_group(ctx: BlockContext, names: Sequence[str], H: torch.Tensor, sp: GptqSpecial,
                   qparams: Dict[str, Optional[QParams]], losses: Dict[str, torch.Tensor]) -> None:
    """Layers sharing H, and GPTQ treats rows independently given H, so their rows are stacked and solved in
    one column sweep (q/k/v: one sweep instead of three; the sweep is launch-bound). per_tensor qparams span
    a whole layer, so those layers are solved one by one."""
    names = list(names)
    batches = [[n] for n in names] if ctx.spec.granularity == "per_tensor" else [names]
    for batch in batches:
        W = torch.cat([ctx.module(n).weight.data for n in batch])
        out = gptq_solve(W, H, ctx.spec, sp.blocksize, sp.percdamp, sp.actorder, sp.static_groups, sp.sweep,
                         check=False)
        r0 = 0
        for n in batch:
            m = ctx.module(n)
            rows = slice(r0, r0 + m.weight.shape[0])
            m.weight.data = out.q[rows].to(m.weight.dtype)
            qparams[n] = None if act_order_groups(ctx.spec, sp) else (out.scale[rows], out.zero[rows])
            # tensors on the device: the block reads losses and failure flags back once, at its end
            losses[n] = torch.stack([out.row_loss[rows].sum(), out.failed.float()])
            r0 = rows.stop


def quantize_subset(ctx: BlockContext, subset: Subset, stats: Dict[str, HessianStats], sp: GptqSpecial,
                    qparams: Dict[str, Optional[QParams]], losses: Dict[str, torch.Tensor],
                    tokens: Dict[str, int]) -> None:
    """Each input group on its own H. A group that saw no tokens (a starved expert) has no H to solve with:
    its weights stay as they are and get RTN qparams (None)."""
    for group in subset.groups():
        st = stats[group[0]]
        tokens.update({n: st.tokens for n in group})
        if st.tokens == 0:
            qparams.update({n: None for n in group})
            continue
        quantize_group(ctx, group, st.H, sp, qparams, losses)


def stages(subsets: Sequence[Subset]) -> List[List[Subset]]:
    """Runs of consecutive subsets with the same non-empty `stage` (independent experts) form one stage;
    every other subset is a stage of its own."""
    out: List[List[Subset]] = []
    for s in subsets:
        if out and s.stage and out[-1][-1].stage == s.stage:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def act_order_groups(spec: QuantSpec, sp: GptqSpecial) -> bool:
    """Groups follow the act order, so they are not consecutive columns: no [out, n_groups] layout exists."""
    return spec.granularity == "per_group" and sp.actorder and not sp.static_groups


@register("GPTQ", GptqSpecial, experts_apart=True)
@torch.no_grad()
def gptq(ctx: BlockContext) -> BlockResult:
    """Experts apart: a routed expert's layers are solved on its tokens only, after the stages before its
    first layer's stage (true_sequential) or on the fp block; its inputs are kept at that same forward, so an
    expert solved alone on them gives what it would have given here."""
    sp: GptqSpecial = ctx.special
    qparams: Dict[str, Optional[QParams]] = {}
    pending: Dict[str, torch.Tensor] = {}  # per linear: (loss, failed) on the device
    tokens: Dict[str, int] = {}
    apart = ctx.experts if ctx.experts_apart else ()
    routed: Dict[str, List[torch.Tensor]] = {}
    # true_sequential: each stage's inputs are captured with the earlier stages already quantized
    for stage in stages(ctx.subsets) if sp.true_sequential else [list(ctx.subsets)]:
        keep = list(without_experts(tuple(stage), apart)) if apart else stage
        wants = {e: [] for e in apart if not routed and any(in_experts(n, (e,)) for s in stage for n in s.layers)}
        if not keep and not wants:
            continue
        stats = collect_hessians(ctx, keep, wants)
        routed.update(wants)
        for subset in keep:
            quantize_subset(ctx, subset, stats, sp, qparams, pending, tokens)
    for e, xs in routed.items():  # for the coverage report: each expert's layers saw its routed tokens
        tokens.update({n: token_count(xs) for s in ctx.subsets for n in s.layers if in_experts(n, (e,))})
    values = torch.stack(list(pending.values())).tolist() if pending else []
    failed = [n for n, (_, bad) in zip(pending, values) if bad]
    if failed:
        raise not_positive_definite(sp.percdamp, f" ({', '.join(failed)})")
    losses = {n: loss for n, (loss, _) in zip(pending, values)}
    info: Dict[str, object] = {"loss": losses, "act_order_groups": act_order_groups(ctx.spec, sp)}
    if info["act_order_groups"]:
        info["note"] = ("actorder without static_groups: group qparams follow the act order, so the weight "
                        "(Q) is returned without qparams; RTN qparams recomputed from Q in consecutive groups "
                        "may not reproduce Q exactly")
    info.update(expert_coverage(ctx.experts, tokens))
    return BlockResult(qparams=qparams, info=info, routed_inputs=routed)
