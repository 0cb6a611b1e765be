"""Tiny random Llama/Qwen2/Qwen2-MoE/DeepSeek-V2 models built from configs in code (mechanics only, never
quality claims)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, LlamaConfig, Qwen2Config, Qwen2MoeConfig

MOE_KINDS = ("qwen2_moe", "deepseek_v2")


def tiny_config(kind: str = "llama", layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 256, vocab: int = 512, **moe):
    if kind in MOE_KINDS:
        return tiny_moe_config(kind, layers=layers, vocab=vocab, **moe)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
               max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa")


def tiny_moe_config(kind: str, layers: int = 3, hidden: int = 64, experts: int = 8, top_k: int = 2,
                    vocab: int = 512, q_lora_rank=None, **over):
    """hidden 64, expert width 32: every in_features is a multiple of 32 (group_size 32 fits all linears).
    Qwen2-MoE: the last block is dense (mlp_only_layers); DeepSeek-V2: the first (first_k_dense_replace)."""
    common = dict(hidden_size=hidden, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=layers,
                  num_attention_heads=4, vocab_size=vocab, max_position_embeddings=1024,
                  num_experts_per_tok=top_k, tie_word_embeddings=False, attn_implementation="sdpa")
    if kind == "qwen2_moe":
        cfg = dict(common, num_key_value_heads=2, num_experts=experts, shared_expert_intermediate_size=64,
                   mlp_only_layers=[layers - 1])
        return Qwen2MoeConfig(**{**cfg, **over})
    cfg = dict(common, num_key_value_heads=4, n_routed_experts=experts, n_shared_experts=2, first_k_dense_replace=1,
               kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    return DeepseekV2Config(**{**cfg, **over})


def tiny_model(kind: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(kind, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # random init gives near-uniform outputs; widen weights so quantization visibly matters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:  # matrices, and fused experts' [E, out, in] stacks
                p.normal_(0, 0.08)
    return model


def block_inputs(model, n: int = 4, seq: int = 32, seed: int = 0):
    """Hidden states entering block 0, plus the kwargs a decoder layer needs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, seq), generator=g)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(seq).unsqueeze(0)
        cos_sin = model.model.rotary_emb(h, pos)
    return [h[i:i + 1] for i in range(n)], {"position_embeddings": cos_sin, "attention_mask": None,
                                            "position_ids": pos}
