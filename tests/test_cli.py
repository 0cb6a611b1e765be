"""The product's front door: `python -m llmc_ray` with Hydra overrides, end to end in a subprocess."""
import json
import subprocess
import sys

from conftest import write_text


def test_cli_awq_run_writes_results_and_keeps_transformed_equivalent(tiny_dir, tmp_path):
    calib, ev = write_text(tmp_path / "c.txt", seed=3), write_text(tmp_path / "e.txt", seed=4)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmc_ray", "model=hf", f"model.path={tiny_dir}", "model.torch_dtype=float32",
           "quant=awq", "quant.weight.group_size=64", "quant.special.weight_clip=false",
           "calib=custom", f"calib.path={calib}", "calib.n_samples=8", "calib.seq_len=64",
           f"eval.path={ev}", "eval.select=null", "eval.seq_len=128", "eval.num_samples=4",
           f"save.save_path={out}", "save.save_trans=true", "dist.cpus_per_actor=1", "run.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    ppl = res["eval"]["custom"]
    assert set(ppl) == {"pretrain", "transformed", "fake_quant"}
    # AWQ's scaling is an exact equivalence (clip off): the transformed model is the same function
    assert abs(ppl["transformed"] / ppl["pretrain"] - 1) < 1e-4
    assert len(res["blocks"]) == 4 and all("weight_rel_err" in b for b in res["blocks"])
    assert (out / "transformed_model" / "config.json").is_file()
    assert "| custom |" in proc.stdout  # the PPL table


def test_every_special_knob_is_in_its_quant_conf():
    """Hydra refuses `quant.special.X=...` for a key its YAML does not list: every field of a method's special
    dataclass must be in conf/quant/<method>.yaml, and every listed key must be one the method takes."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from llmc_ray.algorithms.base import resolve

    confs = sorted((Path(__file__).parents[1] / "conf" / "quant").glob("*.yaml"))
    assert confs
    for path in confs:
        q = OmegaConf.to_container(OmegaConf.load(path))
        method, special = resolve(q["method"], q["special"])  # raises on an unknown key or a bad value
        assert set(q["special"]) == {f.name for f in dataclasses.fields(method.special)}, path.name
