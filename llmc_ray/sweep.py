"""Sweep summary: one table over every job of a Hydra multirun, and PPL vs bits per weight with its Pareto front.

Registered in conf/config.yaml as a Hydra callback (`SweepSummary`). It reads each job's results.json under
the sweep dir (a job's `save.save_path` defaults to its Hydra output dir, `multirun/<task>/<time>/<num>`) and
writes `summary.json`, `summary.md` and `pareto.png` into the sweep dir. The summary is rewritten after every
job and once more at the end, because Hydra skips `on_multirun_end` when any job failed: failed jobs (no
finished results.json) are listed as failed, with the error where one was recorded.

By hand: `python -m llmc_ray.sweep multirun/<task>/<time>`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"  # written by SweepSummary.on_job_end into a failed job's output dir
RAY_JOB_FILE = "ray_job.json"  # written by the ray_jobs launcher: submission id, status, message
SCALE_BITS = 16  # an fp16 scale per group
MARKERS = {"RTN": "o", "Awq": "s", "GPTQ": "^"}


def bits_per_weight(bit: int, granularity: str = "per_group", group_size: int = 128, symmetric: bool = False,
                    scale_bits: int = SCALE_BITS, zero_bits: Optional[int] = None) -> float:
    """Effective storage bits per weight.

    per_group: the codes, plus one fp16 scale per group, plus (asymmetric only) one zero point per group,
    stored at the code's width unless `zero_bits` says otherwise (AutoAWQ/GPTQ pack qzeros at `bit` bits).
    per_channel / per_tensor: one scale (and zero) per row of thousands of weights: counted as `bit`.
    """
    if granularity != "per_group":
        return float(bit)
    zero = 0 if symmetric else (bit if zero_bits is None else zero_bits)
    return bit + (scale_bits + zero) / group_size


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point dominates, both coordinates minimized; sorted by x.

    q dominates p when q.x <= p.x and q.y <= p.y and q != p. Equal points do not dominate each other.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: List[int] = []
    best_y = math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
        elif front and tuple(points[i]) == tuple(points[front[-1]]):
            front.append(i)  # an exact duplicate of a front point is not dominated either
    return front


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path)
    except Exception:
        return None


def _job_dirs(sweep_dir: Path) -> List[Path]:
    dirs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.rglob(RAY_JOB_FILE)}
    dirs.discard(sweep_dir)

    def key(d: Path):
        rel = d.relative_to(sweep_dir).as_posix()
        return (0, int(rel), rel) if rel.isdigit() else (1, 0, rel)

    return sorted(dirs, key=key)


def _results_path(job_dir: Path) -> Path:
    """results.json of a job: in its output dir, or in a literal save.save_path from its saved config."""
    default = job_dir / "results.json"
    if default.is_file():
        return default
    cfg = _load_yaml(job_dir / ".hydra" / "config.yaml")
    try:
        from omegaconf import OmegaConf

        if cfg is not None and not OmegaConf.is_interpolation(cfg.save, "save_path"):
            return Path(str(cfg.save.save_path)) / "results.json"
    except Exception:
        pass
    return default


def _finished(path: Path) -> Optional[Dict[str, Any]]:
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if "total" in res.get("timings_s", {}) else None


def _failure_reason(job_dir: Path, res_path: Path) -> str:
    err = job_dir / ERROR_FILE
    if err.is_file():
        lines = [ln for ln in err.read_text().strip().splitlines() if ln.strip()]
        return lines[-1] if lines else "failed"
    rj = job_dir / RAY_JOB_FILE
    if rj.is_file():
        try:
            info = json.loads(rj.read_text())
            if info.get("status") in ("SUBMITTING", "PENDING", "RUNNING"):
                return f"ray job {info.get('submission_id')} did not finish (last seen {info.get('status')})"
            # the message ends with the tail of the job's log: its last line is the error
            tail = [ln for ln in (info.get("message") or "").strip().splitlines() if ln.strip()]
            return f"ray job {info.get('submission_id')} {info.get('status')}: {tail[-1] if tail else ''}".strip()
        except (OSError, ValueError):
            pass
    return f"no finished {res_path.name} ({'partial file' if res_path.is_file() else 'missing'})"


def _quant_of(res: Optional[Dict[str, Any]], job_dir: Path) -> Dict[str, Any]:
    if res is not None:
        return res.get("config", {}).get("quant", {})
    cfg = _load_yaml(job_dir / ".hydra" / "config.yaml")
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg.quant, resolve=False) if cfg is not None else {}
    except Exception:
        return {}


def collect(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per job dir under `sweep_dir` (ok or failed)."""
    rows = []
    for d in _job_dirs(sweep_dir):
        ov = _load_yaml(d / ".hydra" / "overrides.yaml")
        overrides = list(ov) if ov is not None else []
        if not overrides and (d / RAY_JOB_FILE).is_file():
            try:
                overrides = json.loads((d / RAY_JOB_FILE).read_text()).get("overrides", [])
            except (OSError, ValueError):
                pass
        res_path = _results_path(d)
        res = _finished(res_path)
        q = _quant_of(res, d)
        w = q.get("weight", {}) if isinstance(q, dict) else {}
        row: Dict[str, Any] = {
            "job": d.relative_to(sweep_dir).as_posix(), "dir": str(d), "overrides": [str(o) for o in overrides],
            "status": "ok" if res is not None else "failed",
            "method": q.get("method") if isinstance(q, dict) else None, "bit": w.get("bit"),
            "granularity": w.get("granularity"), "group_size": w.get("group_size"), "symmetric": w.get("symmetric"),
            "ppl": res.get("eval", {}) if res else {}, "total_s": res["timings_s"]["total"] if res else None,
            "results": str(res_path) if res else None,
        }
        try:
            row["bits_per_weight"] = bits_per_weight(int(w["bit"]), w.get("granularity", "per_group"),
                                                     int(w.get("group_size") or 0) or 1, bool(w.get("symmetric")))
        except (KeyError, TypeError, ValueError):
            row["bits_per_weight"] = None
        if res is None:
            row["error"] = _failure_reason(d, res_path)
        rows.append(row)
    return rows


def _ppl_point(row: Dict[str, Any]) -> Optional[Tuple[str, float]]:
    """(eval name, fake-quant PPL) of the first eval set that has one."""
    for name, by_pos in row.get("ppl", {}).items():
        v = by_pos.get("fake_quant")
        if isinstance(v, (int, float)) and math.isfinite(v):
            return name, float(v)
    return None


def _label(row: Dict[str, Any]) -> str:
    g = f" g{row['group_size']}" if row.get("granularity") == "per_group" else f" {row.get('granularity')}"
    return f"w{row.get('bit')}{g}"


def plot_pareto(rows: List[Dict[str, Any]], front: List[int], pts: List[Tuple[float, float]], idx: List[int],
                path: Path, eval_name: str) -> Optional[str]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install 'llmc-ray[report]')"
    fig = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    extra = iter("Dv<>ph*")
    methods: Dict[str, str] = {}
    for k, r in zip(idx, pts):
        m = rows[k].get("method") or "?"
        if m not in methods:
            methods[m] = MARKERS.get(m) or next(extra, "x")
        on_front = k in {idx[f] for f in front}
        ax.scatter([r[0]], [r[1]], marker=methods[m], s=60 if on_front else 40, zorder=3,
                   color=f"C{list(methods).index(m)}", edgecolors="black" if on_front else "none",
                   label=m if m not in ax.get_legend_handles_labels()[1] else None)
        ax.annotate(_label(rows[k]), r, textcoords="offset points", xytext=(5, 4), fontsize=7)
    fx = [pts[f][0] for f in front]
    fy = [pts[f][1] for f in front]
    ax.step(fx, fy, where="post", color="black", lw=1.2, ls="--", zorder=2, label="Pareto front")
    pre = [r["ppl"][eval_name]["pretrain"] for r in rows
           if isinstance(r.get("ppl", {}).get(eval_name, {}).get("pretrain"), (int, float))]
    if pre:
        ax.axhline(pre[0], color="gray", lw=1, ls=":", label="unquantized")
    ys = [p[1] for p in pts] + pre[:1]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel("effective bits per weight (codes + fp16 scale [+ zero] per group)")
    ax.set_ylabel(f"fake-quant perplexity ({eval_name})")
    ax.set_title("PPL vs bits per weight (lower left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return None


def _md_table(rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def write_summary(sweep_dir: Path) -> Dict[str, Any]:
    """Write summary.json, summary.md and pareto.png into `sweep_dir`; return the summary dict."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    cols: List[Tuple[str, str]] = []
    for r in rows:
        for name, by_pos in r["ppl"].items():
            cols += [(name, p) for p in by_pos if (name, p) not in cols]
    idx, pts, eval_name = [], [], None
    for k, r in enumerate(rows):
        p = _ppl_point(r)
        if p is not None and r.get("bits_per_weight") is not None and (eval_name in (None, p[0])):
            eval_name = p[0]
            idx.append(k)
            pts.append((r["bits_per_weight"], p[1]))
    front = pareto_front(pts)
    for k in idx:
        rows[k]["pareto"] = False
    for f in front:
        rows[idx[f]]["pareto"] = True
    summary = {"sweep_dir": str(sweep_dir), "n_jobs": len(rows), "n_ok": sum(r["status"] == "ok" for r in rows),
               "n_failed": sum(r["status"] != "ok" for r in rows), "pareto_eval": eval_name,
               "pareto": [rows[idx[f]]["job"] for f in front], "jobs": rows}
    _write_atomic(sweep_dir / "summary.json", json.dumps(summary, indent=2))

    png = sweep_dir / "pareto.png"
    why_not = "no job has a fake_quant PPL (eval.eval_pos without fake_quant?)" if not pts else None
    if pts:
        try:
            why_not = plot_pareto(rows, front, pts, idx, png, eval_name)
        except Exception as e:  # the table matters more than the picture
            log.warning("pareto plot failed: %s", e)
            why_not = f"plotting failed: {e}"
    if why_not and png.exists():
        png.unlink()

    # the overrides every job shares go above the table; each row shows what makes it differ
    common = [o for o in rows[0]["overrides"] if all(o in r["overrides"] for r in rows)] if len(rows) > 1 else []
    table = [["job", "status", "overrides", "method", "bit", "group", "bits/weight",
              *[f"{n} {p}" for n, p in cols], "total s", "Pareto"]]
    for r in rows:
        table.append([r["job"], r["status"], " ".join(f"`{o}`" for o in r["overrides"] if o not in common) or "-",
                      str(r.get("method") or "-"), str(r.get("bit") or "-"),
                      str(r.get("group_size")) if r.get("granularity") == "per_group" else str(r.get("granularity")),
                      f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") is not None else "-",
                      *[f"{r['ppl'][n][p]:.4f}" if p in r["ppl"].get(n, {}) else "-" for n, p in cols],
                      f"{r['total_s']:.1f}" if r.get("total_s") is not None else "-",
                      "yes" if r.get("pareto") else ""])
    md = [f"# Sweep summary: {sweep_dir}", "",
          f"{summary['n_ok']} finished, {summary['n_failed']} failed, of {summary['n_jobs']} jobs.", ""]
    if common:
        md += ["Overrides of every job: " + " ".join(f"`{o}`" for o in common), ""]
    md += [_md_table(table), ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        md += ["## Failed jobs", ""]
        for r in failed:
            err = r["error"] if len(r["error"]) <= 400 else r["error"][:400] + " ..."
            own = " ".join(o for o in r["overrides"] if o not in common)
            md.append(f"- job {r['job']} (`{own}`): {err} (logs in `{r['dir']}`)")
        md.append("")
    md += ["## PPL vs bits per weight", ""]
    md += ["![pareto](pareto.png)" if not why_not else f"Pareto plot: not written ({why_not}).", ""]
    if pts:
        md += [f"Pareto front ({eval_name}, fake-quant PPL; bits/weight = bit + (16-bit scale [+ bit-wide zero "
               "if asymmetric]) / group_size, per-channel = bit): "
               + ", ".join(f"job {rows[idx[f]]['job']} ({pts[f][0]:.3f} b, {pts[f][1]:.4f})" for f in front), ""]
    _write_atomic(sweep_dir / "summary.md", "\n".join(md))
    return summary


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class SweepSummary(Callback):
    """Hydra callback: summary.json/.md + pareto.png in the sweep dir of a multirun."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @staticmethod
    def _is_multirun(config: Any) -> bool:
        from hydra.types import RunMode

        try:
            return config.hydra.mode == RunMode.MULTIRUN
        except Exception:
            return False

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        out_dir = Path(str(config.hydra.runtime.output_dir))
        if job_return.status == JobStatus.FAILED:
            err = getattr(job_return, "_return_value", None)
            text = "".join(traceback.format_exception(type(err), err, err.__traceback__)) \
                if isinstance(err, BaseException) else repr(err)
            try:
                _write_atomic(out_dir / ERROR_FILE, text)
            except OSError:
                pass
        if self.enabled and self._is_multirun(config):
            self._write(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if self.enabled:
            summary = self._write(Path(str(config.hydra.sweep.dir)))
            if summary is not None:
                log.info("sweep summary: %s/summary.md (%d finished, %d failed)", config.hydra.sweep.dir,
                         summary["n_ok"], summary["n_failed"])

    @staticmethod
    def _write(sweep_dir: Path) -> Optional[Dict[str, Any]]:
        try:
            return write_summary(sweep_dir)
        except Exception as e:  # a summary must never fail the sweep
            log.warning("sweep summary failed: %s", e)
            return None


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m llmc_ray.sweep SWEEP_DIR")
    s = write_summary(Path(argv[0]))
    print(f"{argv[0]}/summary.md: {s['n_ok']} finished, {s['n_failed']} failed")


if __name__ == "__main__":
    main()
