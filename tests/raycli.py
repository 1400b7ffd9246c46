"""Driving a real Ray head the way users do: `ray job submit`, status, logs (shared by the job tests)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
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
    """`ray job submit --no-wait --working-dir <repo> --submission-id sid -- <entrypoint>`; a freshly started head
    may not have its job agent yet, so "No available agent" is retried for up to two minutes. With ``wait``
    the job is followed through the REST API until it ends (`ray job submit` without --no-wait tails the logs
    and notices the end seconds late), and its logs are returned as stdout; returncode 0 means SUCCEEDED."""
    args = ["job", "submit", "--no-wait", "--working-dir", str(ROOT), "--submission-id", sid]
    for _ in range(24):
        r = ray_cli(env, *args, "--", *entrypoint, timeout=timeout, check=False)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(5)
    if not wait or r.returncode != 0:
        return r
    status = wait_for_end(env, sid, timeout)
    return subprocess.CompletedProcess(r.args, 0 if status == "SUCCEEDED" else 1,
                                       r.stdout + job_logs(env, sid), r.stderr + f"\njob {sid}: {status}\n")


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _api(env, path: str, method: str = "GET"):
    """A request to the job server's REST API (what `ray job status|logs|stop` ask, without starting a Python
    with Ray for every call), with the head's token."""
    req = urllib.request.Request(f"{env['RAY_ADDRESS'].rstrip('/')}{path}", method=method)
    token = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else None
    if token and token.exists():
        req.add_header("Authorization", f"Bearer {token.read_text().strip()}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def job_status(env, sid: str) -> str:
    try:
        return _api(env, f"/api/jobs/{sid}")["status"]
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:500]!r}"


def job_logs(env, sid: str) -> str:
    try:
        return _api(env, f"/api/jobs/{sid}/logs")["logs"]
    except urllib.error.HTTPError as exc:
        return f"(no logs: HTTP {exc.code}: {exc.read()[:500]!r})"


def stop_job(env, sid: str, timeout=120) -> str:
    """What `ray job stop` does, at once (the CLI spends seconds starting up while the job goes on); returns
    the terminal status."""
    _api(env, f"/api/jobs/{sid}/stop", method="POST")
    return wait_for_end(env, sid, timeout, poll=0.1)


def wait_for_end(env, sid: str, timeout: float, poll: float = 0.25) -> str:
    """The job's status once it is terminal, or its last status after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while (status := job_status(env, sid)) not in TERMINAL and time.time() < deadline:
        time.sleep(poll)
    return status
