"""Mixture-of-Experts (Qwen2-MoE, DeepSeek-V2 with MLA) against independent references: transformers' own fused
experts and full-model forward, routing recomputed from the router's weights (softmax top-k) on the router's
inputs, the published parameter counts."""
import copy
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from conftest import save_tiny
from llmc_ray.algorithms.awq import AwqSpecial, awq
from llmc_ray.algorithms.base import BlockContext
from llmc_ray.algorithms.gptq import GptqSpecial, collect_hessians, gptq
from llmc_ray.checkpoint import Checkpoint, meta_model, resolve_model_dir
from llmc_ray.config import ConfigError, build
from llmc_ray.models import block_subsets, expert_names, get_spec, linears, module_has, names_has, resolve_subsets
from llmc_ray.models.experts import PerExpertLinears, unfuse, unfuse_experts
from llmc_ray.quant.quantizer import QuantSpec, compute_qparams, fake_quant
from llmc_ray.run import run
from llmc_ray.worker import BlockWorker, WorkerPlan

G32_4 = QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=32)
KINDS = tiny.MOE_KINDS
FIRST_MOE = {"qwen2_moe": 0, "deepseek_v2": 1}  # DeepSeek-V2's block 0 is dense (first_k_dense_replace)
STARVED = (1, 4, 6)


# ------------------------------------------------------------------ helpers


def layer_inputs(model, index, n=4, seq=32, seed=0):
    """Hidden states entering block `index` (HF's full forward), one micro-batch per sample, and the block kwargs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, seq), generator=g)
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[index]
        pos = torch.arange(seq).unsqueeze(0)
        pe = model.model.rotary_emb(h, pos)
    return [h[i:i + 1] for i in range(n)], {"position_embeddings": pe, "attention_mask": None, "position_ids": pos}


def force_starvation(model, index, starved=STARVED, margin=10.0):
    """Starve experts of block `index` through the router's weights. Channel 0 of the residual stream is held
    at +1 (embedding column 0 = 1; attention outputs zeroed up to `index`, dense down_proj row 0 zeroed), so the
    post-attention norm output is clearly positive there for every token; the starved experts' router rows are
    -margin on channel 0 and 0 elsewhere, the others' column 0 is 0. Their logits are then about -35 against
    O(1) for the rest, while the rest still route by the (token-dependent) other channels. Whether it worked is
    checked from the router's top-k, not assumed."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for j, layer in enumerate(model.model.layers[:index + 1]):
            layer.self_attn.o_proj.weight.zero_()
            if j < index:
                layer.mlp.down_proj.weight[0] = 0  # the blocks before are dense in these tiny models
        gate = model.model.layers[index].mlp.gate.weight
        gate[:, 0] = 0
        gate[list(starved)] = 0
        gate[list(starved), 0] = -margin
    return model


def hf_routing(hf_layer, xs, kw):
    """The router's inputs X [T, H] (captured from HF's untouched layer) and the top-k experts of each token,
    recomputed here: softmax(X W^T), top-k (both families route this way with these configs)."""
    seen = []
    h = hf_layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            for x in xs:
                hf_layer(x, **kw)
    finally:
        h.remove()
    X = torch.cat(seen)
    probs = (X.float() @ hf_layer.mlp.gate.weight.float().t()).softmax(-1)
    return X, torch.topk(probs, hf_layer.mlp.gate.top_k, dim=-1).indices


def moe_ctx(kind, special, starved=(), spec=G32_4, **kw):
    """A BlockContext on a copy of the first MoE block with its experts unfused, plus HF's untouched block."""
    model = tiny.tiny_model(kind, **kw)
    i = FIRST_MOE[kind]
    if starved:
        force_starvation(model, i, starved)
    xs, block_kw = layer_inputs(model, i)
    hf_layer = model.model.layers[i]
    mspec = get_spec(kind)
    block = copy.deepcopy(hf_layer)
    assert unfuse_experts(block, mspec.experts)
    ctx = BlockContext(block, xs, block_kw, block_subsets(mspec, block), spec, special, index=i,
                       experts=expert_names(mspec, module_has(block)))
    return ctx, hf_layer


def outputs(layer, xs, kw):
    with torch.no_grad():
        return [layer(x, **kw) for x in xs]


# ------------------------------------------------------------------ unfused experts


@pytest.mark.parametrize("kind", KINDS)
def test_per_expert_forward_equals_hf_fused(kind):
    fused = tiny.tiny_model(kind).model.layers[FIRST_MOE[kind]].mlp.experts
    experts = unfuse(fused)
    assert isinstance(experts, PerExpertLinears) and len(experts) == fused.num_experts
    g = torch.Generator().manual_seed(1)
    T, k = 50, 2
    x = torch.randn(T, fused.hidden_dim, generator=g)
    pool = torch.tensor([e for e in range(fused.num_experts) if e != 3])  # expert 3 gets no token
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, idx, w), fused(x, idx, w), rtol=1e-5, atol=1e-6)


def test_per_expert_forward_equals_an_expert_by_expert_loop():
    """Routing sorted once equals the plain loop (each expert's tokens found with where(), in token order, and
    added to the output expert by expert), bit for bit; a starved expert is never called."""
    fused = tiny.tiny_model("deepseek_v2").model.layers[FIRST_MOE["deepseek_v2"]].mlp.experts
    experts = unfuse(fused)
    calls = []
    for e, ex in enumerate(experts):
        ex.register_forward_pre_hook(lambda _m, args, e=e: calls.append((e, args[0].shape[0])))
    g = torch.Generator().manual_seed(7)
    T, k = 64, 3
    x = torch.randn(T, fused.hidden_dim, generator=g)
    pool = torch.tensor([e for e in range(len(experts)) if e != 2])  # expert 2 gets no token
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    want = torch.zeros_like(x)
    with torch.no_grad():
        for e, ex in enumerate(experts):
            t, slot = torch.where(idx == e)
            if t.numel():
                want.index_add_(0, t, ex(x[t]) * w[t, slot, None])
        calls.clear()
        got = experts(x, idx, w)
    assert torch.equal(got, want)
    assert [e for e, _ in calls] == [e for e in range(len(experts)) if e != 2]
    assert all(n == int((idx == e).sum()) for e, n in calls)


@pytest.mark.parametrize("kind", KINDS)
def test_unfused_block_equals_hf_block(kind):
    model = tiny.tiny_model(kind)
    mspec = get_spec(kind)
    for i, layer in enumerate(model.model.layers):
        xs, kw = layer_inputs(model, i)
        block = copy.deepcopy(layer)
        unfuse_experts(block, mspec.experts)
        for a, b in zip(outputs(block, xs, kw), outputs(layer, xs, kw)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_meta_model_names_are_the_saved_names(kind, tmp_path):
    """save_pretrained (transformers reverts its expert fusion) writes per-expert linears; the unfused meta model
    must name exactly those tensors, with their shapes, or blocks could not be loaded by name."""
    model = tiny.tiny_model(kind)
    model.save_pretrained(tmp_path)
    saved = {}
    for f in glob.glob(str(tmp_path / "*.safetensors")):
        with safe_open(f, "pt") as fh:
            saved.update({n: tuple(fh.get_slice(n).get_shape()) for n in fh.keys()})
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in saved)
    meta = meta_model(model.config, get_spec(kind))
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == saved


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        save_tiny(path, kind=kind)
        out[kind] = path
    return out


def test_worker_export_reloads_with_from_pretrained(moe_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    for kind, src in moe_dirs.items():
        n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        w = BlockWorker(WorkerPlan(0, tuple(range(n)), True, True, str(src), kind, "float32", "cpu"))
        w.load()
        out = tmp_path / kind
        out.mkdir()
        save_file(w.state_for_export(), str(out / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "config.json", out / "config.json")
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (kind, k)


# ------------------------------------------------------------------ subsets per block


@pytest.mark.parametrize("kind", KINDS)
def test_subsets_per_block_from_modules_and_from_checkpoint_names(kind, moe_dirs):
    """Dense and MoE blocks of one model resolve differently; resolving on checkpoint names (validation) and
    on the built block (the worker) gives the same subsets; every matrix is quantized or absorbs a scale."""
    mspec = get_spec(kind)
    ckpt = Checkpoint(moe_dirs[kind])
    meta = meta_model(ckpt.config(), mspec)
    kinds = set()
    for i, block in enumerate(meta.model.layers):
        subsets = block_subsets(mspec, block)
        assert subsets == resolve_subsets(mspec, names_has(ckpt.tensors, f"model.layers.{i}"))
        n_exp = len(expert_names(mspec, module_has(block)))
        kinds.add(n_exp)
        matrices = {n[:-len(".weight")] for n, p in block.named_parameters() if p.dim() == 2}
        absorbed = {a for s in subsets for a in s.absorb}
        assert set(linears(subsets)) | absorbed == matrices
        assert len(linears(subsets)) == len(set(linears(subsets)))  # each linear in one subset
        if n_exp:
            assert absorbed == ({"mlp.gate", "mlp.shared_expert_gate"} if kind == "qwen2_moe" else {"mlp.gate"})
            moe = next(s for s in subsets if s.inspect == "mlp")
            assert moe.prev_op == "post_attention_layernorm" and len(moe.groups()) == n_exp + 1
            downs = [s for s in subsets if s.inspect.startswith("mlp.experts.")]
            assert [s.prev_op for s in downs] == [f"mlp.experts.{e}.up_proj" for e in range(n_exp)]
        else:
            assert absorbed == set() and "mlp.down_proj" in linears(subsets)
    assert kinds == {0, 8}  # both a dense and a MoE block


def test_mla_subsets_with_and_without_q_lora():
    mspec = get_spec("deepseek_v2")
    for q_lora, q_layers in ((None, ["self_attn.q_proj"]), (32, ["self_attn.q_a_proj", "self_attn.q_b_proj"])):
        block = tiny.tiny_model("deepseek_v2", q_lora_rank=q_lora).model.layers[1]
        unfuse_experts(block, mspec.experts)
        subsets = block_subsets(mspec, block)
        first = subsets[0]
        assert first.prev_op == "input_layernorm" and first.inspect_kwargs
        assert first.layers == (q_layers[0], "self_attn.kv_a_proj_with_mqa")
        by_prev = {s.prev_op: s.layers for s in subsets}
        assert by_prev["self_attn.kv_a_layernorm"] == ("self_attn.kv_b_proj",)
        assert by_prev[None] == ("self_attn.o_proj",)
        assert ("self_attn.q_a_layernorm" in by_prev) == (q_lora is not None)


# ------------------------------------------------------------------ AWQ: the router absorbs the norm's scale


@pytest.mark.parametrize("kind,q_lora", [("qwen2_moe", None), ("deepseek_v2", None), ("deepseek_v2", 32)])
def test_awq_scaling_alone_keeps_moe_block_output(kind, q_lora):
    ctx, hf_layer = moe_ctx(kind, AwqSpecial(weight_clip=False), **({"q_lora_rank": q_lora} if q_lora else {}))
    ref = outputs(hf_layer, ctx.inputs, ctx.block_kwargs)  # HF's own fused block, untouched
    router0 = ctx.module("mlp.gate").weight.detach().clone()
    res = awq(ctx)
    assert res.info["ratios"].get("mlp", 0) > 0  # the norm -> experts scale was applied
    assert not torch.equal(router0, ctx.module("mlp.gate").weight)  # and the router absorbed it
    if kind == "deepseek_v2":
        assert "self_attn.o_proj" in res.info["skipped"] and "self_attn.kv_b_proj" in res.info["ratios"]
    for a, b in zip(outputs(ctx.block, ctx.inputs, ctx.block_kwargs), ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_awq_without_absorb_would_change_the_output(kind):
    """The control for the test above: the same scales with the router left alone change the routing."""
    import dataclasses

    ctx, hf_layer = moe_ctx(kind, AwqSpecial(weight_clip=False))
    ref = outputs(hf_layer, ctx.inputs, ctx.block_kwargs)
    ctx.subsets = tuple(dataclasses.replace(s, absorb=()) for s in ctx.subsets)
    awq(ctx)
    worst = max((a - b).abs().max().item() for a, b in zip(outputs(ctx.block, ctx.inputs, ctx.block_kwargs), ref))
    assert worst > 1e-2


# ------------------------------------------------------------------ expert coverage


def quantized_weights(ctx, qparams):
    """What the worker does with a BlockResult: the algorithm's qparams or RTN ones, then fake-quant."""
    out = {}
    for name in linears(ctx.subsets):
        w = ctx.module(name).weight.data
        qp = qparams[name] if qparams[name] is not None else compute_qparams(w, ctx.spec)
        out[name] = fake_quant(w, ctx.spec, *qp)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["awq", "gptq", "gptq_one_pass"])
def test_starved_experts_get_rtn_and_are_reported(kind, method):
    fn, special = {"awq": (awq, AwqSpecial()), "gptq": (gptq, GptqSpecial()),
                   "gptq_one_pass": (gptq, GptqSpecial(true_sequential=False))}[method]
    ctx, hf_layer = moe_ctx(kind, special, starved=STARVED)
    X, top = hf_routing(hf_layer, ctx.inputs, ctx.block_kwargs)
    counts = torch.bincount(top.flatten(), minlength=len(ctx.experts)).tolist()
    expected_starved = [f"mlp.experts.{e}" for e, c in enumerate(counts) if c == 0]
    assert expected_starved == [f"mlp.experts.{e}" for e in STARVED]  # the forcing worked
    expert_linears = [f"mlp.experts.{e}.{n}" for e in range(len(ctx.experts)) for n in ("gate_proj", "up_proj",
                                                                                          "down_proj")]
    fp = {name: ctx.module(name).weight.detach().clone() for name in expert_linears}
    res = fn(ctx)
    assert res.info["experts_without_tokens"] == expected_starved
    # (true-sequential GPTQ routes after quantizing attention, whose output is zero in this block: same routing)
    assert res.info["expert_tokens"] == {f"mlp.experts.{e}": c for e, c in enumerate(counts)}
    assert set(res.qparams) == set(linears(ctx.subsets))
    q = quantized_weights(ctx, res.qparams)
    for name in expert_linears:
        w = ctx.module(name).weight
        assert not torch.equal(q[name], fp[name]), name  # really quantized
        if int(name.split(".")[2]) in STARVED:
            assert res.qparams[name] is None  # RTN
            assert torch.equal(q[name], fake_quant(w, ctx.spec))
            if method != "awq" or name.endswith("down_proj"):
                # GPTQ leaves them alone; AWQ only folds the shared norm's scale into gate/up (no own scale)
                assert torch.equal(w, fp[name]), name
        elif method != "awq":
            assert res.qparams[name] is not None  # solved by GPTQ
    if method == "awq":
        for e in STARVED:
            assert res.info["skipped"][f"mlp.experts.{e}.down_proj"] == "no calibration tokens"
            assert not any(k.startswith(f"mlp.experts.{e}.") for k in res.info["clipped_frac"])


@pytest.mark.parametrize("kind", KINDS)
def test_each_expert_hessian_uses_only_its_tokens(kind):
    ctx, hf_layer = moe_ctx(kind, GptqSpecial(), starved=STARVED)
    X, top = hf_routing(hf_layer, ctx.inputs, ctx.block_kwargs)
    moe = next(s for s in ctx.subsets if s.inspect == "mlp")
    stats = collect_hessians(ctx, [moe])
    for e in range(len(ctx.experts)):
        st = stats[f"mlp.experts.{e}.gate_proj"]
        Xe = X[(top == e).any(-1)]
        assert st.tokens == Xe.shape[0]
        if st.tokens:
            torch.testing.assert_close(st.H * st.n / 2, Xe.t() @ Xe, rtol=1e-4, atol=1e-4)
        else:
            assert st.n == 0 and torch.count_nonzero(st.H) == 0
    shared = next(g[0] for g in moe.groups() if "shared" in g[0])
    assert stats[shared].tokens == X.shape[0]  # the shared expert sees every token


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_expert_stage_equals_one_subset_at_a_time(kind):
    """True-sequential GPTQ collects every expert's down_proj Hessian in one forward (one `stage`): the same
    weights as collecting them subset by subset, since an expert's down_proj input is its own gate/up's."""
    import dataclasses

    staged, _ = moe_ctx(kind, GptqSpecial())
    one_by_one, _ = moe_ctx(kind, GptqSpecial())
    assert len({s.stage for s in staged.subsets if s.stage}) == 1
    one_by_one.subsets = tuple(dataclasses.replace(s, stage="") for s in one_by_one.subsets)
    gptq(staged)
    gptq(one_by_one)
    for name in linears(staged.subsets):
        assert torch.equal(staged.module(name).weight, one_by_one.module(name).weight), name


def test_awq_clip_inputs_are_the_routed_tokens():
    """AWQ's per-expert statistics: expert_tokens counts the rows its linears received (= the router's choice),
    and an expert's down_proj scale search runs on exactly those rows."""
    ctx, hf_layer = moe_ctx("qwen2_moe", AwqSpecial(weight_clip=False))
    X, top = hf_routing(hf_layer, ctx.inputs, ctx.block_kwargs)
    seen = ctx.capture_inputs([f"mlp.experts.{e}.gate_proj" for e in range(len(ctx.experts))])
    for e in range(len(ctx.experts)):
        rows = torch.cat(seen[f"mlp.experts.{e}.gate_proj"]) if seen[f"mlp.experts.{e}.gate_proj"] else X[:0]
        torch.testing.assert_close(rows, X[(top == e).any(-1)])
    res = awq(ctx)
    assert res.info["expert_tokens"] == {f"mlp.experts.{e}": int((top == e).sum()) for e in range(len(ctx.experts))}


@pytest.fixture(scope="module")
def starved_qwen_dir(tmp_path_factory):
    """A saved tiny Qwen2-MoE whose block 0 never routes to STARVED (block 0 is MoE: its inputs are the
    embeddings, the same in the worker and in HF's forward)."""
    from tiny_tokenizer import tiny_tokenizer

    path = tmp_path_factory.mktemp("starved_qwen")
    model = force_starvation(tiny.tiny_model("qwen2_moe"), 0)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, model


@pytest.mark.parametrize("method", ["Awq", "GPTQ"])
def test_worker_quantizes_starved_experts_and_reports_them(method, starved_qwen_dir):
    from llmc_ray.worker import CalibJob

    path, model = starved_qwen_dir
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    seen = []
    h = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        model(ids)
    h.remove()
    gate = model.model.layers[0].mlp.gate
    top = torch.topk((torch.cat(seen) @ gate.weight.t()).softmax(-1), gate.top_k, dim=-1).indices
    counts = torch.bincount(top.flatten(), minlength=8).tolist()
    assert [e for e, c in enumerate(counts) if c == 0] == list(STARVED)

    w = BlockWorker(WorkerPlan(0, (0,), True, False, str(path), "qwen2_moe", "float32", "cpu"))
    w.load()
    fp = {k: v.clone() for k, v in w.blocks[0].state_dict().items()}
    job = CalibJob(method, {}, G32_4, quant_out=False)
    _, report = w.calibrate_block(0, w.calib_inputs(ids, 1), job)
    assert report["info"]["experts_without_tokens"] == [f"mlp.experts.{e}" for e in STARVED]
    assert report["info"]["expert_tokens"] == {f"mlp.experts.{e}": c for e, c in enumerate(counts)}
    expert_linears = {f"mlp.experts.{e}.{n}" for e in range(8) for n in ("gate_proj", "up_proj", "down_proj")}
    assert expert_linears <= set(w.variants[0].qparams[0]) and expert_linears <= set(report["weight_rel_err"])
    w.to_fake_quant()
    for name in expert_linears:
        assert not torch.equal(w.blocks[0].get_submodule(name).weight, fp[name + ".weight"]), name


# ------------------------------------------------------------------ synthetic checkpoints and validation


def published_deepseek_v2_lite():
    """Parameter count of DeepSeek-V2-Lite from its config.json, written out here by hand."""
    H, V, L, I, Ie, E, S = 2048, 102400, 27, 10944, 1408, 64, 2
    heads, nope, rope, v, kv_rank = 16, 128, 64, 128, 512
    attn = H * heads * (nope + rope) + H * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v) \
        + heads * v * H
    norms = 2 * H
    dense = 3 * H * I
    moe = E * 3 * H * Ie + 3 * H * (S * Ie) + E * H  # routed, shared, router
    total = 2 * V * H + H + L * (attn + norms) + dense + (L - 1) * moe
    active = V * H + H + L * (attn + norms) + dense + (L - 1) * (6 * 3 * H * Ie + 3 * H * S * Ie + E * H)
    return total, active  # active: everything a token touches except the input embedding table


def test_synthetic_deepseek_v2_lite_parameter_count(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path))
    ckpt = Checkpoint(resolve_model_dir("synthetic:deepseek-v2-lite:27"))
    n = sum(t.nbytes for t in ckpt.tensors.values()) // 2  # bf16
    total, active = published_deepseek_v2_lite()
    assert n == total
    assert total == pytest.approx(15.7e9, rel=0.005)  # published: 15.7B total
    assert active == pytest.approx(2.4e9, rel=0.03)  # published: 2.4B activated
    assert ckpt.tensors["model.layers.26.mlp.experts.63.down_proj.weight"].shape == [2048, 1408]
    assert "model.layers.0.mlp.down_proj.weight" in ckpt.tensors  # block 0 dense


def test_synthetic_moe_configs_are_read_as_written(tmp_path, monkeypatch):
    """Every key of the published config.json we write is a field of transformers' config class and is read
    back unchanged, except the documented ones (scoring_func: not a field, softmax is what HF's router does;
    rope_theta: moved into rope_parameters)."""
    from llmc_ray import synthetic

    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path))
    meta_keys = {"architectures", "model_type", "torch_dtype"}
    cases = (("deepseek-v2-lite", {"scoring_func", "rope_theta"}), ("qwen1.5-moe-a2.7b", {"rope_theta"}))
    for arch, not_fields in cases:
        cfg = Checkpoint(resolve_model_dir(f"synthetic:{arch}:2")).config()
        written = synthetic.ARCHS[arch]
        assert {k for k in written if k not in type(cfg).__dataclass_fields__} - meta_keys == not_fields
        for k, v in written.items():
            if k not in meta_keys | not_fields | {"num_hidden_layers"}:
                assert getattr(cfg, k) == v, (arch, k)
        assert cfg.rope_parameters["rope_theta"] == written["rope_theta"]


def test_synthetic_qwen15_moe_parameter_count(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path))
    ckpt = Checkpoint(resolve_model_dir("synthetic:qwen1.5-moe-a2.7b:24"))
    n = sum(t.nbytes for t in ckpt.tensors.values()) // 2
    H, V, L, Ie, E, Is = 2048, 151936, 24, 1408, 60, 5632
    attn = 4 * H * H + 3 * H  # q/k/v biases
    moe = E * 3 * H * Ie + 3 * H * Is + E * H + H  # routed, shared, router, shared-expert gate
    assert n == 2 * V * H + H + L * (attn + 2 * H + moe)
    assert n == pytest.approx(14.3e9, rel=0.005)  # published: 14.3B total


def test_synthetic_deepseek_loads_per_expert_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path))
    ckpt = Checkpoint(resolve_model_dir("synthetic:deepseek-v2-lite:2"))
    t = ckpt.load_prefix("model.layers.1.mlp.experts.5")
    assert {k: tuple(v.shape) for k, v in t.items()} == {"gate_proj.weight": (1408, 2048),
                                                        "up_proj.weight": (1408, 2048),
                                                        "down_proj.weight": (2048, 1408)}
    name = "model.layers.1.mlp.experts.6.gate_proj.weight"
    other = ckpt.load([name])[name]
    assert not torch.equal(t["gate_proj.weight"], other)  # seeded by name


def plan_for(path, group_size, tmp_path, method="RTN", spread=False):
    from llmc_ray.validate import make_plan

    return make_plan(build({"model": {"path": path}, "quant": {"method": method,
                                                                 "weight": {"bit": 4, "group_size": group_size}},
                            "eval": {"eval_pos": []}, "save": {"save_path": str(tmp_path / "out")},
                            "dist": {"spread_experts": spread}}))


def test_validation_covers_experts(tmp_path, monkeypatch, moe_dirs):
    monkeypatch.setenv("LLMC_RAY_CACHE", str(tmp_path))
    assert plan_for("synthetic:deepseek-v2-lite:2", 64, tmp_path).model_type == "deepseek_v2"
    # V2-Lite's dense block 0: intermediate 10944 = 64 * 171, so g128 is refused there
    with pytest.raises(ConfigError, match=r"group_size=128 does not divide in_features=10944 of mlp.down_proj.* 64$"):
        plan_for("synthetic:deepseek-v2-lite:2", 128, tmp_path)
    assert plan_for("synthetic:qwen1.5-moe-a2.7b:2", 128, tmp_path).model_type == "qwen2_moe"
    # 1408 = 128 * 11 while 2048 and 5632 divide by 256: the experts' down_proj is what g256 breaks
    with pytest.raises(ConfigError, match=r"group_size=256 does not divide in_features=1408 of mlp.experts.\*.down"):
        plan_for("synthetic:qwen1.5-moe-a2.7b:2", 256, tmp_path)
    for kind, path in moe_dirs.items():
        plan_for(str(path), 32, tmp_path)
        with pytest.raises(ConfigError, match=r"group_size=64 does not divide in_features=32 of .*e\.g\. 32$"):
            plan_for(str(path), 64, tmp_path)


def test_validation_refuses_an_adapter_that_leaves_linears_out(moe_dirs, tmp_path, monkeypatch):
    from llmc_ray import models

    spec = models.ADAPTERS["deepseek_v2"]
    import dataclasses

    no_kv_b = tuple(s for s in spec.subsets if s.layers != ("self_attn.kv_b_proj",))
    monkeypatch.setitem(models.ADAPTERS, "deepseek_v2", dataclasses.replace(spec, subsets=no_kv_b))
    with pytest.raises(ConfigError, match=r"leaves \['self_attn.kv_b_proj'\] unquantized"):
        plan_for(str(moe_dirs["deepseek_v2"]), 32, tmp_path)


# ------------------------------------------------------------------ end to end through Ray actors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["RTN", "Awq", "GPTQ"])
def test_end_to_end(kind, method, moe_dirs, texts, tmp_path, ray_session):
    from test_e2e import eval_windows, hf_ppl, make_cfg

    src = moe_dirs[kind]
    res, weights = [], []
    for n, eval_pos in ((1, ("pretrain", "transformed", "fake_quant")), (2, ("fake_quant",))):
        cfg = make_cfg(src, texts, tmp_path / f"a{n}", method=method, actors=n, eval_pos=eval_pos, group_size=32)
        # GPTQ on 2 actors: each MoE block's experts are calibrated on both (the same weights as in-block)
        cfg.dist.spread_experts = method == "GPTQ" and n == 2
        res.append(run(cfg))
        sd = {}
        for f in sorted((tmp_path / f"a{n}" / "fake_quant_model").glob("*.safetensors")):
            sd.update(load_file(str(f)))
        weights.append(sd)
    windows = eval_windows(src, cfg)
    ppl = res[0]["eval"]["custom"]
    assert ppl["pretrain"] == pytest.approx(hf_ppl(src, windows), rel=1e-5)
    assert res[0]["eval"]["custom"]["fake_quant"] == res[1]["eval"]["custom"]["fake_quant"]
    assert weights[0].keys() == weights[1].keys() and any(".mlp.experts.7.down_proj" in k for k in weights[0])
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    for pos, sub in (("transformed", "transformed_model"), ("fake_quant", "fake_quant_model")):
        assert hf_ppl(tmp_path / "a1" / sub, windows) == pytest.approx(ppl[pos], rel=1e-4)
    if method != "RTN":
        moe_blocks = [r for r in res[0]["blocks"] if "expert_tokens" in r["info"]]
        assert len(moe_blocks) == 3  # of 4 blocks, one is dense
        for r in moe_blocks:  # every calibration token reaches top_k = 2 experts
            assert sum(r["info"]["expert_tokens"].values()) == 8 * 64 * 2
        assert sorted({r["rank"] for r in res[1]["blocks"]}) == [0, 1]
        if method == "GPTQ":
            for r in (r for r in res[1]["blocks"] if "expert_tokens" in r["info"]):
                spread = {int(k): n for k, n in r["info"]["experts_spread"].items()}  # balanced by routed tokens
                assert set(spread) == {0, 1} and sum(spread.values()) == 8
                whole = next(b for b in res[0]["blocks"] if b["block"] == r["block"])
                assert r["info"]["loss"] == whole["info"]["loss"]
        md = (tmp_path / "a1" / "report.md").read_text()  # experts summarised per kind, coverage listed
        assert "## Expert coverage" in md and "mlp.experts.*.down_proj" in md and "experts.0.down_proj" not in md


# ------------------------------------------------------------------ experts spread over actors


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("true_sequential", [True, False])
def test_experts_calibrated_apart_equal_in_block(kind, true_sequential, moe_dirs, starved_qwen_dir):
    """GPTQ on a MoE block with its experts shipped out (spread_block -> solve_experts on two other workers ->
    finish_spread) against the same block calibrated whole: identical weights, qparams and losses; starved
    experts (none shipped) keep RTN in both."""
    from llmc_ray.worker import CalibJob

    path, model_type = (starved_qwen_dir[0], "qwen2_moe") if kind == "qwen2_moe" else (moe_dirs[kind], kind)
    moe = FIRST_MOE[kind]
    blocks = tuple(range(moe + 1))
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    job = CalibJob("GPTQ", {"true_sequential": true_sequential}, G32_4, quant_out=True)

    def worker(rank, blocks):
        w = BlockWorker(WorkerPlan(rank, blocks, rank == 0, False, str(path), model_type, "float32", "cpu"))
        w.load()
        return w

    def inputs_of_moe_block(w):
        acts = w.calib_inputs(ids, 2)
        for i in blocks[:-1]:
            acts, _ = w.calibrate_block(i, acts, job)
        return acts

    whole, apart = worker(0, blocks), worker(0, blocks)
    _, ref = whole.calibrate_block(moe, inputs_of_moe_block(whole), job, hand_on="none")
    helpers = [worker(1, (moe,)), worker(2, (moe,))]
    payloads = apart.spread_block(moe, inputs_of_moe_block(apart), job, 2)
    assert sum(len(p["experts"]) for p in payloads) == 8 - (len(STARVED) if kind == "qwen2_moe" else 0)
    assert all(p["experts"] for p in payloads)  # both workers got experts
    _, got = apart.finish_spread(moe, job, "none", *[h.solve_experts(p, job) for h, p in zip(helpers, payloads)])
    assert got["info"]["experts_spread"] == {1: len(payloads[0]["experts"]), 2: len(payloads[1]["experts"])}
    assert got["info"]["loss"] == ref["info"]["loss"]
    assert got["info"]["expert_tokens"] == ref["info"]["expert_tokens"]
    assert got["info"]["experts_without_tokens"] == ref["info"]["experts_without_tokens"]
    a, b = whole.blocks[moe].state_dict(), apart.blocks[moe].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    qa, qb = whole.variants[0].qparams[moe], apart.variants[0].qparams[moe]
    assert qa.keys() == qb.keys() and all(torch.equal(x, y) for k in qa for x, y in zip(qa[k], qb[k]))


def test_spread_experts_needs_a_method_that_can_and_the_sequential_schedule(moe_dirs, tmp_path):
    with pytest.raises(ConfigError, match="Awq cannot calibrate a block's routed experts apart"):
        plan_for(str(moe_dirs["qwen2_moe"]), 32, tmp_path, method="Awq", spread=True)
    with pytest.raises(ConfigError, match="spread_experts=true applies to the sequential schedule"):
        build({"model": {"path": "x"}, "dist": {"spread_experts": True, "schedule": "parallel"}})


@pytest.mark.parametrize("kind", KINDS)
def test_awq_references_from_the_capture_equal_fresh_ones(kind, monkeypatch):
    from test_awq import assert_same_awq

    assert_same_awq(lambda: moe_ctx(kind, AwqSpecial())[0], monkeypatch)
