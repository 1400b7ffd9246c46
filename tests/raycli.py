"""Driving a real Ray head the way users do: `ray job submit`, status, logs (shared by the job tests)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bin(env, name: str) -> str:
    return str(Path(env["PATH"].split(":")[0]) / name)


def ray_cli(env, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([_bin(env, "ray"), *args], env=env, capture_output=True, encoding="utf-8",
                       errors="replace", timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def submit(env, sid: str, entrypoint: list[str], wait=True, timeout=900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> --submission-id sid -- <entrypoint>`; a freshly started head may
    not have its job agent yet, so "No available agent" is retried for up to two minutes."""
    args = ["job", "submit", "--working-dir", str(ROOT), "--submission-id", sid]
    if not wait:
        args.append("--no-wait")
    for _ in range(24):
        r = ray_cli(env, *args, "--", *entrypoint, timeout=timeout, check=False)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(5)
    return r


def job_status(env, sid: str) -> str:
    code = ("from ray.job_submission import JobSubmissionClient; "
            f"print(JobSubmissionClient().get_job_status({sid!r}).value)")
    r = subprocess.run([_bin(env, "python"), "-c", code], env=env, capture_output=True, encoding="utf-8",
                       errors="replace", timeout=120)
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]


def job_logs(env, sid: str) -> str:
    r = ray_cli(env, "job", "logs", sid, check=False)
    return r.stdout if r.returncode == 0 else f"(no logs: {r.stderr[-2000:]})"
