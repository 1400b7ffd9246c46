#!/usr/bin/env bash
# Submit tonight's archive screening to the Ray cluster and wait for it (cron, systemd, by hand).
#   platform/nightly-screen.sh [ARCHIVE] [more jobs/screen.py arguments, e.g. --model models:/NAME/3]
# Settings (environment, e.g. from /etc/ct3dflow/screen.env):
#   CT3DFLOW_ARCHIVE        archive folder, manifest or dicomweb+https://… PACS (when not given as the first
#                           argument); none: the config's source.url (a PACS, docs/PACS.md). A given archive
#                           wins over the config's source.url.
#   CT3DFLOW_SCREEN_CONFIG  job configuration, default configs/screen.yaml
#   CT3DFLOW_DRY_RUN        set: print the submission tonight would make and exit, without asking the cluster
#   CT3DFLOW_SUBMISSION_ID  default screen-YYYY-MM-DD: Ray refuses a second submission with the same id, so
#                           the same night never runs twice; set e.g. screen-2026-11-26-retry1 to re-run
#   RAY_ADDRESS, RAY_AUTH_TOKEN_PATH, MLFLOW_TRACKING_URI   the cluster and tracking server (platform/env.sh)
# Exit status: 0 when the job SUCCEEDED or today's job was already submitted and did not fail, 1 otherwise.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$CT3DFLOW_HOME"
ARCHIVE="${CT3DFLOW_ARCHIVE:-}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then ARCHIVE="$1"; shift; fi  # a first argument not an option
CONFIG="${CT3DFLOW_SCREEN_CONFIG:-configs/screen.yaml}"
has_source_url() { "$VENV_BIN/python" -c "import sys, yaml
c = yaml.safe_load(open(sys.argv[1], encoding='utf-8')) or {}
sys.exit(0 if (c.get('source') or {}).get('url') else 1)" "$CONFIG"; }
if [ -z "$ARCHIVE" ] && ! has_source_url; then
  echo "usage: $0 ARCHIVE [jobs/screen.py args] (or set CT3DFLOW_ARCHIVE, or a source.url in $CONFIG)" >&2; exit 2
fi
ARCHIVE_ARGS=()
[ -z "$ARCHIVE" ] || ARCHIVE_ARGS=(--archive "$ARCHIVE")
SID="${CT3DFLOW_SUBMISSION_ID:-screen-$(date +%F)}"
SUBMIT=(ray job submit --working-dir . --submission-id "$SID" --
        python jobs/screen.py --config "$CONFIG" "${ARCHIVE_ARGS[@]}" --run-name "$SID" "$@")
if [ -n "${CT3DFLOW_DRY_RUN:-}" ]; then  # what tonight would submit, without asking the cluster
  echo "would submit $SID: ${SUBMIT[*]}"
  exit 0
fi

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
WHAT="${ARCHIVE:-the PACS of the config (source.url)}"
echo "submitting $SID: archive $WHAT, config $CONFIG, Ray $RAY_ADDRESS"
# No --entrypoint-num-gpus: a job asking for GPUs a cluster lacks stays PENDING; the job itself checks
# the cluster's GPUs and puts its scoring actors on them when there are any.
for attempt in 1 2 3; do  # a cluster just started may not accept jobs yet ("No available agent")
  "$VENV_BIN/${SUBMIT[0]}" "${SUBMIT[@]:1}" || true
  final=$(status "$SID")
  [ "$final" != "UNKNOWN" ] && break
  echo "submission $attempt of $SID was not accepted; retrying in 30 s" >&2; sleep 30
done
echo "screening $SID finished: $final"
[ "$final" = "SUCCEEDED" ]
