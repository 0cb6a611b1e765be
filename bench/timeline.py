"""Where a whole run's wall time goes, task by task: one `python -m llmc_ray` run in this process, then Ray's
task timeline (every actor call with its start and duration) printed relative to the run's start.

    python bench/timeline.py OUT_JSON [hydra overrides ...]

e.g. `python bench/timeline.py /tmp/t.json model.path=synthetic:qwen2-7b:4 quant=gptq dist=gpu dist.actors=1`.
Prints the stage timings of the run, then every actor task of >= 5 ms (start, duration, name), and writes the
raw Chrome-trace events to OUT_JSON (open in chrome://tracing or Perfetto). Gaps between a block's task and
the next one are driver or Ray overhead; `flush_checkpoints` is the wait for the last background write.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# actors are killed at the end of a run: they must have sent their task events by then (default: every 1 s)
os.environ.setdefault("RAY_task_events_report_interval_ms", "50")
import ray  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from llmc_ray.config import from_hydra, register_configs  # noqa: E402
from llmc_ray.run import format_table, run  # noqa: E402


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    results = run(from_hydra(cfg))
    print(format_table(results))
    print("blocks_s:", [round(b["seconds"], 2) for b in results["blocks"]])
    time.sleep(3)  # workers report task events to the GCS about once a second
    events = ray.timeline()
    out.write_text(json.dumps(events))
    # whole actor calls only (their execute / deserialize / store sub-phases are named "task:...")
    tasks = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) >= 5000 and not e["name"].startswith("task:")]
    if not tasks:
        return
    t0 = min(e["ts"] for e in tasks)
    print(f"{'start s':>8} {'dur s':>7}  task")
    for e in sorted(tasks, key=lambda e: e["ts"]):
        print(f"{(e['ts'] - t0) / 1e6:8.3f} {e['dur'] / 1e6:7.3f}  {e.get('cat', '')}:{e['name']}")
    # per call kind and per sub-phase (argument fetch, execute, storing outputs): count, median, total
    by: dict = {}
    for e in events:
        if e.get("ph") == "X":
            by.setdefault(e["name"], []).append(e.get("dur", 0) / 1e6)
    print(f"\n{'calls':>6} {'median s':>9} {'total s':>8}  name")
    for name, d in sorted(by.items(), key=lambda kv: -sum(kv[1])):
        if sum(d) >= 0.05:
            print(f"{len(d):6d} {sorted(d)[len(d) // 2]:9.4f} {sum(d):8.3f}  {name}")


if __name__ == "__main__":
    main()
