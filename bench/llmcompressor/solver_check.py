"""Same W, same H, two GPTQ solvers: llmc-ray's gptq_solve (static groups, no act order) vs llm-compressor's
quantize_weight. Isolates the solver from the pipelines around it.

    PYTHONPATH=. /work/venv-lc/bin/python bench/llmcompressor/solver_check.py MODEL_DIR CALIB.pt

Takes block 0's mlp.down_proj of MODEL_DIR, its inputs on the calibration rows, H = 2/n sum x x^T.
"""
import sys, torch
from llmc_ray.algorithms.gptq import gptq_solve, accumulate_hessian
from llmc_ray.quant.quantizer import QuantSpec
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
calib = torch.load(sys.argv[2])
xs = []
h = m.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, a: xs.append(a[0].detach()))
with torch.no_grad():
    for r in calib: m(r[None])
h.remove()
W = m.model.layers[0].mlp.down_proj.weight.data.clone()
H = torch.zeros(W.shape[1], W.shape[1]); n = 0
for x in xs: H, n = accumulate_hessian(H, n, x)
spec = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=64)
ours = gptq_solve(W, H, spec, 128, 0.01, actorder=False, static_groups=True)
qa = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
wg = W.view(W.shape[0], -1, 64)
s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), qa)
Q, loss, fb = quantize_weight(W[None].clone(), H[None].clone(), s[None], z[None], None, qa, 128, 0.01)
Q = Q[0]
print("scale max rel diff", ((s - ours.scale).abs() / ours.scale).max().item())
print("Q differ frac", (Q != ours.q).float().mean().item(), "max |dQ|", (Q - ours.q).abs().max().item())
X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
for name, q in (("llmc-ray", ours.q), ("llm-compressor", Q)):
    print(name, "output MSE", ((X @ (q - W).T) ** 2).mean().item())
