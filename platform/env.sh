# Sourced by the platform scripts: one place for the local endpoints and Ray's auth settings.
# Ray 2.60 turns token auth on after the first ray.init() (it writes ~/.ray/auth_token); every client
# (ray job submit, ray.init in tests) must then use the same mode, so we set it for all of them.
: "${CT3DFLOW_HOME:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
: "${CT3DFLOW_STATE:=$CT3DFLOW_HOME/work/platform}"
: "${RAY_HEAD_PORT:=6390}"
: "${RAY_DASHBOARD_PORT:=8275}"
: "${MLFLOW_PORT:=5055}"
: "${RAY_NUM_CPUS:=2}"
# one temp dir per head (short: Ray's socket paths must stay under 108 characters); stop uses it
: "${RAY_TMPDIR:=/tmp/ct3dflow-ray-$(id -u)-$RAY_HEAD_PORT}"
: "${MLFLOW_HOST:=127.0.0.1}"
# torch's OpenMP threads wait passively: spinning ones hold the cores that Ray's other tasks and actors need
# (ct3dflow/__init__.py says why); every Ray worker inherits it from the head
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:$RAY_DASHBOARD_PORT}"
# clients ask where the server listens (MLFLOW_HOST: a cluster's private address; a server on every address
# answers on the loopback; an IPv6 address goes in brackets in a URL)
case "$MLFLOW_HOST" in
  0.0.0.0) _mlflow_client_host=127.0.0.1 ;;
  ::) _mlflow_client_host="[::1]" ;;
  *:*) _mlflow_client_host="[$MLFLOW_HOST]" ;;
  *) _mlflow_client_host="$MLFLOW_HOST" ;;
esac
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://$_mlflow_client_host:$MLFLOW_PORT}"
VENV_BIN="${VENV_BIN:-$CT3DFLOW_HOME/.venv/bin}"
# job entrypoints ("python jobs/…") must find the project's interpreter
export PATH="$VENV_BIN:$PATH"
mkdir -p "$CT3DFLOW_STATE"
# a project-local token, so nothing depends on (or overwrites) the user's ~/.ray/auth_token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$CT3DFLOW_STATE/ray_auth_token}"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077; "${VENV_BIN}/python" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
fi
