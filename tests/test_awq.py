"""AWQ against independent references: exact equivalence of the scaling, the search's own objective
recomputed by hand, the clip objective recomputed group by group, the scale formulas by hand."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import tiny
from llmc_ray.algorithms.awq import (AwqSpecial, act_mean, awq, awq_scales, sample_tokens, search_clip,
                                     search_scale, weight_mean)
from llmc_ray.algorithms.base import BlockContext
from llmc_ray.config import ConfigError
from llmc_ray.models.llama import LLAMA_SUBSETS
from llmc_ray.quant.quantizer import QuantSpec, fake_quant

G32_4 = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=32)
G32_3 = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=32)
PC_4_SYM = QuantSpec(bit=4, symmetric=True, granularity="per_channel")
PT_4 = QuantSpec(bit=4, granularity="per_tensor")
LINEARS = [n for s in LLAMA_SUBSETS for n in s.layers]


def make_ctx(special: AwqSpecial, spec: QuantSpec = G32_4, kind: str = "llama") -> BlockContext:
    model = tiny.tiny_model(kind)
    xs, kw = tiny.block_inputs(model)
    return BlockContext(model.model.layers[0], xs, kw, LLAMA_SUBSETS, spec, special)


def fp_outputs(ctx: BlockContext):
    with torch.no_grad():
        return [ctx.forward(x) for x in ctx.inputs]


# ------------------------------------------------------------------ the scaling transform


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_scaling_alone_keeps_block_output(kind, version):
    ctx = make_ctx(AwqSpecial(weight_clip=False, trans_version=version), kind=kind)
    before = {n: p.detach().clone() for n, p in ctx.block.named_parameters()}
    ref = fp_outputs(ctx)
    res = awq(ctx)
    # the transform did something (non-zero ratios), and the GQA-narrow v_proj -> o_proj pair was skipped
    assert any(r > 0 for r in res.info["ratios"].values())
    assert "self_attn.o_proj" in res.info["skipped"]
    assert not torch.equal(before["input_layernorm.weight"], ctx.module("input_layernorm").weight)
    assert torch.equal(before["self_attn.o_proj.weight"], ctx.module("self_attn.o_proj").weight)
    for r, out in zip(ref, fp_outputs(ctx)):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)
    assert all(q is None for q in res.qparams.values()) and set(res.qparams) == set(LINEARS)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_scaling_alone_keeps_block_output_without_gqa(kind):
    # kv_heads == heads: v_proj feeds o_proj at full width, so the linear -> linear scale is applied too
    # (Qwen2's v_proj has a bias, which must be divided as well)
    model = tiny.tiny_model(kind, kv_heads=4)
    xs, kw = tiny.block_inputs(model)
    ctx = BlockContext(model.model.layers[0], xs, kw, LLAMA_SUBSETS, G32_4, AwqSpecial(weight_clip=False))
    ref = fp_outputs(ctx)
    res = awq(ctx)
    assert res.info["skipped"] == {} and "self_attn.o_proj" in res.info["ratios"]
    for r, out in zip(ref, fp_outputs(ctx)):
        torch.testing.assert_close(out, r, rtol=1e-4, atol=1e-5)


def test_apply_scale_with_biases():
    from llmc_ray.algorithms.awq import apply_scale, scale_target
    from llmc_ray.models.spec import Subset

    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"ln": torch.nn.LayerNorm(8), "fc1": torch.nn.Linear(8, 8),
                                 "fc2": torch.nn.Linear(8, 3), "fc3": torch.nn.Linear(8, 3)})
    with torch.no_grad():
        block["ln"].bias.normal_()
        block["ln"].weight.normal_()

    def run(x):
        return block["fc2"](block["fc1"](x)), block["fc3"](block["ln"](x))

    x = torch.randn(5, 8)
    ref = run(x)
    ctx = BlockContext(block, [x], {}, (), G32_4, AwqSpecial())
    for subset in (Subset("fc1", ("fc2",), "fc2"), Subset("ln", ("fc3",), "fc3")):
        kind, _ = scale_target(ctx, subset)
        with torch.no_grad():
            apply_scale(ctx, subset, torch.rand(8) + 0.5, kind)
    for a, b in zip(run(x), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def set_scaled_fake_quant(ctx, subset, orig, s):
    for n, w in zip(subset.layers, orig):
        ctx.module(n).weight.data = fake_quant(w * s, ctx.spec) / s


def mse_vs_fp(ctx, subset, xs, s) -> float:
    """Inspect-module MSE with the layers fake-quantized at scale s, computed from scratch."""
    layers = [ctx.module(n) for n in subset.layers]
    orig = [m.weight.data.clone() for m in layers]
    with torch.no_grad():
        ref = torch.cat([ctx.call(subset, x) for x in xs])
        set_scaled_fake_quant(ctx, subset, orig, s)
        out = torch.cat([ctx.call(subset, x) for x in xs])
    for m, w in zip(layers, orig):
        m.weight.data = w
    return (out - ref).pow(2).mean().item()


@pytest.mark.parametrize("spec", [G32_4, G32_3, PC_4_SYM])
@pytest.mark.parametrize("subset_idx", [0, 2, 3])
def test_chosen_scale_not_worse_than_no_scaling(spec, subset_idx):
    ctx = make_ctx(AwqSpecial(), spec)
    subset = LLAMA_SUBSETS[subset_idx]
    xs = ctx.capture_inputs([subset.layers[0]])[subset.layers[0]]
    w0 = [ctx.module(n).weight.detach().clone() for n in subset.layers]
    found = search_scale(ctx, subset, xs, "v2", 20)
    # the search leaves the fp weights in place
    assert all(torch.equal(w, ctx.module(n).weight) for n, w in zip(subset.layers, w0))
    ones = torch.ones(xs[0].shape[-1])
    no_scale, chosen = mse_vs_fp(ctx, subset, xs, ones), mse_vs_fp(ctx, subset, xs, found.scales)
    assert chosen <= no_scale * (1 + 1e-5)
    assert found.losses[0] == pytest.approx(no_scale, rel=1e-4)  # ratio 0 is s = 1
    assert min(found.losses) == pytest.approx(chosen, rel=1e-4)
    assert len(found.losses) == 20 and found.ratio == found.losses.index(min(found.losses)) / 20


# ------------------------------------------------------------------ the scale formulas


def test_scale_formulas_by_hand():
    x_mean = torch.tensor([1.0, 4.0, 0.25])
    w_mean = torch.tensor([0.5, 0.25, 1.0])
    r = 0.5
    # v2: s = x^r = [1, 2, 0.5]; normalised by sqrt(max*min) = sqrt(2 * 0.5) = 1
    torch.testing.assert_close(awq_scales(x_mean, w_mean, r, "v2"), torch.tensor([1.0, 2.0, 0.5]))
    # v1: s = x^r / w^(1-r) = [1/sqrt(.5), 2/sqrt(.25), .5/1] = [sqrt2, 4, .5]; sqrt(4 * .5) = sqrt2
    torch.testing.assert_close(awq_scales(x_mean, w_mean, r, "v1"),
                               torch.tensor([1.0, 4 / math.sqrt(2), 0.5 / math.sqrt(2)]))
    # ratio 0: v2 is all ones, v1 is 1 / w normalised
    torch.testing.assert_close(awq_scales(x_mean, w_mean, 0.0, "v2"), torch.ones(3))
    torch.testing.assert_close(awq_scales(x_mean, w_mean, 0.0, "v1"), torch.tensor([1.0, 2.0, 0.5]))
    # the 1e-4 floor applies before normalising
    torch.testing.assert_close(awq_scales(torch.tensor([0.0, 1.0]), None, 0.5, "v2"),
                               torch.tensor([1e-4, 1.0]) / math.sqrt(1e-4))


def test_act_and_weight_means_by_hand():
    xs = [torch.tensor([[[1.0, -2.0], [3.0, 0.0]]]), torch.tensor([[[-5.0, 2.0]]])]
    torch.testing.assert_close(act_mean(xs), torch.tensor([3.0, 4.0 / 3]))
    spec = QuantSpec(bit=4, granularity="per_group", group_size=2)
    w1 = torch.tensor([[1.0, -4.0, 2.0, 2.0], [3.0, 3.0, -1.0, 0.5]])
    w2 = torch.tensor([[2.0, 1.0, 0.0, -8.0]])
    # |w| / group max, mean over rows: w1 -> [(.25+1)/2, (1+1)/2, (1+1)/2, (1+.5)/2]; w2 -> [1, .5, 0, 1]
    m1 = torch.tensor([0.625, 1.0, 1.0, 0.75])
    m2 = torch.tensor([1.0, 0.5, 0.0, 1.0])
    torch.testing.assert_close(weight_mean([w1, w2], spec), (m1 + m2) / 2)


# ------------------------------------------------------------------ the clip search


def group_errors(w, wq, x, g):
    """Mean over tokens of each group's share of the output error, one (row, group) at a time."""
    out = torch.zeros(w.shape[0], w.shape[1] // g)
    for j in range(w.shape[1] // g):
        cols = slice(j * g, (j + 1) * g)
        out[:, j] = (x[:, cols] @ (wq[:, cols] - w[:, cols]).t()).pow(2).mean(0)
    return out


def clamp_groups(w, lo, hi):
    wg = w.reshape(w.shape[0], lo.shape[1], -1)
    return torch.clamp(wg, lo[..., None], hi[..., None]).reshape(w.shape)


@pytest.fixture(scope="module")
def layer_inputs():
    ctx = make_ctx(AwqSpecial())
    seen = ctx.capture_inputs(LINEARS)
    return {n: (ctx.module(n).weight.detach().clone(), sample_tokens(seen[n], 32)) for n in LINEARS}


@pytest.mark.parametrize("spec", [G32_4, G32_3, PC_4_SYM, PT_4])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_never_increases_error(layer_inputs, spec, sym):
    for name, (w, x) in layer_inputs.items():
        found = search_clip(w, x, spec, sym)
        wc = clamp_groups(w, found.lo, found.hi)
        g = spec.group_size if spec.granularity == "per_group" else w.shape[1]
        clipped = group_errors(w, fake_quant(wc, spec), x, g)
        plain = group_errors(w, fake_quant(w, spec), x, g)
        torch.testing.assert_close(found.err_noclip, plain, rtol=1e-4, atol=1e-9)
        if spec.granularity == "per_tensor":  # one shared range: the total is what is minimised
            assert clipped.sum() <= plain.sum() * (1 + 1e-5), name
        else:  # each group's own objective
            assert torch.all(clipped <= plain * (1 + 1e-4) + 1e-9), name
            torch.testing.assert_close(found.err, clipped, rtol=1e-4, atol=1e-9)
        if spec.granularity != "per_group":  # a group is a whole row: its error is the layer output's
            full = lambda q: (x @ (q - w).t()).pow(2).sum().item()  # noqa: E731
            assert full(fake_quant(wc, spec)) <= full(fake_quant(w, spec)) * (1 + 1e-5), name
        # clipping only shrinks: the range stays inside the original one
        wg = w.reshape(w.shape[0], found.hi.shape[1], -1)
        assert torch.all(found.hi <= (wg.abs().amax(-1) if sym else wg.amax(-1)) + 1e-7)
        assert torch.all(found.lo >= (-wg.abs().amax(-1) if sym else wg.amin(-1)) - 1e-7)


@pytest.mark.parametrize("spec", [G32_4, PT_4])
def test_clip_row_chunking_is_invisible(layer_inputs, spec):
    w, x = layer_inputs["mlp.down_proj"]
    whole, chunked = search_clip(w, x, spec, False), search_clip(w, x, spec, False, max_elems=5000)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_clip_shrink_grid_and_symmetry(layer_inputs):
    w, x = layer_inputs["mlp.up_proj"]
    found = search_clip(w, x, G32_4, sym=True)
    wg = w.reshape(w.shape[0], -1, 32)
    p = found.hi / wg.abs().amax(-1)
    # ten candidates 1, 0.95, ..., 0.55 (max_shrink 0.5 over a 20-step grid), symmetric bounds
    assert torch.all((p * 20).round().sub(p * 20).abs() < 1e-4) and p.min() >= 0.55 - 1e-6 and p.max() <= 1 + 1e-6
    torch.testing.assert_close(found.lo, -found.hi)
    found = search_clip(w, x, G32_4, sym=False)
    p_hi, p_lo = found.hi / wg.amax(-1), found.lo / wg.amin(-1)
    torch.testing.assert_close(p_hi, p_lo)  # min and max shrink together


def test_block_clip_skips_q_and_k():
    ctx = make_ctx(AwqSpecial(trans=False))
    before = {n: ctx.module(n).weight.detach().clone() for n in LINEARS}
    res = awq(ctx)
    for n in ("self_attn.q_proj", "self_attn.k_proj"):
        assert torch.equal(before[n], ctx.module(n).weight) and n not in res.info["clipped_frac"]
    for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        w = ctx.module(n).weight
        assert not torch.equal(before[n], w) and torch.all(w.abs() <= before[n].abs() + 1e-7), n
    assert res.info["ratios"] == {}


def test_block_clip_searches_on_transformed_inputs():
    # the clip must see the inputs of the scaled layers (x / s): redo its search on a scaled-only copy
    scaled = make_ctx(AwqSpecial(weight_clip=False))
    awq(scaled)
    clipped = make_ctx(AwqSpecial())
    awq(clipped)
    seq = scaled.inputs[0].shape[1]
    for subset in LLAMA_SUBSETS:
        xs = scaled.capture_inputs([subset.layers[0]])[subset.layers[0]]
        for n in subset.layers:
            w = scaled.module(n).weight.detach()
            if n.endswith(("q_proj", "k_proj")):
                torch.testing.assert_close(clipped.module(n).weight, w)
                continue
            found = search_clip(w, sample_tokens(xs, seq), G32_4, sym=False)
            torch.testing.assert_close(clipped.module(n).weight, clamp_groups(w, found.lo, found.hi),
                                       rtol=1e-5, atol=1e-6)


def test_full_block_runs_and_reports():
    ctx = make_ctx(AwqSpecial(trans_version="v1"), G32_3)
    res = awq(ctx)
    assert set(res.info["ratios"]) == {"self_attn", "mlp", "mlp.down_proj"}
    assert set(res.info["clipped_frac"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                             "mlp.up_proj", "mlp.down_proj"}
    assert all(torch.isfinite(p).all() for p in ctx.block.parameters())


# ------------------------------------------------------------------ settings


def test_special_validation():
    with pytest.raises(ValueError, match="trans_version"):
        AwqSpecial(trans_version="v3")
    with pytest.raises(ValueError, match="clip_version"):
        AwqSpecial(clip_version="v2")
    with pytest.raises(ValueError, match="n_grid"):
        AwqSpecial(n_grid=0)
    with pytest.raises(ValueError, match="clip_max_shrink"):
        AwqSpecial(clip_max_shrink=1.0)
    assert AwqSpecial(clip_skip=["q_"]).clip_skip == ("q_",)


def test_resolve_through_registry():
    from llmc_ray.algorithms.base import resolve

    method, special = resolve("awq", {"trans_version": "v1", "clip_sym": True})
    assert method.name == "Awq" and special == AwqSpecial(trans_version="v1", clip_sym=True)
    with pytest.raises(ConfigError, match="trans_version"):
        resolve("Awq", {"trans_version": "v9"})


# ------------------------------------------------------------------ references from the capture forward


def fresh_references_only(monkeypatch):
    """AWQ as if the capture kept no outputs: every search computes its reference by calling its module."""
    capture = BlockContext.capture
    monkeypatch.setattr(BlockContext, "capture", lambda self, names, outputs=(): capture(self, names, ()))


def count_calls(monkeypatch):
    calls = []
    call = BlockContext.call
    monkeypatch.setattr(BlockContext, "call", lambda self, subset, x: calls.append(1) or call(self, subset, x))
    return calls


def assert_same_awq(make, monkeypatch):
    """AWQ taking each search's reference from the capture forward gives the same block, bit for bit, as AWQ
    computing every reference afresh (the independent path), with one call of each inspect module fewer."""
    kept_ctx, fresh_ctx = make(), make()
    calls = count_calls(monkeypatch)
    kept = awq(kept_ctx)
    kept_calls = len(calls)
    fresh_references_only(monkeypatch)
    fresh = awq(fresh_ctx)
    assert kept.info["ratios"] == fresh.info["ratios"]
    a, b = kept_ctx.block.state_dict(), fresh_ctx.block.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh_calls = len(calls) - kept_calls
    assert kept.info["ratios"] and fresh_calls > kept_calls
    return kept, kept_ctx, kept_calls, fresh_calls


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_references_from_the_capture_equal_fresh_ones(kind, monkeypatch):
    kept, ctx, kept_calls, fresh_calls = assert_same_awq(
        lambda: make_ctx(AwqSpecial(trans_version="v1"), G32_3, kind), monkeypatch)
    # a dense block: each searched subset's inspect module sees every micro-batch, once less per search
    assert fresh_calls - kept_calls == len(kept.info["ratios"]) * len(ctx.inputs)


def test_a_reference_is_recomputed_once_its_module_has_changed(monkeypatch):
    """Subsets in an order where an earlier scale changes modules inside a later inspect module (up -> down
    first, then the MLP, which holds both): that search must call the MLP afresh, and the result still equals
    the all-fresh path bit for bit."""
    attn, v_to_o, mlp, down = LLAMA_SUBSETS

    def make():
        model = tiny.tiny_model("llama")
        xs, kw = tiny.block_inputs(model)
        return BlockContext(model.model.layers[0], xs, kw, (attn, down, mlp), G32_3, AwqSpecial(weight_clip=False))

    kept, ctx, kept_calls, fresh_calls = assert_same_awq(make, monkeypatch)
    assert set(kept.info["ratios"]) == {"self_attn", "mlp.down_proj", "mlp"}
    # only the two searches whose modules were untouched took their reference from the capture
    assert fresh_calls - kept_calls == 2 * len(ctx.inputs)


# ------------------------------------------------------------------ the loss from the inputs' Gram matrix


def test_gram_loss_equals_the_output_mse():
    """sum((W' - W) G * (W' - W)) / (tokens * out) is the MSE between the linear's outputs with W' and with W,
    bias included (it cancels): recomputed here by running the linear on every micro-batch."""
    from llmc_ray.algorithms.awq import GramLoss

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(48, 24, dtype=torch.float64)
    xs = [torch.randn(1, n, 48, generator=g, dtype=torch.float64) * torch.rand(48, generator=g, dtype=torch.float64)
          for n in (30, 70, 1)]
    w = lin.weight.detach().clone()
    loss = GramLoss(xs, w)
    for scale in (0.0, 1e-3, 0.3):
        cand = w + scale * torch.randn(w.shape, generator=g, dtype=torch.float64)
        want = torch.cat([(torch.nn.functional.linear(x, cand, lin.bias) - lin(x)).reshape(-1, 24) for x in xs])
        want = want.pow(2).mean()
        assert loss(cand, w).item() == pytest.approx(want.item(), rel=1e-10, abs=1e-300)


def gram_ctx(tokens_per_seq: int = 96) -> BlockContext:
    """A float64 tiny llama block with more tokens than the MLP's width, so the Gram loss pays for o_proj and
    down_proj."""
    model = tiny.tiny_model("llama").double()
    xs, kw = tiny.block_inputs(model, n=4, seq=tokens_per_seq)
    return BlockContext(model.model.layers[0], xs, kw, LLAMA_SUBSETS, G32_3, AwqSpecial(weight_clip=False))


@pytest.mark.parametrize("subset_idx", [1, 3])
def test_gram_search_equals_the_forward_search(subset_idx):
    from llmc_ray.algorithms.awq import gram_pays

    ctx = gram_ctx()
    subset = LLAMA_SUBSETS[subset_idx]  # v -> o_proj, up -> down_proj: each its own inspect module
    xs = ctx.capture_inputs([subset.inspect])[subset.inspect]
    assert gram_pays(ctx, subset, 4 * 96, 20)
    by_gram = search_scale(ctx, subset, xs, "v1", 20, gram=True)
    by_forward = search_scale(ctx, subset, xs, "v1", 20)
    # the forward path sums its squared errors in fp32 (and the candidates are fp32-rounded in both)
    assert by_gram.losses == pytest.approx(by_forward.losses, rel=1e-6)
    assert by_gram.ratio == by_forward.ratio and torch.equal(by_gram.scales, by_forward.scales)


def test_gram_pays_only_for_one_linear_with_more_tokens_than_inputs():
    from llmc_ray.algorithms.awq import gram_pays

    ctx = gram_ctx()
    attn, v_to_o, mlp, up_to_down = LLAMA_SUBSETS
    assert not gram_pays(ctx, attn, 10**6, 20) and not gram_pays(ctx, mlp, 10**6, 20)  # inspect is no one linear
    # down_proj (in 256, out 128), 20 ratios: 20*T*in*out forward multiply-adds vs in*(20*out + T) for the Gram
    assert gram_pays(ctx, up_to_down, 300, 20) and not gram_pays(ctx, up_to_down, 250, 20)


def test_awq_with_gram_losses_equals_awq_with_forwards(monkeypatch):
    """The whole block method: the same ratios and weights, and the single-linear inspect modules are never
    called (neither in the searches nor for a reference)."""
    by_forward = gram_ctx()
    by_forward.special = AwqSpecial(weight_clip=False, gram_search=False)
    want = awq(by_forward)
    ctx = gram_ctx()
    calls = []
    call = BlockContext.call
    monkeypatch.setattr(BlockContext, "call", lambda self, s, x: calls.append(s.inspect) or call(self, s, x))
    got = awq(ctx)
    assert set(calls) == {"self_attn", "mlp"}
    # (v -> o_proj is skipped: the tiny model's GQA v_proj is narrower than o_proj's input)
    assert got.info["ratios"] == want.info["ratios"] and "mlp.down_proj" in got.info["ratios"]
    a, b = ctx.block.state_dict(), by_forward.block.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-12, atol=0) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision Gram product runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gram_loss_on_cuda_is_close_to_the_exact_mse(dtype):
    """On a GPU with half weights, G and W' - W go through a half GEMM with fp32 output: the MSE stays within
    1e-2 (relative) of the float64 outputs' MSE of the same half tensors, and ranks candidates as it does."""
    from llmc_ray.algorithms.awq import GramLoss

    g = torch.Generator(device="cuda").manual_seed(4)
    scale = torch.rand(512, device="cuda", generator=g) * 4  # uneven channels, as activations have
    xs = [(torch.randn(1, 2048, 512, device="cuda", generator=g) * scale).to(dtype) for _ in range(3)]
    w = (torch.randn(256, 512, device="cuda", generator=g) * 0.05).to(dtype)
    loss = GramLoss(xs, w)
    got, want = [], []
    for noise in (0.002, 0.004, 0.008):
        cand = (w.float() + noise * torch.randn(w.shape, device="cuda", generator=g)).to(dtype)
        d = (cand.double() - w.double())
        want.append(torch.cat([(x.double().reshape(-1, 512) @ d.t()) for x in xs]).pow(2).mean().item())
        got.append(loss(cand, w).item())
    assert got == pytest.approx(want, rel=1e-2)
    assert sorted(range(3), key=got.__getitem__) == sorted(range(3), key=want.__getitem__)
