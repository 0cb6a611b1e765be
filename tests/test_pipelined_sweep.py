"""A pipelined sweep (several configs through one set of loaded actors) against the independent reference:
the same configs run one by one. PPLs and saved weights must be identical, for both schedules."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from test_e2e import make_cfg
from llmc_ray.config import ConfigError
from llmc_ray.run import run, run_many


def weights(out, kind):
    sd = {}
    for f in sorted((out / kind).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def points(tiny_dir, texts, root, schedule, transport="object_store"):
    cfgs = [make_cfg(tiny_dir, texts, root / "rtn", method="RTN", actors=2, group_size=32),
            make_cfg(tiny_dir, texts, root / "awq", method="Awq", actors=2, bit=3),
            make_cfg(tiny_dir, texts, root / "gptq", method="GPTQ", actors=2, bit=4)]
    for c in cfgs:
        c.dist.schedule, c.dist.transport = schedule, transport
    return cfgs


def assert_same_run(a, b, dir_a, dir_b):
    assert a["eval"] == b["eval"]
    assert [blk["weight_rel_err"] for blk in a["blocks"]] == [blk["weight_rel_err"] for blk in b["blocks"]]
    for kind in ("transformed_model", "fake_quant_model"):
        wa, wb = weights(dir_a, kind), weights(dir_b, kind)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), kind


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_pipelined_sweep_equals_separate_runs(schedule, tiny_dir, texts, tmp_path, ray_session):
    # the sweep's eval batches (and parallel captures) go actor to actor by direct sends; the separate runs'
    # through the object store
    swept = run_many(points(tiny_dir, texts, tmp_path / "sweep", schedule, transport="collective"))
    for cfg, got in zip(points(tiny_dir, texts, tmp_path / "alone", schedule), swept):
        assert not isinstance(got, BaseException), got
        ref = run(cfg)
        name = cfg.save.save_path.rsplit("/", 1)[-1]
        assert_same_run(got, ref, tmp_path / "sweep" / name, tmp_path / "alone" / name)
        assert got["pipelined_sweep"]["points"] == 3 and "pipelined_sweep" not in ref
    # the three points differ from each other (the sweep did not hand one result to all)
    assert len({r["eval"]["custom"]["fake_quant"] for r in swept}) == 3
    assert len({r["eval"]["custom"]["pretrain"] for r in swept}) == 1  # pretrain is shared and measured once


def test_a_bad_point_fails_alone(tiny_dir, texts, tmp_path, ray_session):
    good = make_cfg(tiny_dir, texts, tmp_path / "good", method="RTN", actors=2)
    bad = make_cfg(tiny_dir, texts, tmp_path / "bad", method="RTN", actors=2, group_size=48)  # 64 % 48 != 0
    out = run_many([bad, good])
    assert isinstance(out[0], ConfigError) and "group_size" in str(out[0])
    assert out[1]["eval"]["custom"]["fake_quant"] > 0 and (tmp_path / "good" / "fake_quant_model").is_dir()


def test_points_must_share_model_eval_and_actors(tiny_dir, texts, tmp_path):
    a = make_cfg(tiny_dir, texts, tmp_path / "a", actors=2)
    b = dataclasses.replace(make_cfg(tiny_dir, texts, tmp_path / "b", actors=2))
    b.eval.seq_len = 64
    with pytest.raises(ConfigError, match=r"eval\.seq_len"):
        run_many([a, b])
