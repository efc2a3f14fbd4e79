#!/usr/bin/env bash
# Starts bin/otherix-api with the dev config in the background (its own etcd
# member under .local/etcd), logging to .local/run/otherix-api.log, and
# returns once it is ready. Idempotent: a running dev server is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIG=${API_CONFIG:-dev/config/api.yaml}
RUN=.local/run
PIDFILE=$RUN/otherix-api.pid
LOG=$RUN/otherix-api.log
URL=${OTHERIX_DEV_URL:-http://127.0.0.1:8080}
mkdir -p "$RUN"

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "otherix-api already running (pid $(cat "$PIDFILE")) on $URL; log: $LOG"
  exit 0
fi

# The seed's development admin, unless the caller exported its own. It is
# created on the first start only (or while no admin exists).
export OTHERIX_BOOTSTRAP_ADMIN_EMAIL=${OTHERIX_BOOTSTRAP_ADMIN_EMAIL:-admin@otherix.local}
export OTHERIX_BOOTSTRAP_ADMIN_PASSWORD=${OTHERIX_BOOTSTRAP_ADMIN_PASSWORD:-correct-horse-battery-staple}

./bin/otherix-api --config "$CONFIG" --check-config
nohup ./bin/otherix-api --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"

for _ in $(seq 1 300); do
  if curl -sf "$URL/readyz" >/dev/null 2>&1; then
    echo "otherix-api ready on $URL (pid $(cat "$PIDFILE")); log: $LOG"
    echo "  admin: $OTHERIX_BOOTSTRAP_ADMIN_EMAIL (password from OTHERIX_BOOTSTRAP_ADMIN_PASSWORD)"
    echo "  curl -s $URL/healthz"
    echo "  stop with: make stop-dev"
    exit 0
  fi
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "otherix-api exited during start-up; last log lines:" >&2
    tail -n 20 "$LOG" >&2
    rm -f "$PIDFILE"
    exit 1
  fi
  sleep 0.1
done
echo "otherix-api not ready after 30 s; see $LOG" >&2
exit 1
