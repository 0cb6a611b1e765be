"""Ray Jobs plumbing shared by the `ray_jobs` Hydra launcher and scripts/submit.py.

A Ray Job runs `python -m llmc_ray <overrides>` as its own driver process on the cluster, with this project's
directory shipped as the job's working_dir (so the cluster runs the code you have, not what it has installed).
Outputs are written where `hydra.run.dir` / `save.save_path` point *on the cluster*: for a local head that is
this machine's disk; on a real cluster it must be storage every node and you can reach (NFS, a bucket mount).
Imports Ray lazily: Hydra imports the launcher plugin on every start.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

#: gitignore-style, on top of the project's .gitignore and .rayignore (Ray honours both in working_dir);
#: anchored with "/" where a bare name would also hit conf/save/ and the like
DEFAULT_EXCLUDES = [".git/", "/.venv/", "/venv/", "/outputs/", "/multirun/", "/save/", "__pycache__/", "*.pyc",
                    ".pytest_cache/", "*.egg-info/"]
RESULTS_MARKER = "@@llmc_ray.results@@"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def project_dir() -> Path:
    """The directory that holds llmc_ray/ and conf/: what a job ships as its working_dir."""
    return Path(__file__).resolve().parents[2]


def use_token_if_available() -> None:
    """Token-authenticated clusters (Ray's default for new clusters) need the token on every request, and a
    client sends it only with RAY_AUTH_MODE=token. Turn that on when the user left the mode unset and a token
    is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): what `ray start` itself does."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if not (os.environ.get("RAY_AUTH_TOKEN") or path.is_file()):
        return
    try:  # Ray caches the mode at import; its own switch sets the env var and refreshes the cache
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:
        os.environ["RAY_AUTH_MODE"] = "token"
    else:
        _enable_token_auth()


def job_client(address: Optional[str]):
    """JobSubmissionClient for a dashboard address (http://head:8265); None: RAY_API_SERVER_ADDRESS/RAY_ADDRESS."""
    use_token_if_available()
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit(f"the Ray Jobs client needs ray[default] (pip install 'llmc-ray[cluster]'): {e}")
    # after Ray's import, which sets its logger up: Ray's client logs every packaging step at INFO ("Ignoring
    # upload to cluster for these files ...") and says on each start that .git is not uploaded
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):  # own levels
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(_drop_default_exclude_notice)
    return JobSubmissionClient(address)


def _drop_default_exclude_notice(record: logging.LogRecord) -> bool:
    return "is now ignored by default" not in str(record.msg)


def runtime_env(working_dir: Optional[str] = None, excludes: Optional[Sequence[str]] = None,
                env_vars: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    env: Dict[str, Any] = {"working_dir": str(Path(working_dir or project_dir()).resolve()),
                           "excludes": list(DEFAULT_EXCLUDES if excludes is None else excludes)}
    if env_vars:
        env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    return env


def hydra_quote(value: str) -> str:
    """A value as a Hydra single-quoted string (paths with spaces, commas, '=' stay one value)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def entrypoint(python: str, overrides: Sequence[str], run_dir: str, emit_results: bool = False) -> str:
    """The shell command a job runs: one llmc_ray run into `run_dir` (an absolute path on the cluster)."""
    args = [*overrides, f"hydra.run.dir={hydra_quote(run_dir)}"]
    cmd = f"{shlex.quote(python)} -m llmc_ray " + " ".join(shlex.quote(a) for a in args)
    if emit_results:  # print results.json into the job's log, so a client without shared storage gets it too
        cmd += f" && {shlex.quote(python)} -m llmc_ray.launchers.jobs emit {shlex.quote(str(run_dir))}"
    return cmd


def results_from_logs(logs: str) -> Optional[Dict[str, Any]]:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULTS_MARKER):
            return json.loads(line[len(RESULTS_MARKER):])
    return None


async def tail(client, job_id: str, write: Callable[[str], None], prefix: str = "") -> None:
    """Stream a job's log lines to `write` until the job ends."""
    buf = ""
    async for chunk in client.tail_job_logs(job_id):
        buf += chunk
        *lines, buf = buf.split("\n")
        for ln in lines:
            if not ln.startswith(RESULTS_MARKER):
                write(prefix + ln)
    if buf and not buf.startswith(RESULTS_MARKER):
        write(prefix + buf)


async def wait(client, job_id: str, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal state; return it (SUCCEEDED, FAILED or STOPPED)."""
    while True:
        status = str(await asyncio.to_thread(client.get_job_status, job_id))
        status = status.split(".")[-1]  # JobStatus.SUCCEEDED or SUCCEEDED, by Ray version
        if status in TERMINAL:
            return status
        await asyncio.sleep(poll_s)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _emit(run_dir: str) -> None:
    res = json.loads((Path(run_dir) / "results.json").read_text())
    print(RESULTS_MARKER + json.dumps(res), flush=True)


def new_submission_id(tag: str = "") -> str:
    return f"llmc_ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}{('-' + tag) if tag else ''}"


if __name__ == "__main__":  # `python -m llmc_ray.launchers.jobs emit RUN_DIR` (run inside a job)
    if len(sys.argv) == 3 and sys.argv[1] == "emit":
        _emit(sys.argv[2])
    else:
        sys.exit("usage: python -m llmc_ray.launchers.jobs emit RUN_DIR")
