#!/usr/bin/env bash
# On the GPU device machine: llmc-ray vs llm-compressor, AWQ and GPTQ w4 g64 asym, SmolLM2-135M, demo tokens,
# bfloat16 for both. Two calls on one warm machine (the two wheel sets do not fit one 64 MiB carry):
#   bench/llmcompressor/gpu_compare.sh llmc-ray       carry [".whl", ".cache/sotu"]; /tmp/stage/smollm2.gguf staged
#   bench/llmcompressor/gpu_compare.sh llmcompressor  carry [".whl-lc", ".lc-tokens"]; uses the HF dir the
#                                                     first call converted from the GGUF (same weights)
# Results land under $OUT (results.json per llmc-ray run, lc_*.json per llm-compressor run); a table is printed.
set -euo pipefail
export LLMC_RAY_CACHE=/tmp/llmc_cache
phase=${1:?llmc-ray or llmcompressor}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case $phase in
llmc-ray)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0
  mkdir -p $LLMC_RAY_CACHE/assets
  cp /tmp/stage/smollm2.gguf $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -rf $LLMC_RAY_CACHE/assets/sotu && cp -r .cache/sotu $LLMC_RAY_CACHE/assets/sotu
  run() { local name=$1; shift; local t0=$SECONDS
          python3 -m llmc_ray +experiment=demo dist=gpu dist.actors=1 model.torch_dtype=bfloat16 run.progress=false \
            save.save_path=$OUT/$name "$@" > $OUT/$name.log 2>&1 || { echo "$name FAILED"; tail -20 $OUT/$name.log; }
          echo "$name wall $((SECONDS - t0)) s"; }
  # llm-compressor has no AWQ clip search, and propagates unquantized (smoothed fp) outputs during AWQ
  run ray_awq_matched quant=awq quant.special.weight_clip=false quant.quant_out=false
  run ray_awq_default quant=awq
  # llm-compressor's group qparams always come from the weight before GPTQ's updates (static groups)
  run ray_gptq_matched quant=gptq quant.special.static_groups=true
  run ray_gptq_layer quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  run ray_gptq_default quant=gptq
  ls -d $LLMC_RAY_CACHE/gguf/*/ ;;
llmcompressor)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-lc .whl-lc/*.whl
  export PYTHONPATH=/tmp/site-lc:$PWD
  python3 -c "import numpy, torch, transformers, llmcompressor, datasets; print('numpy', numpy.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__)"
  model=$(ls -d $LLMC_RAY_CACHE/gguf/SmolLM2-135M-Instruct*/ | head -1)
  run() { local name=$1; shift; local t0=$SECONDS
          python3 bench/llmcompressor/run_llmcompressor.py --model "$model" --calib .lc-tokens/calib.pt \
            --eval .lc-tokens/eval.pt --bits 4 --group-size 64 --asymmetric --device cuda --dtype bfloat16 \
            --out $OUT/$name.json "$@" > $OUT/$name.log 2>&1 || { echo "$name FAILED"; tail -20 $OUT/$name.log; }
          echo "$name wall $((SECONDS - t0)) s"; }
  run lc_awq --method awq
  run lc_gptq_matched --method gptq --sequential-targets Linear  # one subgraph per linear = true-sequential
  run lc_gptq_layer --method gptq                                # llm-compressor's default: one per decoder layer
  ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
python3 - <<'PY'
import glob, json, os
out = os.environ["OUT"]
for f in sorted(glob.glob(out + "/*/results.json")):
    r = json.load(open(f)); e = r["eval"]["custom"]; t = r["timings_s"]
    mem = max((m.get("gpu_peak_bytes", 0) for m in r.get("memory", [])), default=0)
    print(f"{f.split('/')[-2]:18s} pretrain {e.get('pretrain', 0):.4f} quant {e.get('fake_quant', 0):.4f} "
          f"calibrate_s {t.get('calibrate', 0):.1f} total_s {t.get('total', 0):.1f} gpu_peak_GiB {mem / 2**30:.2f}")
for f in sorted(glob.glob(out + "/lc_*.json")):
    r = json.load(open(f))
    print(f"{os.path.basename(f)[:-5]:18s} pretrain {r['pretrain_ppl']:.4f} quant {r['quant_ppl']:.4f} "
          f"oneshot_s {r['oneshot_s']:.1f} total_s {r['total_s']:.1f} gpu_peak_GiB {r['gpu_peak_bytes'] / 2**30:.2f}")
PY
