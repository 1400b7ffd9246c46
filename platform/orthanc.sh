#!/usr/bin/env bash
# A local PACS for the DICOMweb screening path, its tests and its demo: Debian's Orthanc with its DICOMweb
# plugin (apt-get install orthanc orthanc-dicomweb), run as a plain process with the project's own
# configuration and storage under $CT3DFLOW_STATE/orthanc-$ORTHANC_HTTP_PORT/.
#   platform/orthanc.sh start|stop|status
# - HTTP (REST + DICOMweb at /dicom-web/) on port $ORTHANC_HTTP_PORT, answering 127.0.0.1 only: Orthanc 1.10
#   has no bind-address option (HttpBindAddresses came in 1.12.10), so it listens on every interface and
#   refuses every client that is not this host ("RemoteAccessAllowed": false); firewall it on a shared host.
# - no DICOM (DIMSE) port at all ("DicomServerEnabled": false): the platform speaks DICOMweb only.
# - HTTP basic authentication on, one user; its credentials are generated into a file of mode 600
#   ($ORTHANC_CREDENTIALS, JSON {"username", "password"}), the file the screening job's `source` reads.
set -euo pipefail
source "$(dirname "$0")/env.sh"
: "${ORTHANC_HTTP_PORT:=8042}"
: "${ORTHANC_BIN:=$(command -v Orthanc || echo /usr/sbin/Orthanc)}"
: "${ORTHANC_PLUGIN:=/usr/share/orthanc/plugins/libOrthancDicomWeb.so}"
DIR="$CT3DFLOW_STATE/orthanc-$ORTHANC_HTTP_PORT"
: "${ORTHANC_CREDENTIALS:=$DIR/credentials.json}"
PIDFILE="$DIR/orthanc.pid"
URL="http://127.0.0.1:$ORTHANC_HTTP_PORT"
up() {
  "$VENV_BIN/python" - "$URL" "$ORTHANC_CREDENTIALS" <<'PY'
import base64, json, sys, urllib.request
c = json.load(open(sys.argv[2], encoding="utf-8"))
req = urllib.request.Request(sys.argv[1] + "/system")
req.add_header("Authorization", "Basic " + base64.b64encode(f"{c['username']}:{c['password']}".encode()).decode())
try:
    urllib.request.urlopen(req, timeout=2); sys.exit(0)
except Exception:
    sys.exit(1)
PY
}
case "${1:-}" in
  start)
    mkdir -p "$DIR/storage"
    if [ ! -s "$ORTHANC_CREDENTIALS" ]; then
      (umask 077; "$VENV_BIN/python" -c "import json, secrets; print(json.dumps({'username': 'ct3dflow', \
'password': secrets.token_urlsafe(24)}))" >"$ORTHANC_CREDENTIALS")
    fi
    chmod 600 "$ORTHANC_CREDENTIALS"
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && up; then
      echo "Orthanc already running: $URL/dicom-web"; exit 0
    fi
    [ -x "$ORTHANC_BIN" ] || { echo "Orthanc not found ($ORTHANC_BIN): apt-get install orthanc orthanc-dicomweb" >&2; exit 1; }
    [ -f "$ORTHANC_PLUGIN" ] || { echo "the DICOMweb plugin is missing ($ORTHANC_PLUGIN): apt-get install orthanc-dicomweb" >&2; exit 1; }
    (umask 077; "$VENV_BIN/python" - "$DIR" "$ORTHANC_HTTP_PORT" "$ORTHANC_PLUGIN" "$ORTHANC_CREDENTIALS" <<'PY'
import json, sys
d, port, plugin, creds = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.load(open(sys.argv[4], encoding="utf-8"))
cfg = {
    "Name": f"ct3dflow-pacs-{port}", "StorageDirectory": f"{d}/storage", "IndexDirectory": f"{d}/storage",
    "HttpPort": port, "RemoteAccessAllowed": False, "DicomServerEnabled": False,
    "AuthenticationEnabled": True, "RegisteredUsers": {creds["username"]: creds["password"]},
    "Plugins": [plugin], "HttpTimeout": 60, "StableAge": 5, "SaveJobs": False,
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{port}",
                 "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
}
json.dump(cfg, open(f"{d}/orthanc.json", "w", encoding="utf-8"), indent=1)
PY
    )
    setsid "$ORTHANC_BIN" "$DIR/orthanc.json" >"$DIR/orthanc.log" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 60); do
      up && { echo "Orthanc up: $URL/dicom-web (credentials in $ORTHANC_CREDENTIALS)"; exit 0; }
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DIR/orthanc.log" >&2; exit 1; }
      sleep 0.5
    done
    echo "Orthanc did not answer at $URL; see $DIR/orthanc.log" >&2; exit 1 ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      pid=$(cat "$PIDFILE")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$PIDFILE"
    fi
    echo "Orthanc stopped" ;;
  status) [ -s "$ORTHANC_CREDENTIALS" ] && up && echo "Orthanc running: $URL/dicom-web" || { echo "Orthanc not running"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
