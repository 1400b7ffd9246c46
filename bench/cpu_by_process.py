"""Where a command's CPU goes, by kind of process: run it while /proc is sampled every 2 s.

    python3 bench/cpu_by_process.py [--interval 2] -- make test

Every 2 s it reads each process's CPU time (user + system) and command line; a process's CPU between two
samples is charged to the kind its command line says it is then (a Ray worker renames itself from
``ray::IDLE`` to ``ray::MapWorker(…)`` and back). The figures of docs/BENCHMARKS.md's `make test` sections
come from it. A process that starts and ends between two samples is missed, so the total is a lower bound;
the CPU a process spent before its first sample is counted only if it started after the command did.
Stdlib only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
# (substring of the command line, kind); the first that matches wins; a kind ending in ": " gets the job
# script, Ray task or test file appended
KINDS = [("job submit", "ray job submit CLI"), ("ray job", "ray job CLI, other"), ("jobs/", "job driver: "),
         ("-m pytest", "pytest (the tests' own process)"), ("pytest", "other process under pytest's tmp: "),
         ("ray::IDLE", "Ray worker, starting or idle"), ("ray::", "Ray worker or actor: "),
         ("default_worker", "Ray worker, starting or idle"), ("raylet", "Ray raylet"), ("gcs_server", "Ray GCS"),
         ("dashboard/agent", "Ray dashboard agent"), ("runtime_env/agent", "Ray runtime env agent"),
         ("dashboard", "Ray dashboard"), ("log_monitor", "Ray log monitor"), ("monitor.py", "Ray monitor"),
         ("bin/ray ", "ray CLI, other"), ("mlflow", "MLflow server"), ("uvicorn", "MLflow server"),
         ("Orthanc", "Orthanc"), ("chrom", "Chromium"), ("cc1plus", "g++ (inductor)"), ("uv ", "uv / pip"),
         ("pip", "uv / pip")]


def kind_of(cmdline: str) -> str:
    for key, kind in KINDS:
        if key in cmdline:
            if kind.endswith(": "):
                m = re.search(r"(jobs/\w+\.py|ray::[\w.]+|tests/\w+)", cmdline)
                return kind + (m.group(1) if m else "")
            return kind
    return "other: " + cmdline[:40]


def snapshot() -> dict[str, tuple[int, str]]:
    """pid → (CPU ticks so far, command line)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12]), cmd)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    before = snapshot()
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    seen: dict[str, int] = {pid: ticks for pid, (ticks, _) in before.items()}
    by_kind: collections.Counter = collections.Counter()
    pids_of: dict[str, set] = collections.defaultdict(set)
    while True:
        done = proc.poll() is not None
        for pid, (ticks, cmdline) in snapshot().items():
            if pid == str(os.getpid()):
                continue
            last = seen.get(pid, 0)
            delta = ticks - last if ticks >= last else ticks  # a new process (or a reused pid): all its CPU so far
            seen[pid] = ticks
            if delta > 0:
                kind = kind_of(cmdline) if cmdline else "other: (exited or kernel)"
                by_kind[kind] += delta
                pids_of[kind].add(pid)
        if done:
            break
        time.sleep(args.interval)
    wall = time.time() - t0
    total = sum(by_kind.values()) / TICKS
    print(f"\n[cpu_by_process] {' '.join(cmd)}: rc {proc.returncode}, {wall:.0f} s wall, {total:.0f} CPU-s "
          f"sampled ({total / wall / os.cpu_count():.0%} of {os.cpu_count()} CPUs)", file=sys.stderr)
    for kind, ticks in by_kind.most_common(args.top):
        print(f"{ticks / TICKS:8.1f} CPU-s {ticks / TICKS / total:5.1%} {len(pids_of[kind]):4d} processes  {kind}",
              file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
