"""AWQ's fused grid-search kernels against their PyTorch references, run by Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton compiles anything, hence a child process)."""
import textwrap

import pytest
import torch

from interpret import run_interpreted

pytest.importorskip("triton")

CHILD = textwrap.dedent('''
    import torch
    from llmc_ray.algorithms import awq_kernel as k
    from llmc_ray.quant.quantizer import QuantSpec, fake_quant

    g = torch.Generator().manual_seed(0)
    n_fused = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for spec in (QuantSpec(4, False, "per_group", 32), QuantSpec(3, True, "per_group", 64),
                     QuantSpec(8, False, "per_group", 128), QuantSpec(2, True, "per_group", 16)):
            for rows in (1, 37, 300):  # not a multiple of a program's rows
                cols = 2 * spec.group_size
                w = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)).to(dtype)
                w[0, :spec.group_size] = 0  # an all-zero group: the range floor (MIN_RANGE) decides
                w[-1, -3] = 40.0  # an outlier
                s = torch.rand(cols, generator=g) * 4 + 0.05
                ref = (fake_quant(w.float() * s, spec) / s).to(dtype)  # AWQ's candidate weights, spelled out
                got = k.scaled_fake_quant(w, s, spec)
                assert got.dtype == dtype and torch.equal(got, ref), (dtype, spec, rows, (got - ref).abs().max())
                n_fused += 1
    assert k.kernels.broken is None and n_fused == 36
    # the squared-error sum: fp32 accumulation of half-precision inputs, any size
    for n in (1, 4095, 4096, 10001):
        a, b = torch.randn(n, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
        want = ((a.double() - b.double()) ** 2).sum()
        got = k.sq_err_sum(a.reshape(1, -1), b.reshape(1, -1))
        assert got.dtype == torch.float32 and abs(got.double() - want) <= 1e-5 * want, (n, got, want)
    print("OK")
''')


def test_awq_kernels_equal_their_references_in_the_interpreter():
    run_interpreted(CHILD)


def test_layouts_the_kernel_does_not_take_use_the_reference():
    """per_channel / per_tensor / mse qparams or a group size that is no power of two: PyTorch's ops."""
    from llmc_ray.algorithms import awq_kernel as k
    from llmc_ray.quant.quantizer import QuantSpec

    w = torch.randn(4, 96)
    for spec in (QuantSpec(4, False, "per_channel"), QuantSpec(4, False, "per_tensor"),
                 QuantSpec(4, False, "per_group", 48), QuantSpec(4, False, "per_group", 32, "mse")):
        assert not k._fused_layout(w, spec)
    assert k._fused_layout(w, QuantSpec(4, False, "per_group", 32))


def test_a_kernel_that_fails_on_the_gpu_falls_back_once(monkeypatch, caplog):
    """A kernel that does not build or launch: the reference's result, said once, not tried again."""
    from llmc_ray.algorithms import awq_kernel as k
    from llmc_ray.quant.quantizer import QuantSpec

    calls = []

    class Failing:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                calls.append(grid)
                raise RuntimeError("no kernel image is available for execution on the device")
            return launch

    monkeypatch.setattr(k.kernels, "broken", None)
    monkeypatch.setattr(k.kernels, "runs_on", lambda t: k.kernels.broken is None)  # as if on a GPU
    monkeypatch.setattr(k, "_scaled_fake_quant_kernel", Failing())
    monkeypatch.setattr(k, "_sq_err_kernel", Failing())
    spec = QuantSpec(4, False, "per_group", 32)
    w, s = torch.randn(8, 64), torch.rand(64) + 0.5
    with caplog.at_level("WARNING"):
        assert torch.equal(k.scaled_fake_quant(w, s, spec), k.scaled_fake_quant_reference(w, s, spec))
        assert torch.equal(k.sq_err_sum(w, w * 2), k.sq_err_sum_reference(w, w * 2))
    assert len(calls) == 1 and "no kernel image" in k.kernels.broken
    assert sum("fused AWQ kernels failed" in r.message for r in caplog.records) == 1
