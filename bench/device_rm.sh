#!/usr/bin/env bash
# The reward-model bench of bench/README.md ("Rewards from models") on one lent GPU, in device calls made back to back
# (the machine is given back 30 s after a call; /tmp and the repo's ignored folders live as long as it does).
# Everything is logged under $OUT.
#   - bench/reward_model.py: a random 7B-shaped reward model (Qwen2ForSequenceClassification, one label, bfloat16)
#     scoring 256 completions as the trainer does, against a bare forward of the same batches (torch and
#     transformers alone: stage 1, before the GPU stack is there);
#   - bench/step.py, a random 1.5B policy colocated with its engine on the card, 32 prompts x 8 samples, completion
#     budgets drawn from [128, 512] per prompt (--lengths varied: groups finish at different times, as real ones do;
#     with fixed lengths every group would finish at the same engine step and nothing could be scored early),
#     without a reward model, then with the random 7B reward model on the same GPU scored while the engine generates
#     (score_while_generating, the default on GPU), then with it scored after generation (score_while_generating
#     false): the step time with and without it, and what the overlap hides.
#
# The GPU stack is bench/device_lora.sh's (vllm 0.20.1, deepspeed 0.19.8, ...: an xz tar of the unpacked wheels in
# 58 MiB parts .gpu/a/part00, .gpu/b/part01, .gpu/c/part02; .gpu/xg the xgrammar wheel). Calls:
#   1 (carry .gpu/a .cache/tiny-qwen2-v4):  bash bench/device_rm.sh 1   part 1; random 1.5B policy and 7B reward
#                                                                       model built on the GPU; bench/reward_model.py
#   2 (carry .gpu/b):   bash bench/device_rm.sh 2   part 2
#   3 (carry .gpu/c):   bash bench/device_rm.sh 3   part 3; the stack unpacked into /tmp/site
#   4 (carry .gpu/xg):  bash bench/device_rm.sh 4   xgrammar; the step without the reward model, with it streamed,
#                                                   with it scored after generation (each job at most 180 s; ALL=0:
#                                                   the first two alone, for a call with less time)
#   5 (no carry):       bash bench/device_rm.sh 5   the step with it scored after generation, alone
# With little device time left, three calls: 1, 2, then (carry .gpu/c .gpu/xg, 49 MiB together)
#   bash bench/device_rm.sh 3 && ALL=0 bash bench/device_rm.sh 4   (~10 min in all, the machine's start aside)
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
C="--config configs/default.yaml --colocate true --rollout_ranks all --policy_ranks all --random_model 1.5b \
--prompts_per_step 32 --num_generations 8 --max_completion_length 512 --lengths varied \
--vllm_gpu_memory_utilization 0.3 --steps 3 --plain_steps 0 --bare_repeats 0 ${EXTRA:-}"

bench() {  # the step bench with extra flags; its log and the trainer's metrics under $OUT
  local name=$1; shift
  t0=$(date +%s)
  timeout "${LIMIT:-270}" python3 -m torch.distributed.run --nproc_per_node 1 bench/step.py $C "$@" 2>&1 \
    | tee "$OUT/bench-$name.log" | grep -v -i -E "warn|it/s\]" | tail -25
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
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  t0=$(date +%s); python3 -m tgrpo.tiny .cache --random 1.5b; echo "built 1.5b in $(( $(date +%s) - t0 )) s"
  timeout 300 python3 bench/reward_model.py --shape 7b --prompts 32 --num_generations 8 --prompt_tokens 256 \
    --completion_tokens 512 --batch_tokens 32768 2>&1 | grep -v -i warn | tee "$OUT/reward_model.log"
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
  LIMIT=${LIMIT:-180} bench none
  LIMIT=${LIMIT:-180} bench rm-streamed --reward_model 7b
  [ "${ALL:-1}" = 1 ] && LIMIT=${LIMIT:-180} bench rm-after --reward_model 7b --score_while_generating false
  ;;
5)
  stack_ready
  bench rm-after --reward_model 7b --score_while_generating false
  ;;
esac
echo "== stage $stage done $(date -u +%FT%TZ)"
