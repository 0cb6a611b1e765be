"""GPTQ against independent references: RTN, the OBS update with explicit inverses, the quadratic loss."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch

import tiny
from llmc_ray.algorithms.base import BlockContext
from llmc_ray.algorithms.gptq import GptqSpecial, HessianStats, accumulate_hessian, gptq, gptq_solve
from llmc_ray.models.llama import LLAMA_SUBSETS
from llmc_ray.quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quant, quantize, round_half_away

G32_4 = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=32)
G32_3 = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=32)
PC_3 = QuantSpec(bit=3, symmetric=False, granularity="per_channel")
PC_4_SYM = QuantSpec(bit=4, symmetric=True, granularity="per_channel")
LINEARS = [n for s in LLAMA_SUBSETS for n in s.layers]


@pytest.fixture(scope="module")
def block_acts():
    """Weights and fp inputs [tokens, in] of every linear of a tiny Llama's block 0."""
    model = tiny.tiny_model()
    xs, kw = tiny.block_inputs(model, n=8, seq=64)
    ctx = BlockContext(model.model.layers[0], xs, kw, LLAMA_SUBSETS, G32_4, GptqSpecial())
    seen = ctx.capture_inputs(LINEARS)
    return {n: (ctx.module(n).weight.detach().clone(), torch.cat(seen[n]).reshape(-1, seen[n][0].shape[-1]))
            for n in LINEARS}


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def recon_err(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return (x @ w.t() - x @ q.t()).pow(2).sum().item()


def random_problem(out_f=32, in_f=64, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with uneven channel scales: GPTQ has something to exploit
    x = torch.randn(tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    x = x * torch.rand(in_f, generator=g).mul(3).add(0.2)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    return w, x


def on_grid(out) -> torch.Tensor:
    """Q re-quantized with its own qparams, column by column through g_idx."""
    s, z = out.scale[:, out.g_idx], out.zero[:, out.g_idx]
    if s.shape[0] == 1:
        s, z = s.expand_as(out.q), z.expand_as(out.q)
    return round_half_away(out.q / s) + z, s, z


# ------------------------------------------------------------------ quality vs RTN on real activations


@pytest.mark.parametrize("spec", [G32_4, G32_3, PC_3], ids=["w4g32", "w3g32", "w3pc"])
def test_gptq_beats_rtn_per_layer(block_acts, spec):
    for name, (w, x) in block_acts.items():
        out = gptq_solve(w, hessian(x), spec)
        err_gptq = recon_err(x, w, out.q)
        err_rtn = recon_err(x, w, fake_quant(w, spec))
        assert err_gptq < err_rtn, f"{name}: gptq {err_gptq:.4g} >= rtn {err_rtn:.4g}"


# ------------------------------------------------------------------ exact properties


@pytest.mark.parametrize("spec", [G32_4, G32_3, PC_3, PC_4_SYM])
@pytest.mark.parametrize("actorder,static", [(False, False), (True, False), (True, True), (False, True)])
def test_q_lies_on_its_grid(spec, actorder, static):
    w, x = random_problem()
    out = gptq_solve(w, hessian(x), spec, blocksize=16, actorder=actorder, static_groups=static)
    codes, s, z = on_grid(out)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert torch.equal((codes - z) * s, out.q)


@pytest.mark.parametrize("spec", [G32_4, PC_3, PC_4_SYM, QuantSpec(bit=4, granularity="per_tensor")])
def test_identity_hessian_equals_rtn(spec):
    # uncorrelated inputs: no error is propagated, so each column rounds to nearest
    w, _ = random_problem()
    out = gptq_solve(w, torch.eye(w.shape[1]) * 3.0, spec, blocksize=16)
    assert torch.equal(out.q, fake_quant(w, spec))
    s, z = compute_qparams(w, spec)
    assert torch.equal(out.scale, s) and torch.equal(out.zero, z)


@pytest.mark.parametrize("spec", [G32_4, G32_3])
def test_actorder_static_groups_qparams_reproduce_q(spec):
    w, x = random_problem()
    out = gptq_solve(w, hessian(x), spec, blocksize=16, actorder=True, static_groups=True)
    assert out.perm is not None and not torch.equal(out.perm, torch.arange(w.shape[1]))
    assert out.scale.shape == (w.shape[0], w.shape[1] // spec.group_size)
    assert torch.equal(out.g_idx, torch.arange(w.shape[1]) // spec.group_size)
    assert torch.equal(fake_quant(out.q, spec, out.scale, out.zero), out.q)
    assert torch.equal(dequantize(quantize(out.q, out.scale, out.zero, spec), out.scale, out.zero, spec), out.q)
    # static groups are the original W's RTN qparams
    s, z = compute_qparams(w, spec)
    assert torch.equal(out.scale, s) and torch.equal(out.zero, z)


def test_actorder_dynamic_groups_follow_the_order():
    w, x = random_problem()
    H = hessian(x)
    out = gptq_solve(w, H, G32_4, blocksize=16, actorder=True)
    assert torch.all(torch.diag(H)[out.perm].diff() <= 0)  # largest diag H first
    invperm = torch.argsort(out.perm)
    assert torch.equal(out.g_idx, invperm // 32)


def naive_obs(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
              percdamp: float = 0.01) -> torch.Tensor:
    """The paper's OBS step with an explicit inverse, eliminated one column at a time (float64)."""
    W = w.double().clone()
    H = H.double().clone()
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    s, z = scale.double(), zero.double()
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = ((round_half_away(W[:, i:i + 1] / s) + z).clamp(spec.qmin, spec.qmax) - z) * s
        Q[:, i] = q[:, 0]
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return Q.float()


@pytest.mark.parametrize("blocksize", [1, 7, 128])
def test_matches_naive_obs_per_channel(blocksize):
    w, x = random_problem()
    H = hessian(x)
    spec = PC_3
    out = gptq_solve(w, H, spec, blocksize=blocksize)
    s, z = compute_qparams(w, spec)
    ref = naive_obs(w, H, s, z, spec)
    # fp32 vs fp64 may flip a rounding tie now and then; the solutions must otherwise coincide
    assert (out.q == ref).float().mean() > 0.995
    assert abs(recon_err(x, w, out.q) - recon_err(x, w, ref)) < 0.01 * recon_err(x, w, ref)


@pytest.mark.parametrize("actorder", [False, True])
def test_loss_is_the_quadratic_error(actorder):
    # every OBS step is exact on a quadratic, so the per-column losses add up to 1/2 tr(D H D^T)
    w, x = random_problem()
    H = hessian(x)
    out = gptq_solve(w, H, G32_4, blocksize=16, actorder=actorder, percdamp=0.01)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0])
    d = (out.q - w).double()
    assert out.loss == pytest.approx(0.5 * torch.trace(d @ Hd.double() @ d.t()).item(), rel=1e-3)


def test_dead_inputs_are_zeroed():
    w, x = random_problem()
    x[:, [3, 40]] = 0
    out = gptq_solve(w, hessian(x), G32_4, blocksize=16)
    assert torch.all(out.q[:, [3, 40]] == 0)
    assert torch.isfinite(out.q).all()


def test_inputs_not_modified():
    w, x = random_problem()
    H = hessian(x)
    w0, H0 = w.clone(), H.clone()
    gptq_solve(w, H, G32_4, blocksize=16, actorder=True)
    assert torch.equal(w, w0) and torch.equal(H, H0)


def test_accumulate_hessian_over_micro_batches():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)]
    stats = HessianStats(8, torch.device("cpu"))
    for b in batches:
        stats.add_batch(b)
    x = torch.cat(batches).reshape(-1, 8)
    # H = 2/n X^T X with n counting sequences (the reference's convention)
    assert stats.n == 6
    torch.testing.assert_close(stats.H, 2 * x.t() @ x / 6, rtol=1e-5, atol=1e-6)
    H, n = accumulate_hessian(torch.zeros(8, 8), 0, x)  # 2-D input: one sample
    assert n == 1
    torch.testing.assert_close(H, 2 * x.t() @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-input Hessian path runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_hessian_on_cuda_equals_the_fp32_formula(dtype):
    """On CUDA, half activations go into a GEMM with fp32 output; the result must be the reference's
    2/n X^T X of the upcast activations (only the summation order differs)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    batches = [torch.randn(b, 64, 256, device="cuda", generator=g).to(dtype) for b in (2, 1, 3)]
    stats = HessianStats(256, torch.device("cuda"))
    for b in batches:
        stats.add_batch(b)
    x = torch.cat(batches).reshape(-1, 256).double()
    torch.testing.assert_close(stats.H.double(), 2 * x.t() @ x / 6, rtol=1e-5, atol=1e-4)


def test_special_validation():
    with pytest.raises(ValueError, match="blocksize"):
        GptqSpecial(blocksize=0)
    with pytest.raises(ValueError, match="percdamp"):
        GptqSpecial(percdamp=-0.1)


# ------------------------------------------------------------------ the registered block method


def run_block(special: GptqSpecial, spec: QuantSpec = G32_4):
    model = tiny.tiny_model()
    xs, kw = tiny.block_inputs(model)
    ctx = BlockContext(model.model.layers[0], xs, kw, LLAMA_SUBSETS, spec, special)
    return ctx, gptq(ctx)


@pytest.mark.parametrize("special", [GptqSpecial(), GptqSpecial(true_sequential=False),
                                     GptqSpecial(actorder=True, static_groups=True, blocksize=32)])
def test_block_weights_match_returned_qparams(special):
    ctx, res = run_block(special)
    assert set(res.qparams) == set(LINEARS) and res.info["act_order_groups"] is False
    for name in LINEARS:
        w = ctx.module(name).weight.data
        scale, zero = res.qparams[name]
        assert scale.shape == (w.shape[0], w.shape[1] // 32)
        assert torch.equal(fake_quant(w, G32_4, scale, zero), w), name


def test_block_actorder_dynamic_groups_returns_no_qparams():
    ctx, res = run_block(GptqSpecial(actorder=True))
    assert res.info["act_order_groups"] is True and "note" in res.info
    assert all(res.qparams[n] is None for n in LINEARS)


def test_block_true_sequential_sees_quantized_inputs():
    # with true_sequential the later subsets are solved on inputs from the quantized earlier ones
    _, seq = run_block(GptqSpecial(true_sequential=True))
    _, par = run_block(GptqSpecial(true_sequential=False))
    first = LLAMA_SUBSETS[0].layers
    for n in first:  # the first subset sees the same fp input either way
        assert seq.info["loss"][n] == pytest.approx(par.info["loss"][n], rel=1e-5)
    assert seq.info["loss"]["mlp.down_proj"] != pytest.approx(par.info["loss"]["mlp.down_proj"], rel=1e-5)


@pytest.mark.parametrize("actorder", [False, True])
def test_stacked_subset_equals_layers_solved_one_by_one(actorder):
    """q/k/v share H and GPTQ's rows are independent given H: the stacked sweep must give each layer exactly
    what solving it alone gives."""
    torch.manual_seed(3)
    x = torch.randn(512, 64)
    H = hessian(x)
    ws = [torch.randn(n, 64) * 0.1 for n in (32, 16, 16)]
    lin = torch.nn.ModuleDict({k: torch.nn.Linear(64, w.shape[0], bias=False) for k, w in zip("qkv", ws)})
    for k, w in zip("qkv", ws):
        lin[k].weight.data = w.clone()
    from llmc_ray.algorithms.gptq import quantize_group

    ctx = BlockContext(block=lin, inputs=[], block_kwargs={}, subsets=(), spec=G32_4,
                       special=GptqSpecial(actorder=actorder, static_groups=True))
    qparams, losses = {}, {}
    quantize_group(ctx, ("q", "k", "v"), H, ctx.special, qparams, losses)
    for k, w in zip("qkv", ws):
        alone = gptq_solve(w, H, G32_4, actorder=actorder, static_groups=True)
        torch.testing.assert_close(lin[k].weight.data, alone.q, rtol=0, atol=1e-6)
        torch.testing.assert_close(qparams[k][0], alone.scale, rtol=0, atol=0)
        assert losses[k][0].item() == pytest.approx(alone.loss, rel=1e-4) and losses[k][1].item() == 0


@pytest.mark.parametrize("n", [5, 16])
def test_padded_lazy_batch_sweeps_to_the_same_columns(n):
    """The CUDA-graph path pads a layer's narrower last lazy batch to the block size (zero columns, identity
    Hinv): the real columns must come out exactly as from the unpadded sweep."""
    from llmc_ray.algorithms.gptq import column_sweep, inverse_cholesky, pad_lazy_batch

    w, x = random_problem(out_f=8, in_f=n)
    Hinv, _ = inverse_cholesky(hessian(x), 0.01)
    S, Z = compute_qparams(w, PC_3)
    S, Z = S.expand(-1, n).contiguous(), Z.expand(-1, n).contiguous()
    want = column_sweep(w.clone(), Hinv, S, Z, PC_3)
    got = column_sweep(*pad_lazy_batch(w.clone(), Hinv, S, Z, 16), PC_3)
    for a, b in zip(want, got):
        assert b.shape == (8, 16) and torch.equal(b[:, :n], a)


def test_block_names_the_layer_whose_hessian_is_not_positive_definite():
    """Failures are read back once per block; the error still says which linears and what to change."""
    model = tiny.tiny_model()
    xs, kw = tiny.block_inputs(model)
    # every token the same vector: q/k/v's input Hessian has rank 1, and without damping no Cholesky factor
    same = [x[:, :1].expand_as(x).contiguous() for x in xs]
    bad = BlockContext(model.model.layers[0], same, kw, LLAMA_SUBSETS, G32_4, GptqSpecial(percdamp=0.0))
    with pytest.raises(torch.linalg.LinAlgError, match=r"GPTQ \(self_attn.q_proj, .*raise special.percdamp"):
        gptq(bad)
