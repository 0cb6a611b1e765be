#!/usr/bin/env bash
# Prove that .whl-lc's package set is enough: build the same set for this machine's Python (PYVER=3.11 via
# pack.sh), install it the way the device does (--no-index --no-deps --target, PYTHONPATH) over a venv that has
# only torch + transformers and their dependencies (so no auto-round, py-cpuinfo, pillow, datasets, ...), then
# run AWQ and GPTQ through run_llmcompressor.py on MODEL (a small HF dir) with a few calibration/eval rows.
# Usage: bench/llmcompressor/verify_min_env.sh MODEL CALIB.pt EVAL.pt [VENV]
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
model=$1; calib=$2; evalt=$3; venv=${4:-/work/venv-lc-min}
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv"; "$venv/bin/pip" install -q torch==2.13.0 transformers==5.17.0; }
whl=$(mktemp -d); site=$(mktemp -d); trap 'rm -rf "$whl" "$site"' EXIT
PYVER=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') bench/llmcompressor/pack.sh "$whl" | tail -1
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$whl"/*.whl
for pkg in auto_round cpuinfo PIL; do  # really absent
  ! PYTHONPATH="$site" "$venv/bin/python" -c "import $pkg" 2>/dev/null || { echo "$pkg is importable" >&2; exit 1; }
done
for m in awq gptq; do
  PYTHONPATH="$site:$PWD" "$venv/bin/python" - "$model" "$calib" "$evalt" "$m" <<'PY'
import sys
sys.argv[0] = "run_llmcompressor.py"
model, calib, evalt, method = sys.argv[1:]
sys.path.insert(0, "bench/llmcompressor")
import run_llmcompressor as r
res = r.main(["--model", model, "--calib", calib, "--eval", evalt, "--method", method, "--device", "cpu",
              "--out", f"/tmp/verify_min_{method}.json"])
loaded = sorted({m.split(".")[0] for m in sys.modules})
bad = [p for p in ("auto_round", "cpuinfo", "PIL") if p in loaded]
assert not bad, bad
print(f"OK {method}: quant PPL {res['quant_ppl']:.3f}, check {res['quant_check']}; "
      f"pyarrow/pandas/datasets loaded: {[p for p in ('pyarrow', 'pandas', 'datasets') if p in loaded]}")
PY
done
