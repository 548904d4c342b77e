#!/usr/bin/env bash
# Issue 39, parts 1 and 4, on one lent GPU (H100 or H200), in device calls made back to back (the machine is given
# back 30 s after a call; /tmp lives as long as it does). Everything is logged under $OUT.
#   part 1: the real job (train_grpo.py) at an older commit and at HEAD, same flags, same card, one call
#   part 4: the real job beside TRL's GRPOTrainer on the same work, one call (bench/trl_peer.py compare)
#
# The stack (../shared/tools/gpu-stack/wheels.txt: vllm 0.20.1, deepspeed 0.19.8, datasets, ...; plus trl 1.14.2,
# whose other requirements, accelerate, transformers and jinja2, the GPU image has) travels as one xz-compressed tar
# of the unpacked wheels, without vLLM's FA2 and MoE kernels (Hopper attention is FA3, the models are dense), split
# into parts of at most 58 MiB. Made here with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 (wheels.txt's list, as prepare.sh does, and
#   trl==1.14.2) -d W; pip wheel --no-deps deepspeed==0.19.8 -w W; unzip every wheel into S;
#   rm S/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so S/vllm/_moe_C.abi3.so
#   tar cf - -C S . | xz -9 -T1 > site.tar.xz (155 MiB); split -b 58m -d site.tar.xz part -> .gpu/a/part00,
#   .gpu/b/part01, .gpu/c/part02 (dropping xgrammar's static library, Mistral's tokenizer files and pycountry's
#   translations still left 120+ MiB: three calls either way)
# The older commit's tree: git archive b75a40d | tar -x -C .old (with /.old/ in .git/info/exclude).
# Calls (each at most 64 MiB of tree):
#   1 (carry .gpu/a .old):  bash bench/device_peer.sh 1   machine facts; part 1 of the stack; random 1.5B built
#   2 (carry .gpu/b):       bash bench/device_peer.sh 2   a middle part, where there are three
#   3 (carry .gpu/c .old):  bash bench/device_peer.sh 3   the last part, the stack unpacked; the real job at .old,
#                                                         then at HEAD beside TRL (compare --natural)
#   4 (no carry):           bash bench/device_peer.sh 4   again with every completion at the limit (ignore_eos in
#                                                         both: bench/tgrpo_fixed_job.py and TRL's generation_kwargs)
# STEPS (default 4: one warm-up, 3 timed).
set -u
stage=${1:?stage 1, 2, 3 or 4}
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD
MODEL=/tmp/models/random-qwen2-v2-1.5b
LOGS=/tmp/peerlogs/stage$stage
mkdir -p "$LOGS"
log=$OUT/stage$stage.log
exec > >(tee -a "$log") 2>&1
echo "== stage $stage $(date -u +%FT%TZ) in $PWD"

facts() {  # the machine as found (read only: the card's settings are never changed)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,\
power.limit,power.max_limit,pstate,temperature.gpu,persistence_mode,compute_mode,pcie.link.gen.current,\
pcie.link.width.current --format=csv
  nvidia-smi -q -d CLOCK,PERFORMANCE,POWER 2>/dev/null | grep -v "^$" | head -70
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Socket|MHz|NUMA node\(|Hypervisor|Flags" | cut -c1-200
  grep -m3 MHz /proc/cpuinfo; nproc; free -g | head -2; uname -r; python3 -V
  cat /sys/fs/cgroup/cpu.max 2>/dev/null || true
}

monitor() {  # the card's clocks, load and power every second while the runs go: $OUT/smi-stageN.csv
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,utilization.gpu,power.draw,temperature.gpu,memory.used \
    --format=csv,noheader -l 1 > "$OUT/smi-stage$stage.csv" 2>&1 &
  MON=$!
  (while sleep 5; do echo "$(date +%T) $(cat /proc/loadavg)"; done) > "$LOGS/loadavg.txt" 2>&1 &
  LOAD=$!
}

engine_lines() {  # what vLLM chose: attention backend, CUDA graphs, compile, scheduler limits (first lines of each)
  grep -h -i -E "attention backend|backend|cuda ?graph|capture|compil|max_num_seqs|max_num_batched|chunked|prefix cach|kv cache|gpu_memory_util|sleep|ready in|zero" \
    "$@" 2>/dev/null | grep -v -i -E "warn.*deprecat" | sed -E 's/^\S+ \S+ //' | cut -c1-240 | sort | uniq -c | sort -rn | head -40
}

unpack() {
  test -d /tmp/site/vllm && return 0
  mkdir -p /tmp/site
  t0=$(date +%s)
  if command -v xz >/dev/null; then cat /tmp/asm/part* | xz -dc -T0 | tar x -C /tmp/site
  else cat /tmp/asm/part* | python3 -c "import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('/tmp/site')"; fi
  echo "unpacked in $(( $(date +%s) - t0 )) s"
  python3 -c "import vllm, deepspeed, trl, transformers, torch; print('vllm', vllm.__version__, 'deepspeed', \
deepspeed.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())"
}

case $stage in
1)
  mkdir -p /tmp/asm /tmp/models && cp .gpu/a/part* /tmp/asm/ && ls -la /tmp/asm
  facts
  test -f .old/train_grpo.py && echo ".old holds $(ls .old | wc -l) entries" || echo "no .old tree"
  # the random model takes only the tiny model's tokenizer: the tiny model's 300-step warm-up (~20 s, weights the
  # random model never uses) is skipped here, which leaves the tokenizer as it is
  t0=$(date +%s)
  python3 -c "import tgrpo.tiny as t; t._warm_up = lambda *a, **k: None; print(t.ensure_random_model('/tmp/models', '1.5b'))"
  echo "built the random 1.5B in $(( $(date +%s) - t0 )) s"; du -sh /tmp/models/*
  ;;
2)
  mkdir -p /tmp/asm && cp .gpu/b/part* /tmp/asm/ && ls -la /tmp/asm
  ;;
3)
  END=$(( $(date +%s) + ${DEADLINE_S:-570} ))  # by then TRL has stopped (what the session's device time allows)
  mkdir -p /tmp/asm && { test ! -d .gpu/c || cp .gpu/c/part* /tmp/asm/; } && ls -la /tmp/asm
  unpack || exit 3
  test -f $MODEL/done || { echo "no model in $MODEL: the machine was given back between calls"; exit 3; }
  monitor
  # part 1: the real job of .old (b75a40d) and of HEAD with the same flags; HEAD's run is also tgrpo's side of part
  # 4 (compare: TRL next, in the same call). ZeRO-2 named (b75a40d's default stage was 3, HEAD's auto picks 2 here);
  # the token budget per micro-batch 16384 (both defaults) on a card over 100 GB, 8192 on an 80 GB card. Completions
  # end where the model stops in all three runs (b75a40d has no ignore_eos; TRL then gets none either).
  timeout 220 python3 bench/trl_peer.py tgrpo --tree "$PWD/.old" --name old --model $MODEL --steps "$STEPS" \
    --work /tmp/peerwork --logs "$LOGS" --timeout_s ${OLD_S:-205} --port 29661 -- --zero_stage 2 2>&1 \
    | grep -v -E "^\| [0-9]" | tail -2 | cut -c1-400
  cp "$LOGS/metrics-old.jsonl" "$OUT/" 2>/dev/null
  timeout $(( END - $(date +%s) + 5 )) python3 bench/trl_peer.py compare --natural --model $MODEL --steps "$STEPS" \
    --work /tmp/peerwork --logs "$LOGS" --timeout_s ${HEAD_S:-160} --trl_timeout_s ${TRL_S:-175} --deadline $END \
    -- --zero_stage 2
  echo "compare exit $?"
  cp "$LOGS/metrics-tgrpo.jsonl" "$OUT/metrics-head.jsonl" 2>/dev/null
  python3 bench/trl_peer.py summary old=$LOGS/metrics-old.jsonl head=$LOGS/metrics-tgrpo.jsonl --warmup 1
  echo "== old: what the engine chose (counts of log lines)"; engine_lines "$LOGS/old.log" /tmp/peerwork/old/logs/*.log
  echo "== head"; engine_lines "$LOGS/tgrpo.log" /tmp/peerwork/tgrpo/logs/*.log
  echo "== TRL"; engine_lines "$LOGS"/trl-*.log
  grep -h -E "^trl|Traceback|Error|error:" "$LOGS"/trl-*.log | cut -c1-300 | tail -16
  kill $MON $LOAD 2>/dev/null
  cp /tmp/peerwork/trl-result-*.json "$OUT/" 2>/dev/null
  tar czf "$OUT/logs-stage3.tgz" -C /tmp peerlogs/stage3 $(cd /tmp && ls -d peerwork/*/logs 2>/dev/null) 2>/dev/null
  ;;
4)
  unpack || exit 3
  test -f $MODEL/done || { echo "no model in $MODEL: the machine was given back between calls"; exit 3; }
  monitor
  rm -rf /tmp/peerwork4
  timeout 560 python3 bench/trl_peer.py compare --model $MODEL --steps "$STEPS" --work /tmp/peerwork4 \
    --logs "$LOGS" --timeout_s 270
  echo "compare exit $?"
  echo "== tgrpo: what the engine chose"; engine_lines "$LOGS/tgrpo.log" /tmp/peerwork4/tgrpo/logs/*.log
  echo "== TRL: what the engine chose"; engine_lines "$LOGS"/trl-*.log
  grep -h -E "^trl|Traceback|Error|error:" "$LOGS"/trl-*.log | cut -c1-300 | tail -24
  kill $MON $LOAD 2>/dev/null
  cp /tmp/peerwork4/tgrpo/metrics.jsonl "$OUT/metrics-tgrpo-stage4.jsonl" 2>/dev/null
  cp /tmp/peerwork4/trl-result-*.json "$OUT/" 2>/dev/null
  tar czf "$OUT/logs-stage4.tgz" -C /tmp peerlogs/stage4 $(cd /tmp && ls -d peerwork4/tgrpo/logs 2>/dev/null) \
    2>/dev/null
  ;;
esac
echo "== stage $stage done $(date -u +%FT%TZ)"
