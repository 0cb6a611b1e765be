"""A run's report next to its results.json: report.md, block_error.png, report.html.

Everything comes from the results dict that `run.run` returns (the same one it writes to results.json), so a
report can be rebuilt from any results.json: `python -m llmc_ray.report outputs/demo/<time>/results.json`.
matplotlib is optional (extra `report`): without it the markdown says the plot was skipped.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config import EVAL_POSITIONS

log = logging.getLogger(__name__)

PLOT_NAME = "block_error.png"


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x, digits) for x in v)
    return "-" if v is None else str(v)


def _ppl_rows(results: Dict[str, Any]) -> List[List[str]]:
    rows = [["eval", *EVAL_POSITIONS]]
    for name, by_pos in results.get("eval", {}).items():
        rows.append([name] + [f"{by_pos[p]:.4f}" if p in by_pos else "-" for p in EVAL_POSITIONS])
    return rows


def _timing_rows(results: Dict[str, Any]) -> List[List[str]]:
    t = results.get("timings_s", {})
    total = t.get("total") or 0.0
    rows = [["stage", "seconds", "share of total"]]
    for k, v in t.items():
        share = f"{100 * v / total:.1f}%" if total and k != "total" else ""
        rows.append([k, f"{v:.3f}", share])
    return rows


def _block_rows(blocks: Sequence[Dict[str, Any]], linears: List[str]) -> List[List[str]]:
    rows = [["block", "rank", "seconds", *linears]]
    for b in blocks:
        errs = b.get("weight_rel_err", {})
        rows.append([str(b.get("block")), str(b.get("rank", "-")), _fmt(b.get("seconds"), 2)]
                    + [f"{errs[n]:.4g}" if n in errs else "-" for n in linears])
    return rows


def _actor_rows(results: Dict[str, Any]) -> List[List[str]]:
    by_rank: Dict[Any, Dict[str, Any]] = {}
    for a in results.get("actors") or []:
        by_rank.setdefault(a.get("rank"), {}).update(a)
    for m in results.get("memory") or []:
        if isinstance(m, dict) and m:
            by_rank.setdefault(m.get("rank"), {}).update(m)
    if not by_rank:
        return []
    keys: List[str] = []
    for info in by_rank.values():
        keys += [k for k in info if k not in keys]
    rows = [keys]
    for rank in sorted(by_rank, key=lambda r: (r is None, r)):
        info = by_rank[rank]
        cells = []
        for k in keys:
            v = info.get(k)
            if k == "blocks" and isinstance(v, list) and v:
                cells.append(f"{v[0]}–{v[-1]}" if v == list(range(v[0], v[-1] + 1)) else _fmt(v))
            elif k.endswith("_bytes") and isinstance(v, (int, float)):
                cells.append(f"{v / 2**20:.1f} MiB")
            else:
                cells.append(_fmt(v, 3))
        rows.append(cells)
    return rows


def by_kind(errs: Dict[str, float]) -> Dict[str, float]:
    """Routed experts' linears averaged per kind (`mlp.experts.*.down_proj`): one column and one plot line
    instead of one per expert. Names without an index pass through."""
    groups: Dict[str, List[float]] = {}
    for name, v in errs.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(v)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _coverage_rows(blocks: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """MoE blocks: calibration tokens per routed expert (fewest, most) and the experts that got none."""
    rows = [["block", "experts", "fewest tokens", "most tokens", "without tokens (RTN)"]]
    for b in blocks:
        counts = (b.get("info") or {}).get("expert_tokens")
        if counts:
            starved = b["info"].get("experts_without_tokens") or []
            rows.append([str(b.get("block")), str(len(counts)), str(min(counts.values())),
                         str(max(counts.values())), ", ".join(starved) or "none"])
    return rows if len(rows) > 1 else []


def _linear_names(blocks: Sequence[Dict[str, Any]]) -> List[str]:
    names: List[str] = []
    for b in blocks:
        names += [n for n in b.get("weight_rel_err", {}) if n not in names]
    return names


def _md_table(rows: List[List[str]]) -> str:
    if not rows:
        return ""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def _html_table(rows: List[List[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_block_errors(blocks: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Optional[str]:
    """One line per linear name: relative weight error per block. Returns None on success, else why not."""
    try:  # the object API with the Agg canvas: no pyplot, no global backend switch in the caller's process
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'llmc-ray[report]')"
    linears = _linear_names(blocks)
    fig = Figure(figsize=(9.5, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "os^vD<>ph*"
    for k, name in enumerate(linears):
        pts = [(b["block"], b["weight_rel_err"][name]) for b in blocks if name in b.get("weight_rel_err", {})]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], ms=4, lw=1.2,
                label=name)
    ax.set_xlabel("block index")
    ax.set_ylabel("relative weight error  ||W - Q(W)|| / ||W||")
    ax.set_title(title or "weight quantization error per block")
    ax.grid(alpha=0.3)
    if blocks:
        xs = sorted({b["block"] for b in blocks})
        if len(xs) <= 40:
            ax.set_xticks(xs)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, title="linear")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return None


def _title(results: Dict[str, Any]) -> str:
    q = results.get("config", {}).get("quant", {})
    w = q.get("weight", {})
    gran = w.get("granularity", "")
    g = f" g{w.get('group_size')}" if gran == "per_group" else f" {gran}" if gran else ""
    sym = " sym" if w.get("symmetric") else ""
    return f"{q.get('method', '?')} w{w.get('bit', '?')}{g}{sym}"


def write_report(results: Dict[str, Any], out_dir: Path) -> Path:
    """Write report.md (+ block_error.png when there are per-block reports, + report.html); return the md path."""
    import yaml

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = results.get("config", {})
    title = _title(results)
    blocks = sorted(results.get("blocks") or [], key=lambda b: b.get("block", 0))
    coverage = _coverage_rows(blocks)
    blocks = [dict(b, weight_rel_err=by_kind(b.get("weight_rel_err") or {})) for b in blocks]
    linears = _linear_names(blocks)

    png = out_dir / PLOT_NAME
    if blocks:
        try:
            why_not = plot_block_errors(blocks, png, f"{title}: weight quantization error per block")
        except Exception as e:  # a plot must never cost the run its report
            log.warning("block error plot failed: %s", e)
            why_not = f"plotting failed: {e}"
    else:
        why_not = ("no per-block reports in this run (the method ran without calibration, e.g. RTN), "
                   "so there is nothing to plot")
    if why_not and png.exists():
        png.unlink()  # never leave a plot from an earlier run beside this report

    model = cfg.get("model", {}).get("path") or results.get("model_dir", "?")
    sections: List[tuple] = [  # (heading, markdown body, html body)
        ("Perplexity", _md_table(_ppl_rows(results)), _html_table(_ppl_rows(results))),
        ("Timings", _md_table(_timing_rows(results)), _html_table(_timing_rows(results))),
    ]
    if why_not:
        note = f"Block error plot: not written ({why_not})."
        block_md, block_html = note, f"<p>{html.escape(note)}</p>"
    else:
        block_md = f"![weight error per block]({PLOT_NAME})"
        block_html = f'<img alt="weight error per block" src="data:image/png;base64,' \
                     f'{base64.b64encode(png.read_bytes()).decode()}">'
    if blocks:
        mean = {n: sum(b["weight_rel_err"][n] for b in blocks if n in b["weight_rel_err"])
                / max(1, sum(n in b["weight_rel_err"] for b in blocks)) for n in linears}
        mean_rows = [["linear", "mean rel. error"]] + [[n, f"{v:.4g}"] for n, v in mean.items()]
        block_md += "\n\n" + _md_table(mean_rows) + "\n\n" + _md_table(_block_rows(blocks, linears))
        block_html += _html_table(mean_rows) + _html_table(_block_rows(blocks, linears))
    sections.append(("Weight error per block", block_md, block_html))
    if coverage:
        note = "Routed experts' errors above are means over the experts of a block."
        sections.append(("Expert coverage", note + "\n\n" + _md_table(coverage),
                         f"<p>{html.escape(note)}</p>" + _html_table(coverage)))
    actors = _actor_rows(results)
    sections.append(("Actors", _md_table(actors) or "none recorded", _html_table(actors) or "<p>none recorded</p>"))
    cfg_yaml = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
    sections.append(("Config", f"```yaml\n{cfg_yaml}```", f"<pre>{html.escape(cfg_yaml)}</pre>"))

    head = f"# llmc-ray report: {title}\n\nmodel: `{model}`\n"
    md = head + "".join(f"\n## {h}\n\n{body}\n" for h, body, _ in sections)
    md_path = out_dir / "report.md"
    _write_atomic(md_path, md)
    page = ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>llmc-ray report: {html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
            "text-align:right}th{background:#eee}img{max-width:100%}pre{background:#f6f6f6;padding:1em}"
            "</style></head><body>"
            f"<h1>llmc-ray report: {html.escape(title)}</h1><p>model: <code>{html.escape(str(model))}</code></p>"
            + "".join(f"<h2>{html.escape(h)}</h2>{body}" for h, _, body in sections) + "</body></html>\n")
    _write_atomic(out_dir / "report.html", page)
    return md_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m llmc_ray.report RESULTS_JSON [OUT_DIR]`: rebuild a report from a results.json."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m llmc_ray.report RESULTS_JSON [OUT_DIR]")
    src = Path(argv[0])
    print(write_report(json.loads(src.read_text()), Path(argv[1]) if len(argv) > 1 else src.parent))


if __name__ == "__main__":
    main()
