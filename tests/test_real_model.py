"""The real small model (SmolLM2-135M GGUF) on real text (State of the Union), when the assets are present
(`python scripts/fetch_demo_assets.py`; CI fetches them). Independent references: transformers' own GGUF
loader and full-model forward; the quality claim (AWQ beats RTN at 3 bits) on real weights and text."""
import math
import os
from pathlib import Path

import pytest
import torch

from llmc_ray.config import build
from llmc_ray.run import run

ASSETS = Path(os.environ.get("LLMC_RAY_CACHE", Path.home() / ".cache" / "llmc_ray")) / "assets"
GGUF = ASSETS / "SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU = ASSETS / "sotu"
pytestmark = pytest.mark.skipif(not (GGUF.is_file() and SOTU.is_dir()),
                                reason="real assets absent: run scripts/fetch_demo_assets.py")


def real_cfg(out, method="RTN", bit=4, eval_pos=("pretrain", "fake_quant"), actors=1, **calib):
    c = {"name": "custom", "path": str(SOTU), "select": "19[5-9]*.txt", "n_samples": 4, "seq_len": 256,
         "preproc": "random_truncate_txt"}
    c.update(calib)
    return build({
        "model": {"path": str(GGUF)},
        "calib": c,
        "eval": {"name": "custom", "path": str(SOTU), "select": "202*.txt", "seq_len": 512, "num_samples": 4,
                 "eval_pos": list(eval_pos)},
        "quant": {"method": method, "weight": {"bit": bit, "group_size": 64}, "quant_out": method != "RTN",
                  "special": {"clip_sym": True} if method == "Awq" else {}},
        "save": {"save_path": str(out)},
        "dist": {"actors": actors, "cpus_per_actor": 1},
        "run": {"progress": False},
    })


def test_gguf_conversion_matches_transformers_gguf_loader():
    from transformers import AutoModelForCausalLM

    from llmc_ray.checkpoint import resolve_model_dir

    hf_dir = resolve_model_dir(str(GGUF))
    ids = torch.tensor([[1, 504, 3458, 282, 260, 2747, 2020, 314, 4744, 30]])
    ref = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_two_actor_pipeline_ppl_equals_full_model(tmp_path, ray_session):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc_ray.checkpoint import resolve_model_dir
    from llmc_ray.data import load_eval_tokens

    cfg = real_cfg(tmp_path, eval_pos=("pretrain",), actors=2)
    ours = run(cfg)["eval"]["custom"]["pretrain"]
    hf_dir = resolve_model_dir(str(GGUF))
    windows = load_eval_tokens(cfg.eval, AutoTokenizer.from_pretrained(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert ours == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert 5 < ours < 100  # a real LM on real English, not noise


def test_awq_and_gptq_beat_rtn_at_3_bits_on_real_text(tmp_path, ray_session):
    ppl = {m: run(real_cfg(tmp_path / m, method=m, bit=3, eval_pos=("fake_quant",)))["eval"]["custom"]["fake_quant"]
           for m in ("RTN", "Awq", "GPTQ")}
    assert ppl["Awq"] < ppl["RTN"] and ppl["GPTQ"] < ppl["RTN"], ppl
