#!/usr/bin/env bash
# Start or stop a local Ray head, dashboard (job server) on 127.0.0.1 only. Ray's internal GCS/raylet
# ports listen on all interfaces whatever we pass (Ray 2.60): firewall them on a shared host.
#   platform/ray-head.sh start|stop|status
set -euo pipefail
source "$(dirname "$0")/env.sh"
PGIDFILE="$CT3DFLOW_STATE/ray-head-$RAY_HEAD_PORT.pgid"
case "${1:-}" in
  start)
    # `ray status` against a port where nothing listens retries for ~40 s: ask it only when something does
    if (: </dev/tcp/127.0.0.1/"$RAY_HEAD_PORT") 2>/dev/null && \
       "$VENV_BIN/ray" status --address "127.0.0.1:$RAY_HEAD_PORT" >/dev/null 2>&1; then
      echo "Ray head already running at 127.0.0.1:$RAY_HEAD_PORT"; exit 0
    fi
    # its own session, so the head's process group is not the caller's (stop kills that group)
    setsid "$VENV_BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_HEAD_PORT" \
      --num-cpus "$RAY_NUM_CPUS" --num-gpus 0 --include-dashboard true \
      --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
      --temp-dir "$RAY_TMPDIR" --disable-usage-stats \
      --dashboard-agent-listen-port $((RAY_HEAD_PORT + 46000)) --dashboard-agent-grpc-port $((RAY_HEAD_PORT + 47000)) \
      --runtime-env-agent-port $((RAY_HEAD_PORT + 48000)) --metrics-export-port $((RAY_HEAD_PORT + 49000)) \
      --ray-client-server-port $((RAY_HEAD_PORT + 50000)) >"$CT3DFLOW_STATE/ray-start.log" 2>&1 \
      || { cat "$CT3DFLOW_STATE/ray-start.log"; exit 1; }
    # every process of this head (agents included, which rename themselves) shares the GCS's process group
    gcs=$(pgrep -f "gcs_server.*--gcs_server_port=$RAY_HEAD_PORT( |$)" | head -1)
    [ -n "$gcs" ] && ps -o pgid= -p "$gcs" | tr -d ' ' >"$PGIDFILE"
    # the job server answers once the dashboard is up
    for _ in $(seq 60); do
      "$VENV_BIN/ray" job list >/dev/null 2>&1 && { echo "Ray head up: dashboard $RAY_ADDRESS"; exit 0; }
      sleep 1
    done
    echo "Ray head started but its job server did not answer at $RAY_ADDRESS" >&2; exit 1 ;;
  stop)
    # only this head (`ray stop` would stop every Ray on the machine): its process group, and anything
    # still naming its temp dir or port
    mine="$RAY_TMPDIR/|ray.util.client.server --address=[^ ]*:$RAY_HEAD_PORT "
    pgid=$(cat "$PGIDFILE" 2>/dev/null || true)
    [ -n "$pgid" ] && kill -TERM -- "-$pgid" 2>/dev/null || true
    pkill -TERM -f -- "$mine" 2>/dev/null || true
    # a few seconds' grace to exit cleanly (Ray's own `ray stop` does the same), then the kill
    for _ in $(seq 10); do
      { [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null; } || pgrep -f -- "$mine" >/dev/null || break
      sleep 0.5
    done
    [ -n "$pgid" ] && kill -KILL -- "-$pgid" 2>/dev/null || true
    pkill -KILL -f -- "$mine" 2>/dev/null || true
    rm -f "$PGIDFILE"
    echo "Ray head stopped" ;;
  status)
    "$VENV_BIN/ray" status --address "127.0.0.1:$RAY_HEAD_PORT" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
