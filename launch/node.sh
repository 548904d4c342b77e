#!/usr/bin/env bash
# Start this node's share of the job: bash launch/node.sh NODE_RANK MASTER_ADDR [-- train_grpo.py arguments]
#
# Reads the node count and this node's process count from the hostfile and runs torchrun with a static
# rendezvous (--master_addr/--master_port/--node_rank), which keeps global rank 0 on the master node.
# Environment: HOSTFILE (hostfile), MASTER_PORT (29631), CONFIG (configs/default.yaml), PYTHON (.venv's python),
# LOG_DIR (the run's output_dir/logs; a previous run's node log there is kept as nodeN.log.1 .. .5), JOIN_TIMEOUT_S (600: how long the nodes wait for each other at start-up),
# MAX_RESTARTS (0: after a failure, start the job again with --resume auto up to this many times; every node's
# node.sh does, so the nodes meet again; a bad config, exit status 2, is never retried), TGRPO_PREEMPT_FILE (when
# this file appears the job saves at the end of its step and stops; node.sh then exits with status 3).
# Signals to node.sh: SIGUSR1 asks the job to save at the end of its step and stop (exit status 3, as for a
# preemption); SIGTERM (kill) stops it now (143); Ctrl-C or SIGINT likewise (130). Never restarted.
# NCCL_*/GLOO_* variables (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_DISABLE, ...) pass through to every rank.
set -euo pipefail
# A script's background job (`bash launch/node.sh ... &` in a non-interactive shell, as wrappers and schedulers start
# it) inherits SIGINT ignored, and bash can neither trap nor reset a signal ignored on entry: Ctrl-C would never
# reach the handlers below. Start again with SIGINT, SIGTERM and SIGUSR1 at their defaults (exec keeps the pid).
ignored=$(sed -n 's/^SigIgn:[[:space:]]*//p' "/proc/$$/status" 2>/dev/null || true)
if [ -n "$ignored" ] && (( (16#$ignored >> 1 & 1) | (16#$ignored >> 9 & 1) | (16#$ignored >> 14 & 1) )); then
  if [ -z "${TGRPO_NODE_SIGNALS_RESET:-}" ]; then
    export TGRPO_NODE_SIGNALS_RESET=1
    if env --default-signal=INT true 2>/dev/null; then exec env --default-signal=INT,TERM,USR1 bash "$0" "$@"; fi
    exec "${PYTHON:-python3}" -c 'import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1): signal.signal(s, signal.SIG_DFL)
os.execvp("bash", ["bash", *sys.argv[1:]])' "$0" "$@"
  fi
  echo "warning: node.sh started with SIGINT, SIGTERM or SIGUSR1 ignored and could not restore them: those signals" \
    "will not stop or save the job (start node.sh from a shell that does not ignore them)" >&2
fi
unset TGRPO_NODE_SIGNALS_RESET
cd "$(dirname "$0")/.."

usage="usage: bash launch/node.sh NODE_RANK MASTER_ADDR [-- train_grpo.py arguments]"
NODE_RANK=${1:?$usage}
MASTER_ADDR=${2:?$usage}
shift 2
if [ "${1:-}" = "--" ]; then shift; fi

HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29631}
CONFIG=${CONFIG:-configs/default.yaml}
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-600}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# shellcheck source=launch/hostfile.sh
source launch/hostfile.sh
# shellcheck source=launch/cleanup.sh
source launch/cleanup.sh
read_hostfile "$NODE_RANK"

# Bad input stops here, in one line, before any process group or engine starts.
checked=$(TGRPO_NODE_RANK=$NODE_RANK LOCAL_WORLD_SIZE=$NPROC "$PYTHON" -m tgrpo.job.preflight "$WORLD_SIZE" --config "$CONFIG" "$@") || exit $?
OUTPUT_DIR=$(printf '%s\n' "$checked" | sed -n 's/^output_dir=//p' | tail -n 1)
OUTPUT_DIR=${OUTPUT_DIR:-output}
LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}

if [ "$NODE_RANK" = 0 ] && ! "$PYTHON" -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('', int(sys.argv[1])))" "$MASTER_PORT" 2>/dev/null; then
  echo "error: MASTER_PORT $MASTER_PORT is in use on this host (another job?): stop that job or set MASTER_PORT to a free port" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"
log="$LOG_DIR/node$NODE_RANK.log"
if [ -s "$log" ]; then  # a previous run's log (a failed run about to be resumed by hand, say): kept, not overwritten
  for i in 4 3 2 1; do [ ! -e "$log.$i" ] || mv -f "$log.$i" "$log.$((i + 1))"; done
  mv -f "$log" "$log.1"
fi
echo "node $NODE_RANK/$NODES: $NPROC processes, world size $WORLD_SIZE, master $MASTER_ADDR:$MASTER_PORT (log: $log; TGRPO_VERBOSE=1 shows library output here too)"
: > "$log"
export TGRPO_LOG_FILE="$log" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the ranks append library output to the log
rm -f "$OUTPUT_DIR/logs/preempted"
# SIGUSR1 asks the ranks, through this file, to save at their step's end and stop (slurm.sbatch names its own)
export TGRPO_PREEMPT_FILE=${TGRPO_PREEMPT_FILE:-$LOG_DIR/.preempt-request-node$NODE_RANK}
rm -f "$TGRPO_PREEMPT_FILE"
pidfile="$LOG_DIR/.torchrun-node$NODE_RANK.pid" statusfile="$LOG_DIR/.torchrun-node$NODE_RANK.status"
quiet="$LOG_DIR/.stopped-node$NODE_RANK"
rm -f "$quiet"
openline="$LOG_DIR/.console-open-node$NODE_RANK"  # launch/tee.py: 1 while rank 0's progress bar holds the line open
# node.sh's own lines, on the console (stderr) and in the log, never glued to the progress bar
say() {
  local nl=""
  [ "$(cat "$openline" 2>/dev/null)" != 1 ] || { nl=$'\n'; echo 0 > "$openline"; }
  printf '%s%s\n' "$nl" "$*" | tee -a "$log" >&2
}
stopped=""  # the signal that stopped the job: it is never restarted
job=""
# torchrun runs in a session of its own (as its ranks do), so that Ctrl-C and signals reach node.sh alone, which
# says what they mean: SIGTERM to torchrun stops every rank at once (torchrun sends it to each rank's group, then
# SIGKILL to any still running 30 s later); a second Ctrl-C or SIGTERM does not wait those 30 s
stop_job() {
  if [ -n "$stopped" ] && [ -n "$job" ]; then
    pkill -KILL -s "$job" 2>/dev/null; pkill -KILL -P "$job" 2>/dev/null; kill -KILL "$job" 2>/dev/null
    return
  fi
  stopped=$1
  say "$1: stopping the job (again to kill it at once)"
  touch "$quiet"  # torchrun's traceback about the signal: the log's, not the console's
  [ -z "$job" ] || kill -TERM "$job" 2>/dev/null || true
}
trap 'stop_job SIGINT' INT
trap 'stop_job SIGTERM' TERM
trap 'say "SIGUSR1: the job saves at the end of its step and stops"; touch "$TGRPO_PREEMPT_FILE"' USR1
restarts=0
args=("$@")
started=$(date +%s)
lowest="$LOG_DIR/.lowest-available-kb"
# the host's lowest available memory while the job runs: a rank killed by SIGKILL then is named as the OOM killer's
sample_memory() {
  local key value _ low=""
  trap '' USR1
  while sleep 1; do
    while read -r key value _; do [ "$key" = MemAvailable: ] && break; done < /proc/meminfo
    if [ -z "$low" ] || [ "$value" -lt "$low" ]; then low=$value; echo "$low" > "$lowest"; fi
  done
}
sampler=""
trap '[ -z "$sampler" ] || kill "$sampler" 2>/dev/null; rm -f "$lowest" "$TGRPO_PREEMPT_FILE" "$pidfile" "$statusfile" "$quiet" "$openline"' EXIT
while true; do
  start_byte=$(stat -c %s "$log")
  oom_before=$("$PYTHON" -m tgrpo.job.failures --oom-kills 2>/dev/null || true)
  rm -f "$lowest"
  sample_memory &
  sampler=$!
  set +e
  rm -f "$pidfile" "$statusfile"
  {
    trap '' INT USR1  # Ctrl-C and SIGUSR1 are node.sh's to interpret (torchrun registers its own SIGINT handler)
    setsid "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --rdzv_conf "timeout=$JOIN_TIMEOUT_S" \
      --max_restarts 0 train_grpo.py --config "$CONFIG" "${args[@]}" < /dev/null 2>&1 &
    echo $! > "$pidfile"
    wait $!
    echo $? > "$statusfile"
  } | "$PYTHON" launch/tee.py "$log" "$quiet" "$openline" &
  pipeline=$!
  until [ -s "$pidfile" ] || ! kill -0 "$pipeline" 2>/dev/null; do sleep 0.1; done
  job=$(cat "$pidfile" 2>/dev/null || true)
  [ -z "$stopped" ] || [ -z "$job" ] || kill -TERM "$job" 2>/dev/null  # a signal that came before it started
  while true; do
    wait "$pipeline"
    kill -0 "$pipeline" 2>/dev/null || break  # a trapped signal interrupts wait; the job runs on
  done
  job=""
  status=$(cat "$statusfile" 2>/dev/null || echo 1)
  rm -f "$pidfile" "$statusfile"
  set -e
  # no `wait` for the sampler: once bash has reaped it, `wait PID` could block on another child, such as the tee of
  # a process substitution that node.sh's output goes through and that lives as long as node.sh (bash reaps it)
  kill "$sampler" 2>/dev/null || true
  sampler=""
  sweep_shm "$started"  # shared memory of killed ranks and engines
  find "$OUTPUT_DIR/logs" -maxdepth 1 -name 'fatal-rank*.log' -empty -delete 2>/dev/null || true  # ranks stopped by a signal
  if [ -n "$stopped" ]; then
    if [ "$stopped" = SIGINT ]; then status=130; what="interrupted (Ctrl-C/SIGINT)"; else status=143; what="stopped by SIGTERM"; fi
    say "$what: the job was stopped, not failed; steps after its newest checkpoint are not kept: continue with" \
      "--resume auto (log: $log)"
    break
  fi
  if [ "$status" -eq 0 ] && [ -e "$OUTPUT_DIR/logs/preempted" ]; then
    rm -f "$OUTPUT_DIR/logs/preempted"
    status=3  # saved and stopped on a preemption request: for the scheduler to requeue, not for us to restart
  fi
  [ "$status" -ne 0 ] || break
  [ "$status" -ne 3 ] || break
  cause=$("$PYTHON" -m tgrpo.job.failures "$log" "$start_byte" "${oom_before:-none}" "$(cat "$lowest" 2>/dev/null || echo none)" 2>/dev/null || true)
  [ -z "$cause" ] || say "error: ${cause} (log: $log)"
  # a bad config (2) is never retried
  if [ "$status" -eq 2 ] || [ "$restarts" -ge "$MAX_RESTARTS" ]; then break; fi
  restarts=$((restarts + 1))
  say "restart $restarts/$MAX_RESTARTS after exit status $status: resuming from the newest checkpoint"
  args=("$@" --overwrite_output_dir false --resume auto)
done
if [ "$status" -ne 0 ] && grep -q "clients joined\|waiting for clients\|Timed out after .* seconds" "$log"; then
  echo "error: not all $NODES nodes of $HOSTFILE met at $MASTER_ADDR:$MASTER_PORT within JOIN_TIMEOUT_S=$JOIN_TIMEOUT_S s:" \
    "start launch/node.sh on every host, with the same MASTER_ADDR, and check that the port is reachable" >&2
fi
exit "$status"
