"""The venv install of `make venv` (platform/install-venv.sh) with uv against pip, from a clean clone.

    python3 bench/install.py [--write]

Each installer gets a fresh clone of this checkout's HEAD, a fresh venv and empty caches (pip's and uv's,
set through PIP_CACHE_DIR / UV_CACHE_DIR), as CI gets; the wheels themselves come from wherever pip is
configured to find them. Then each venv imports what a Ray job driver imports, twice: the first import shows
the cost of bytecode that was not compiled at install time (the Makefile lets Python cache it), the second
the steady state. Stdlib only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _machine import cpu_model, publish

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## The venv install: uv against pip (`bench/install.py`)"
IMPORTS = ("import torch, ray, ray.data, ray.train, ray.tune, mlflow, pandas, SimpleITK, pydicom, highdicom, "
           "sklearn, ct3dflow.adapters.ray_jobs")


def _cpu_seconds() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    w, c = time.perf_counter(), _cpu_seconds()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - w, _cpu_seconds() - c


def run(installer: str, tmp: Path) -> dict:
    src = tmp / installer
    subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True)
    env = {**os.environ, "CT3DFLOW_INSTALLER": installer, "PIP_CACHE_DIR": str(tmp / f"pip-cache-{installer}"),
           "UV_CACHE_DIR": str(tmp / f"uv-cache-{installer}")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as under `make`, which unexports it
    wall, cpu = _timed(["bash", "platform/install-venv.sh", ".venv"], env, src)
    first = _timed([str(src / ".venv/bin/python"), "-c", IMPORTS], env, src)
    second = _timed([str(src / ".venv/bin/python"), "-c", IMPORTS], env, src)
    return {"installer": installer, "wall": wall, "cpu": cpu, "first": first, "second": second}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="replace this section of docs/BENCHMARKS.md")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ct3dflow-install-"))
    try:
        rows = [run(installer, tmp) for installer in ("pip", "uv")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    pip_wall = rows[0]["wall"]
    lines = [SECTION, "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; CPU: {cpu_model()} "
             f"({os.cpu_count()} logical CPUs); at {head.strip()}",
             "- command: `python3 bench/install.py --write` (a fresh clone, venv and empty pip and uv caches per "
             "installer; `CT3DFLOW_INSTALLER` picks it)",
             "",
             "| installer | install: wall s | install: CPU s | vs pip | first import of a job driver's modules: "
             "wall s (CPU s) | second import |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['installer']} | {r['wall']:.1f} | {r['cpu']:.1f} | {pip_wall / r['wall']:.1f}× | "
                     f"{r['first'][0]:.1f} ({r['first'][1]:.1f}) | {r['second'][0]:.1f} ({r['second'][1]:.1f}) |")
    publish(SECTION, lines, a.write)


if __name__ == "__main__":
    main()
