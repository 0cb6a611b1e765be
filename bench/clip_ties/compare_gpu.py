import sys, torch
sys.path.insert(0, ".")
from llmc_ray.algorithms.awq import search_clip
from llmc_ray.quant.quantizer import QuantSpec
d = torch.load(".devsnap/clip_case.pt")  # made by bench/clip_ties/dump_case_cpu.py
spec = QuantSpec(4, False, "per_group", 64)
W, x, hi_cpu = d["W"], d["x"], d["hi"]
amax = W.reshape(W.shape[0], -1, 64).abs().amax(-1)
print("cpu clipped frac", (hi_cpu < amax).float().mean().item())
print("tf32 flags", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
for tf32 in (False, True):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    r = search_clip(W.cuda(), x.cuda(), spec, True)
    hi = r[1].cpu()
    print("gpu tf32", tf32, "clipped frac", (hi < amax).float().mean().item(), "same choice frac", (hi == hi_cpu).float().mean().item())
import transformers
print("after importing transformers:", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
