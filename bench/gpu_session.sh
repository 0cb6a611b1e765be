#!/usr/bin/env bash
# One GPU session of benchmarks (device tool, one GPU). Phases, one device call each, run back to back on a
# warm machine (it keeps /tmp between calls):
#   stage N   carry .stage/NN: append chunk NN of the SmolLM2 GGUF to /tmp/stage/smollm2.gguf
#   ours      carry .whl .cache/sotu: dumps the SmolLM2 tokens for llm-compressor, llmc-ray AWQ/GPTQ on SmolLM2
#             (default and matched settings), block_profile.py with and without micro-batch merging
#   ours7b    carry .whl .cache/sotu: FLOP floor, llmc-ray on a 4-block Qwen2-7B-shape
#             model (also written to /tmp/cmp/q7b${D} for llm-compressor)
#   verify    carry .whl .cache/sotu: SmolLM2 AWQ/GPTQ rows again, GPTQ without merging at bs=32, 7B-shape blocks
#   triton    carry .whl .cache/sotu: GPTQ's column sweep eager / CUDA graph / fused Triton (solver alone, one
#             block, and the SmolLM2 GPTQ rows with each)
#   q7        carry .whl .cache/sotu: the llmc-ray side of ours7b alone (no materialized copy)
#   timeline  carry .whl: write speed of one 7B block's checkpoint to $OUT and /tmp, then Ray task timelines
#             (bench/timeline.py) of the 7B-shape matched runs: what the calibrate stage spends outside blocks
#   awqk      carry .whl (.cache/sotu and a staged GGUF for the SmolLM2 rows): block profiles of AWQ and GPTQ
#             at 7B shape, timelines of the 7B-shape matched/default runs, SmolLM2 AWQ/GPTQ PPL
#   full7b    carry .whl: DEPTH=28 for the whole Qwen2-7B shape: ours matched AWQ and GPTQ on it (and GPTQ without
#             block checkpoints); DEPTH=28 ONLY7B=1 BS=32 ... theirs writes the same model for llm-compressor itself
#   more      carry .whl .cache/sotu: MoE (DeepSeek-V2-Lite shape) blocks, pipelined sweep vs separate runs
#   gram      carry .whl .cache/sotu (and a staged GGUF for the SmolLM2 rows): AWQ with the search loss of
#             o_proj/down_proj from the Gram matrix vs a forward per ratio: 7B-shape block profiles, SmolLM2 PPL
#   gram_full7b carry .whl: DEPTH=28: the whole Qwen2-7B shape, AWQ matched, as full7b (Gram losses on)
#   theirs    carry .whl-lc: llm-compressor AWQ/GPTQ on the same two models and tokens (BS=32 bash ...: 32 rows
#             a forward instead of its default 1)
set -uo pipefail
phase=$1
D=${DEPTH:-4}  # blocks of the Qwen2-7B-shape model of the 7B rows (DEPTH=28: the whole model)
q7_tokens() { D=$D python3 - <<'PY'
import torch, os
from llmc_ray.synthetic import synthetic_tokens, ARCHS
d = f"/tmp/cmp/q7b{os.environ['D']}_tok"
os.makedirs(d, exist_ok=True)
v = ARCHS["qwen2-7b"]["vocab_size"]
torch.save(synthetic_tokens(128, 512, v, 42), f"{d}/calib.pt")  # = the run's calib tokens
torch.save(synthetic_tokens(4, 2048, v, 43), f"{d}/eval.pt")
PY
}
mkdir -p /tmp/stage /tmp/cmp
if [ "$phase" = stage ]; then cat .stage/$2/* >> /tmp/stage/smollm2.gguf; ls -la /tmp/stage; exit 0; fi
if [ "$phase" = theirs ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-lc .whl-lc/*.whl || exit 1
  export PYTHONPATH=/tmp/site-lc:$PWD
  BS=${BS:-1}  # calibration rows per forward (llm-compressor's default 1)
  lc() { local name=${1}_bs$BS; shift; local t0=$SECONDS
         python3 bench/llmcompressor/run_llmcompressor.py --bits 4 --asymmetric --device cuda --dtype bfloat16 \
           --batch-size $BS --out $OUT/$name.json "$@" > $OUT/$name.log 2>&1 || { echo "$name FAILED"; tail -20 $OUT/$name.log; }
         echo "$name wall $((SECONDS - t0)) s"; }
  SMOL=(--model /tmp/cmp/smol_hf --calib /tmp/cmp/smol/calib.pt --eval /tmp/cmp/smol/eval.pt --group-size 64)
  Q7=(--model /tmp/cmp/q7b${D} --calib /tmp/cmp/q7b${D}_tok/calib.pt --eval /tmp/cmp/q7b${D}_tok/eval.pt --group-size 128)
  if [ -z "${ONLY7B:-}" ]; then  # ONLY7B=1: the 7B-shape runs alone
    lc lc_smol_awq "${SMOL[@]}" --method awq
    lc lc_smol_gptq_matched "${SMOL[@]}" --method gptq --sequential-targets Linear
    lc lc_smol_gptq_layer "${SMOL[@]}" --method gptq
  fi
  if [ -n "${ONLY7B:-}" ] && [ ! -d /tmp/cmp/q7b${D} ]; then  # a fresh machine: write the model and tokens here
    python3 bench/materialize_synthetic.py qwen2-7b $D /tmp/cmp/q7b${D} | tail -1; q7_tokens
  fi
  [ -d /tmp/cmp/q7b${D} ] && lc lc_q7b${D}_awq "${Q7[@]}" --method awq
  [ -d /tmp/cmp/q7b${D} ] && lc lc_q7b${D}_gptq_layer "${Q7[@]}" --method gptq
  python3 - <<'PY'
import glob, json, os
for f in sorted(glob.glob(os.environ["OUT"] + "/lc_*.json")):
    r = json.load(open(f))
    print(f"{os.path.basename(f)[:-5]:22s} pretrain {r['pretrain_ppl']:.4f} quant {r['quant_ppl']:.4f} "
          f"oneshot_s {r['oneshot_s']:.1f} total_s {r['total_s']:.1f} gpu_peak_GiB {r['gpu_peak_bytes'] / 2**30:.2f}")
PY
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 LLMC_RAY_CACHE=/tmp/llmc_cache
mkdir -p $LLMC_RAY_CACHE/assets
[ -f $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp /tmp/stage/smollm2.gguf $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf
[ -d $LLMC_RAY_CACHE/assets/sotu ] || cp -r .cache/sotu $LLMC_RAY_CACHE/assets/sotu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ours() { local name=$1; shift; local t0=$SECONDS
         python3 -m llmc_ray run.progress=false save.save_path=$OUT/$name "$@" > $OUT/$name.log 2>&1 \
           || { echo "$name FAILED"; tail -20 $OUT/$name.log; }
         echo "$name wall $((SECONDS - t0)) s"; }
# the SmolLM2 runs: the demo model and text, bf16, 128 calibration samples, every eval window of 2048
SMOL=(+experiment=demo model.torch_dtype=bfloat16 calib.n_samples=128 eval.seq_len=2048 eval.num_samples=null)
summary() { python3 - <<'PY'
import json, os, glob
for f in sorted(glob.glob(os.environ["OUT"] + "/*/results.json")):
    r = json.load(open(f)); e = next(iter(r["eval"].values()), {}); t = r["timings_s"]
    mem = max((m.get("gpu_peak_bytes", 0) for m in r.get("memory", [])), default=0)
    print(f"{f.split('/')[-2]:22s}", {k: round(v, 4) for k, v in e.items()}, "calibrate_s", t.get("calibrate"),
          "total_s", t.get("total"), f"gpu_peak_GiB {mem / 2**30:.2f}", "blocks_s",
          [round(b["seconds"], 2) for b in r.get("blocks", [])][:8])
PY
}
if [ "$phase" = ours ]; then
  # tokens for llm-compressor: the very ones llmc-ray uses (this also converts the GGUF to an HF dir)
  [ -f /tmp/cmp/smol/calib.pt ] || python3 bench/llmcompressor/dump_tokens.py --out /tmp/cmp/smol "${SMOL[@]}" || exit 1
  ln -sfn "$(ls -d $LLMC_RAY_CACHE/gguf/SmolLM2*/ | head -1)" /tmp/cmp/smol_hf
  E=(dist=gpu dist.actors=1 "eval.eval_pos=[pretrain,fake_quant]")
  ours smol_awq "${SMOL[@]}" "${E[@]}" quant=awq
  ours smol_awq_matched "${SMOL[@]}" "${E[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false
  ours smol_gptq "${SMOL[@]}" "${E[@]}" quant=gptq
  ours smol_gptq_matched "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true
  # llm-compressor's default GPTQ: one Hessian pass per decoder layer (not true-sequential)
  ours smol_gptq_layer "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  summary
  # where a block's time goes, micro-batches merged (the default) or not
  for m in 65536 0; do for q in Awq GPTQ; do
    python3 bench/block_profile.py synthetic:smollm2-135m:30 $q 1 --blocks 4 --merge-tokens $m 2>&1 | tail -12
  done; done > $OUT/block_profile.md
fi
if [ "$phase" = verify ]; then  # after the data-movement and sync changes: SmolLM2 rows again, 7B-shape blocks
  E=(dist=gpu dist.actors=1 "eval.eval_pos=[pretrain,fake_quant]")
  ours v_smol_awq "${SMOL[@]}" "${E[@]}" quant=awq
  ours v_smol_gptq_matched "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true
  ours v_smol_gptq_layer "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  # the same GPTQ on 32-sample forwards without merging (llm-compressor's bs=32 chunking): how far rounding moves PPL
  ours v_smol_gptq_matched_bs32 "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true calib.bs=32 calib.merge_tokens=null
  summary
  python3 bench/block_profile.py synthetic:smollm2-135m:30 GPTQ 1 --blocks 4 --special true_sequential=false 2>&1 | tail -9
  python3 bench/scale_bench.py $OUT/scale qwen2-7b:4:Awq:sequential:1 qwen2-7b:4:GPTQ:sequential:1 2>&1 | tail -4
fi
if [ "$phase" = batched ]; then  # the same SmolLM2 runs with 32 calibration samples per forward
  python3 bench/gptq_sweep_bench.py 2>&1 | tee $OUT/gptq_sweep.md
  for a in qwen2-7b llama2-70b; do python3 bench/flop_floor.py $a 2>&1 | tail -3; done | tee $OUT/flop_floor.txt
  E=(dist=gpu dist.actors=1 "eval.eval_pos=[pretrain,fake_quant]" calib.bs=32)
  ours smol_awq_bs32 "${SMOL[@]}" "${E[@]}" quant=awq
  ours smol_gptq_matched_bs32 "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true
  summary
fi
Q7=(model.path=synthetic:qwen2-7b:$D model.torch_dtype=bfloat16 calib.n_samples=128 calib.seq_len=512
    calib.bs=16 eval.seq_len=2048 eval.num_samples=4 "eval.eval_pos=[fake_quant]" quant.weight.group_size=128 dist=gpu dist.actors=1)
if [ "$phase" = q7 ]; then  # the 7B-shape rows alone (llmc-ray side)
  ours q7b${D}_awq "${Q7[@]}" quant=awq
  ours q7b${D}_awq_matched "${Q7[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false
  ours q7b${D}_awq_matched_noresume "${Q7[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false save.resume=false
  ours q7b${D}_gptq "${Q7[@]}" quant=gptq
  ours q7b${D}_gptq_matched "${Q7[@]}" quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  summary
fi
if [ "$phase" = timeline ]; then
  python3 - <<'PY'
import os, time, torch
from safetensors.torch import save_file
from llmc_ray.checkpoint import Checkpoint, resolve_model_dir
ck = Checkpoint(resolve_model_dir("synthetic:qwen2-7b:1"))
sd = ck.load_prefix("model.layers.0", device=torch.device("cuda"), dtype=torch.bfloat16)
gb = sum(t.numel() * t.element_size() for t in sd.values()) / 2**30
for d in (os.environ["OUT"], "/tmp"):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    host = {k: v.cpu().contiguous() for k, v in sd.items()}
    t1 = time.perf_counter()
    save_file(host, f"{d}/blk.safetensors")
    t2 = time.perf_counter()
    os.sync(); t3 = time.perf_counter()
    print(f"{d}: {gb:.2f} GiB block, host copy {t1 - t0:.3f} s, save_file {t2 - t1:.3f} s, sync {t3 - t2:.3f} s")
    os.remove(f"{d}/blk.safetensors")
PY
  df -h $OUT /tmp | tail -2
  # the first run also pays the Triton compile (a fresh machine has no kernel cache): run twice
  for sr in $OUT:true:cold $OUT:true:warm /tmp:true:warm /tmp:false:warm; do
    IFS=: read s r w <<< "$sr"; f=$OUT/tl_gptq_${r}_$(basename $s)_$w.txt
    python3 bench/timeline.py /tmp/tl.json "${Q7[@]}" quant=gptq quant.special.static_groups=true \
      quant.special.true_sequential=false run.progress=false save.save_path=$s/tl_gptq_${r}_$w save.resume=$r 2>&1 \
      | grep -v WARNING | tail -40 > $f
    echo "$f"; grep "^timings\|^blocks" $f; rm -rf $s/tl_gptq_${r}_$w
  done
  python3 bench/timeline.py /tmp/tl.json "${Q7[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false \
    run.progress=false save.save_path=/tmp/tl_awq 2>&1 | grep -v WARNING | tail -40 > $OUT/tl_awq.txt
  grep "^timings\|^blocks" $OUT/tl_awq.txt
fi
if [ "$phase" = awqk ]; then
  python3 bench/block_profile.py synthetic:qwen2-7b:4 Awq 16 --blocks 3 --group-size 128 --special weight_clip=false \
    --trace > $OUT/awq_profile.txt 2>&1; tail -12 $OUT/awq_profile.txt
  python3 bench/block_profile.py synthetic:qwen2-7b:4 GPTQ 16 --blocks 3 --group-size 128 --special static_groups=true \
    true_sequential=false > $OUT/gptq_profile.txt 2>&1; tail -9 $OUT/gptq_profile.txt
  tl() { local name=$1; shift
         python3 bench/timeline.py /tmp/tl.json "${Q7[@]}" run.progress=false save.save_path=/tmp/$name "$@" 2>&1 \
           | grep -v WARNING | grep -v "stage:stage" | tail -14 > $OUT/$name.txt; echo "== $name"; grep -v "^|" $OUT/$name.txt; }
  tl tl_gptq_matched quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  tl tl_awq_matched quant=awq quant.special.weight_clip=false quant.quant_out=false
  tl tl_awq quant=awq
  if [ -f $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    E=(dist=gpu dist.actors=1 "eval.eval_pos=[pretrain,fake_quant]")
    ours k_smol_awq "${SMOL[@]}" "${E[@]}" quant=awq
    ours k_smol_awq_matched "${SMOL[@]}" "${E[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false
    ours k_smol_gptq_layer "${SMOL[@]}" "${E[@]}" quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
    summary
  fi
fi
if [ "$phase" = full7b ]; then
  python3 -c "import safetensors; print('safetensors', safetensors.__version__)"; cat /proc/sys/vm/dirty_ratio
  ours q7b${D}_awq_matched "${Q7[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false
  ours q7b${D}_gptq_matched "${Q7[@]}" quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  ours q7b${D}_gptq_matched_noresume "${Q7[@]}" quant=gptq quant.special.static_groups=true \
    quant.special.true_sequential=false save.resume=false
  summary
  rm -rf $OUT/q7b${D}_*/  # the logs stay
fi
if [ "$phase" = ours7b ]; then
  for a in qwen2-7b llama2-70b; do python3 bench/flop_floor.py $a 2>&1 | tail -3; done | tee $OUT/flop_floor.txt
  python3 bench/materialize_synthetic.py qwen2-7b $D /tmp/cmp/q7b${D}
  cp /tmp/cmp/smol_hf/tokenizer* /tmp/cmp/q7b${D}/ 2>/dev/null  # ids are passed directly; a tool may still want one
  q7_tokens
  ours q7b${D}_awq "${Q7[@]}" quant=awq
  ours q7b${D}_awq_matched "${Q7[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false
  ours q7b${D}_gptq "${Q7[@]}" quant=gptq
  ours q7b${D}_gptq_matched "${Q7[@]}" quant=gptq quant.special.static_groups=true quant.special.true_sequential=false
  summary
fi
if [ "$phase" = triton ]; then
  python3 -c "import triton; print('triton', triton.__version__)"
  python3 bench/gptq_sweep_bench.py smollm2-135m eager graph triton 2>&1 | tee $OUT/sweep_smollm2.md
  python3 bench/gptq_sweep_bench.py qwen2-7b graph triton 2>&1 | tee $OUT/sweep_qwen2-7b.md
  for s in graph triton; do
    python3 bench/block_profile.py synthetic:smollm2-135m:30 GPTQ 1 --blocks 6 --special true_sequential=false sweep=$s 2>&1 | tail -9
  done > $OUT/block_profile.md
  if [ -f $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    E=(dist=gpu dist.actors=1 "eval.eval_pos=[pretrain,fake_quant]" quant=gptq quant.special.static_groups=true)
    for s in graph triton; do
      ours t_smol_gptq_matched_$s "${SMOL[@]}" "${E[@]}" quant.special.sweep=$s
      ours t_smol_gptq_layer_$s "${SMOL[@]}" "${E[@]}" quant.special.true_sequential=false quant.special.sweep=$s
    done
    summary
  fi
fi
if [ "$phase" = more ]; then
  python3 bench/scale_bench.py $OUT/moe deepseek-v2-lite:2:Awq:sequential:1 deepseek-v2-lite:2:GPTQ:sequential:1 2>&1 | tail -5
  python3 bench/sweep_bench.py $OUT/sweep demo 1 sequential Awq 4:64 3:64 4:32 3:32 2>&1 | tail -8
fi
if [ "$phase" = gram ]; then
  for g in true false; do
    python3 bench/block_profile.py synthetic:qwen2-7b:4 Awq 16 --blocks 4 --group-size 128 \
      --special weight_clip=false gram_search=$g > $OUT/gram_profile_$g.txt 2>&1; tail -6 $OUT/gram_profile_$g.txt
  done
  if [ -f $LLMC_RAY_CACHE/assets/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    E=(dist=gpu dist.actors=1 "eval.eval_pos=[pretrain,fake_quant]")
    for g in true false; do
      ours g_smol_awq_gram_$g "${SMOL[@]}" "${E[@]}" quant=awq quant.special.gram_search=$g
      ours g_smol_awq_matched_gram_$g "${SMOL[@]}" "${E[@]}" quant=awq quant.special.weight_clip=false \
        quant.quant_out=false quant.special.gram_search=$g
    done
    summary
    python3 - <<'PY'
import json, os
for name in ("g_smol_awq", "g_smol_awq_matched"):
    a, b = (json.load(open(f"{os.environ['OUT']}/{name}_gram_{g}/results.json")) for g in ("true", "false"))
    ratios = lambda r: [blk.get("info", {}).get("ratios") for blk in r["blocks"]]
    same = sum(x == y for x, y in zip(ratios(a), ratios(b)))
    print(name, f"blocks with the same ratios gram vs forward: {same}/{len(a['blocks'])}")
PY
  fi
fi
if [ "$phase" = gram_full7b ]; then  # DEPTH=28: the whole Qwen2-7B shape, AWQ matched (as full7b), Gram losses on
  ours q7b${D}_awq_matched_gram "${Q7[@]}" quant=awq quant.special.weight_clip=false quant.quant_out=false
  summary
  rm -rf $OUT/q7b${D}_*/
fi
