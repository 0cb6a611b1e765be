"""Bad input fails with one ConfigError line before Ray starts or any weight is read."""
import subprocess
import sys

import pytest

from llmc_ray.config import ConfigError, build
from llmc_ray.run import run


def cfg(tiny_dir, tmp_path, **sections):
    calib = tmp_path / "calib.txt"
    calib.write_text("a few words of text\n" * 4)
    base = {
        "model": {"path": str(tiny_dir)},
        "calib": {"name": "custom", "path": str(calib), "n_samples": 4, "seq_len": 32},
        "eval": {"name": "custom", "path": str(calib), "seq_len": 16, "eval_pos": []},
        "quant": {"method": "RTN", "weight": {"bit": 4, "group_size": 64}},
        "save": {"save_path": str(tmp_path / "out")},
        "run": {"progress": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return base


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Validation must fail before Ray starts: starting it here is itself a failure."""
    from llmc_ray.dist import cluster

    def boom(*a, **k):
        raise AssertionError("Ray was started before the config error was raised")

    monkeypatch.setattr(cluster, "init_ray", boom)


def fails(d, match):
    with pytest.raises(ConfigError, match=match):
        run(build(d))


def test_missing_model_path(tiny_dir, tmp_path):
    fails(cfg(tiny_dir, tmp_path, model={"path": str(tmp_path / "nope")}), "does not exist")


def test_unknown_model_type(tiny_dir, tmp_path):
    fails(cfg(tiny_dir, tmp_path, model={"type": "gpt_neox"}), "no adapter")


def test_group_size_must_divide_in_features(tiny_dir, tmp_path):
    fails(cfg(tiny_dir, tmp_path, quant={"weight": {"bit": 4, "group_size": 96}}),
          "group_size=96 does not divide in_features=128")


def test_unknown_method_and_special(tiny_dir, tmp_path):
    fails(cfg(tiny_dir, tmp_path, quant={"method": "Foo"}), "known methods")
    fails(cfg(tiny_dir, tmp_path, quant={"method": "GPTQ", "special": {"blocksiz": 64}}), "does not take")


@pytest.mark.parametrize("weight,special,match", [
    ({"bit": 4, "symmetric": True, "group_size": 64}, {}, "asymmetric"),
    ({"bit": 8, "symmetric": False, "granularity": "per_channel"}, {}, "symmetric=true"),
    ({"bit": 3, "group_size": 64}, {}, "W4 or W8"),
    ({"bit": 4, "group_size": 64}, {"actorder": True}, "act-order"),
])
def test_tpu_mlir_target_refuses_what_it_cannot_requantize(tiny_dir, tmp_path, weight, special, match):
    fails(cfg(tiny_dir, tmp_path, run={"target": "tpu_mlir"},
              quant={"method": "GPTQ", "weight": weight, "special": special}), match)


def test_too_little_calibration_text(tiny_dir, tmp_path):
    fails(cfg(tiny_dir, tmp_path, quant={"method": "GPTQ"}, calib={"n_samples": 64, "seq_len": 512}), "tokens")


def test_too_many_actors(tiny_dir, tmp_path):
    fails(cfg(tiny_dir, tmp_path, dist={"actors": 9}), "at most 4")


@pytest.mark.parametrize("section,value,match", [
    ({"quant": {"weight": {"bit": 9}}}, None, "2..8 bits"),
    ({"quant": {"weight": {"granularity": "per_row"}}}, None, "granularity"),
    ({"eval": {"eval_pos": ["after"]}}, None, "eval_pos"),
    ({"quant": {"wieght": {}}}, None, "wieght"),
])
def test_schema_errors(tiny_dir, tmp_path, section, value, match):
    d = cfg(tiny_dir, tmp_path)
    for k, v in section.items():
        d[k] = {**d.get(k, {}), **v}
    with pytest.raises(ConfigError, match=match):
        build(d)


def test_cli_prints_one_line_and_exits_2(tiny_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmc_ray", "model=hf", f"model.path={tiny_dir}",
                          "quant.weight.group_size=96", "eval.eval_pos=[]", f"save.save_path={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if "config error" in l]
    assert len(lines) == 1 and "group_size=96" in lines[0]
