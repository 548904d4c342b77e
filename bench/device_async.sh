#!/usr/bin/env bash
# The asynchronous mode's GPU measurements of bench/README.md ("Asynchronous mode"): bench/step.py timing the
# synchronous mode, the one-step-off mode (--overlap) and async_mode (--async) in one job, random Qwen2.5-1.5B,
# 64 prompts x 8 samples, --lengths longtail with max_completion_length 2048, split placement: rank 0 the vLLM engine,
# rank 1 the policy. Wanted on 2 GPUs (nvidia-h200-x2: GPU=2 below); when only one-GPU machines are lent, both ranks
# share GPU 0 (bench/step.py --share_gpu: the weight sync over gloo, the engine and the policy on one card).
# Device calls made back to back (the machine is given back 30 s after a call; /tmp and the repo's ignored folders
# live as long as it does). Everything is logged under $OUT.
#
# The GPU stack is bench/device_lora.sh's (vllm 0.20.1, deepspeed 0.19.8, ...: .gpu/part00-02 an xz tar of the
# unpacked wheels split in 58 MiB parts, .gpu/xg the xgrammar wheel; see there how they were made). Calls (each at
# most 64 MiB of tree):
#   1 (carry .gpu/a):               bash bench/device_async.sh 1   part 1 and the tiny tokenizer; random 1.5B built
#   2 (carry .gpu/b .gpu/part02):   bash bench/device_async.sh 2   parts 2 and 3, the stack unpacked into /tmp/site
#   3 (carry .gpu/xg):              bash bench/device_async.sh 3   xgrammar; the bench: sync, one-step-off, async
#   4 (no carry):                   bash bench/device_async.sh 4   the bench again, async_mode with max_staleness 2
# (If .gpu/b holds part02 too, carry .gpu/b alone in call 2.)
set -u
stage=${1:?stage 1, 2, 3 or 4}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD
log=$OUT/stage$stage.log
exec > >(tee -a "$log") 2>&1
echo "== stage $stage $(date -u +%FT%TZ) in $PWD"
GPUS=$(nvidia-smi -L | wc -l)
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
# One card for both: the engine's share of it and the policy's micro-batches leave each other room. The policy alone
# peaked at ~76 GiB with 16k-token micro-batches (bench/README.md, 1.5B on an H200); 4k tokens keep it near 40 GiB.
if [ "$GPUS" -ge 2 ]; then SHARE=""; MEM="--vllm_gpu_memory_utilization 0.85"; MB=""
elif [ "${mib:-0}" -gt 100000 ]; then SHARE="--share_gpu"; MEM="--vllm_gpu_memory_utilization 0.3"
  MB="--max_tokens_per_micro_batch 8192"
else SHARE="--share_gpu"; MEM="--vllm_gpu_memory_utilization 0.25"; MB="--max_tokens_per_micro_batch 4096"; fi
echo "$GPUS GPU(s) of ${mib} MiB: '$SHARE $MEM $MB'"
C="--config configs/default.yaml --rollout_ranks 0-0 --policy_ranks 1-1 --random_model 1.5b --zero_stage 2 \
--prompts_per_step 64 --max_completion_length 2048 --lengths longtail --plain_steps 0 --bare_repeats 0 \
--overlap --async $SHARE $MEM $MB"

bench() {  # the bench with extra flags; its log and the trainer's metrics under $OUT
  local name=$1; shift
  t0=$(date +%s)
  timeout "${LIMIT:-500}" python3 -m torch.distributed.run --nproc_per_node 2 bench/step.py $C "$@" 2>&1 \
    | tee "$OUT/bench-$name.log" | grep -v -i -E "warn|it/s\]" | tail -60
  rc=${PIPESTATUS[0]}
  echo "bench $name exit $rc in $(( $(date +%s) - t0 )) s"
  cp output/bench-step/metrics.jsonl "$OUT/metrics-$name.jsonl" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
}

case $stage in
1)
  mkdir -p /tmp/asm .cache && cp .gpu/a/part00 /tmp/asm/ && cp -r .gpu/a/tiny-qwen2-v4 .cache/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -V; free -g; nproc
  t0=$(date +%s); python3 -m tgrpo.tiny .cache --random 1.5b; echo "built 1.5b in $(( $(date +%s) - t0 )) s"
  du -sh .cache/*
  ;;
2)
  mkdir -p /tmp/asm /tmp/site && cp .gpu/b/part* /tmp/asm/ && { test ! -f .gpu/part02 || cp .gpu/part02 /tmp/asm/; }
  ls -la /tmp/asm
  t0=$(date +%s)
  if command -v xz >/dev/null; then cat /tmp/asm/part* | xz -dc -T0 | tar x -C /tmp/site
  else cat /tmp/asm/part* | python3 -c "import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/site')"; fi
  echo "unpacked in $(( $(date +%s) - t0 )) s"; du -sh /tmp/site
  ;;
3)
  test -d /tmp/site/vllm || { echo "no stack in /tmp/site: the machine was given back between calls"; exit 3; }
  python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.gpu/xg/*.whl')]"
  python3 -c "import vllm, deepspeed, torch; print('vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, \
'torch', torch.__version__, torch.cuda.get_device_name())"
  bench s1 --steps 3
  ;;
4)
  test -d /tmp/site/xgrammar || { echo "no stack in /tmp/site: the machine was given back between calls"; exit 3; }
  bench s2 --steps 3 --async_staleness 2
  ;;
esac
echo "== stage $stage done $(date -u +%FT%TZ)"
