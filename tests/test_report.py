"""The run report (report.md / block_error.png / report.html) and the reuse of a finished run."""
import json
import logging
import re
import sys

import pytest

from llmc_ray.report import write_report
from llmc_ray.run import finished_results, run
from test_e2e import make_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def md_ppl(md: str):
    """{eval: {pos: value}} parsed back out of report.md's Perplexity table."""
    section = md.split("## Perplexity", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for ln in rows[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = {p: float(v) for p, v in zip(head[1:], cells[1:]) if v != "-"}
    return out


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


@pytest.fixture(scope="module")
def awq_run(tiny_dir, texts, tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("report_awq")
    cfg = make_cfg(tiny_dir, texts, out, method="Awq", special={"weight_clip": False})
    return cfg, run(cfg), out


def test_report_matches_results_json(awq_run):
    cfg, res, out = awq_run
    saved = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    ppl = md_ppl(md)
    assert ppl.keys() == saved["eval"].keys()
    for name, by_pos in saved["eval"].items():
        assert set(ppl[name]) == set(by_pos) == {"pretrain", "transformed", "fake_quant"}
        for pos, v in by_pos.items():
            assert ppl[name][pos] == pytest.approx(v, abs=5e-5)  # printed with 4 decimals
    for stage in saved["timings_s"]:
        assert re.search(rf"^\| {stage} \| {saved['timings_s'][stage]:.3f} \|", md, re.M), stage
    assert "```yaml" in md and f"path: {cfg.model.path}" in md  # the resolved config
    assert "## Actors" in md and "| 0 | 0–3 |" in md  # one actor holding blocks 0..3
    w, h = png_size(out / "block_error.png")
    assert w > 100 and h > 100
    import matplotlib.image

    img = matplotlib.image.imread(out / "block_error.png")
    assert img.shape[:2] == (h, w) and img.std() > 0  # decodes, and is not a blank canvas
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and f"{saved['eval']['custom']['fake_quant']:.4f}" in page


def test_finished_run_is_reused_without_work(awq_run, caplog, monkeypatch):
    cfg, res, out = awq_run
    before = (out / "results.json").read_bytes()
    import llmc_ray.run as run_mod

    monkeypatch.setattr(run_mod, "make_plan", lambda *a: pytest.fail("a finished run was planned again"))
    with caplog.at_level(logging.INFO, logger="llmc_ray.run"):
        again = run(cfg)
    assert again == json.loads(before)
    assert (out / "results.json").read_bytes() == before
    assert any("reused finished run" in r.getMessage() for r in caplog.records)


def test_partial_or_different_results_are_not_reused(tiny_dir, texts, tmp_path):
    cfg = make_cfg(tiny_dir, texts, tmp_path)
    cfg.save.save_trans = cfg.save.save_fake = False
    from dataclasses import asdict

    good = {"eval": {}, "timings_s": {"plan": 1.0, "total": 2.0}, "config": json.loads(json.dumps(asdict(cfg)))}
    (tmp_path / "results.json").write_text(json.dumps(good))
    assert finished_results(cfg) == good
    partial = dict(good, timings_s={"plan": 1.0})  # a run that died after an eval
    (tmp_path / "results.json").write_text(json.dumps(partial))
    assert finished_results(cfg) is None
    (tmp_path / "results.json").write_text(json.dumps(good))
    cfg.quant.weight.bit = 3  # another sweep point written into the same directory
    assert finished_results(cfg) is None
    cfg.quant.weight.bit = 4
    cfg.save.save_fake = True  # asks for an output the earlier run did not write
    good["config"]["save"]["save_fake"] = True
    (tmp_path / "results.json").write_text(json.dumps(good))
    assert finished_results(cfg) is None


RTN_RESULTS = {"eval": {"wikitext2": {"pretrain": 10.123456, "fake_quant": 11.5}},
               "timings_s": {"plan": 0.5, "load": 1.0, "total": 2.0}, "blocks": [],
               "actors": [{"rank": 0, "blocks": [0, 1], "load_s": 0.3, "gpu_bytes": 0}],
               "config": {"quant": {"method": "RTN", "weight": {"bit": 4, "granularity": "per_group",
                                                               "group_size": 128}}}}


def test_rtn_report_has_no_plot_and_says_why(tmp_path):
    (tmp_path / "block_error.png").write_bytes(b"stale")  # from an earlier run in the same dir
    md = write_report(RTN_RESULTS, tmp_path).read_text()
    assert md_ppl(md) == {"wikitext2": {"pretrain": 10.1235, "fake_quant": 11.5}}
    assert "nothing to plot" in md and "without calibration" in md
    assert not (tmp_path / "block_error.png").exists()


def test_report_without_matplotlib(tmp_path, monkeypatch):
    res = dict(RTN_RESULTS, blocks=[{"block": 0, "rank": 0, "seconds": 0.1, "weight_rel_err": {"q": 0.1}}])
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if not installed
    md = write_report(res, tmp_path).read_text()
    assert "matplotlib is not installed" in md
    assert not (tmp_path / "block_error.png").exists()
    assert "| 0 | 0 | 0.10 | 0.1 |" in md  # the per-block table still is there
