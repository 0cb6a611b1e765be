"""Lazy checkpoint access: read config.json and safetensors headers without loading weights, and build
only the requested modules (one block, the embeddings, the head) on a device.

A GGUF file is converted once into an HF directory under a cache keyed by the file's path, size and mtime;
everything downstream only ever sees HF directories.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from . import synthetic
from .config import ConfigError

log = logging.getLogger(__name__)

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMC_RAY_CACHE", Path.home() / ".cache" / "llmc_ray"))


def resolve_model_dir(path: str, cache_dir: Optional[Path] = None) -> Path:
    """HF directory for `path`: itself, the cached conversion of a .gguf file, or a synthetic model's dir."""
    syn = synthetic.parse(path)
    if syn:
        return synthetic.make_dir(*syn, cache_dir or default_cache_dir())
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"model.path={path!r} does not exist: point it at an HF model directory or a .gguf file")
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_hf(p, cache_dir or default_cache_dir())
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path={path!r} has no config.json: give an HF model directory or a .gguf file")
    return p


def gguf_to_hf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF once into an fp32 safetensors HF directory (atomic: written aside, then renamed)."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an HF directory in %s (once)", gguf.name, out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # the weights are now plain fp: rebuild the model without GGUF's quantization_config so it saves as HF
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


@dataclass
class TensorInfo:
    file: str
    shape: List[int]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


class Checkpoint:
    """An HF directory: its config and a map of tensor name -> (file, shape, dtype) read from headers."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.tensors: Dict[str, TensorInfo] = {}
        self.synthetic = (self.dir / synthetic.MARKER).is_file()
        if self.synthetic:  # shapes from the architecture; weights generated on demand
            for name, shape in synthetic.tensor_shapes(self.config()).items():
                self.tensors[name] = TensorInfo("<synthetic>", list(shape), "BF16")
            return
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{self.dir} holds no .safetensors files (only safetensors checkpoints are read)")
        for f in files:
            for name, info in _read_header(f).items():
                self.tensors[name] = TensorInfo(f.name, info["shape"], info["dtype"])

    def config(self):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.dir)
        cfg._attn_implementation = "sdpa"  # causal attention from is_causal, so blocks need no mask tensor
        return cfg

    def raw_config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def bytes_under(self, prefix: str) -> int:
        return sum(t.nbytes for n, t in self.tensors.items() if n.startswith(prefix))

    def load(self, names: Iterable[str], device: Optional[torch.device] = None,
             dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
        """Read just these tensors (grouped by file; safe_open maps the file, it does not read it whole).
        `device`/`dtype` only steer synthetic weights, which are generated where they will live."""
        from safetensors import safe_open

        if self.synthetic:
            shapes = {n: tuple(t.shape) for n, t in self.tensors.items()}
            return synthetic.load(names, shapes, dtype, device or torch.device("cpu"))
        by_file: Dict[str, List[str]] = {}
        for n in names:
            if n not in self.tensors:
                raise KeyError(f"tensor {n!r} not in checkpoint {self.dir}")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(self.dir / f), framework="pt") as fh:
                for n in ns:
                    out[n] = fh.get_tensor(n)
        return out

    def load_prefix(self, prefix: str, **kw) -> Dict[str, torch.Tensor]:
        """Tensors under `prefix.`, keys relative to it."""
        names = [n for n in self.tensors if n.startswith(prefix + ".")]
        return {n[len(prefix) + 1:]: t for n, t in self.load(names, **kw).items()}


def _read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return {k: {"shape": v["shape"], "dtype": v["dtype"]} for k, v in header.items()}


def meta_model(config, spec=None) -> nn.Module:
    """The whole architecture on the meta device: module names and shapes, no memory. With an adapter spec
    that names routed experts, each block's fused experts become per-expert linears (the checkpoint's names)."""
    from transformers import AutoModelForCausalLM

    from .models.experts import unfuse_experts

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if spec is not None and spec.experts:
        for block in model.get_submodule(spec.blocks):
            unfuse_experts(block, spec.experts)
    return model


def materialize(module: nn.Module, state: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                what: str) -> nn.Module:
    """Give a meta module real tensors from `state` (all of its parameters must be there)."""
    expected = set(module.state_dict().keys())
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(f"{what}: checkpoint lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()
             if k in expected}
    module.load_state_dict(state, assign=True, strict=True)
    return module.eval().requires_grad_(False)
