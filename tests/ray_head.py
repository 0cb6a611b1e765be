"""A throwaway local Ray head with the dashboard (the Jobs API lives in it), for the launcher/submit tests.

Started as `ray start --head --block` in its own process group, on free ports and in its own temp dir, so it
neither collides with another Ray on this machine nor gets picked up by a plain `ray.init()`
(/tmp/ray/ray_current_cluster is not touched). Stopped by SIGTERM to the `ray start` process it started (then
its process group, by id, for stragglers): `ray stop` would end every Ray on the machine, other sessions' too.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, num_cpus: int = 2, timeout_s: float = 90, auth: str = "token"):
        ray_bin = Path(sys.executable).with_name("ray")
        # short: Ray puts unix sockets under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
        ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                                 "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                 "metrics-export-port", "ray-client-server-port")}
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        self.address = f"http://127.0.0.1:{ports['dashboard-port']}"
        # token auth, as a new cluster has by default; the token is the machine's ~/.ray/auth_token
        self.env = dict(os.environ, RAY_AUTH_MODE=auth, RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        has_token = Path("~/.ray/auth_token").expanduser().is_file() or "RAY_AUTH_TOKEN" in self.env
        if auth == "token" and not has_token:
            subprocess.run([str(ray_bin), "get-auth-token", "--generate"], env=self.env, check=True,
                           capture_output=True, timeout=60)
        cmd = [str(ray_bin), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats"] + [f"--{k}={v}" for k, v in ports.items()]
        self.log_path = Path(self.temp_dir) / "ray_start.log"
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        from llmc_ray.launchers.jobs import job_client

        t_end = time.time() + timeout_s
        err = None
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:  # the Jobs API answers once the dashboard is up
                job_client(self.address).list_jobs()
                return
            except Exception as e:  # not up yet
                err = e
            time.sleep(1)
        log = self.log_path.read_text()[-3000:]
        self.stop()
        raise RuntimeError(f"Ray head's Jobs API not up in {timeout_s}s ({err}):\n{log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` drains and stops the processes it started on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # anything of this head still alive (a worker that outlived the drain): its group, by id
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
