"""Adapter lookup by model type (config.json's model_type, or model.type)."""
from .llama import LLAMA, MISTRAL, QWEN2
from .spec import ModelSpec, Subset

ADAPTERS = {s.name: s for s in (LLAMA, MISTRAL, QWEN2)}
ALIASES = {"smollm": "llama", "smollm2": "llama", "Llama": "llama", "Qwen2": "qwen2", "Mistral": "mistral"}


def get_spec(model_type: str) -> ModelSpec:
    key = ALIASES.get(model_type, model_type)
    if key not in ADAPTERS:
        from ..config import ConfigError

        raise ConfigError(f"model type {model_type!r} has no adapter: supported are {sorted(ADAPTERS)} "
                          f"(set model.type to one of them if the architecture matches)")
    return ADAPTERS[key]


__all__ = ["ADAPTERS", "ModelSpec", "Subset", "get_spec"]
