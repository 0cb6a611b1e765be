"""Run a test script under Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before triton compiles
anything, so the script runs in a child process and prints OK at its end."""
import os
import subprocess
import sys


def run_interpreted(script: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
