#!/usr/bin/env bash
# Two-GPU scaling (device kind nvidia-h200-x2; carry .whl). One device call per phase:
#   eval    pretrain + warm eval of whole-width models on 1 and 2 GPUs: Qwen2-7B shape (28 blocks, 128 windows
#           of 2048 tokens: about wikitext2-test's size) and Llama-2-70B shape (24 blocks, 64 windows); 2 GPUs
#           with activations through Ray's object store and with direct NCCL sends (dist.transport)
#   calib   parallel calibration on 1 and 2 GPUs (and llmc's sequential schedule on 1): AWQ and GPTQ on 8
#           Qwen2-7B-shape blocks, AWQ on 4 Llama-2-70B-shape blocks
#   sweep   a 4-point GPTQ sweep (w4/w3 x g128/g64) on 8 Qwen2-7B-shape blocks: separate runs on 1 GPU, the
#           pipelined sweep on 1 and 2 GPUs, sequential and parallel schedules
set -uo pipefail
phase=$1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 LLMC_RAY_CACHE=/tmp/llmc_cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi topo -m | head -4
sb() { python3 bench/scale_bench.py "$@" 2>&1 | grep -v '^{' | tail -8; }
if [ "$phase" = eval ]; then
  sb $OUT/eval --eval-windows 128 qwen2-7b:28:RTN:sequential:1
  sb $OUT/eval --eval-windows 128 --transport object_store qwen2-7b:28:RTN:sequential:2
  sb $OUT/eval --eval-windows 128 --transport collective qwen2-7b:28:RTN:sequential:2
  sb $OUT/eval --eval-windows 64 llama2-70b:24:RTN:sequential:1
  sb $OUT/eval --eval-windows 64 --transport collective llama2-70b:24:RTN:sequential:2
  grep -o '"gpu_peak_gib_per_actor": \[[^]]*\]' $OUT/eval/scale.jsonl
fi
if [ "$phase" = calib ]; then
  sb $OUT/calib qwen2-7b:8:Awq:parallel:1 qwen2-7b:8:Awq:parallel:2 qwen2-7b:8:Awq:sequential:1 \
     qwen2-7b:8:GPTQ:parallel:1 qwen2-7b:8:GPTQ:parallel:2 qwen2-7b:8:GPTQ:sequential:1 \
     llama2-70b:4:Awq:parallel:1 llama2-70b:4:Awq:parallel:2
  grep -o '"gpu_peak_gib_per_actor": \[[^]]*\]' $OUT/calib/scale.jsonl
fi
if [ "$phase" = sweep ]; then
  P=(GPTQ 4:128 3:128 4:64 3:64)
  swb() { python3 bench/sweep_bench.py "$@" 2>&1 | tail -6; }
  swb $OUT/s1 synthetic:qwen2-7b:8 1 sequential "${P[@]}"
  swb $OUT/s2 synthetic:qwen2-7b:8 2 sequential "${P[@]}" --pipelined-only
  swb $OUT/p1 synthetic:qwen2-7b:8 1 parallel "${P[@]}" --pipelined-only
  swb $OUT/p2 synthetic:qwen2-7b:8 2 parallel "${P[@]}" --pipelined-only
fi
