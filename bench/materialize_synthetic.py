"""Write a synthetic checkpoint (`synthetic:ARCH:LAYERS`, seeded per-tensor weights) as a plain HF directory
(config.json + bf16 safetensors shards + index), so tools that only read real checkpoints (llm-compressor)
see exactly the weights llmc-ray generates for the same name. Timing and memory only: the weights are random.

    python bench/materialize_synthetic.py qwen2-7b 4 OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmc_ray import synthetic
from llmc_ray.checkpoint import Checkpoint


def main() -> None:
    arch, layers, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    src = Checkpoint(synthetic.make_dir(arch, layers, out / ".synthetic"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards, weight_map = {}, {}
    for name, info in src.tensors.items():  # one shard per block, one for the rest
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append((name, info.shape))
    for k, (key, items) in enumerate(sorted(shards.items())):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: synthetic.generate(n, s, torch.bfloat16, device).cpu() for n, s in items}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(synthetic.ARCHS[arch], num_hidden_layers=layers, torch_dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    print(f"{out}: {len(weight_map)} tensors in {len(shards)} shards")


if __name__ == "__main__":
    main()
