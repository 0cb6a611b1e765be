"""Run one llmc_ray job on an existing Ray cluster through the Ray Jobs API, and bring its results back.

    python scripts/submit.py --address http://HEAD:8265 -- +experiment=demo quant.weight.bit=3

Ships this project directory as the job's working_dir (so the cluster runs your code and conf/), runs
`python -m llmc_ray <overrides> hydra.run.dir=<output dir>` as the job's driver, streams its log here, and at
the end writes into --download (default outputs/submit/<job id>/ here): results.json (carried back through
the job's log, so it works without shared storage), job.log, and the report (copied from the output dir when
this machine sees it, else rebuilt from results.json). Exit status: 0 when the job succeeded.

The output dir is a path *on the cluster*. For a local head it is this disk; on a real cluster point
--output-dir (and so save.save_path, transformed_model/, fake_quant_model/) at storage shared by the nodes and
you. Model and data paths in the overrides are read on the cluster, too. Ctrl-C stops following the log; the
job keeps running (`ray job logs -f ID`, `ray job stop ID`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llmc_ray.launchers import jobs  # noqa: E402

REPORT_FILES = ("report.md", "report.html", "block_error.png")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="everything after -- goes to `python -m llmc_ray` as Hydra overrides")
    ap.add_argument("--address", default=None,
                    help="the cluster's dashboard, e.g. http://head:8265 (default: RAY_API_SERVER_ADDRESS / "
                         "RAY_ADDRESS)")
    ap.add_argument("--output-dir", default=None,
                    help="where the job writes, on the cluster (default: ./outputs/submit/<job id>, absolute)")
    ap.add_argument("--download", default=None, help="where results come back here (default: the output dir's "
                                                     "path, or ./outputs/submit/<job id>)")
    ap.add_argument("--python", default="python", help="the cluster's interpreter with llmc_ray's dependencies")
    ap.add_argument("--working-dir", default=None, help="shipped with the job (default: this project)")
    ap.add_argument("--job-id", default=None, help="submission id (default: llmc_ray-<time>-<random>)")
    ap.add_argument("--no-wait", action="store_true", help="submit and return; follow with `ray job logs -f`")
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    client = jobs.job_client(args.address)
    sid = args.job_id or jobs.new_submission_id()
    out = args.output_dir or str((Path("outputs") / "submit" / sid).resolve())
    cmd = jobs.entrypoint(args.python, args.overrides, out, emit_results=True)
    client.submit_job(entrypoint=cmd, runtime_env=jobs.runtime_env(args.working_dir), submission_id=sid,
                      entrypoint_num_cpus=0, metadata={"llmc_ray": "submit.py"})
    print(f"submitted Ray job {sid}; it writes to {out} on the cluster", flush=True)
    if args.no_wait:
        print(f"follow: ray job logs -f {sid}   stop: ray job stop {sid}")
        return 0
    try:
        asyncio.run(jobs.tail(client, sid, lambda ln: print(ln, flush=True)))
        status = asyncio.run(jobs.wait(client, sid))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sid} keeps running (ray job logs -f {sid} / ray job stop {sid})")
        return 130
    logs = client.get_job_logs(sid)
    dl = Path(args.download or out)
    dl.mkdir(parents=True, exist_ok=True)
    (dl / "job.log").write_text(logs)
    res = jobs.results_from_logs(logs)
    if res is not None:
        (dl / "results.json").write_text(json.dumps(res, indent=2))
        src = Path(out)
        if src.resolve() != dl.resolve() and (src / "report.md").is_file():  # shared storage: the job's own report
            for name in REPORT_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, dl / name)
        elif not (dl / "report.md").is_file():
            from llmc_ray.report import write_report

            write_report(res, dl)
    info = client.get_job_info(sid)
    why = (info.message or "").strip().splitlines()[:1] if status != "SUCCEEDED" else []
    print(f"job {sid}: {status}" + (f" ({why[0]})" if why else ""))
    print(f"downloaded to {dl}: " + ", ".join(sorted(p.name for p in dl.iterdir() if p.is_file())))
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
