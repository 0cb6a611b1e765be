#!/usr/bin/env bash
# Multi-GPU scaling (device kinds nvidia-h200-x2, or x4 with ACTORS="1 2 4"; carry .whl). One device call per
# phase, each case on 1 GPU and on every actor count of ACTORS (default "1 2"):
#   eval    pretrain + warm eval of whole-width models: Qwen2-7B shape (28 blocks, 128 windows of 2048 tokens:
#           about wikitext2-test's size) and Llama-2-70B shape (24 blocks, 64 windows); with more than one GPU,
#           activations by direct NCCL sends and, for the 7B shape, through Ray's object store
#   calib   parallel calibration (and llmc's sequential schedule on 1 GPU): AWQ and GPTQ on 8 Qwen2-7B-shape
#           blocks, AWQ on 4 Llama-2-70B-shape blocks
#   moe     GPTQ on 4 DeepSeek-V2-Lite-shape blocks (1 dense + 3 MoE), sequential: 1 GPU, and every other
#           actor count with each MoE block's experts spread over all actors (dist.spread_experts)
#   sweep   a 4-point GPTQ sweep (w4/w3 x g128/g64) on 8 Qwen2-7B-shape blocks: separate runs on 1 GPU, the
#           pipelined sweep on each actor count, sequential and parallel schedules
set -uo pipefail
phase=$1
ACTORS=${ACTORS:-"1 2"}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 LLMC_RAY_CACHE=/tmp/llmc_cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
sb() { python3 bench/scale_bench.py "$@" 2>&1 | grep -v '^{' | tail -4; }
if [ "$phase" = eval ]; then
  for n in $ACTORS; do
    sb $OUT/eval --eval-windows 128 --transport collective qwen2-7b:28:RTN:sequential:$n
    [ "$n" -gt 1 ] && sb $OUT/eval --eval-windows 128 --transport object_store qwen2-7b:28:RTN:sequential:$n
    sb $OUT/eval --eval-windows 64 --transport collective llama2-70b:24:RTN:sequential:$n
  done
  grep -o '"case": "[^"]*"\|"gpu_peak_gib_per_actor": \[[^]]*\]' $OUT/eval/scale.jsonl | paste - -
fi
if [ "$phase" = calib ]; then
  cases=(qwen2-7b:8:Awq:sequential:1 qwen2-7b:8:GPTQ:sequential:1)
  for n in $ACTORS; do  # the parallel schedule's capture goes by NCCL sends (--transport collective)
    cases+=(qwen2-7b:8:Awq:parallel:$n qwen2-7b:8:GPTQ:parallel:$n llama2-70b:4:Awq:parallel:$n)
  done
  sb $OUT/calib --transport collective "${cases[@]}"
  python3 - <<'PY'
import json, os
for line in open(os.environ["OUT"] + "/calib/scale.jsonl"):
    r = json.loads(line)
    print(f"| {r['case']} | {r['wall_s']} | {r['calibrate_s']} | {r['block_median_s']} | "
          f"{r['gpu_peak_gib_per_actor']} | {r['actor_host_peak_gib']} | {r['driver_host_peak_gib']} |")
PY
fi
if [ "$phase" = moe ]; then
  for n in $ACTORS; do
    if [ "$n" = 1 ]; then sb $OUT/moe deepseek-v2-lite:4:GPTQ:sequential:1:16:64
    else sb $OUT/moe --spread-experts deepseek-v2-lite:4:GPTQ:sequential:$n:16:64; fi
  done
fi
if [ "$phase" = sweep ]; then
  P=(GPTQ 4:128 3:128 4:64 3:64)
  swb() { python3 bench/sweep_bench.py --transport=collective "$@" 2>&1 | tail -6; }
  for n in $ACTORS; do
    [ "$n" = 1 ] && swb $OUT/s1 synthetic:qwen2-7b:8 1 sequential "${P[@]}" \
                 || swb $OUT/s$n synthetic:qwen2-7b:8 $n sequential "${P[@]}" --pipelined-only
    swb $OUT/p$n synthetic:qwen2-7b:8 $n parallel "${P[@]}" --pipelined-only
  done
fi
