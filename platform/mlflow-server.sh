#!/usr/bin/env bash
# Start or stop a local MLflow tracking server: SQLite backend, local artifact folder, one worker,
# bound to 127.0.0.1 (set MLFLOW_HOST to serve a cluster's private network).
#   platform/mlflow-server.sh start|stop|status
set -euo pipefail
source "$(dirname "$0")/env.sh"
: "${MLFLOW_DIR:=$CT3DFLOW_STATE/mlflow}"
PIDFILE="$CT3DFLOW_STATE/mlflow.pid"
mkdir -p "$MLFLOW_DIR/artifacts"
# asked where it listens (MLFLOW_HOST, a cluster's private address; 0.0.0.0 answers on the loopback too)
healthy() { "$VENV_BIN/python" - "$MLFLOW_PORT" "$_mlflow_client_host" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://{sys.argv[2]}:{sys.argv[1]}/health", timeout=2); sys.exit(0)
except Exception:
    sys.exit(1)
PY
}
case "${1:-}" in
  start)
    if healthy; then echo "MLflow already serving at http://$_mlflow_client_host:$MLFLOW_PORT"; exit 0; fi
    # `mlflow server` creates and migrates the SQLite schema itself before it starts its one uvicorn worker
    # MLflow 3's job runner (a dozen huey consumers, ~240 MB each) serves GenAI features we do not use
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
      setsid nohup "$VENV_BIN/mlflow" server --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
      --artifacts-destination "$MLFLOW_DIR/artifacts" --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" -w 1 \
      >"$CT3DFLOW_STATE/mlflow.log" 2>&1 &
    echo $! > "$PIDFILE"
    for _ in $(seq 180); do
      healthy && { echo "MLflow up: http://$_mlflow_client_host:$MLFLOW_PORT (UI in a browser at that address)"; exit 0; }
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$CT3DFLOW_STATE/mlflow.log"; exit 1; }
      sleep 1
    done
    echo "MLflow did not become healthy; see $CT3DFLOW_STATE/mlflow.log" >&2; exit 1 ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      pid=$(cat "$PIDFILE")
      # started under setsid: the server, its uvicorn worker and job consumers share its process group
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true; rm -f "$PIDFILE"
    fi
    echo "MLflow stopped" ;;
  status) healthy && echo "MLflow serving at http://$_mlflow_client_host:$MLFLOW_PORT" || { echo "MLflow not running"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
