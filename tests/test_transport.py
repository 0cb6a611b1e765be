"""Direct sends between actors (dist.transport=collective: gloo between these CPU actors, NCCL between GPUs)
against the independent reference, one actor and no hand-offs at all: a chain of three (a middle actor both
receives and sends) gives the same PPLs and calibrated weights bit for bit, under both schedules."""
import pytest
import torch

from test_e2e import make_cfg
from test_pipelined_sweep import weights
from llmc_ray.config import ConfigError, DistConfig
from llmc_ray.dist.cluster import resolve_transport
from llmc_ray.run import run


def run_with(tiny_dir, texts, out, schedule, actors, transport):
    cfg = make_cfg(tiny_dir, texts, out, method="GPTQ", actors=actors, eval_pos=("pretrain", "fake_quant"))
    cfg.dist.schedule, cfg.dist.transport = schedule, transport
    return run(cfg)


@pytest.mark.parametrize("schedule", ["parallel", "sequential"])
def test_three_actor_chain_with_direct_sends_equals_one_actor(schedule, tiny_dir, texts, tmp_path, ray_session):
    one = run_with(tiny_dir, texts, tmp_path / "one", "parallel", 1, "object_store")
    three = run_with(tiny_dir, texts, tmp_path / "three", schedule, 3, "collective")
    assert sorted({b["rank"] for b in three["blocks"]}) == [0, 1, 2]
    assert three["eval"]["custom"]["pretrain"] == one["eval"]["custom"]["pretrain"]
    if schedule == "parallel":  # the same block inputs as one actor's capture: the same calibration
        assert three["eval"] == one["eval"]
        w1, w3 = weights(tmp_path / "one", "fake_quant_model"), weights(tmp_path / "three", "fake_quant_model")
        assert w1.keys() == w3.keys() and all(torch.equal(w1[k], w3[k]) for k in w1)


def test_transport_auto_and_bad_values(monkeypatch):
    from llmc_ray.dist import cluster

    assert resolve_transport(DistConfig(actors=2, device="cuda")) == "collective"  # measured on 2 GPUs
    assert resolve_transport(DistConfig(actors=2, device="cuda", transport="object_store")) == "object_store"
    monkeypatch.setattr(cluster, "COLLECTIVE_BY_DEFAULT_ON_GPUS", False)
    assert resolve_transport(DistConfig(actors=2, device="cuda")) == "object_store"
    monkeypatch.setattr(cluster, "COLLECTIVE_BY_DEFAULT_ON_GPUS", True)
    assert resolve_transport(DistConfig(actors=1, device="cuda")) == "object_store"
    assert resolve_transport(DistConfig(actors=2, device="cpu")) == "object_store"
    assert resolve_transport(DistConfig(actors=2, device="cpu", transport="collective")) == "collective"
    with pytest.raises(ConfigError, match="dist.transport='nccl'"):
        DistConfig(transport="nccl")
