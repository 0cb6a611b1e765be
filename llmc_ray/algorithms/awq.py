"""AWQ: activation-aware per-channel scaling (grid-searched per subset), then per-group weight clipping.

Follows the AWQ paper and llmc (`llmc/compression/quantization/awq.py`, `auto_clip.py`,
`base_blockwise_quantization.py`). Per block:
  1. capture the fp input of each subset once;
  2. (trans) for each subset in order: search a ratio r on a grid, scale s(r) per input channel, keeping the
     s whose fake-quantized layers (Q(W*s)/s) give the inspect module's output closest (MSE) to the original;
     fold 1/s into prev_op and s into the layers' columns (an exact transform in full precision); a subset
     that is its own inspect linear (o_proj, down_proj) gets that MSE from its inputs' Gram matrix;
  3. (weight_clip) for each layer, shrink each group's range over a grid, keeping the range that minimises the
     group's partial output error on a token subsample, and clamp the (transformed) weights to it.
The transformed fp weights are what fake-quant/export then quantize with plain RTN qparams (returned as None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.spec import Subset
from ..quant.quantizer import QuantSpec, compute_qparams, fake_quant, to_groups
from .awq_kernel import scaled_fake_quant, sq_err_sum
from .base import BlockContext, BlockResult, expert_coverage, register, token_count

TRANS_VERSIONS = ("v1", "v2")
CLIP_VERSIONS = ("v1",)


@dataclass(frozen=True)
class AwqSpecial:
    """llmc's `quant.special` keys for Awq (save_scale/save_clip/awq_bs/save_mem/do_gqa_trans are not taken)."""

    trans: bool = True
    # v1: s = x_mean^r / w_mean^(1-r) (activation and weight statistics; AutoAWQ's later "duo scaling");
    # v2: s = x_mean^r (activation only, the paper's formula). llmc's default is v2.
    trans_version: str = "v2"
    weight_clip: bool = True
    # v1: clamp the weights to the searched range (llmc's default). llmc's v2 stores logit clip factors for its
    # "learnable" calib algo, which this quantizer does not have.
    clip_version: str = "v1"
    # None: follow the quantizer's symmetry, as llmc does (special.clip_sym defaults to wquantizer.sym).
    # True clamps each group to [-m, m] (m = shrunk |w| max); False shrinks min and max separately.
    clip_sym: Optional[bool] = None
    n_grid: int = 20  # ratios r = 0, 1/n_grid, ..., (n_grid-1)/n_grid
    clip_n_grid: int = 20  # shrink step 1/clip_n_grid ...
    clip_max_shrink: float = 0.5  # ... over int(clip_max_shrink * clip_n_grid) candidates (AutoAWQ/llmc: 20, 0.5)
    # tokens the clip search uses (a strided subsample); None: the calibration seq_len, as llmc passes
    clip_n_tokens: Optional[int] = None
    # layers whose last name component contains one of these are not clipped: llmc skips q/k projections
    # (their error is not seen linearly at the block output: it goes through softmax(QK^T))
    clip_skip: Tuple[str, ...] = ("q_", "k_", "query", "key", "Wqkv")
    # a subset whose inspect module is the one linear it scales (o_proj, down_proj) may take its search loss
    # from the inputs' Gram matrix instead of a forward per ratio (`gram_pays`): the same MSE in exact
    # arithmetic, fewer FLOPs. False: a forward per ratio for every subset, as llmc does.
    gram_search: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "clip_skip", tuple(self.clip_skip))  # YAML gives a list
        if self.trans_version not in TRANS_VERSIONS:
            raise ValueError(f"trans_version={self.trans_version!r}: use one of {TRANS_VERSIONS}")
        if self.clip_version not in CLIP_VERSIONS:
            raise ValueError(f"clip_version={self.clip_version!r}: only {CLIP_VERSIONS} is supported "
                             f"(llmc's v2 needs its learnable calib algo)")
        if self.n_grid < 1 or self.clip_n_grid < 1:
            raise ValueError(f"n_grid={self.n_grid} and clip_n_grid={self.clip_n_grid} must be >= 1")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(f"clip_max_shrink={self.clip_max_shrink} must be in [0, 1)")
        if self.clip_n_tokens is not None and self.clip_n_tokens < 1:
            raise ValueError(f"clip_n_tokens={self.clip_n_tokens} must be >= 1 (or None for the seq_len)")
        if self.clip_sym not in (None, True, False):
            raise ValueError(f"clip_sym={self.clip_sym!r} must be true, false or null")


# ---------------------------------------------------------------- statistics and the scale formula


def act_mean(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean |x| per input channel over all tokens of all micro-batches (fp32)."""
    total = sum(x.detach().float().abs().reshape(-1, x.shape[-1]).sum(0) for x in xs)
    count = sum(x.numel() // x.shape[-1] for x in xs)
    return total / count


def weight_mean(weights: Sequence[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """|w| normalised by its group's max |w|, averaged over output rows, then over layers (llmc's
    get_weight_scale): how large each input channel is relative to the quantization range it shares."""
    per_layer = []
    for w in weights:
        a = to_groups(w.detach().float(), spec).abs()
        a = (a / a.amax(-1, keepdim=True)).reshape(w.shape)  # all-zero group -> nan, as in llmc
        per_layer.append(a.mean(0))
    return torch.stack(per_layer).mean(0)


def awq_scales(x_mean: torch.Tensor, w_mean: Optional[torch.Tensor], ratio: float, version: str) -> torch.Tensor:
    """Per-channel scale for one grid ratio, normalised so that max*min = 1 (keeps s around 1)."""
    if version == "v1":
        # the tiny floor only avoids inf for an all-zero column (llmc divides unguarded)
        s = x_mean.pow(ratio) / w_mean.clamp(min=1e-12).pow(1 - ratio)
    elif version == "v2":
        s = x_mean.pow(ratio)
    else:
        raise ValueError(f"trans_version={version!r}: use one of {TRANS_VERSIONS}")
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


# ---------------------------------------------------------------- scale search


class ScaleSearch(NamedTuple):
    scales: torch.Tensor  # [in] fp32
    ratio: float
    losses: List[float]  # inspect-module MSE for each grid ratio


def inspect_mse(ctx: BlockContext, subset: Subset, xs: Sequence[torch.Tensor],
                ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """MSE of the inspect module's output vs `ref` over all micro-batches (one mean over all elements), as a
    0-d fp32 tensor on the device: reading it back would stall the launch queue once per grid point."""
    sq = sum(sq_err_sum(ctx.call(subset, x), r) for x, r in zip(xs, ref))
    return sq / sum(r.numel() for r in ref)


def input_gram(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """X^T X over all tokens of all micro-batches, at least fp32. Half inputs on a GPU go straight into the
    tensor cores with fp32 accumulation (a product of two half values is exact in fp32)."""
    gram = None
    for x in xs:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            g = torch.mm(x.t(), x, out_dtype=torch.float32)
        else:
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            g = x.t() @ x
        gram = g if gram is None else gram.add_(g)
    return gram


def gram_pays(ctx: BlockContext, subset: Subset, tokens: int, n_grid: int) -> bool:
    """The inspect module is the single linear being scaled, so its output error for candidate weights W' is
    ||X (W' - W)^T||^2 = sum((W' - W) G * (W' - W)) with G = X^T X (a bias cancels): per ratio out*in^2
    multiply-adds (plus tokens*in^2 once for G) instead of tokens*in*out — fewer when tokens outnumber input
    channels (Qwen2-7B's down_proj on 128 x 512 tokens: 1.8x fewer, o_proj 10x)."""
    if subset.layers != (subset.inspect,) or not isinstance(ctx.module(subset.inspect), nn.Linear):
        return False
    out_f, in_f = ctx.module(subset.inspect).weight.shape
    return in_f * (n_grid * out_f + tokens) < n_grid * tokens * out_f


class GramLoss:
    """The inspect-output MSE of candidate weights of one linear, from its inputs' Gram matrix."""

    def __init__(self, xs: Sequence[torch.Tensor], w: torch.Tensor):
        gram = input_gram(xs)
        # on a GPU with half weights the per-ratio product runs at the half GEMM rate, fp32 accumulation; its
        # rounding (2^-9 of W' - W and of G, relative) is far below that of the forward path, whose error is a
        # difference of two half-rounded outputs. bf16 even for fp16 weights: G's sums of squares overflow fp16.
        self.half = gram.is_cuda and w.dtype in (torch.bfloat16, torch.float16)
        self.gram = gram.to(torch.bfloat16) if self.half else gram
        self.count = token_count(xs) * w.shape[0]  # elements of the inspect output, the MSE's denominator

    def __call__(self, candidate: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.half:
            d = (candidate.float() - w.float()).to(torch.bfloat16)
            dg = torch.mm(d, self.gram, out_dtype=torch.float32)
        else:
            dtype = torch.promote_types(self.gram.dtype, candidate.dtype)
            d = candidate.to(dtype) - w.to(dtype)
            dg = d @ self.gram
        return (dg * d.to(dg.dtype)).sum() / self.count


def search_scale(ctx: BlockContext, subset: Subset, xs: Sequence[torch.Tensor], version: str,
                 n_grid: int, ref: Optional[Sequence[torch.Tensor]] = None, gram: bool = False) -> ScaleSearch:
    """Grid search of the ratio for one subset; layers are restored to their fp weights afterwards.
    `ref`: the inspect module's fp outputs on `xs` when already known (else computed here). `gram`: the loss
    from the inputs' Gram matrix (the subset must be one linear that is its own inspect module, `gram_pays`).
    The losses of all ratios are read back once, at the end; the first smallest wins (NaN never does)."""
    layers = [ctx.module(n) for n in subset.layers]
    orig = [m.weight.data.clone() for m in layers]
    gram_loss = GramLoss(xs, orig[0]) if gram else None
    if ref is None and gram_loss is None:
        with torch.no_grad():
            ref = [ctx.call(subset, x) for x in xs]
    x_mean = act_mean(xs)
    w_mean = weight_mean(orig, ctx.spec) if version == "v1" else None

    def scales(k: int) -> torch.Tensor:
        return awq_scales(x_mean, w_mean, k / n_grid, version).to(orig[0].device)

    losses = []
    try:
        for k in range(n_grid):
            s = scales(k)
            # Q(W*s)/s on input x equals Q(W*s) on x/s: keeps the captured inputs untouched
            candidates = [scaled_fake_quant(w, s, ctx.spec) for w in orig]
            if gram_loss is not None:
                losses.append(gram_loss(candidates[0], orig[0]))
                continue
            for m, c in zip(layers, candidates):
                m.weight.data = c
            del candidates
            with torch.no_grad():
                losses.append(inspect_mse(ctx, subset, xs, ref))
    finally:
        for m, w in zip(layers, orig):
            m.weight.data = w
    values = torch.stack(losses).tolist()
    finite = [k for k, v in enumerate(values) if not math.isnan(v)]
    if not finite:
        return ScaleSearch(torch.ones_like(x_mean), 0.0, values)
    best = min(finite, key=values.__getitem__)
    return ScaleSearch(scales(best), best / n_grid, values)


# ---------------------------------------------------------------- applying a scale


def scale_target(ctx: BlockContext, subset: Subset) -> Tuple[Optional[str], str]:
    """('linear' | 'norm' | None, why): how prev_op can absorb 1/s. A linear must produce exactly the layers'
    input (GQA's narrow v_proj feeding o_proj does not: skipped, as llmc/AutoAWQ do without GQA transforms).
    Modules in `absorb` (routers) must take s into weight columns of the same width."""
    if subset.prev_op is None:
        return None, "no prev_op: quantized without a scale"
    prev = ctx.module(subset.prev_op)
    width = ctx.module(subset.layers[0]).weight.shape[1]
    for name in subset.absorb:
        w = getattr(ctx.module(name), "weight", None)
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == width):
            return None, f"{name} reads the same input but has no [*, {width}] weight to absorb the scale"
    if isinstance(prev, nn.Linear):
        if prev.out_features != width:
            return None, f"{subset.prev_op} has out_features {prev.out_features} != in_features {width}"
        return "linear", ""
    w = getattr(prev, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == width:
        return "norm", ""
    return None, f"{subset.prev_op} ({type(prev).__name__}) has no per-channel weight of size {width}"


def apply_scale(ctx: BlockContext, subset: Subset, s: torch.Tensor, kind: str) -> None:
    """prev_op output /= s (norm weight and bias, or linear rows and bias); layers' and absorbing modules'
    (routers') columns *= s."""
    prev = ctx.module(subset.prev_op)
    if kind == "linear":
        prev.weight.data = (prev.weight.data.float() / s.view(-1, 1)).to(prev.weight.dtype)
    else:
        prev.weight.data = (prev.weight.data.float() / s).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for name in subset.layers + subset.absorb:
        m = ctx.module(name)
        m.weight.data = (m.weight.data.float() * s.view(1, -1)).to(m.weight.dtype)


# ---------------------------------------------------------------- clip search


class ClipSearch(NamedTuple):
    lo: torch.Tensor  # [out, n_clip_groups] best lower bound
    hi: torch.Tensor  # [out, n_clip_groups] best upper bound
    err: torch.Tensor  # [out, n_clip_groups] partial-output MSE at the chosen range
    err_noclip: torch.Tensor  # [out, n_clip_groups] the same without clipping (shrink 1)


def clip_group_len(spec: QuantSpec, in_features: int) -> int:
    # per group for per_group, per row otherwise (llmc's layout; per_tensor then shares one shrink)
    return spec.group_size if spec.granularity == "per_group" else in_features


def sample_tokens(xs: Sequence[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Every k-th token of all micro-batches concatenated, k = total // n_tokens (llmc's subsample)."""
    x = torch.cat([t.detach().float().reshape(-1, t.shape[-1]) for t in xs])
    return x[0::max(x.shape[0] // n_tokens, 1)]


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t if t.shape[0] == 1 else t[r0:r1]  # per_tensor qparams are [1, 1]


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, sym: bool, n_grid: int = 20,
                max_shrink: float = 0.5, max_elems: int = 2**27) -> ClipSearch:
    """For each (row, clip group) pick the shrink p in {1, 1-1/n_grid, ...} minimising the mean over tokens of
    (x_g . (Q(clamp(w)) - w)_g)^2, the group's share of the output error (llmc auto_clip_layer, clip v1);
    per_tensor picks one p for all rows. All candidates of a row chunk go through one batched einsum whose
    output stays under `max_elems` elements."""
    w = w.detach().float()
    out_f, in_f = w.shape
    g = clip_group_len(spec, in_f)
    wg = w.reshape(out_f, in_f // g, g)
    xg = x.float().reshape(x.shape[0], in_f // g, g)
    hi0 = wg.abs().amax(-1) if sym else wg.amax(-1)
    lo0 = -hi0 if sym else wg.amin(-1)
    shrinks = [1 - k / n_grid for k in range(max(int(max_shrink * n_grid), 1))]
    his = torch.stack([hi0 * p for p in shrinks])  # [K, out, n_g]
    los = torch.stack([lo0 * p for p in shrinks])

    def clamp(k: int, r0: int, r1: int) -> torch.Tensor:
        return torch.clamp(wg[r0:r1], los[k, r0:r1, :, None], his[k, r0:r1, :, None]).reshape(r1 - r0, in_f)

    # qparams from each whole clamped matrix, so per_tensor ranges see every row (the pipeline's RTN does too)
    qps = [compute_qparams(clamp(k, 0, out_f), spec) for k in range(len(shrinks))]
    errs = []
    n_g, n_k = in_f // g, len(shrinks)
    row_chunk = max(1, max_elems // (n_k * x.shape[0] * n_g))
    xt = xg.permute(1, 2, 0)  # [n_g, g, tokens]: each group's products come out tokens-last
    for r0 in range(0, out_f, row_chunk):
        r1 = min(r0 + row_chunk, out_f)
        dq = torch.stack([fake_quant(clamp(k, r0, r1), spec, _rows(s, r0, r1), _rows(z, r0, r1))
                          for k, (s, z) in enumerate(qps)])  # [K, rows, in]
        d = (dq - w[r0:r1]).reshape(n_k * (r1 - r0), n_g, g).transpose(0, 1)  # [n_g, K*rows, g]
        # the mean over tokens reduces the innermost, contiguous dim (a strided middle-dim reduction was the
        # clip search's slowest kernel on a GPU)
        err = torch.bmm(d, xt).pow_(2).mean(-1)  # [n_g, K*rows]
        errs.append(err.reshape(n_g, n_k, r1 - r0).permute(1, 2, 0))  # [K, rows, n_g]
    err = torch.cat(errs, dim=1)
    if spec.granularity == "per_tensor":
        # one range for the tensor: rows are not independent (they share qparams), so all rows take the
        # shrink with the least total output error (llmc instead picks per row within 64/256-row batches)
        best = err.sum((1, 2)).argmin().view(1, 1, 1).expand(1, *err.shape[1:])
    else:
        best = err.argmin(0, keepdim=True)  # first minimum: ties keep the larger range

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(0, best)[0]

    return ClipSearch(pick(los), pick(his), pick(err), err[0])


def apply_clip(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> None:
    w = m.weight.data
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, lo.shape[1], -1)
    m.weight.data = torch.clamp(wg, lo[..., None], hi[..., None]).reshape(out_f, in_f).to(w.dtype)


def skip_clip(name: str, patterns: Sequence[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(p in leaf for p in patterns)


# ---------------------------------------------------------------- the block method


def _inside(name: str, module: str) -> bool:
    """Is module `name` (block-relative) `module` itself or inside it ("" is the whole block)?"""
    return not module or name == module or name.startswith(module + ".")


@register("Awq", AwqSpecial)
@torch.no_grad()
def awq(ctx: BlockContext) -> BlockResult:
    """Scales are searched on each subset's inspect input (all tokens the inspect module sees); clipping
    uses each layer's own input (a routed expert's: only its tokens). A group of layers that got no
    calibration tokens (a starved expert) keeps its weights: no scale of its own, no clip, RTN qparams; it
    still takes the shared norm's scale, which the transform needs to stay exact."""
    sp: AwqSpecial = ctx.special
    groups = {g[0]: g for s in ctx.subsets for g in s.groups()}  # first layer -> layers sharing its input
    # the inspect modules' outputs too: each is a subset's reference, the very tensors a fresh call on the
    # captured inputs gives as long as no earlier scale changed a module inside it (checked below)
    # (not those of subsets whose search may take its loss from the Gram matrix instead: the block's token
    # count bounds a routed expert's, so a subset left out here may still search by forwards, on a fresh
    # reference)
    all_tokens = token_count(ctx.inputs)
    by_gram = {s.inspect for s in ctx.subsets if sp.gram_search and gram_pays(ctx, s, all_tokens, sp.n_grid)}
    inspects = tuple(dict.fromkeys(s.inspect for s in ctx.subsets if s.inspect not in by_gram)) if sp.trans else ()
    captured, inspect_out = ctx.capture(list(dict.fromkeys([s.inspect for s in ctx.subsets] + list(groups))),
                                        inspects)
    inspect_in = {s.inspect: captured[s.inspect] for s in ctx.subsets}
    layer_in: Dict[str, List[torch.Tensor]] = {g0: list(captured[g0]) for g0 in groups}
    tokens = {n: token_count(layer_in[g0]) for g0, g in groups.items() for n in g}
    info: Dict[str, object] = {"ratios": {}, "skipped": {}, "clipped_frac": {}}

    if sp.trans:
        changed: List[str] = []  # modules whose weights an applied scale has changed so far
        for subset in ctx.subsets:
            # the captured output is the reference only while nothing inside the inspect module has changed
            ref = inspect_out.pop(subset.inspect, None)
            if any(_inside(n, subset.inspect) for n in changed):
                ref = None
            kind, why = scale_target(ctx, subset)
            if kind is not None and not inspect_in[subset.inspect]:
                kind, why = None, "no calibration tokens"
            if kind is None:
                info["skipped"][subset.inspect] = why
                continue
            xs = inspect_in[subset.inspect]
            gram = sp.gram_search and gram_pays(ctx, subset, token_count(xs), sp.n_grid)
            found = search_scale(ctx, subset, xs, sp.trans_version, sp.n_grid, ref=ref, gram=gram)
            apply_scale(ctx, subset, found.scales, kind)
            changed += [subset.prev_op, *subset.layers, *subset.absorb]
            # the layers now see x / s: the clip search must use the same inputs
            for g in subset.groups():
                layer_in[g[0]] = [(x.float() / found.scales).to(x.dtype) for x in layer_in[g[0]]]
            info["ratios"][subset.inspect] = found.ratio

    if sp.weight_clip:
        sym = ctx.spec.symmetric if sp.clip_sym is None else sp.clip_sym
        n_tokens = sp.clip_n_tokens or ctx.inputs[0].shape[-2]
        for g0, group in groups.items():
            if not layer_in[g0]:
                continue  # no tokens: nothing to measure the clip against
            x = sample_tokens(layer_in[g0], n_tokens)
            for name in group:
                if skip_clip(name, sp.clip_skip):
                    continue
                m = ctx.module(name)
                found = search_clip(m.weight.data, x.to(m.weight.device), ctx.spec, sym,
                                    sp.clip_n_grid, sp.clip_max_shrink)
                apply_clip(m, found.lo, found.hi)
                # share of groups whose range was shrunk, for the report (read back once, below)
                info["clipped_frac"][name] = (found.err < found.err_noclip).float().mean()
        if info["clipped_frac"]:
            fracs = torch.stack(list(info["clipped_frac"].values())).tolist()
            info["clipped_frac"] = dict(zip(info["clipped_frac"], fracs))

    info.update(expert_coverage(ctx.experts, tokens))
    # the transformed weights get plain RTN qparams downstream
    return BlockResult(qparams={n: None for s in ctx.subsets for n in s.layers}, info=info)
