"""llm-compressor (vllm-project/llm-compressor) doing llmc-ray's AWQ or GPTQ on given tokens: PPL and time.

    python bench/llmcompressor/run_llmcompressor.py --model HF_DIR --calib calib.pt --eval eval.pt \
        --method awq|gptq --bits 4 --group-size 64 --asymmetric --device cuda --out results.json

calib.pt / eval.pt: int64 [rows, seq] tensors (bench/llmcompressor/dump_tokens.py writes llmc-ray's own).
Steps: load the model; pretrain PPL; llm-compressor `oneshot` fed exactly the calibration rows (a DataLoader
of the rows in order, --batch-size rows a batch: no shuffling, no re-tokenizing); check that the model now computes with
quantized weights; quant PPL; write JSON. PPL is llmc-ray's (worker._nll, schedule.perplexity): each eval
window one causal sequence, batch 1, exp(sum of next-token NLL / count).

Settings that mirror llmc-ray (conf/quant/*.yaml) are explicit below; README.md tabulates them.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

# llmc-ray's Llama/Mistral/Qwen2 block linears (llmc_ray/models/llama.py); lm_head and embeddings stay fp
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEAR_TARGETS = [r"re:.*\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"]
# llmc-ray's AWQ subsets (prev_op -> layers); the v->o one is skipped by both tools under GQA
AWQ_MAPPINGS = [
    (r"re:.*input_layernorm$", [r"re:.*q_proj$", r"re:.*k_proj$", r"re:.*v_proj$"]),
    (r"re:.*v_proj$", [r"re:.*o_proj$"]),
    (r"re:.*post_attention_layernorm$", [r"re:.*gate_proj$", r"re:.*up_proj$"]),
    (r"re:.*up_proj$", [r"re:.*down_proj$"]),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--calib", required=True, type=Path, help="int64 [n, seq] calibration tokens (.pt)")
    ap.add_argument("--eval", required=True, type=Path, help="int64 [windows, seq] eval tokens (.pt)")
    ap.add_argument("--method", required=True, choices=("awq", "gptq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    sym = ap.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    ap.set_defaults(symmetric=False)  # llmc-ray's W4 default
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                    help="auto: bfloat16 on cuda, float32 on cpu (llmc-ray's model.torch_dtype should match)")
    ap.add_argument("--out", required=True, type=Path)
    # AWQ: llmc-ray trans_version v2 (s = mean|x|^r, no weight term) is duo_scaling=False; llmc-ray searches
    # r = k/20, k = 0..19; llm-compressor searches r = k/(n_grid-1), k = 0..n_grid-1: 21 gives k/20, k = 0..20
    ap.add_argument("--duo-scaling", choices=("false", "true", "both"), default="false")
    ap.add_argument("--n-grid", type=int, default=21)
    # GPTQ: llmc-ray blocksize 128, percdamp 0.01, actorder false
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dampening-frac", type=float, default=0.01)
    ap.add_argument("--actorder", choices=("none", "static", "weight"), default="none")
    ap.add_argument("--sequential-targets", default=None,
                    help="comma-separated module class names that cut the model into calibration subgraphs "
                         "(default: llm-compressor's, the decoder layer). 'Linear' makes GPTQ true-sequential")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="calibration rows per forward (llm-compressor's default and its advice: 1)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- perplexity (llmc-ray's formula)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device) -> Tuple[float, float]:
    """exp(sum NLL / count): each window alone (batch 1, no padding, no mask), labels = ids shifted by one."""
    total, count = 0.0, 0
    for row in windows:
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count), total / count


# ---------------------------------------------------------------- recipe


def quant_scheme(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.symmetric, strategy="group",
                               group_size=args.group_size, dynamic=False, observer="minmax")
    return {"group_0": QuantizationScheme(targets=LINEAR_TARGETS, weights=weights,
                                          input_activations=None, output_activations=None)}


def build_recipe(args) -> List:
    if args.method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        duo = {"false": False, "true": True, "both": "both"}[args.duo_scaling]
        awq = AWQModifier(mappings=[AWQMapping(smooth_layer=s, balance_layers=b) for s, b in AWQ_MAPPINGS],
                          duo_scaling=duo, n_grid=args.n_grid)
        # AWQ only smooths; the QuantizationModifier after it takes min-max qparams of the smoothed weights
        return [awq, QuantizationModifier(config_groups=quant_scheme(args), ignore=["lm_head"])]
    from llmcompressor.modifiers.gptq import GPTQModifier

    actorder = None if args.actorder == "none" else args.actorder
    return [GPTQModifier(config_groups=quant_scheme(args), ignore=["lm_head"], block_size=args.block_size,
                         dampening_frac=args.dampening_frac, actorder=actorder)]


def calib_loader(calib: torch.Tensor, batch_size: int = 1):
    """The rows in order, `batch_size` a batch, as {"input_ids": [b, seq]}: no shuffle, pad, truncation or mask
    (every row has the same length, so batching changes no token)."""
    from torch.utils.data import DataLoader

    rows = [{"input_ids": r} for r in calib]
    return DataLoader(rows, batch_size=batch_size, shuffle=False,
                      collate_fn=lambda b: {"input_ids": torch.stack([r["input_ids"] for r in b])})


# ---------------------------------------------------------------- did the forward really quantize?


def quantized_linears(model) -> Dict[str, torch.nn.Module]:
    found = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    expected = {n for n, _ in model.named_modules() if n.rsplit(".layers.", 1)[-1].split(".", 1)[-1] in LINEARS
                and ".layers." in n}
    assert set(found) == expected, (f"quantized modules differ from llmc-ray's linears: "
                                    f"extra {sorted(set(found) - expected)[:5]}, missing {sorted(expected - set(found))[:5]}")
    return found


@torch.no_grad()
def check_quantized(model, originals: Dict[str, torch.Tensor], bits: int, symmetric: bool,
                    group_size: int) -> Dict[str, object]:
    """Each quantized linear is FROZEN (compressed-tensors then fake-quantizes its weight on every forward),
    its effective weight lies on the int grid of its stored scale/zero point, and the module's output is
    F.linear with that weight (so the forward does use it). Returns a summary for the JSON."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    mods = quantized_linears(model)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # compressed-tensors' int range (zp shifts it)
    worst, changed = 0.0, 0
    for name, m in mods.items():
        assert m.quantization_status == QuantizationStatus.FROZEN, f"{name}: status {m.quantization_status}"
        assert getattr(m, "quantization_enabled", True), f"{name}: quantization disabled"
        w = m.weight.data
        w_eff = forward_quantize(m, w, "weight", m.quantization_scheme.weights).float()
        scale = m.weight_scale.float()  # [out, in / group]
        zp = m.weight_zero_point.float() if not symmetric else torch.zeros_like(scale)
        out_f, in_f = w_eff.shape
        codes = w_eff.view(out_f, in_f // group_size, group_size) / scale[..., None] + zp[..., None]
        # a 16-bit weight holds (q - zp) * s after one or two roundings to 8 (bf16) significant bits: the code
        # then carries an error below |q - zp| * 2^-7 < 2^(bits-7) (0.05 seen at w4), far from the 0.5 between codes
        tol = 1e-3 if w.dtype == torch.float32 else 2.0 ** (bits - 7)
        err = (codes - codes.round()).abs().max().item()
        lo, hi = codes.round().min().item(), codes.round().max().item()
        assert tol < 0.5, f"--bits {bits} with {w.dtype} weights: the grid check cannot tell codes apart"
        assert err <= tol and lo >= qmin and hi <= qmax, f"{name}: effective weight off the int{bits} grid " \
                                                          f"(max |code - round| {err:.3g}, codes {lo}..{hi})"
        worst = max(worst, err)
        if not torch.equal(w_eff.to(originals[name].dtype), originals[name].to(w.device)):
            changed += 1
    assert changed == len(mods), f"only {changed} of {len(mods)} linears changed from their original weights"
    # the forward itself: output equals F.linear(x, fake-quant W), and differs from the fp weight when it is
    # not already on the grid (AWQ keeps the smoothed fp weight and fake-quantizes it each call)
    name, m = next(iter(mods.items()))
    x = torch.randn(3, m.in_features, device=m.weight.device, dtype=m.weight.dtype)
    w_eff = forward_quantize(m, m.weight.data, "weight", m.quantization_scheme.weights)
    y = m(x)
    assert torch.allclose(y.float(), F.linear(x, w_eff, m.bias).float(), rtol=1e-3, atol=1e-4), \
        f"{name}: the forward does not compute with the fake-quantized weight"
    return {"quantized_linears": len(mods), "max_code_residual": worst, "status": "frozen",
            "forward_uses_fake_quant_weight": True,
            "stored_weight_on_grid": bool(torch.allclose(w_eff.float(), m.weight.data.float(), atol=1e-6))}


# ---------------------------------------------------------------- main


def versions() -> Dict[str, str]:
    import compressed_tensors
    import llmcompressor
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    else:
        out["cpu_threads"] = torch.get_num_threads()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    t_total = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    calib = torch.load(args.calib)
    evals = torch.load(args.eval)
    for name, t in (("calib", calib), ("eval", evals)):
        assert t.dtype == torch.int64 and t.dim() == 2, f"--{name}: want an int64 [rows, seq] tensor, got {t.dtype}{tuple(t.shape)}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    sync(device)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pretrain_ppl, pretrain_nll = perplexity(model, evals, device)
    sync(device)
    timings["eval_pretrain_s"] = time.perf_counter() - t0
    print(f"pretrain PPL {pretrain_ppl:.4f}", flush=True)

    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if ".layers." in n and n.rsplit(".layers.", 1)[-1].split(".", 1)[-1] in LINEARS}
    if device.type == "cpu" and not torch.accelerator.is_available():
        # llm-compressor 0.14.0.1's AWQ pins the cached block inputs (IntermediatesCache.pin_memory), which
        # raises without an accelerator; pinning only speeds host-to-device copies, so on CPU skip it
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    n, seq = calib.shape
    kwargs = dict(model=model, recipe=build_recipe(args), dataset=calib_loader(calib, args.batch_size),
                  num_calibration_samples=n, max_seq_length=seq, shuffle_calibration_samples=False,
                  pipeline="sequential", output_dir=None)
    if args.sequential_targets:
        kwargs["sequential_targets"] = args.sequential_targets.split(",")
    sync(device)
    t0 = time.perf_counter()
    model = oneshot(**kwargs)
    sync(device)
    timings["oneshot_s"] = time.perf_counter() - t0
    print(f"oneshot {timings['oneshot_s']:.1f} s", flush=True)

    check = check_quantized(model, originals, args.bits, args.symmetric, args.group_size)
    del originals

    t0 = time.perf_counter()
    quant_ppl, quant_nll = perplexity(model, evals, device)
    sync(device)
    timings["eval_quant_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_total
    print(f"quant PPL {quant_ppl:.4f}", flush=True)

    settings = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric,
                "strategy": "group", "observer": "minmax", "targets": LINEAR_TARGETS, "ignore": ["lm_head"],
                "device": args.device, "dtype": str(dtype).replace("torch.", ""), "pipeline": "sequential",
                "sequential_targets": args.sequential_targets or "default (decoder layer)",
                "calib_shape": list(calib.shape), "eval_shape": list(evals.shape), "batch_size": args.batch_size,
                "model": str(args.model)}
    if args.method == "awq":
        settings.update(duo_scaling=args.duo_scaling, n_grid=args.n_grid,
                        mappings=[{"smooth_layer": s, "balance_layers": b} for s, b in AWQ_MAPPINGS])
    else:
        settings.update(block_size=args.block_size, dampening_frac=args.dampening_frac, actorder=args.actorder,
                        static_groups="always (group qparams from the min-max observer on the layer's "
                                      "weight before GPTQ updates)")
    result = {
        "tool": "llm-compressor", "method": args.method, "settings": settings,
        "pretrain_ppl": pretrain_ppl, "quant_ppl": quant_ppl,
        "oneshot_s": timings["oneshot_s"], "total_s": timings["total_s"], "timings_s": timings,
        "gpu_peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0,
        "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "quant_check": check, "versions": versions(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("method", "pretrain_ppl", "quant_ppl", "oneshot_s", "total_s",
                                             "gpu_peak_bytes", "host_peak_bytes")}))
    return result


if __name__ == "__main__":
    main()
