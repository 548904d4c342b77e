#!/usr/bin/env bash
# Cluster readiness check, what `ray status` gave: bash launch/check.sh NODE_RANK MASTER_ADDR [EXPECTED_PROCS]
#
# Run it on every node of the hostfile, as you would run launch/node.sh. It starts a short torchrun job with the
# same static rendezvous (launch/check_cluster.py, one process per slot); rank 0 prints every process (host, global
# rank, local rank, device), then all-reduce and broadcast bandwidth with the results checked exact, and one JSON
# line. It fails (exit 1) with one `error: ` line when the world size differs from EXPECTED_PROCS (default: the
# hostfile's slot sum), a value comes out wrong, or a node does not join within CHECK_TIMEOUT_S.
# Environment: HOSTFILE (hostfile), MASTER_PORT (29631), PYTHON (.venv's python), LOG_DIR (output/logs),
# CHECK_TIMEOUT_S (60: rendezvous, process-group init and each collective), CHECK_SIZES_MIB (e.g. "1,4,16,64"),
# CHECK_BACKEND (nccl with CUDA, else gloo). NCCL_*/GLOO_* variables pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash launch/check.sh NODE_RANK MASTER_ADDR [EXPECTED_PROCS]"
if [ $# -lt 2 ] || [ $# -gt 3 ]; then echo "$usage" >&2; exit 2; fi
NODE_RANK=$1
MASTER_ADDR=$2

HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29631}
LOG_DIR=${LOG_DIR:-output/logs}
CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-60}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# shellcheck source=launch/hostfile.sh
source launch/hostfile.sh
read_hostfile "$NODE_RANK"
EXPECTED=${3:-$WORLD_SIZE}
if ! [[ "$EXPECTED" =~ ^[0-9]+$ ]] || [ "$EXPECTED" -eq 0 ]; then
  echo "error: EXPECTED_PROCS '$EXPECTED' is not a positive number; $usage" >&2
  exit 2
fi
if ! [[ "$CHECK_TIMEOUT_S" =~ ^[0-9]+$ ]] || [ "$CHECK_TIMEOUT_S" -eq 0 ]; then
  echo "error: CHECK_TIMEOUT_S '$CHECK_TIMEOUT_S' is not a positive number of seconds" >&2
  exit 2
fi

mkdir -p "$LOG_DIR"
LOG=$LOG_DIR/check-node$NODE_RANK.log
echo "check node $NODE_RANK/$NODES: $NPROC processes, expecting $EXPECTED in all, master $MASTER_ADDR:$MASTER_PORT" \
  "(timeout ${CHECK_TIMEOUT_S} s, log: $LOG)"

# stdout (rank 0's tables) goes to the terminal; stderr (torchrun's tracebacks, library warnings) goes to the log,
# and only one line of it is shown on failure. `timeout` is the last guard: the rendezvous timeout (rdzv_conf) and
# the process-group timeout normally end a stuck run well before it.
rc=0
timeout -k 10 $((3 * CHECK_TIMEOUT_S + 300)) \
  "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --rdzv_conf "timeout=$CHECK_TIMEOUT_S" \
  launch/check_cluster.py --expected "$EXPECTED" --timeout "$CHECK_TIMEOUT_S" --sizes_mib "${CHECK_SIZES_MIB:-}" \
  2>"$LOG" || rc=$?
if [ "$rc" -eq 0 ]; then
  [ "$NODE_RANK" -eq 0 ] || echo "node $NODE_RANK: check passed (node 0 prints the tables)"
  exit 0
fi

ours=$(grep -m1 '^error: ' "$LOG" || true)
if [ -n "$ours" ]; then
  echo "$ours" >&2
elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "error: the check did not end within $((3 * CHECK_TIMEOUT_S + 300)) s on node $NODE_RANK (log: $LOG)" >&2
elif cause=$(grep -m1 -o 'Dist\(Store\|Network\)Error: .*' "$LOG"); then
  # torchrun's own rendezvous failed: a node missing, or the master unreachable
  echo "error: node $NODE_RANK: the $NODES nodes of $HOSTFILE did not all meet at $MASTER_ADDR:$MASTER_PORT within" \
    "$CHECK_TIMEOUT_S s ($cause): start check.sh on every node with the same MASTER_ADDR, and check the address," \
    "port and firewall (log: $LOG)" >&2
else
  cause=$(grep -m1 -i 'error' "$LOG" || tail -n1 "$LOG")
  echo "error: node $NODE_RANK: torchrun failed with status $rc: $cause (log: $LOG)" >&2
fi
exit 1
