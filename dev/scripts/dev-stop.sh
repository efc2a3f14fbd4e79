#!/usr/bin/env bash
# Stops the dev otherix-api started by dev-start.sh (SIGTERM: it stops its
# etcd member in order).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIDFILE=.local/run/otherix-api.pid
[ -f "$PIDFILE" ] || { echo "otherix-api is not running"; exit 0; }
pid=$(cat "$PIDFILE")
if kill -0 "$pid" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "otherix-api did not stop in 15 s; killing it" >&2
    kill -KILL "$pid"
  fi
fi
rm -f "$PIDFILE"
echo "otherix-api stopped"
