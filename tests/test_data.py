"""Data layer: every source format round-trips, every preprocessor keeps llmc's rule, eval windows are GPTQ's.

References are rebuilt here independently: token streams come from tokenizing the joined text directly, and
rows are checked against them structurally (where they must occur, which samples they may hold), not by
re-running the library's sampling code.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from datasets import Dataset, DatasetDict

from llmc_ray.config import CalibConfig, ConfigError, EvalConfig
from llmc_ray.data import load_calib_tokens, load_eval_tokens, load_texts
from llmc_ray.data.preproc import PREPROCESSORS
from tiny_tokenizer import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model weight scale group block layer text token value error quant round bit sample window "
         "river stone light house garden winter summer north south paper music number letter city").split()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_docs(n: int, lo: int, hi: int, seed: int = 0) -> List[str]:
    """n distinct ASCII documents of lo..hi words (a serial number makes each one unique)."""
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "." for i in range(n)]


def ids_of(tok, text: str) -> List[int]:
    return tok(text)["input_ids"]


def occurs(row: torch.Tensor, stream: Sequence[int]) -> bool:
    """Whether `row` appears contiguously in `stream`."""
    s = torch.tensor(list(stream))
    if len(s) < len(row):
        return False
    return bool((s.unfold(0, len(row), 1) == row).all(1).any())


def split_at(row: Sequence[int], sep: int) -> List[List[int]]:
    """Cut a token row into segments that each start with `sep` (BOS)."""
    segs: List[List[int]] = []
    for t in row:
        if t == sep or not segs:
            segs.append([])
        segs[-1].append(t)
    return segs


# ------------------------------------------------------------------ sources

def test_txt_lines_skip_blanks_and_slice(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("first sample\n\n   \n  second sample  \nthird\nfourth\n", encoding="utf-8")
    assert load_texts("custom", str(p), "calib") == ["first sample", "second sample", "third", "fourth"]
    assert load_texts("custom", str(p), "eval", "1:3") == ["second sample", "third"]
    assert load_texts("custom", str(p), "calib", "-1:") == ["fourth"]
    with pytest.raises(ConfigError, match="slice"):
        load_texts("custom", str(p), "calib", "*.txt")


def test_txt_dir_glob_select_is_disjoint(tmp_path):
    names = {"1990.txt": "nineties a", "1995.txt": "nineties b\n\nsecond para", "2001.txt": "noughties a",
             "2010.txt": "tens a", "notes.md": "not text", "empty.txt": "  \n"}
    for n, t in names.items():
        (tmp_path / n).write_text(t, encoding="utf-8")
    calib = load_texts("custom", str(tmp_path), "calib", "19*.txt")
    ev = load_texts("custom", str(tmp_path), "eval", "20*.txt")
    assert calib == ["nineties a", "nineties b\n\nsecond para"]  # file order, whole file one document
    assert ev == ["noughties a", "tens a"]
    assert not set(calib) & set(ev)
    assert load_texts("custom", str(tmp_path), "calib") == calib + ev  # default *.txt, empty file dropped
    assert load_texts("custom", str(tmp_path), "calib", ":1") == ["nineties a"]  # a slice over files
    with pytest.raises(ConfigError, match=r"no files matching calib.select='18\*.txt'"):
        load_texts("custom", str(tmp_path), "calib", "18*.txt")


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "alpha beta", "id": 1}, {"text": "gamma"}, {"text": ""}, {"text": "delta\nepsilon"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts("custom", str(p), "calib") == ["alpha beta", "gamma", "delta\nepsilon"]
    assert load_texts("custom", str(p), "calib", "1:") == ["gamma", "delta\nepsilon"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2"):
        load_texts("custom", str(bad), "calib")


def test_saved_dataset_and_datasetdict(tmp_path):
    texts = ["one", "", "three"]
    Dataset.from_dict({"text": texts, "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts("custom", str(tmp_path / "ds"), "calib") == texts  # datasets rows are kept as is
    assert load_texts("custom", str(tmp_path / "ds"), "calib", "1:") == ["", "three"]

    dd = DatasetDict({"train": Dataset.from_dict({"text": ["tr1", "tr2"]}),
                      "test": Dataset.from_dict({"text": ["te1"]}),
                      "validation": Dataset.from_dict({"text": ["va1"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_texts("custom", str(tmp_path / "dd"), "calib") == ["tr1", "tr2"]
    assert load_texts("custom", str(tmp_path / "dd"), "eval") == ["te1"]
    assert load_texts("wikitext2", str(tmp_path / "dd"), "eval") == ["te1"]
    assert load_texts("c4", str(tmp_path / "dd"), "eval") == ["va1"]
    assert load_texts("wikitext2", str(tmp_path / "dd"), "calib") == ["tr1", "tr2"]

    DatasetDict({"train": Dataset.from_dict({"sentence": ["s1", "s2"]})}).save_to_disk(str(tmp_path / "ptb"))
    assert load_texts("ptb", str(tmp_path / "ptb"), "calib") == ["s1", "s2"]
    with pytest.raises(ConfigError, match="splits"):
        load_texts("ptb", str(tmp_path / "ptb"), "eval")  # ptb eval reads test, which is absent
    DatasetDict({"only": Dataset.from_dict({"text": ["p"]})}).save_to_disk(str(tmp_path / "pile"))
    assert load_texts("pileval", str(tmp_path / "pile"), "calib") == ["p"]


def test_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_texts("custom", str(tmp_path / "nope.txt"), "calib")
    with pytest.raises(ConfigError, match="calib.name=custom needs calib.path"):
        load_texts("custom", None, "calib")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="expected a .txt"):
        load_texts("custom", str(tmp_path / "x.csv"), "calib")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no text"):
        load_texts("custom", str(tmp_path / "blank.txt"), "calib")
    with pytest.raises(ConfigError, match="not one"):
        load_texts("wikitext2", str(tmp_path / "blank.txt"), "calib")  # a hub name wants a save_to_disk dir
    Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(ConfigError, match="columns"):
        load_texts("custom", str(tmp_path / "nocol"), "calib")


def test_hub_requests_match_llmc_and_failures_say_what_to_do():
    calls = []

    def fake_hub(*args, **kwargs):
        calls.append((args, kwargs))
        col = "sentence" if args[0] == "ptb_text_only" else "text"
        return Dataset.from_dict({col: ["hub text"]})

    for name in ("pileval", "wikitext2", "c4", "ptb"):
        assert load_texts(name, None, "calib", hub_loader=fake_hub) == ["hub text"]
    shuffled = Dataset.from_dict({"text": ["a", "b", "c", "d"]}).shuffle(seed=0)  # rows behind an index map
    assert load_texts("wikitext2", None, "eval", hub_loader=lambda *a, **k: shuffled) == list(shuffled["text"])
    assert load_texts("c4", None, "eval", hub_loader=fake_hub) == ["hub text"]
    assert calls == [
        (("mit-han-lab/pile-val-backup",), {"split": "validation"}),
        (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
        (("allenai/c4",), {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
        (("ptb_text_only", "penn_treebank"), {"split": "train"}),
        (("allenai/c4",), {"split": "validation",
                           "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}),
    ]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore lines")

    with pytest.raises(ConfigError) as e:
        load_texts("wikitext2", None, "eval", hub_loader=offline)
    msg = str(e.value)
    assert "\n" not in msg and "scripts/download_eval_dataset.py --dataset_name wikitext2" in msg
    assert "eval.path=DIR/wikitext2" in msg and "ConnectionError" in msg


# ------------------------------------------------------------------ preprocessors

SEQ, N = 48, 6


@pytest.fixture(scope="module")
def docs():
    """Mixed lengths: some shorter than SEQ tokens, some far longer."""
    return make_docs(120, 1, 30, seed=1)


def run(name: str, texts, tok, seed: int = 42, n: int = N, seq: int = SEQ) -> torch.Tensor:
    out = PREPROCESSORS[name](texts, tok, n, seq, seed)
    assert out.dtype == torch.long and tuple(out.shape) == (n, seq)
    return out


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_seed_decides_rows(name, docs, tok):
    a, b, c = run(name, docs, tok, seed=1), run(name, docs, tok, seed=1), run(name, docs, tok, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name,sep", [("wikitext2_gptq", "\n\n"), ("ptb_gptq", " ")])
def test_gptq_windows_lie_in_the_joined_stream(name, sep, docs, tok):
    stream = ids_of(tok, sep.join(docs))
    rows = run(name, docs, tok)
    assert all(occurs(r, stream[:-1]) for r in rows)  # GPTQ never takes the very last token
    assert len({tuple(r.tolist()) for r in rows}) > 1


def test_random_truncate_txt_windows_span_whole_samples(docs, tok):
    """Decoded, a row is: the tail of one sample, whole samples, the head of another, joined by blank lines."""
    rows = run("random_truncate_txt", docs, tok, n=12, seq=48)
    spans_several = 0
    for r in rows:
        pieces = tok.decode(r, skip_special_tokens=True).split("\n\n")
        first, last, middle = pieces[0].lstrip("\n"), pieces[-1].rstrip("\n"), pieces[1:-1]
        if len(pieces) == 1:
            assert any(first in d for d in docs)
            continue
        spans_several += 1
        assert any(d.endswith(first) for d in docs) and any(d.startswith(last) for d in docs)
        assert all(m in docs for m in middle) and len(set(middle)) == len(middle)
    assert spans_several > 0


def test_c4_windows_come_from_one_long_document(docs, tok):
    enc = {d: ids_of(tok, d) for d in docs}
    long_docs = [e for e in enc.values() if len(e) > SEQ]
    assert 0 < len(long_docs) < len(docs)
    for r in run("c4_gptq", docs, tok):
        assert any(occurs(r, e[:-1]) for e in long_docs)


def test_pileval_awq_concatenates_whole_short_samples(tok):
    docs = make_docs(80, 2, 30, seed=3) + ["   ", ""]
    enc = {tuple(ids_of(tok, d.strip())): d for d in docs if d.strip()}
    eligible = {e for e in enc if len(e) <= SEQ}
    assert len(eligible) < len(enc)  # some samples are too long and must be skipped
    rows = run("pileval_awq", docs, tok)
    segs = split_at(rows.flatten().tolist(), tok.bos_token_id)
    assert all(tuple(s) in eligible for s in segs[:-1])  # whole samples of <= SEQ tokens, nothing else
    assert len({tuple(s) for s in segs[:-1]}) == len(segs) - 1  # each sample at most once
    assert any(e[:len(segs[-1])] == tuple(segs[-1]) for e in eligible)  # the last one is cut where rows end


def check_general_rows(rows: torch.Tensor, texts: List[str], tok, seq: int) -> int:
    """Each row: a long sample's first seq tokens, or whole short samples then the head of one more; no sample
    twice. Returns how many rows were built from short samples."""
    enc = [ids_of(tok, t) for t in texts if t.strip()]
    used, grouped = [], 0
    for r in rows.tolist():
        segs = split_at(r, tok.bos_token_id)
        if len(segs) == 1:  # a long sample's first seq tokens (llmc's rule)
            assert any(len(e) >= seq and e[:seq] == r for e in enc)
        else:  # short samples, concatenated; the last one cut
            grouped += 1
            assert all(s in enc and len(s) < seq for s in segs[:-1])
            assert any(len(e) < seq and e[:len(segs[-1])] == segs[-1] for e in enc)
        used += [tuple(s) for s in segs]
    assert len(set(used)) == len(used)
    return grouped


def test_general_rows_start_at_a_sample(tok):
    docs = make_docs(60, 1, 20, seed=4) + ["", "  "]
    rows = run("general", docs, tok, n=10)
    grouped = check_general_rows(rows, docs, tok, SEQ)
    assert 0 < grouped < 10


def test_general_keeps_custom_short_lines(tok):
    """llmc's general would drop every short line; a .txt of short lines must still calibrate."""
    lines = [f"line {i} " + WORDS[i % len(WORDS)] for i in range(200)]
    rows = run("general", lines, tok, n=8, seq=32)
    assert check_general_rows(rows, lines, tok, 32) == 8


@pytest.mark.parametrize("name,what", [
    ("wikitext2_gptq", "calib.seq_len+1 = 65"),
    ("ptb_gptq", "calib.seq_len+1 = 65"),
    ("random_truncate_txt", "calib.seq_len+1 = 65"),
    ("c4_gptq", "calib.seq_len+1 = 65"),
    ("pileval_awq", "calib.n_samples*calib.seq_len = 256"),
    ("general", "calib.n_samples*calib.seq_len = 256"),
])
def test_too_little_text_names_the_numbers(name, what, tok):
    texts = ["a small text", "and another"]
    have = {"wikitext2_gptq": len(ids_of(tok, "\n\n".join(texts))), "ptb_gptq": len(ids_of(tok, " ".join(texts))),
            "random_truncate_txt": len(ids_of(tok, "\n\n".join(texts))),
            "c4_gptq": max(len(ids_of(tok, t)) for t in texts),
            "pileval_awq": sum(len(ids_of(tok, t)) for t in texts),
            "general": sum(len(ids_of(tok, t)) for t in texts)}[name]
    with pytest.raises(ConfigError) as e:
        PREPROCESSORS[name](texts, tok, 4, 64, 0)
    msg = str(e.value)
    assert msg.startswith(f"calibration text has {have} tokens") and what in msg
    assert "point calib.path at more text" in msg and "\n" not in msg


def test_load_calib_tokens_end_to_end(tmp_path, tok):
    p = tmp_path / "c.txt"
    p.write_text("\n".join(make_docs(50, 1, 8, seed=5)), encoding="utf-8")
    for preproc in ("general", "random_truncate_txt", "pileval_awq"):
        cfg = CalibConfig(name="custom", path=str(p), n_samples=4, seq_len=16, preproc=preproc, seed=0)
        out = load_calib_tokens(cfg, tok)
        assert out.dtype == torch.long and out.shape == (4, 16)
    with pytest.raises(ConfigError, match="calib.preproc='nope'"):
        load_calib_tokens(CalibConfig(name="custom", path=str(p), preproc="nope"), tok)
    with pytest.raises(ConfigError, match="calib.n_samples\\*calib.seq_len = 512000"):
        load_calib_tokens(CalibConfig(name="custom", path=str(p), n_samples=1000, seq_len=512), tok)


# ------------------------------------------------------------------ eval

def windows_by_hand(ids: List[int], seq: int) -> torch.Tensor:
    n = len(ids) // seq
    return torch.tensor([ids[i * seq:(i + 1) * seq] for i in range(n)], dtype=torch.long)


def test_eval_custom_windows_and_cap(tmp_path, tok):
    texts = make_docs(30, 3, 20, seed=6)
    p = tmp_path / "e.txt"
    p.write_text("\n".join(texts), encoding="utf-8")
    ref = windows_by_hand(ids_of(tok, "\n\n".join(texts)), 32)
    out = load_eval_tokens(EvalConfig(name="custom", path=str(p), seq_len=32), tok)
    assert out.dtype == torch.long and torch.equal(out, ref)
    capped = load_eval_tokens(EvalConfig(name="custom", path=str(p), seq_len=32, num_samples=3), tok)
    assert torch.equal(capped, ref[:3])
    with pytest.raises(ConfigError, match=r"eval text has \d+ tokens, eval.seq_len = 100000"):
        load_eval_tokens(EvalConfig(name="custom", path=str(p), seq_len=100000), tok)
    with pytest.raises(ConfigError, match="eval.num_samples"):
        load_eval_tokens(EvalConfig(name="custom", path=str(p), num_samples=0), tok)


def test_eval_wikitext2_keeps_empty_lines(tmp_path, tok):
    test = ["", " = Title = ", ""] + make_docs(20, 5, 25, seed=7) + [""]
    DatasetDict({"train": Dataset.from_dict({"text": ["train only"]}),
                 "test": Dataset.from_dict({"text": test})}).save_to_disk(str(tmp_path / "w"))
    out = load_eval_tokens(EvalConfig(name="wikitext2", path=str(tmp_path / "w"), seq_len=16), tok)
    assert torch.equal(out, windows_by_hand(ids_of(tok, "\n\n".join(test)), 16))


def test_eval_c4_first_1100_docs_and_256_windows(tmp_path, tok):
    docs = ["river"] * 1100 + ["garden stone"] * 50
    Dataset.from_dict({"text": docs}, split="validation").save_to_disk(str(tmp_path / "c4"))
    seq = 32
    out = load_eval_tokens(EvalConfig(name="c4", path=str(tmp_path / "c4"), seq_len=seq), tok)
    ids = ids_of(tok, " ".join(docs[:1100]))
    assert len(ids) < 256 * seq  # the 1100-doc cut decides here
    assert torch.equal(out, windows_by_hand(ids, seq))
    out4 = load_eval_tokens(EvalConfig(name="c4", path=str(tmp_path / "c4"), seq_len=4), tok)
    assert out4.shape == (256, 4) and torch.equal(out4, windows_by_hand(ids[:256 * 4], 4))  # the 256-window cut


def test_eval_ptb_joins_sentences_with_spaces(tmp_path, tok):
    sents = make_docs(40, 3, 12, seed=8)
    DatasetDict({"test": Dataset.from_dict({"sentence": sents})}).save_to_disk(str(tmp_path / "ptb"))
    out = load_eval_tokens(EvalConfig(name="ptb", path=str(tmp_path / "ptb"), seq_len=20), tok)
    assert torch.equal(out, windows_by_hand(ids_of(tok, " ".join(sents)), 20))


# ------------------------------------------------------------------ download scripts

def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_hub_factory(calls: List) -> object:
    """A stand-in for datasets.load_dataset serving a small local copy of each dataset."""
    corpora: Dict[str, Dict[str, list]] = {
        "mit-han-lab/pile-val-backup": {"text": make_docs(20, 5, 30, seed=9), "meta": [{"a": 1}] * 20},
        "wikitext": {"text": ["", " = A = "] + make_docs(20, 5, 30, seed=10)},
        "allenai/c4": {"text": make_docs(20, 5, 30, seed=11), "url": ["u"] * 20},
        "ptb_text_only": {"sentence": make_docs(20, 5, 30, seed=12)},
    }

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return Dataset.from_dict(corpora[path], split=split)

    return fake_load_dataset, corpora


def test_download_calib_script_end_to_end(tmp_path, tok, caplog):
    calls: List = []
    loader, corpora = fake_hub_factory(calls)
    mod = load_script("download_calib_dataset")
    assert mod.main(["--dataset_name", "pileval", "wikitext2", "c4", "ptb", "--save_path", str(tmp_path)],
                    loader=loader) == 0
    assert [c[:3] for c in calls] == [("mit-han-lab/pile-val-backup", None, "validation"),
                                      ("wikitext", "wikitext-2-raw-v1", "train"), ("allenai/c4", None, "train"),
                                      ("ptb_text_only", "penn_treebank", "train")]
    for name, repo in (("pileval", "mit-han-lab/pile-val-backup"), ("wikitext2", "wikitext"),
                       ("c4", "allenai/c4"), ("ptb", "ptb_text_only")):
        col = "sentence" if name == "ptb" else "text"
        assert load_texts(name, str(tmp_path / name), "calib") == corpora[repo][col]
    assert not list(tmp_path.glob(".*partial"))
    cfg = CalibConfig(name="wikitext2", path=str(tmp_path / "wikitext2"), n_samples=4, seq_len=16,
                      preproc="wikitext2_gptq")
    assert load_calib_tokens(cfg, tok).shape == (4, 16)
    with caplog.at_level(logging.WARNING):
        load_texts("wikitext2", str(tmp_path / "wikitext2"), "eval")  # the train split read for eval: warn
    assert "holds split 'train'" in caplog.text


def test_download_eval_script_end_to_end_and_default_loader(tmp_path, tok, monkeypatch):
    calls: List = []
    loader, corpora = fake_hub_factory(calls)
    mod = load_script("download_eval_dataset")
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", loader)  # the default path goes through datasets.load_dataset
    assert mod.main(["--save_path", str(tmp_path)]) == 0
    assert [c[:3] for c in calls] == [("allenai/c4", None, "validation"), ("wikitext", "wikitext-2-raw-v1", "test"),
                                      ("ptb_text_only", "penn_treebank", "test")]
    assert calls[0][3] == {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}
    assert load_texts("ptb", str(tmp_path / "ptb"), "eval") == corpora["ptb_text_only"]["sentence"]
    out = load_eval_tokens(EvalConfig(name="wikitext2", path=str(tmp_path / "wikitext2"), seq_len=16), tok)
    assert torch.equal(out, windows_by_hand(ids_of(tok, "\n\n".join(corpora["wikitext"]["text"])), 16))
