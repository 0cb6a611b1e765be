"""A floor for calibration time: the FLOPs our AWQ and GPTQ must do per block, over the GPU's measured
matmul rate. Printed next to a measured per-block time it says how far from the hardware limit we are.

    python bench/flop_floor.py ARCH [N_SAMPLES SEQ_LEN]      e.g. qwen2-7b 128 512

Counts (T = calibration tokens, P_x = weights in linears of part x, 2 FLOPs per multiply-add):
- block forward: 2·T·P_block + causal attention 2·T·seq·(q_heads·head_dim) (QKᵀ and AV, half the square each).
- AWQ (ours, per block): 1 forward to capture inputs; per scaled subset one fp reference + n_grid (20)
  forwards of its inspect module (qkv → whole attention, gate/up → MLP, down → down_proj; v→o skipped under
  GQA); clip search: for every non-q/k linear, K = 10 shrinks × 2·n_tok·out·in (n_tok = seq_len tokens);
  1 forward to propagate (quant_out).
- GPTQ (ours, true-sequential, per block): Hessians 2·T·in² for each distinct input (qkv, o, gate/up, down),
  at the bf16 rate (half activations into a GEMM with fp32 output); the column sweep ≈ 2·out·in² per linear
  (the lazy-batch updates) and Cholesky + inverse ≈ in³ per input, both fp32; forwards: 4 capture passes
  (one per true-sequential step) + 1 propagate.
The bf16 and fp32 GEMM rates are measured here (CUDA events, 8192² after warm-up, median of 20).
"""
from __future__ import annotations

import json
import sys

import torch

from llmc_ray.synthetic import ARCHS


def shapes(cfg: dict):
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    lin = {"q": (heads * hd, h), "k": (kv * hd, h), "v": (kv * hd, h), "o": (h, heads * hd),
           "gate": (i, h), "up": (i, h), "down": (h, i)}
    return lin, heads * hd, kv != heads


def params(lin, names):
    return sum(lin[n][0] * lin[n][1] for n in names)


def flops(cfg: dict, n_samples: int, seq: int):
    lin, qdim, gqa = shapes(cfg)
    T = n_samples * seq
    attn_core = 2 * T * seq * qdim  # causal: half of QKᵀ and of AV
    attn = 2 * T * params(lin, "qkvo") + attn_core
    mlp = 2 * T * params(lin, ("gate", "up", "down"))
    fwd = attn + mlp
    down = 2 * T * params(lin, ("down",))
    inspect = [attn, mlp, down] + ([] if gqa else [2 * T * params(lin, "o")])
    awq_search = sum(21 * f for f in inspect)  # fp reference + 20 grid points
    awq_clip = sum(10 * 2 * seq * lin[n][0] * lin[n][1] for n in ("v", "o", "gate", "up", "down"))
    awq_bf16 = 2 * fwd + awq_search + awq_clip
    ins = {"qkv": lin["q"][1], "o": lin["o"][1], "gateup": lin["gate"][1], "down": lin["down"][1]}
    hess = sum(2 * T * d * d for d in ins.values())
    sweep = sum(2 * o * i * i for o, i in lin.values())
    chol = sum(d ** 3 for d in ins.values())
    gptq_bf16 = 5 * fwd + hess
    gptq_fp32 = sweep + chol
    return {"tokens": T, "block_forward": fwd, "awq_bf16": awq_bf16, "gptq_bf16": gptq_bf16,
            "gptq_fp32": gptq_fp32}


def gemm_rate(dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]


def main() -> None:
    arch = sys.argv[1]
    n_samples, seq = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (128, 512)
    f = flops(ARCHS[arch], n_samples, seq)
    out = {"arch": arch, **{k: v for k, v in f.items()}}
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 rate: GPTQ's Hessian math is fp32
        bf16, fp32 = gemm_rate(torch.bfloat16), gemm_rate(torch.float32)
        out.update(gpu=torch.cuda.get_device_name(), bf16_tflops=bf16 / 1e12, fp32_tflops=fp32 / 1e12,
                   awq_floor_s=f["awq_bf16"] / bf16,
                   gptq_floor_s=f["gptq_bf16"] / bf16 + f["gptq_fp32"] / fp32)
    print(json.dumps(out))
    print(f"\n{arch}, {f['tokens']} calibration tokens: AWQ {f['awq_bf16'] / 1e12:.1f} TFLOP/block (bf16); "
          f"GPTQ {f['gptq_bf16'] / 1e12:.1f} TFLOP bf16 + {f['gptq_fp32'] / 1e12:.1f} TFLOP fp32 per block")
    if "awq_floor_s" in out:
        print(f"{out['gpu']}: bf16 {out['bf16_tflops']:.0f} TFLOP/s, fp32 {out['fp32_tflops']:.0f} TFLOP/s -> "
              f"floor AWQ {out['awq_floor_s']:.2f} s/block, GPTQ {out['gptq_floor_s']:.2f} s/block")


if __name__ == "__main__":
    main()
