"""The fused Triton column sweep against the eager PyTorch sweep, run by Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton compiles anything, hence a child process)."""
import textwrap

import pytest

from interpret import run_interpreted

pytest.importorskip("triton")

CHILD = textwrap.dedent('''
    import torch
    from llmc_ray.algorithms.gptq import column_sweep, gptq_solve, inverse_cholesky, pad_lazy_batch
    from llmc_ray.algorithms.gptq_kernel import fused_sweep, usable
    from llmc_ray.quant.quantizer import QuantSpec, compute_qparams

    g = torch.Generator().manual_seed(0)
    assert usable(torch.zeros(1), 32) is None and "power of two" in usable(torch.zeros(1), 24)
    # one lazy batch: every output equal to the eager sweep's, bit for bit, also for a padded narrower batch
    for spec in (QuantSpec(3, False, "per_channel"), QuantSpec(4, True, "per_channel")):
        for rows, n, width in ((8, 16, 16), (37, 32, 32), (5, 13, 16)):
            x = torch.randn(256, n, generator=g) @ torch.randn(n, n, generator=g)
            w = torch.randn(rows, n, generator=g)
            Hinv, _ = inverse_cholesky(2 * x.t() @ x / 256, 0.01)
            S, Z = compute_qparams(w, spec)
            S, Z = S.expand(-1, n).contiguous(), Z.expand(-1, n).contiguous()
            want = column_sweep(w.clone(), Hinv, S, Z, spec)
            got = fused_sweep(*pad_lazy_batch(w, Hinv, S, Z, width), spec.qmin, spec.qmax)
            for a, b in zip(want, got):
                assert torch.equal(a, b[:, :n]), (spec, rows, n)
    # a whole solve with several lazy batches, dynamic groups and a narrower last batch
    spec = QuantSpec(4, False, "per_group", 8)
    x = torch.randn(512, 40, generator=g) @ torch.randn(40, 40, generator=g)
    w = torch.randn(12, 40, generator=g)
    H = 2 * x.t() @ x / 512
    a = gptq_solve(w, H, spec, blocksize=16, sweep="eager")
    b = gptq_solve(w, H, spec, blocksize=16, sweep="triton")
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.row_loss, b.row_loss)
    print("OK")
''')


def test_fused_sweep_equals_eager_sweep_in_the_interpreter():
    run_interpreted(CHILD)


def test_sweep_setting_is_checked():
    from llmc_ray.algorithms.gptq import GptqSpecial

    with pytest.raises(ValueError, match="sweep='cuda'"):
        GptqSpecial(sweep="cuda")


def test_a_kernel_that_fails_to_build_falls_back_once(monkeypatch, caplog):
    """A GPU where the fused kernel does not build or launch: the solve finishes with the plain sweep (same
    result as sweep=eager), says so once, and later solves do not try the kernel again."""
    import torch

    from llmc_ray.algorithms import gptq_kernel
    from llmc_ray.algorithms.gptq import gptq_solve
    from llmc_ray.quant.quantizer import QuantSpec

    calls = []

    def no_kernel(*args):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(gptq_kernel.kernels, "broken", None)
    monkeypatch.setattr(gptq_kernel, "interpreting", lambda: True)  # let usable() accept CPU tensors
    monkeypatch.setattr(gptq_kernel, "fused_sweep", no_kernel)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 40, generator=g) @ torch.randn(40, 40, generator=g)
    w, H = torch.randn(12, 40, generator=g), 2 * x.t() @ x / 256
    spec = QuantSpec(4, False, "per_group", 8)
    want = gptq_solve(w, H, spec, blocksize=16, sweep="eager")
    with caplog.at_level("WARNING"):
        got = gptq_solve(w, H, spec, blocksize=16, sweep="triton")
        again = gptq_solve(w, H, spec, blocksize=16, sweep="triton")
    assert torch.equal(want.q, got.q) and torch.equal(want.row_loss, got.row_loss) and torch.equal(got.q, again.q)
    assert len(calls) == 1 and "no kernel image" in gptq_kernel.kernels.broken
    assert sum("fused GPTQ sweep failed" in r.getMessage() for r in caplog.records) == 1
