# Sourced by node.sh and check.sh: one reading of the hostfile, so the check starts the world the job will start.
# read_hostfile NODE_RANK sets NODES, SLOTS (per node), WORLD_SIZE and NPROC (this node's), or exits 2 with one line.
read_hostfile() {
  local node_rank=$1 s
  [ -f "$HOSTFILE" ] || { echo "error: hostfile '$HOSTFILE' not found: write one line 'host slots=N' per node" >&2; exit 2; }
  mapfile -t SLOTS < <(grep -v '^\s*\(#\|$\)' "$HOSTFILE" | sed -n 's/^\s*\S\+\s\+slots=\([0-9]\+\)\s*$/\1/p')
  NODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE" || true)
  if [ "${#SLOTS[@]}" -ne "$NODES" ] || [ "$NODES" -eq 0 ]; then
    echo "error: $HOSTFILE: every non-comment line must read 'host slots=N' (found $NODES lines, ${#SLOTS[@]} valid)" >&2
    exit 2
  fi
  for s in "${!SLOTS[@]}"; do
    if [ "${SLOTS[$s]}" -eq 0 ]; then
      echo "error: $HOSTFILE: node $s has slots=0: every node runs at least one process (slots = its GPUs, or its" \
        "processes on a CPU machine); remove the line of a node that takes no part" >&2
      exit 2
    fi
  done
  if ! [[ "$node_rank" =~ ^[0-9]+$ ]] || [ "$node_rank" -ge "$NODES" ]; then
    echo "error: NODE_RANK '$node_rank' is not one of the $NODES nodes of $HOSTFILE (0-$((NODES - 1)))" >&2
    exit 2
  fi
  WORLD_SIZE=0
  for s in "${SLOTS[@]}"; do WORLD_SIZE=$((WORLD_SIZE + s)); done
  NPROC=${SLOTS[$node_rank]}
}
