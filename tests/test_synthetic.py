"""Synthetic checkpoints: seeded per tensor name, so any actor layout builds the same model."""
import pytest
import torch

from llmc_ray import synthetic
from llmc_ray.checkpoint import Checkpoint, resolve_model_dir
from llmc_ray.config import ConfigError, build
from llmc_ray.run import run

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
            max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16")


@pytest.fixture
def tiny_arch(monkeypatch, tmp_path):
    monkeypatch.setitem(synthetic.ARCHS, "tiny", TINY)
    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path / "cache"))
    return "synthetic:tiny:3"


def test_shapes_follow_the_architecture_and_weights_are_seeded(tiny_arch):
    ckpt = Checkpoint(resolve_model_dir(tiny_arch))
    assert ckpt.synthetic and ckpt.raw_config()["num_hidden_layers"] == 3
    assert ckpt.tensors["model.layers.2.mlp.down_proj.weight"].shape == [64, 128]
    a = ckpt.load(["model.layers.1.self_attn.q_proj.weight"])["model.layers.1.self_attn.q_proj.weight"]
    b = ckpt.load(["model.layers.1.self_attn.q_proj.weight"])["model.layers.1.self_attn.q_proj.weight"]
    c = ckpt.load(["model.layers.2.self_attn.q_proj.weight"])["model.layers.2.self_attn.q_proj.weight"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().std().item() - synthetic.WEIGHT_STD) < 0.003


def test_real_arch_sizes(tmp_path, monkeypatch):
    """Parameter counts of the written configs match the published models (Llama-2-70B: 68,976,653,312,
    which counts the 80 layers' stored rotary inv_freq buffers of 64 floats; Qwen2-7B: 7,615,616,512;
    SmolLM2-135M: 134,515,008 with the head tied to the embedding)."""
    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path))
    for path, published in (("synthetic:llama2-70b:80", 68_976_653_312 - 80 * 64), ("synthetic:qwen2-7b:28", 7_615_616_512),
                            ("synthetic:smollm2-135m:30", 134_515_008)):
        ckpt = Checkpoint(resolve_model_dir(path))
        n = sum(t.nbytes for t in ckpt.tensors.values()) // 2  # bf16
        assert n == published, path


def test_bad_synthetic_spec():
    with pytest.raises(ConfigError, match="synthetic:ARCH:LAYERS"):
        resolve_model_dir("synthetic:nope:2")


def test_runs_through_actors_same_result_on_1_and_2(tiny_arch, tmp_path, ray_session):
    ppl = []
    for n in (1, 2):
        cfg = build({"model": {"path": tiny_arch, "torch_dtype": "float32"},
                     "calib": {"n_samples": 4, "seq_len": 32},
                     "eval": {"seq_len": 32, "num_samples": 2, "eval_pos": ["pretrain", "fake_quant"]},
                     "quant": {"method": "GPTQ", "weight": {"bit": 4, "group_size": 32}},
                     "save": {"save_path": str(tmp_path / f"a{n}")},
                     "dist": {"actors": n, "cpus_per_actor": 1}, "run": {"progress": False}})
        ppl.append(run(cfg)["eval"])
    assert ppl[0] == ppl[1]
    assert ppl[0]["custom"]["pretrain"] == pytest.approx(256, rel=0.2)  # random weights: near-uniform output
