"""Synthetic checkpoints: a real architecture's config.json (written here) at full width and a chosen depth,
with seeded random weights generated per tensor on demand. For speed and memory at scale without
downloading weights — never for quality claims.

    model.path=synthetic:llama2-70b:4     (architecture : number of blocks)
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from .config import ConfigError

# config.json fields of the published checkpoints (shapes only; weights are random)
ARCHS: Dict[str, dict] = {
    "llama2-7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16"),
    "llama2-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                       intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       num_hidden_layers=80, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16"),
    # SmolLM2-135M (HuggingFaceTB): the real small model's shape, for timing without staging its weights
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                         intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, torch_dtype="bfloat16"),
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                     intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                     num_hidden_layers=28, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False, torch_dtype="bfloat16"),
    # MoE: 64 routed experts (6 per token) + 2 shared, MLA attention with q_lora_rank null, block 0 dense.
    # scoring_func is not a DeepseekV2Config field (transformers' router always uses softmax, which it is) and
    # rope_theta is moved into rope_parameters by the config;
    # rope_scaling (yarn) is left out: it changes no shape.
    "deepseek-v2-lite": dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048,
                             num_hidden_layers=27, intermediate_size=10944, moe_intermediate_size=1408,
                             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
                             kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                             v_head_dim=128, num_attention_heads=16, num_key_value_heads=16, vocab_size=102400,
                             routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
                             norm_topk_prob=False, scoring_func="softmax", rope_theta=10000.0,
                             max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             torch_dtype="bfloat16"),
    # MoE: 60 routed experts (4 per token) + one gated shared expert, Qwen2 attention with biases
    "qwen1.5-moe-a2.7b": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_size=2048,
                              num_hidden_layers=24, intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                              decoder_sparse_step=1, norm_topk_prob=False, num_attention_heads=16,
                              num_key_value_heads=16, vocab_size=151936, max_position_embeddings=8192,
                              rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                              torch_dtype="bfloat16"),
}
MARKER = "synthetic.json"
WEIGHT_STD = 0.02


def parse(path: str) -> Optional[tuple]:
    """'synthetic:ARCH:LAYERS' -> (arch, layers), else None."""
    if not path.startswith("synthetic:"):
        return None
    parts = path.split(":")
    if len(parts) != 3 or parts[1] not in ARCHS or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ConfigError(f"model.path={path!r}: use synthetic:ARCH:LAYERS with ARCH one of {sorted(ARCHS)}")
    return parts[1], int(parts[2])


def make_dir(arch: str, layers: int, cache_dir: Path) -> Path:
    """A directory holding just config.json (+ the marker): enough for AutoConfig and the planner."""
    out = cache_dir / "synthetic" / f"{arch}-L{layers}"
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(ARCHS[arch], num_hidden_layers=layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / MARKER).write_text(json.dumps({"arch": arch, "layers": layers}))
    return out


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def generate(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The same tensor for the same name on any device/actor count (seeded by the tensor's name)."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed_of(name))
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * WEIGHT_STD).to(dtype)


def tensor_shapes(config) -> Dict[str, tuple]:
    """Shapes under the on-disk names (experts per expert, as published checkpoints store them)."""
    from .checkpoint import meta_model
    from .models import get_spec

    spec = get_spec(config.model_type)
    shapes = {k: tuple(v.shape) for k, v in meta_model(config, spec).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):  # the head is the embedding: checkpoints store it once
        shapes.pop(f"{spec.lm_head}.weight", None)
    return shapes


def synthetic_tokens(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def load(names: Iterable[str], shapes: Dict[str, tuple], dtype: torch.dtype, device: torch.device):
    return {n: generate(n, shapes[n], dtype, device) for n in names}
