"""Adapter lookup by model type (config.json's model_type, or model.type)."""
from .llama import LLAMA, MISTRAL, QWEN2
from .moe import DEEPSEEK_V2, QWEN2_MOE
from .spec import ModelSpec, Subset, linears
from .subsets import (block_subsets, expert_names, module_has, names_has, only_experts, renamed,
                      resolve_subsets, without_experts)

ADAPTERS = {s.name: s for s in (LLAMA, MISTRAL, QWEN2, QWEN2_MOE, DEEPSEEK_V2)}
ALIASES = {"smollm": "llama", "smollm2": "llama", "Llama": "llama", "Qwen2": "qwen2", "Mistral": "mistral"}


def get_spec(model_type: str) -> ModelSpec:
    key = ALIASES.get(model_type, model_type)
    if key not in ADAPTERS:
        from ..config import ConfigError

        raise ConfigError(f"model type {model_type!r} has no adapter: supported are {sorted(ADAPTERS)} "
                          f"(set model.type to one of them if the architecture matches)")
    return ADAPTERS[key]


__all__ = ["ADAPTERS", "ModelSpec", "Subset", "block_subsets", "expert_names", "get_spec", "linears",
           "module_has", "names_has", "only_experts", "renamed", "resolve_subsets", "without_experts"]
