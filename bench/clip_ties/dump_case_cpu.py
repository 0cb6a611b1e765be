import torch
exec(open('bench/clip_ties/perturb_cpu.py').read().split("import copy")[0])
from llmc_ray.algorithms.awq import search_clip, sample_tokens
W = w.blocks[2].mlp.gate_proj.weight.data.clone()
# inputs of gate_proj = post_attention_layernorm output; capture via block context
from llmc_ray.algorithms.base import BlockContext
ctx = BlockContext(w.blocks[2], w._to_dev(acts), w.block_kwargs(acts[0]), w.subsets[2], QuantSpec(4, False, "per_group", 64), None)
cap = ctx.capture_inputs(["mlp.gate_proj"])["mlp.gate_proj"]
x = sample_tokens(cap, 512)
spec = QuantSpec(4, False, "per_group", 64)
r = search_clip(W, x, spec, True)
torch.save({"W": W, "x": x, "hi": r[1]}, "/work/main/.devsnap/clip_case.pt")
print(W.shape, x.shape, (r[1] < W.reshape(W.shape[0], -1, 64).abs().amax(-1)).float().mean())
