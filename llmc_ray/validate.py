"""Checks that need the model's shapes, run on safetensors headers before Ray or any GPU starts.

Each failure is one ConfigError line that says what to change.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List

from .algorithms.base import ALGORITHMS, Method, resolve
from .checkpoint import Checkpoint, resolve_model_dir
from .config import ConfigError, RunConfig
from .models import ModelSpec, get_spec, linears, names_has, resolve_subsets
from .quant.quantizer import QuantSpec


@dataclass
class Plan:
    """What the run resolved from the config and the checkpoint headers."""
    ckpt: Checkpoint
    model_type: str
    spec: ModelSpec
    n_layers: int
    method: Method
    special: Any
    qspec: QuantSpec
    dtype: str


def check_target(cfg: RunConfig, special: Any) -> None:
    """TPU-MLIR re-quantizes saved weights with plain group RTN; refuse settings it cannot reproduce."""
    if cfg.run.target != "tpu_mlir":
        return
    w = cfg.quant.weight
    if w.bit == 4 and (w.symmetric or w.granularity not in ("per_group", "per_channel")):
        raise ConfigError("run.target=tpu_mlir with 4-bit weights needs quant.weight.symmetric=false and "
                          "granularity per_group or per_channel (TPU-MLIR's W4 is asymmetric)")
    if w.bit == 8 and (not w.symmetric or w.granularity not in ("per_group", "per_channel")):
        raise ConfigError("run.target=tpu_mlir with 8-bit weights needs quant.weight.symmetric=true and "
                          "granularity per_channel or per_group")
    if w.bit not in (4, 8):
        raise ConfigError(f"run.target=tpu_mlir re-quantizes to W4 or W8 only; quant.weight.bit={w.bit}")
    if getattr(special, "actorder", False):
        raise ConfigError("run.target=tpu_mlir cannot reproduce GPTQ act-order groups: set quant.special.actorder=false")


def check_shapes(ckpt: Checkpoint, spec: ModelSpec, n_layers: int, qspec: QuantSpec) -> None:
    """Every block resolves to subsets that quantize all its weight matrices (routers absorb scales), and the
    group size divides every quantized linear's in_features, routed experts included."""
    bad_groups: Dict[str, List[int]] = {}
    widths = set()
    for i in range(n_layers):
        prefix = f"{spec.blocks}.{i}"
        subsets = resolve_subsets(spec, names_has(ckpt.tensors, prefix))
        matrices = {n[len(prefix) + 1:-len(".weight")] for n, t in ckpt.tensors.items()
                    if n.startswith(prefix + ".") and n.endswith(".weight") and len(t.shape) == 2}
        left = sorted(matrices - set(linears(subsets)) - {a for s in subsets for a in s.absorb})
        if not subsets or left:
            what = f"leaves {left[:3]} unquantized" if subsets else "names none of its layers"
            raise ConfigError(f"block {i} of the checkpoint: the {spec.name!r} adapter {what} "
                              f"(set model.type to the right family)")
        for name in linears(subsets):
            in_f = ckpt.tensors[f"{prefix}.{name}.weight"].shape[1]
            widths.add(in_f)
            if qspec.granularity == "per_group" and in_f % qspec.group_size:
                bad_groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(in_f)
    if bad_groups:
        name, dims = next(iter(bad_groups.items()))
        fits = math.gcd(*widths) & -math.gcd(*widths)  # the largest power of two dividing every in_features
        raise ConfigError(f"quant.weight.group_size={qspec.group_size} does not divide in_features={dims[0]} of "
                          f"{name} (and {len(bad_groups) - 1} more layer kinds): pick a group size dividing "
                          f"every in_features, e.g. {min(fits, 128)}")


def check_data_paths(cfg: RunConfig, needs_calib: bool) -> None:
    """Cross-section checks (dataclass defaults cannot hold them: OmegaConf builds defaults first)."""
    if needs_calib and cfg.calib.name == "custom" and not cfg.calib.path:
        raise ConfigError("calib.name=custom needs calib.path (a .txt with one sample a line, a .jsonl, "
                          "or a directory of .txt files)")
    if cfg.eval.eval_pos and cfg.eval.name == "custom" and not cfg.eval.path:
        raise ConfigError("eval.name=custom needs eval.path (or set eval.eval_pos=[] to skip evaluation)")


def make_plan(cfg: RunConfig) -> Plan:
    model_dir = resolve_model_dir(cfg.model.path)
    ckpt = Checkpoint(model_dir)
    raw = ckpt.raw_config()
    model_type = cfg.model.type or raw.get("model_type")
    if not model_type:
        raise ConfigError(f"{model_dir}/config.json has no model_type: set model.type")
    spec = get_spec(model_type)
    method, special = resolve(cfg.quant.method, cfg.quant.special)
    if cfg.dist.spread_experts and method.needs_calib and not method.experts_apart:
        raise ConfigError(f"dist.spread_experts=true: {method.name} cannot calibrate a block's routed experts apart "
                          f"from it (methods that can: "
                          f"{sorted(m.name for m in ALGORITHMS.values() if m.experts_apart)}); set "
                          f"dist.spread_experts=false")
    if not ckpt.synthetic:  # synthetic models calibrate and evaluate on random tokens
        check_data_paths(cfg, method.needs_calib)
    check_target(cfg, special)
    qspec = QuantSpec.from_config(cfg.quant.weight)
    n_layers = int(raw["num_hidden_layers"])
    check_shapes(ckpt, spec, n_layers, qspec)
    if cfg.dist.actors > n_layers:
        raise ConfigError(f"dist.actors={cfg.dist.actors} but the model has {n_layers} blocks: use at most {n_layers}")
    dtype = cfg.model.torch_dtype
    if dtype == "auto":
        dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32").replace("torch.", "")
    if cfg.dist.device == "cpu" and dtype == "float16":
        raise ConfigError("model.torch_dtype=float16 on dist.device=cpu is slow and lossy: use float32 or bfloat16")
    return Plan(ckpt, model_type, spec, n_layers, method, special, qspec, dtype)
