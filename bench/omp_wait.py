"""What torch's OpenMP wait policy costs when processes share the cores, as Ray's workers and actors do.

Usage::

    .venv/bin/python bench/omp_wait.py [--procs 2] [--threads 2] [--steps 8] [--write]

Runs the detection recipe's training step (L=3, K=8, width 64, batch 16 of 24³ patches) and its no_grad
scoring (batch 32) in ``--procs`` processes at once, each with ``--threads`` torch threads, first with
libgomp's default wait policy (threads spin for a while before they sleep), then with
``OMP_WAIT_POLICY=PASSIVE`` (what ct3dflow sets), and once more alone, one process, for the uncontended
cost of passive waiting. The baseline is measured in the same run. ``--write`` replaces this benchmark's
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, publish  # noqa: E402

SECTION = "## OpenMP wait policy with shared cores (bench/omp_wait.py)"

# the child: torch is imported here, after the policy is in the environment (libgomp reads it on load)
CHILD = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1])); steps = int(sys.argv[2])
from ct3dflow.flow import Glow3D
torch.manual_seed(0)
model = Glow3D(levels=3, steps=8, width=64, patch_size=24)
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = 0.05 * torch.randn(16, 1, 24, 24, 24) - 0.37
def step():
    loss = -model.log_prob(x).mean(); opt.zero_grad(); loss.backward(); opt.step()
step(); step()
t = time.perf_counter()
for _ in range(steps): step()
train = (time.perf_counter() - t) / steps
model.eval(); xs = x.repeat(2, 1, 1, 1, 1)
with torch.no_grad():
    model.log_prob(xs); t = time.perf_counter()
    for _ in range(steps): model.log_prob(xs)
print(train, (time.perf_counter() - t) / steps)
"""


def run(procs: int, threads: int, steps: int, policy: str | None) -> tuple[float, float]:
    """Mean seconds per training step and per scoring batch over ``procs`` processes started together.
    ``policy`` None: libgomp's default (the child imports torch before ct3dflow, so ct3dflow's default comes
    too late to change it)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "-c", CHILD, str(threads), str(steps)]
    root = Path(__file__).resolve().parents[1]
    ps = [subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [p.communicate()[0].split() for p in ps]
    if any(p.returncode for p in ps):
        raise SystemExit("a benchmark process failed")
    return sum(float(o[0]) for o in outs) / procs, sum(float(o[1]) for o in outs) / procs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2, help="processes at once (default: 2, one per core here)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (default: 2)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps and scoring batches (default: 8)")
    p.add_argument("--write", action="store_true", help="replace this section of docs/BENCHMARKS.md")
    a = p.parse_args()
    rows = []
    for label, procs, policy in ((f"{a.procs} at once, libgomp default (spin, then sleep)", a.procs, None),
                                 (f"{a.procs} at once, OMP_WAIT_POLICY=PASSIVE", a.procs, "PASSIVE"),
                                 ("1 alone, libgomp default", 1, None),
                                 ("1 alone, OMP_WAIT_POLICY=PASSIVE", 1, "PASSIVE")):
        t0 = time.perf_counter()
        train, score = run(procs, a.threads, a.steps, policy)
        rows.append((label, train, score))
        print(f"{label}: {train:.2f} s/step, {score:.2f} s/batch ({time.perf_counter() - t0:.0f} s)", flush=True)
    spin, passive, alone_spin, alone_passive = rows
    lines = [
        SECTION, "",
        f"`{shlex.join(['.venv/bin/python', 'bench/omp_wait.py', *sys.argv[1:]])}`, {dt.date.today()}, "
        f"{cpu_model()}, {os.cpu_count()} cores; the detection recipe (L=3, K=8, width 64): a training step on "
        f"16 patches of 24³ and no_grad scoring of 32, {a.threads} torch threads per process, mean of each "
        "process's mean over its timed iterations.", "",
        "| processes, wait policy | s per training step | s per scoring batch |", "|---|---|---|",
        *(f"| {label} | {t:.2f} | {s:.2f} |" for label, t, s in rows), "",
        f"Sharing the cores, passive waiting makes each training step **{spin[1] / passive[1]:.1f}×** and each "
        f"scoring batch **{spin[2] / passive[2]:.1f}×** faster; alone, it costs "
        f"{100 * (alone_passive[1] / alone_spin[1] - 1):+.0f} % per step and "
        f"{100 * (alone_passive[2] / alone_spin[2] - 1):+.0f} % per batch. Hence ct3dflow's default "
        "(`ct3dflow/__init__.py`, platform/env.sh, the runtime env and the nodes' environment file).",
    ]
    publish(SECTION, lines, a.write)


if __name__ == "__main__":
    main()
