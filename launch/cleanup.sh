# Sourced by node.sh and tmux.sh: remove the shared memory a job leaves behind when its processes are killed.
#   sweep_shm SINCE_EPOCH_SECONDS
# - tgrpo-*-<pid>.bin: a rollout rank's weight buffer, once that rank (<pid>) is gone (a rank killed with SIGKILL
#   cannot remove its own);
# - vLLM's and Python multiprocessing's segments (psm_*, vllm_*, sem.mp-*) of this user, made since the job started,
#   that no process maps or holds open any more (an engine killed with SIGKILL leaves them; a live job's are mapped).
sweep_shm() {
  local since=$1 f pid in_use
  for f in /dev/shm/tgrpo-*-*.bin; do
    [ -e "$f" ] || continue
    pid=${f##*-}; pid=${pid%.bin}
    [ -d "/proc/$pid" ] || rm -f "$f"
  done
  # every segment still in use by any process of any user, from the mappings and open files we can read
  # (a sweep never fails its caller: processes come and go while /proc is read)
  in_use=$({ cat /proc/[0-9]*/maps 2>/dev/null | grep -o '/dev/shm/[^ ]*'
             find /proc/[0-9]*/fd -maxdepth 1 -lname '/dev/shm/*' -printf '%l\n' 2>/dev/null; } | sort -u || true)
  { find /dev/shm -maxdepth 1 -user "$(id -u)" \( -name 'psm_*' -o -name 'vllm_*' -o -name 'sem.mp-*' \) \
      -newermt "@$since" -print 2>/dev/null || true; } | while read -r f; do
    grep -qxF -- "$f" <<<"$in_use" || rm -f -- "$f"
  done
  return 0
}
