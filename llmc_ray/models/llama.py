"""Llama family (Llama, SmolLM, Mistral) and Qwen2 share one block layout."""
from .spec import ModelSpec, Subset

LLAMA_SUBSETS = (
    Subset("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", True),
    # GQA makes v_proj narrower than o_proj's input: scaling is then skipped (shapes checked at run time)
    Subset("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    Subset("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Subset("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                     lm_head="lm_head", rotary="model.rotary_emb", subsets=LLAMA_SUBSETS)


LLAMA = _spec("llama")
MISTRAL = _spec("mistral")
QWEN2 = _spec("qwen2")
