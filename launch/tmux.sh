#!/usr/bin/env bash
# Run the job from one terminal: every node of the hostfile in a window of one tmux session.
#   bash launch/tmux.sh start [-- train_grpo.py arguments]   one window per hostfile line, node.sh in each
#   bash launch/tmux.sh attach                               watch it (detach: Ctrl-b d)
#   bash launch/tmux.sh stop                                 end this session's processes on every node, close it
#
# The master is the hostfile's first host (localhost becomes 127.0.0.1). Local hosts (localhost, 127.*, this
# machine's name) run in the window itself; other hosts through `ssh -tt host "cd REPO && ..."` (same path there: a
# shared folder or the same checkout). Every process a window starts carries TGRPO_TMUX_RUN=SESSION:REPO in its
# environment; `stop` ends exactly the processes that carry it (the current user's), on every host: torchrun starts
# its ranks in new sessions and vLLM's engines can outlive a dead rank, so neither the pane's process group nor a
# process name would find them all.
# Environment: TMUX_SESSION (tgrpo-$USER), HOSTFILE (hostfile), STOP_GRACE_S (20: SIGTERM, then SIGKILL),
# DRY_RUN=1 (start prints each window's command). PYTHON, CONFIG, MASTER_PORT, LOG_DIR, PYTHONPATH, CUDA_VISIBLE_DEVICES,
# HF_*, NCCL_*, GLOO_*, VLLM_*, TORCH_* and OMP_* are passed to every node.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
# shellcheck source=launch/cleanup.sh
source launch/cleanup.sh

usage="usage: bash launch/tmux.sh start|stop|attach [-- train_grpo.py arguments]"
USER=${USER:-$(id -un)}
SESSION=${TMUX_SESSION:-tgrpo-$USER}
HOSTFILE=${HOSTFILE:-hostfile}
TAG="$SESSION:$REPO"

die() { echo "error: $*" >&2; exit 2; }

hosts() {
  # Same rules as node.sh, checked here so that a bad hostfile fails once, not in every window.
  [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' not found: write one line 'host slots=N' per node"
  local lines valid
  lines=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE" || true)
  mapfile -t HOSTS < <(grep -v '^\s*\(#\|$\)' "$HOSTFILE" | sed -n 's/^\s*\(\S\+\)\s\+slots=[0-9]\+\s*$/\1/p')
  valid=${#HOSTS[@]}
  if [ "$valid" -ne "$lines" ] || [ "$lines" -eq 0 ]; then
    die "$HOSTFILE: every non-comment line must read 'host slots=N' (found $lines lines, $valid valid)"
  fi
}

is_local() {
  case "$1" in localhost | 127.* | ::1) return 0 ;; esac
  [ "$1" = "$(hostname)" ] || [ "$1" = "$(hostname -s 2>/dev/null)" ] || [ "$1" = "$(hostname -f 2>/dev/null)" ]
}

# NAME=value words for every variable a node should see; a tmux server started earlier has its own environment,
# and ssh passes none, so they travel on the command line.
forward_env() {
  local name
  FORWARD=("TGRPO_TMUX_RUN=$TAG")
  for name in $(compgen -e | sort); do
    case "$name" in
      PYTHON | CONFIG | MASTER_PORT | LOG_DIR | HOSTFILE | PYTHONPATH | CUDA_VISIBLE_DEVICES | HF_* | NCCL_* | GLOO_* | \
        VLLM_* | TORCH_* | OMP_*) FORWARD+=("$name=${!name}") ;;
    esac
  done
}

start() {
  hosts
  if [ "${DRY_RUN:-0}" != 1 ]; then
    command -v tmux >/dev/null || die "tmux not found: install it (apt-get install -y tmux)"
    if tmux has-session -t "=$SESSION" 2>/dev/null; then
      die "tmux session '$SESSION' already exists: bash launch/tmux.sh attach, or bash launch/tmux.sh stop first"
    fi
  fi
  local master=${HOSTS[0]} i host node_cmd cmd remote=0
  [ "$master" = localhost ] && master=127.0.0.1
  for host in "${HOSTS[@]}"; do is_local "$host" || remote=1; done
  if [ "$remote" = 1 ] && [[ "$master" == 127.* ]]; then
    die "the master '${HOSTS[0]}' (first hostfile line) must be a name the other hosts can reach, not localhost"
  fi
  forward_env
  node_cmd=$(printf ' %q' "${FORWARD[@]}")
  for i in "${!HOSTS[@]}"; do
    host=${HOSTS[$i]}
    cmd="env$node_cmd bash launch/node.sh $i $(printf '%q' "$master")"
    if [ $# -gt 0 ]; then cmd+=" --$(printf ' %q' "$@")"; fi
    cmd="cd $(printf '%q' "$REPO") && $cmd"
    if ! is_local "$host"; then
      # -tt: closing the window hangs up the remote side too
      cmd="ssh -tt $(printf '%q' "$host") $(printf '%q' "$cmd")"
    fi
    # the window stays open after node.sh ends, so that its last lines can be read
    cmd="$cmd; s=\$?; echo; echo \"[node $i ($host): ended with status \$s; Enter closes this window]\"; read -r _"
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "node$i: $cmd"; continue; fi
    if [ "$i" -eq 0 ]; then
      tmux new-session -d -s "$SESSION" -n "node0" -c "$REPO" bash -c "$cmd"
    else
      tmux new-window -d -t "=$SESSION:" -n "node$i" -c "$REPO" bash -c "$cmd"
    fi
  done
  [ "${DRY_RUN:-0}" = 1 ] && return 0
  echo "started ${#HOSTS[@]} node(s) in tmux session '$SESSION' (master $master): bash launch/tmux.sh attach |" \
    "bash launch/tmux.sh stop; logs in ${LOG_DIR:-output/logs}/node*.log"
}

tagged_pids() {
  # This user's processes whose environment holds TGRPO_TMUX_RUN=$1 exactly; one grep reads every environ file.
  local f pid
  grep -lzxF -- "TGRPO_TMUX_RUN=$1" /proc/[0-9]*/environ 2>/dev/null | while read -r f; do
    pid=${f#/proc/}; pid=${pid%/environ}
    if [ "$pid" != $$ ] && [ -O "/proc/$pid" ]; then echo "$pid"; fi
  done || true
}

kill_tagged() {
  # SIGTERM first, so that torchrun and vLLM can end their children; SIGKILL whatever is left after the grace;
  # then the shared memory they leave (made since the oldest of them started).
  local tag=$1 grace=${STOP_GRACE_S:-20} pids waited=0 since
  pids=$(tagged_pids "$tag")
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  since=$(( $(date +%s) - $(ps -o etimes= -p ${pids//$'\n'/,} | sort -n | tail -n 1) - 1 ))
  echo "$(hostname): stopping $(echo "$pids" | wc -l) process(es)"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  while [ -n "$(tagged_pids "$tag")" ] && [ "$waited" -lt $((grace * 2)) ]; do sleep 0.5; waited=$((waited + 1)); done
  pids=$(tagged_pids "$tag")
  if [ -n "$pids" ]; then
    echo "$(hostname): $(echo "$pids" | wc -l) process(es) still running after ${grace} s: SIGKILL"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 1
  fi
  sweep_shm "$since"
}

stop() {
  hosts
  local host done_local=0
  for host in "${HOSTS[@]}"; do
    if is_local "$host"; then
      [ "$done_local" = 1 ] && continue
      kill_tagged "$TAG"
      done_local=1
    else
      # shellcheck disable=SC2029  # expanded here on purpose: the remote side gets this repo's path and the tag
      ssh "$host" "cd $(printf '%q' "$REPO") && bash launch/tmux.sh kill-tagged $(printf '%q' "$TAG")" ||
        echo "error: could not stop the processes on $host (ssh failed): run bash launch/tmux.sh stop there" >&2
    fi
  done
  if tmux has-session -t "=$SESSION" 2>/dev/null; then
    tmux kill-session -t "=$SESSION"
    echo "tmux session '$SESSION' closed"
  else
    echo "no tmux session '$SESSION'"
  fi
}

case "${1:-}" in
  start)
    shift
    if [ "${1:-}" = "--" ]; then shift; elif [ $# -gt 0 ]; then die "train arguments go after '--'; $usage"; fi
    start "$@"
    ;;
  stop) [ $# -eq 1 ] || die "$usage"; stop ;;
  attach)
    [ $# -eq 1 ] || die "$usage"
    tmux has-session -t "=$SESSION" 2>/dev/null || die "no tmux session '$SESSION': bash launch/tmux.sh start"
    # inside tmux, attaching would nest sessions; switch this client instead
    if [ -n "${TMUX:-}" ]; then exec tmux switch-client -t "=$SESSION"; else exec tmux attach-session -t "=$SESSION"; fi
    ;;
  kill-tagged) [ $# -eq 2 ] || die "$usage"; kill_tagged "$2" ;; # stop's remote half, run over ssh
  -h | --help) echo "$usage" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
