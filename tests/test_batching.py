"""Micro-batch merging on the actor (calib.merge_tokens) and block outputs kept on the device between blocks of
one actor (KeptOnDevice): both change how data moves, never what is computed."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from test_e2e import make_cfg
from llmc_ray.quant.quantizer import QuantSpec
from llmc_ray.run import run
from llmc_ray.worker import BlockWorker, CalibJob, KeptOnDevice, WorkerPlan, merge_batches


def test_merge_batches_keeps_order_and_respects_the_budget():
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(b, 16, 8, generator=g) for b in (1, 2, 1, 3, 1)] + [torch.randn(2, 32, 8, generator=g)]
    out = merge_batches(acts, max_tokens=48)
    # same rows in the same order, per sequence length
    assert torch.equal(torch.cat([a for a in out if a.shape[1] == 16]), torch.cat(acts[:5]))
    assert torch.equal(out[-1], acts[-1])
    tokens = [a.shape[0] * a.shape[1] for a in out]
    # rows 1+2 | 1 (+3 would pass 48 tokens) | 3 | 1 | the 32-long one apart (another shape)
    assert tokens == [48, 16, 48, 16, 64]
    assert merge_batches(acts, None) is acts
    # a micro-batch larger than the budget is left whole
    assert [a.shape[0] for a in merge_batches(acts[:2], max_tokens=4)] == [1, 2]


def weights(model_dir):
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _with_calib(cfg, **calib):
    return dataclasses.replace(cfg, calib=dataclasses.replace(cfg.calib, **calib))


@pytest.mark.parametrize("method", ["Awq", "GPTQ"])
def test_merged_micro_batches_equal_one_big_batch(method, tiny_dir, texts, tmp_path, ray_session):
    """bs=1 micro-batches merged on the actor give bit-for-bit the run with all samples in one micro-batch (the
    blocks see identical tensors), over 2 actors (a device hand-off inside actor 0, a Ray hop to actor 1)."""
    base = make_cfg(tiny_dir, texts, tmp_path / "a", method=method, actors=2, eval_pos=("fake_quant",))
    merged = run(_with_calib(base, bs=1, merge_tokens=10**6))
    whole = run(_with_calib(dataclasses.replace(base, save=dataclasses.replace(base.save, save_path=str(tmp_path / "b"))),
                            bs=base.calib.n_samples, merge_tokens=None))
    assert merged["eval"] == whole["eval"]
    a, b = (weights(tmp_path / d / "transformed_model") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and bs=1 without merging is a different (more forwards) but equivalent computation: close, not equal
    split = run(_with_calib(dataclasses.replace(base, save=dataclasses.replace(base.save, save_path=str(tmp_path / "c"))),
                            bs=1, merge_tokens=None))
    for pos, ppl in merged["eval"]["custom"].items():
        assert split["eval"]["custom"][pos] == pytest.approx(ppl, rel=2e-2)


def test_kept_outputs_feed_the_next_block_exactly(tiny_dir):
    """hand_on="device" hands back a KeptOnDevice marker; the next block then calibrates on exactly the tensors
    a host hand-off would have given it. A marker for another block is refused. The last block (hand_on="none")
    hands on nothing and is calibrated like any other."""
    plan = WorkerPlan(0, (0, 1, 2, 3), True, True, str(tiny_dir), "llama", "float32", "cpu")
    job = CalibJob("GPTQ", {}, QuantSpec(4, False, "per_group", 32), quant_out=True)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))

    kept, host = BlockWorker(plan), BlockWorker(plan)
    for w in (kept, host):
        w.load()
    first = kept.calib_inputs(ids, 2, variant=0)  # the embedded tokens stay for block 0
    assert first == KeptOnDevice(variant=0, block=0)
    marker, _ = kept.calibrate_block(0, first, job, hand_on="device")
    assert marker == KeptOnDevice(variant=0, block=1)
    acts, _ = host.calibrate_block(0, host.calib_inputs(ids, 2), job)
    assert isinstance(acts, list) and all(a.device.type == "cpu" for a in acts)
    with pytest.raises(RuntimeError, match="block 2: no activations were kept"):
        kept.calibrate_block(2, KeptOnDevice(0, 2), job)
    out_kept, _ = kept.calibrate_block(1, marker, job)
    out_host, _ = host.calibrate_block(1, acts, job)
    assert all(torch.equal(x, y) for x, y in zip(out_kept, out_host))
    for name, w in kept.blocks[1].state_dict().items():
        assert torch.equal(w, host.blocks[1].state_dict()[name]), name
    nothing, report = kept.calibrate_block(2, out_kept, job, hand_on="none")
    host.calibrate_block(2, out_host, job)
    assert nothing is None and report["block"] == 2 and not kept.kept
    for name, w in kept.blocks[2].state_dict().items():
        assert torch.equal(w, host.blocks[2].state_dict()[name]), name
    with pytest.raises(ValueError, match="hand_on='gpu'"):
        kept.calibrate_block(3, out_kept, job, hand_on="gpu")


def test_out_of_memory_names_the_knobs(tiny_dir, monkeypatch):
    """A block that runs out of device memory says how big its forwards were and what to lower."""
    from llmc_ray.algorithms import base

    def oom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    @dataclasses.dataclass(frozen=True)
    class NoSpecial:
        pass

    monkeypatch.setitem(base.ALGORITHMS, "oom", base.Method("Oom", oom, NoSpecial, needs_calib=True))
    w = BlockWorker(WorkerPlan(0, (0, 1, 2, 3), True, True, str(tiny_dir), "llama", "float32", "cpu"))
    w.load()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    job = CalibJob("oom", {}, QuantSpec(4, False, "per_group", 32), quant_out=False, merge_tokens=64)
    with pytest.raises(torch.OutOfMemoryError, match=r"block 0 \(oom\): CUDA out of memory.*forwards of 64 tokens: "
                                                     r"lower calib.merge_tokens, now 64"):
        w.calibrate_block(0, w.calib_inputs(ids, 1), job)


def test_checkpoints_are_written_in_the_background_and_failures_reported(tiny_dir, tmp_path):
    """A block's checkpoint is written while the next block calibrates: after a flush the file holds exactly
    the block's weights; a write that fails is reported by the flush and does not fail the calibration."""
    plan = WorkerPlan(0, (0, 1, 2, 3), True, True, str(tiny_dir), "llama", "float32", "cpu")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    w = BlockWorker(plan)
    w.load()
    job = CalibJob("GPTQ", {}, QuantSpec(4, False, "per_group", 32), quant_out=True, checkpoint_dir=str(tmp_path))
    acts, _ = w.calibrate_block(0, w.calib_inputs(ids, 2), job)
    acts, _ = w.calibrate_block(1, acts, job)
    assert w.flush_checkpoints() == []
    for i in (0, 1):
        saved = load_file(str(tmp_path / f"block_{i:05d}.safetensors"))
        for name, t in w.blocks[i].state_dict().items():
            assert torch.equal(saved[f"w.{name}"], t), (i, name)

    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the checkpoint directory should be")
    job2 = dataclasses.replace(job, checkpoint_dir=str(blocked))
    out, report = w.calibrate_block(2, acts, job2)
    assert report["block"] == 2 and len(out) == len(acts)
    errors = w.flush_checkpoints()
    assert len(errors) == 1 and errors[0].startswith("block 2: checkpoint not written")
    assert w.flush_checkpoints() == []  # reported once
