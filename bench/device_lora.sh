#!/usr/bin/env bash
# The LoRA measurements of bench/README.md on one lent GPU (H200 or H100: the micro-batch settings follow the card's
# memory), in device calls made back to back (the machine is given back 30 s after a call; /tmp and the repo's
# ignored folders live as long as it does). Everything is logged under $OUT.
#
# The GPU stack (../shared/tools/gpu-stack/wheels.txt: vllm 0.20.1, deepspeed 0.19.8, datasets, math-verify; plus
# peft 0.21.0, which the image also has) travels as one xz-compressed tar of the unpacked wheels (123 MB), without
# vLLM's FA2 and MoE kernels (Hopper attention is FA3, the models are dense) and without xgrammar, which vLLM 0.20.1
# imports when an engine starts (seen) and so travels beside it as its wheel (48 MB). Made here with:
#   pip download --no-deps (wheels.txt's list, as prepare.sh does) -d W; unzip every wheel but xgrammar's, deepspeed
#   0.19.8's and peft 0.21.0's into S; rm S/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so S/vllm/_moe_C.abi3.so;
#   tar cf - -C S . | xz -9 -T2 > site.tar.xz; split -b 58m -d site.tar.xz .gpu/part
#   .gpu/a: part00 and .cache/tiny-qwen2-v4; .gpu/b: part01 and part02; .gpu/xg: the xgrammar wheel
# Calls (each at most 64 MiB of tree):
#   1 (carry .gpu/a):   bash bench/device_lora.sh 1   part 1; random 7B and 14B built on the GPU
#   2 (carry .gpu/b):   bash bench/device_lora.sh 2   parts 2 and 3
#   3 (carry .gpu/xg):  bash bench/device_lora.sh 3   the stack unpacked; 7B LoRA r=64 step with bare vLLM
#   4 (no carry):       bash bench/device_lora.sh 4   pre-flight plans (7B full fine-tune and LoRA, 14B LoRA);
#                                                     14B LoRA r=64 step
# (2026-12-05 these ran as calls 1, 3 and 4, with parts 2 and 3 and the xgrammar wheel sent by hand in between.)
set -u
stage=${1:?stage 1, 2, 3 or 4}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD
log=$OUT/stage$stage.log
exec > >(tee -a "$log") 2>&1
echo "== stage $stage $(date -u +%FT%TZ) in $PWD"
# An H100 (80 GB) gets smaller micro-batches: the 7B LoRA step's 16k-token micro-batches are planned at ~116 GiB,
# the 14B's at 8k tokens without checkpointing ~108 GiB
gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${gib:-0}" -gt 100000 ]; then X7=""; X14="--max_tokens_per_micro_batch 8192"
else X7="--max_tokens_per_micro_batch 8192"; X14="--max_tokens_per_micro_batch 8192 --gradient_checkpointing true"; fi
echo "GPU memory ${gib} MiB: 7b extra '${X7}', 14b extra '${X14}'"
C7="--config configs/default.yaml --colocate true --rollout_ranks all --policy_ranks all --prompts_per_step 16 \
--max_completion_length 512 --lengths fixed"

case $stage in
1)
  mkdir -p /tmp/asm .cache && cp .gpu/a/part00 /tmp/asm/ && cp -r .gpu/a/tiny-qwen2-v4 .cache/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -V; free -g; df -h . /tmp; nproc
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import peft; print('image peft', peft.__version__)" || true
  for s in 7b 14b; do
    t0=$(date +%s); python3 -m tgrpo.tiny .cache --random $s; echo "built $s in $(( $(date +%s) - t0 )) s"
  done
  du -sh .cache/*; df -h .
  ;;
2)
  mkdir -p /tmp/asm && cp .gpu/b/part* /tmp/asm/ && ls -la /tmp/asm
  ;;
3)
  mkdir -p /tmp/site
  t0=$(date +%s)
  if command -v xz >/dev/null; then cat /tmp/asm/part* | xz -dc -T0 | tar x -C /tmp/site
  else cat /tmp/asm/part* | python3 -c "import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/site')"; fi
  python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.gpu/xg/*.whl')]"
  echo "unpacked in $(( $(date +%s) - t0 )) s"
  python3 -c "import vllm, deepspeed, peft, torch; print('vllm', vllm.__version__, 'deepspeed', deepspeed.__version__, \
'peft', peft.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
  t0=$(date +%s)
  timeout 520 python3 -m torch.distributed.run --nproc_per_node 1 bench/step.py $C7 --random_model 7b \
    --use_lora true --lora_r 64 --lora_alpha 128 --steps 3 --plain_steps 2 --bare_repeats 1 $X7
  echo "7b lora bench exit $? in $(( $(date +%s) - t0 )) s"
  tar czf "$OUT/logs-7b-lora.tgz" output/bench-step/logs output/bench-step/metrics.jsonl 2>/dev/null
  ;;
4)
  test -d /tmp/site/vllm || { echo "no stack in /tmp/site: the machine was given back between calls"; exit 3; }
  python3 -m tgrpo.tiny .cache --random 14b
  M7="--model .cache/random-qwen2-v2-7b $C7"
  M7=${M7/--lengths fixed/}
  for extra in "--use_lora true --lora_r 64 $X7" "" "--max_tokens_per_micro_batch 4096 --gradient_checkpointing true"; do
    echo "== pre-flight 7b: ${extra:-full fine-tune}"
    python3 -m tgrpo.job.preflight --plan 1 $M7 $extra 2>&1 | grep -v -i warn
  done
  echo "== pre-flight check 7b full fine-tune"
  python3 -m tgrpo.job.preflight 1 $M7 2>&1 | grep -v -i warn | tail -2
  M14="--model .cache/random-qwen2-v2-14b $C7"
  M14=${M14/--lengths fixed/}
  echo "== pre-flight 14b lora $X14"
  python3 -m tgrpo.job.preflight --plan 1 $M14 --use_lora true --lora_r 64 $X14 2>&1 \
    | grep -v -i warn
  t0=$(date +%s)
  timeout 480 python3 -m torch.distributed.run --nproc_per_node 1 bench/step.py $C7 --random_model 14b \
    --use_lora true --lora_r 64 --lora_alpha 128 $X14 --steps 2 --plain_steps 2 \
    --bare_repeats 0
  echo "14b lora bench exit $? in $(( $(date +%s) - t0 )) s"
  tar czf "$OUT/logs-14b-lora.tgz" output/bench-step/logs output/bench-step/metrics.jsonl 2>/dev/null
  ;;
esac
echo "== stage $stage done $(date -u +%FT%TZ)"
