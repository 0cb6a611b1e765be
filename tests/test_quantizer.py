"""Quantizer against independent references: a NumPy re-implementation of the formulas and their bounds."""
import numpy as np
import pytest
import torch

from llmc_ray.quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quant, quantize


def ref_fake_quant(w: np.ndarray, bit: int, sym: bool, g: int) -> np.ndarray:
    """Straight from the formulas (llmc / TPU-MLIR), group by group, in float64."""
    out = np.empty_like(w, dtype=np.float64)
    rows, cols = w.shape
    for r in range(rows):
        for c0 in range(0, cols, g):
            x = w[r, c0:c0 + g].astype(np.float64)
            if sym:
                s = max(np.abs(x).max(), 1e-5) / (2 ** (bit - 1) - 1)
                q = np.clip(np.sign(x / s) * np.floor(np.abs(x / s) + 0.5), -2 ** (bit - 1), 2 ** (bit - 1) - 1)
                out[r, c0:c0 + g] = q * s
            else:
                s = max(x.max() - x.min(), 1e-5) / (2 ** bit - 1)
                zp = np.clip(-np.sign(x.min() / s) * np.floor(np.abs(x.min() / s) + 0.5), 0, 2 ** bit - 1)
                q = np.clip(np.sign(x / s) * np.floor(np.abs(x / s) + 0.5) + zp, 0, 2 ** bit - 1)
                out[r, c0:c0 + g] = (q - zp) * s
    return out


@pytest.mark.parametrize("bit", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gran,g", [("per_group", 32), ("per_channel", 128)])
def test_matches_reference_formula(bit, sym, gran, g):
    torch.manual_seed(bit)
    w = torch.randn(16, 128) * 0.05
    spec = QuantSpec(bit=bit, symmetric=sym, granularity=gran, group_size=g)
    ours = fake_quant(w, spec).numpy()
    ref = ref_fake_quant(w.numpy(), bit, sym, g)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel", "per_group"])
def test_round_trip_error_at_most_half_step(sym, gran):
    torch.manual_seed(0)
    w = torch.randn(24, 256) * 0.1
    spec = QuantSpec(bit=4, symmetric=sym, granularity=gran, group_size=64)
    scale, zero = compute_qparams(w, spec)
    q = quantize(w, scale, zero, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    err = (dequantize(q, scale, zero, spec) - w).abs()
    # both ranges contain every element, so rounding moves each by at most half its group's step
    per_elem = scale.expand(w.shape) if gran == "per_tensor" else scale.repeat_interleave(
        w.shape[1] // scale.shape[1], dim=1)
    assert torch.all(err <= per_elem / 2 + 1e-6)


def test_mse_never_worse_than_minmax():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    w[0, 0] = 12.0  # an outlier that min-max wastes its range on
    mm = QuantSpec(bit=3, group_size=64)
    mse = QuantSpec(bit=3, group_size=64, calib_algo="mse")
    e_mm = (fake_quant(w, mm) - w).abs().pow(2.4).sum()
    e_mse = (fake_quant(w, mse) - w).abs().pow(2.4).sum()
    assert e_mse < e_mm


def test_integer_grid_sizes():
    w = torch.linspace(-1, 1, 1024).reshape(2, 512)
    for bit in (2, 3, 4, 8):
        spec = QuantSpec(bit=bit, group_size=512)
        q = quantize(w, *compute_qparams(w, spec), spec)
        assert len(torch.unique(q[0])) == 2 ** bit  # a linear ramp uses every asymmetric code
