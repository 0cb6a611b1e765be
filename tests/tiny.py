"""Tiny random Llama/Qwen2 models built from configs in code (mechanics only, never quality claims)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def tiny_config(kind: str = "llama", layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 256, vocab: int = 512):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
               max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="sdpa")


def tiny_model(kind: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(kind, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # random init gives near-uniform outputs; widen weights so quantization visibly matters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
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
