"""Mixture-of-Experts families: Qwen2-MoE (Qwen1.5-MoE) and DeepSeek-V2 (MLA attention).

Routed experts are per-expert linears once unfused (`experts.py`), named as in the published checkpoints:
`mlp.experts.{e}.{gate,up,down}_proj`. The router reads the post-attention norm's output, so it absorbs that
norm's AWQ scale (`absorb`) and is never quantized. Dense layers of the same model (DeepSeek-V2's first
`first_k_dense_replace` blocks, Qwen2-MoE's `mlp_only_layers`) resolve to the Llama MLP subsets instead.
"""
from .llama import LLAMA_SUBSETS
from .spec import ModelSpec, Subset

ATTENTION, V_TO_O, DENSE_MLP, DENSE_DOWN = LLAMA_SUBSETS


def moe_subsets(shared: str, routers: tuple) -> tuple:
    """The MoE half of a block: the norm feeds every expert's gate/up and the shared expert's; each expert's
    up_proj feeds its own down_proj (an expert sees only the tokens routed to it: one input group each)."""
    expert_in = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj")
    shared_in = (f"{shared}.gate_proj", f"{shared}.up_proj")
    return (
        Subset("post_attention_layernorm", expert_in + shared_in, "mlp", absorb=routers,
               input_groups=(expert_in, shared_in)),
        Subset("mlp.experts.{e}.up_proj", ("mlp.experts.{e}.down_proj",), "mlp.experts.{e}.down_proj"),
        Subset(f"{shared}.up_proj", (f"{shared}.down_proj",), f"{shared}.down_proj"),
    )


QWEN2_MOE = ModelSpec(
    name="qwen2_moe", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", rotary="model.rotary_emb", experts="mlp.experts",
    # attention as Qwen2; the shared expert's sigmoid gate reads the norm output as the router does
    subsets=(ATTENTION, V_TO_O, DENSE_MLP, DENSE_DOWN,
             *moe_subsets("mlp.shared_expert", ("mlp.gate", "mlp.shared_expert_gate"))),
)

MLA_SUBSETS = (
    # q_lora_rank null (V2-Lite): q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj. One of the two resolves.
    Subset("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn", True),
    Subset("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn", True),
    Subset("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn.q_b_proj"),
    # kv_a_layernorm normalizes the kv_lora_rank part only, which is exactly kv_b_proj's input
    Subset("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj"),
    # o_proj reads attention over values expanded from kv_b_proj's rows: no single per-channel output to
    # divide, so it is quantized without a scale
    Subset(None, ("self_attn.o_proj",), "self_attn.o_proj"),
)

DEEPSEEK_V2 = ModelSpec(
    name="deepseek_v2", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", rotary="model.rotary_emb", experts="mlp.experts",
    subsets=(*MLA_SUBSETS, DENSE_MLP, DENSE_DOWN, *moe_subsets("mlp.shared_experts", ("mlp.gate",))),
)
