#!/usr/bin/env bash
# Run on the GPU device machine (see ../shared/device/README.md): SmolLM2-135M + SOTU text through the same
# Ray actors the CPU runs, on 1 and 2 GPU actors. Expects the GGUF assembled at /tmp/stage/smollm2.gguf and the
# carried paths .whl (Ray/Hydra wheels) and .cache/sotu (the text). Results land under $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0
export LLMC_RAY_CACHE=/tmp/llmc_cache
mkdir -p $LLMC_RAY_CACHE/assets
sha256sum /tmp/stage/smollm2.gguf
cp /tmp/stage/smollm2.gguf $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf $LLMC_RAY_CACHE/assets/sotu && cp -r .cache/sotu $LLMC_RAY_CACHE/assets/sotu
nvidia-smi --query-gpu=name,memory.total --format=csv
run() { local name=$1; shift; local t0=$SECONDS
        python3 -m llmc_ray run.progress=false save.save_path=$OUT/$name "$@" > $OUT/$name.log 2>&1 \
          || { echo "$name FAILED"; tail -20 $OUT/$name.log; }
        echo "$name wall $((SECONDS - t0)) s"; }
# 1) the CPU demo's exact settings (AWQ w4 g64, 8x512 calib, 8x1024 eval) on 1 and 2 GPU actors
run demo_gpu1 +experiment=demo dist=gpu dist.actors=1
run demo_gpu2 +experiment=demo dist=gpu dist.actors=2
# 2) llmc's settings (128x512 calib) with the full 2000-2021 eval text, 2 GPU actors
for bit in 4 3; do
  for q in rtn awq gptq; do
    run full_${q}_w${bit} +experiment=demo dist=gpu dist.actors=2 quant=$q quant.weight.bit=$bit \
        quant.weight.group_size=64 calib.n_samples=128 eval.seq_len=2048 eval.num_samples=null \
        "eval.eval_pos=[pretrain,fake_quant]"
  done
done
python3 - <<'PY'
import json, os, glob
for f in sorted(glob.glob(os.environ["OUT"] + "/*/results.json")):
    r = json.load(open(f)); e = r["eval"]["custom"]; t = r["timings_s"]
    print(f.split("/")[-2], {k: round(v, 4) for k, v in e.items()}, "calib_s", t.get("calibrate"), "total_s", t.get("total"))
PY
