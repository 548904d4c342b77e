# Sourced by node.sh and tmux.sh: remove the shared memory a job leaves behind when its processes are killed.
#   sweep_shm SINCE_EPOCH_SECONDS
# - tgrpo-*-<pid>.bin: a rollout rank's weight buffer, once that rank (<pid>) is gone (a rank killed with SIGKILL
#   cannot remove its own);
# - vLLM's and Python multiprocessing's segments (psm_*, vllm_*, sem.mp-*) of this user, made since the job started,
#   that no process maps or holds open any more (an engine killed with SIGKILL leaves them; a live job's are mapped).
sweep_shm() {
  local since=$1 f pid in_use ino
  for f in /dev/shm/tgrpo-*-*.bin; do
    [ -e "$f" ] || continue
    pid=${f##*-}; pid=${pid%.bin}
    [ -d "/proc/$pid" ] || rm -f "$f"
  done
  # The candidates first, then every segment in use by any process of any user (mapped or open), so that a segment
  # another job on this node makes now (created, mapped microseconds later) is seen in use; none younger than 2 s.
  # Compared by inode: glibc makes a named semaphore under a temporary name, maps it, then links the real name, so
  # its creator's mapping shows the temporary one. A sweep never fails its caller: processes come and go meanwhile.
  local candidates
  candidates=$(find /dev/shm -maxdepth 1 -user "$(id -u)" \( -name 'psm_*' -o -name 'vllm_*' -o -name 'sem.mp-*' \) \
                 -newermt "@$since" ! -newermt "@$(( $(date +%s) - 2 ))" -print 2>/dev/null || true)
  [ -n "$candidates" ] || return 0
  in_use=$({ cat /proc/[0-9]*/maps 2>/dev/null | awk '$6 ~ /^\/dev\/shm\// {print $5}'
             find /proc/[0-9]*/fd -maxdepth 1 -lname '/dev/shm/*' -print 2>/dev/null | xargs -r stat -L -c %i 2>/dev/null
           } | sort -u || true)
  while read -r f; do
    ino=$(stat -c %i -- "$f" 2>/dev/null) || continue
    grep -qxF -- "$ino" <<<"$in_use" || rm -f -- "$f"
  done <<<"$candidates"
  return 0
}
