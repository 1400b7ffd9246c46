#!/usr/bin/env bash
# Install the project and its test tools into a virtual environment (`make venv` calls this).
#   platform/install-venv.sh [VENV]        EXTRAS=dev by default; CT3DFLOW_INSTALLER=pip forces pip
# uv when it can be had: on 2 cores it installs the whole stack in 20 s where pip takes 153 s (bench/install.py,
# docs/BENCHMARKS.md), and the test command has ten minutes in all. uv does not read pip's configuration, so the
# indexes, find-links, constraints and certificate pip is configured with (pip.conf, PIP_* variables) are
# handed to it: where the CPU build of torch lies in a find-links folder, uv must see that folder too, or it
# would fetch PyPI's multi-GB CUDA build. If uv cannot be installed or fails, pip does the same install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
EXTRAS=${EXTRAS:-dev}
BIN=$VENV/bin
# the CPU build where the machine has one (pip's constraints may cap it); a looser pin pulls the CUDA build
TORCH=torch==2.13.0

test -x "$BIN/python" || python3 -m venv "$VENV"

with_pip() {
  "$BIN/pip" install -q --upgrade pip
  "$BIN/pip" install -q "$TORCH"
  "$BIN/pip" install -q -e ".[$EXTRAS]"
}

# one value per line for a pip setting, from every scope pip reads (site, user, global, PIP_* variables)
conf=$("$BIN/pip" config list 2>/dev/null || true)
pip_setting() { sed -n "s/^[^=]*\.$1='\(.*\)'\$/\1/p" <<<"$conf" | tr ' ' '\n' | awk 'NF && !seen[$0]++'; }

with_uv() {
  "$BIN/pip" install -q uv 2>/dev/null || { echo "install-venv: uv is not installable here; using pip"; return 1; }
  local args=(--index-strategy unsafe-best-match)  # pip's rule: the best version from any index
  local v
  for v in $(pip_setting find-links); do args+=(--find-links "$v"); done
  for v in $(pip_setting extra-index-url); do args+=(--extra-index-url "$v"); done
  for v in $(pip_setting constraint); do args+=(--constraint "$v"); done
  v=$(pip_setting index-url | tail -1); [ -z "$v" ] || args+=(--index-url "$v")
  v=$(pip_setting cert | head -1); [ -z "$v" ] || export SSL_CERT_FILE="$v"
  # not compiled to bytecode here (pip compiles every file: ≈ 90 CPU-s on 2 cores): Python compiles what is
  # imported when it is first imported, and the Makefile lets it keep that bytecode (its comment says why)
  "$BIN/uv" pip install -q --python "$BIN/python" "${args[@]}" "$TORCH" -e ".[$EXTRAS]" \
    || { echo "install-venv: uv failed; using pip"; return 1; }
}

if [ "${CT3DFLOW_INSTALLER:-uv}" = uv ] && with_uv; then
  exit 0
fi
with_pip
