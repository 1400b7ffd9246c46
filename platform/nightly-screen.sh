#!/usr/bin/env bash
# Submit tonight's archive screening to the Ray cluster and wait for it (cron, systemd, by hand).
#   platform/nightly-screen.sh [ARCHIVE] [more jobs/screen.py arguments, e.g. --model models:/NAME/3]
# Settings (environment, e.g. from /etc/ct3dflow/screen.env):
#   CT3DFLOW_ARCHIVE        archive folder or manifest (when not given as the first argument)
#   CT3DFLOW_SCREEN_CONFIG  job configuration, default configs/screen.yaml
#   CT3DFLOW_SUBMISSION_ID  default screen-YYYY-MM-DD: Ray refuses a second submission with the same id, so
#                           the same night never runs twice; set e.g. screen-2026-11-26-retry1 to re-run
#   RAY_ADDRESS, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI   the cluster and tracking server (platform/env.sh)
# Exit status: 0 when the job SUCCEEDED or today's job was already submitted and did not fail, 1 otherwise.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$CT3DFLOW_HOME"
ARCHIVE="${1:-${CT3DFLOW_ARCHIVE:-}}"
[ -n "$ARCHIVE" ] || { echo "usage: $0 ARCHIVE [jobs/screen.py args] (or set CT3DFLOW_ARCHIVE)" >&2; exit 2; }
[ $# -gt 0 ] && shift
CONFIG="${CT3DFLOW_SCREEN_CONFIG:-configs/screen.yaml}"
SID="${CT3DFLOW_SUBMISSION_ID:-screen-$(date +%F)}"

status() { "$VENV_BIN/python" - "$1" <<'PY'
import sys
from ray.job_submission import JobSubmissionClient
try:
    print(JobSubmissionClient().get_job_status(sys.argv[1]).value)
except Exception:
    print("UNKNOWN")
PY
}

existing=$(status "$SID")
if [ "$existing" != "UNKNOWN" ]; then
  echo "screening $SID was already submitted (status $existing); not submitting it again"
  case "$existing" in FAILED|STOPPED) exit 1 ;; *) exit 0 ;; esac
fi
echo "submitting $SID: archive $ARCHIVE, config $CONFIG, Ray $RAY_ADDRESS"
# No --entrypoint-num-gpus: a job asking for GPUs a cluster lacks stays PENDING; the job itself checks
# the cluster's GPUs and puts its scoring actors on them when there are any.
for attempt in 1 2 3; do  # a cluster just started may not accept jobs yet ("No available agent")
  "$VENV_BIN/ray" job submit --working-dir . --submission-id "$SID" -- \
    python jobs/screen.py --config "$CONFIG" --archive "$ARCHIVE" --run-name "$SID" "$@" || true
  final=$(status "$SID")
  [ "$final" != "UNKNOWN" ] && break
  echo "submission $attempt of $SID was not accepted; retrying in 30 s" >&2; sleep 30
done
echo "screening $SID finished: $final"
[ "$final" = "SUCCEEDED" ]
