#!/usr/bin/env bash
# The BM25 retrieval server of this node (tgrpo/rollout/retriever.py), in the background: run it on every node of a
# multi-turn search job, all over the same corpus, so rollout ranks search on their own node.
#   bash launch/retriever.sh start   # starts it (if not running) and waits until it answers /health
#   bash launch/retriever.sh stop
#   bash launch/retriever.sh status
# Environment: CORPUS (data/search_corpus.jsonl), RETRIEVER_PORT (8321), RETRIEVER_HOST (127.0.0.1), PYTHON,
# LOG_DIR (output/logs), START_TIMEOUT_S (120).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CORPUS=${CORPUS:-data/search_corpus.jsonl}
PORT=${RETRIEVER_PORT:-8321}
HOST=${RETRIEVER_HOST:-127.0.0.1}
LOG_DIR=${LOG_DIR:-output/logs}
PIDFILE="$LOG_DIR/retriever-$(hostname)-$PORT.pid"
URL="http://127.0.0.1:$PORT"

healthy() { "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen('$URL/health', timeout=2)" 2>/dev/null; }
running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
start)
  mkdir -p "$LOG_DIR"
  if running && healthy; then echo "retriever already up: $URL/retrieve (pid $(cat "$PIDFILE"))"; exit 0; fi
  [ -f "$CORPUS" ] || { echo "error: corpus '$CORPUS' not found: set CORPUS to a .jsonl of {id, contents}" >&2; exit 2; }
  log="$LOG_DIR/retriever-$(hostname)-$PORT.log"
  nohup "$PYTHON" -m tgrpo.rollout.retriever --corpus "$CORPUS" --host "$HOST" --port "$PORT" > "$log" 2>&1 &
  echo $! > "$PIDFILE"
  deadline=$((SECONDS + ${START_TIMEOUT_S:-120}))
  until healthy; do
    if ! running; then echo "error: the retriever exited: $(tail -1 "$log")" >&2; rm -f "$PIDFILE"; exit 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "error: the retriever did not answer $URL/health in time (log: $log)" >&2; exit 1; fi
    sleep 0.5
  done
  echo "retriever up: $URL/retrieve (pid $(cat "$PIDFILE"), log $log)" ;;
stop)
  if running; then kill "$(cat "$PIDFILE")"; echo "retriever stopped"; else echo "no retriever running"; fi
  rm -f "$PIDFILE" ;;
status)
  if running && healthy; then echo "up: $URL/retrieve"; else echo "down"; exit 1; fi ;;
*)
  echo "usage: bash launch/retriever.sh start|stop|status" >&2; exit 2 ;;
esac
