#!/usr/bin/env bash
# The vision-language bench of bench/README.md ("Vision-language") on one lent GPU: bench/step.py --random_model
# vl-3b (Qwen2.5-VL-3B's architecture, random bfloat16 weights, tgrpo/tiny.py RANDOM_VL_SHAPES), one 448x448 drawn
# image per prompt (bench/vl_data.py: 256 image tokens, 1,024 tower patches each, no image repeated), 16 prompts x 8
# samples x 512 completion tokens (--lengths fixed), colocated: the engine and the policy share the card. Device
# calls made back to back (the machine is given back 30 s after a call; /tmp and the repo's ignored folders live as
# long as it does). Everything is logged under $OUT.
#
# The GPU stack is bench/device_lora.sh's (vllm 0.20.1, deepspeed 0.19.8, ...: an xz tar of the unpacked wheels in
# 58 MiB parts .gpu/a/part00, .gpu/b/part01, .gpu/c/part02; .gpu/xg the xgrammar wheel; see there how they were
# made). EXTRA adds flags to every bench. The image has torchvision 0.26.0, which Qwen2.5-VL's processor needs. Calls (each at most 64 MiB of tree):
#   1 (carry .gpu/a):   bash bench/device_vl.sh 1   part 1; the random vl-3b built on the GPU
#   2 (carry .gpu/b):   bash bench/device_vl.sh 2   part 2
#   3 (carry .gpu/c):   bash bench/device_vl.sh 3   part 3; the stack unpacked into /tmp/site
#   4 (carry .gpu/xg):  bash bench/device_vl.sh 4   xgrammar; the bench (full fine-tuning, the tower trained;
#                                                   on an H100 ~540 s: call with timeout_s 600)
#   5 (no carry):       bash bench/device_vl.sh 5   the bench with freeze_vision_tower
set -u
stage=${1:?stage 1 to 5}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD
log=$OUT/stage$stage.log
exec > >(tee -a "$log") 2>&1
. bench/gpu_stack.sh
echo "== stage $stage $(date -u +%FT%TZ) in $PWD"
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
# Full fine-tuning of 3.75B on one card: bf16 weights and gradients, fp32 master weights and AdamW moments 60 GB.
# Beside the awake engine's 0.3 of the card that is ~95 GB: an H100 (80 GB) offloads the optimizer to the host
# (the pre-flight refuses it otherwise, 2026-12-07) and keeps activations small with checkpointing and 8k-token
# micro-batches; an H200 (141 GB) holds it all.
if [ "${mib:-0}" -gt 100000 ]; then MB="--max_tokens_per_micro_batch 16384"
else MB="--max_tokens_per_micro_batch 8192 --gradient_checkpointing true --offload_optimizer true"; fi
echo "GPU memory ${mib} MiB: '$MB'"
C="--config configs/vl.yaml --colocate true --rollout_ranks all --policy_ranks all --random_model vl-3b \
--prompts_per_step 16 --num_generations 8 --max_completion_length 512 --lengths fixed --image_size 448 \
--vllm_gpu_memory_utilization 0.3 $MB ${EXTRA:-}"

bench() {  # the bench with extra flags; its log and the trainer's metrics under $OUT
  local name=$1; shift
  t0=$(date +%s)
  timeout "${LIMIT:-540}" python3 -m torch.distributed.run --nproc_per_node 1 bench/step.py $C "$@" 2>&1 \
    | tee "$OUT/bench-$name.log" | grep -v -i -E "warn|it/s\]" | tail -60
  rc=${PIPESTATUS[0]}
  echo "bench $name exit $rc in $(( $(date +%s) - t0 )) s"
  cp output/bench-step/metrics.jsonl "$OUT/metrics-$name.jsonl" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
}

case $stage in
1)
  mkdir -p .cache && stack_part .gpu/a/part00
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -V; free -g; nproc
  python3 -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'transformers', transformers.__version__)"
  t0=$(date +%s); python3 -m tgrpo.tiny .cache --random vl-3b; echo "built vl-3b in $(( $(date +%s) - t0 )) s"
  du -sh .cache/*
  ;;
2)
  stack_part .gpu/b/part*
  ;;
3)
  stack_part .gpu/c/part* && stack_unpack
  ;;
4)
  stack_ready xgrammar
  LIMIT=${LIMIT:-575} bench full --steps 2 --plain_steps 2 --bare_repeats 1
  ;;
5)
  stack_ready
  bench frozen --steps 3 --plain_steps 2 --bare_repeats 0 --freeze_vision_tower true
  ;;
esac
echo "== stage $stage done $(date -u +%FT%TZ)"
