"""What one Ray job of the test suite's chain costs: wall seconds and CPU-seconds of the whole machine.

    .venv/bin/python bench/job_cpu.py [--head-env K=V ...] [--ray '{"sampling_concurrency": 1}'] train train tune

Starts a Ray head and an MLflow server of its own (the platform's scripts, on ports of its own, stopped again
at the end), writes the chain's phantom archive (tests/chain.py: 6 normal and 4 abnormal small phantoms, the
test split replaced by sentinels) and submits the named jobs one after the other with `ray job submit`, with
the chain's tiny CT-3DFlow configuration (``train-ae`` and ``tune-ae``: the AE's, as the chain runs it). For
each job it prints the wall time and the machine's CPU-seconds (``/proc/stat``, every process: the job's
driver and Ray workers and the head's own housekeeping), so run it on an otherwise idle machine. A second
``train`` resumes the first one's finished run: its cost is a Ray Train job's start, its data and its end.
``--head-env`` sets environment variables of the head (conftest's test head sets some; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def machine_cpu_seconds() -> float:
    user, nice, system = (int(v) for v in open("/proc/stat").readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("jobs", nargs="+", choices=["train", "tune", "train-ae", "tune-ae"])
    p.add_argument("--head-env", nargs="*", default=[], help="KEY=VALUE for the Ray head's environment")
    p.add_argument("--ray", default="{}", help="JSON merged into the configuration's ray section")
    p.add_argument("--work", default="/tmp/ct3dflow-job-cpu")
    args = p.parse_args()

    import raycli
    from chain import AE_ARGS, AE_CLOCK, sentinel_manifest, write_chain_config
    from conftest import _platform_env, _run

    from ct3dflow.adapters.small_node import SMALL_NODE_ENV
    from ct3dflow.synthetic import make_archive

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "state").mkdir(parents=True)
    env = _platform_env(work / "state")
    env.update(RAY_HEAD_PORT="6395", RAY_DASHBOARD_PORT="8279", MLFLOW_PORT="5059",
               RAY_ADDRESS="http://127.0.0.1:8279", MLFLOW_TRACKING_URI="http://127.0.0.1:5059")
    for k in SMALL_NODE_ENV:
        env.pop(k, None)  # the head as the platform starts it, unless --head-env says otherwise
    env.update(kv.split("=", 1) for kv in args.head_env)
    make_archive(work / "archive", n_normal=6, n_abnormal=4, seed=3, splits=(0.5, 0.25, 0.25))
    manifest, _ = sentinel_manifest(work / "archive" / "manifest.parquet", work / "tune_manifest.parquet")
    ray = {"preprocess_concurrency": None, "sampling_concurrency": None, **json.loads(args.ray)}  # Ray's defaults
    config = write_chain_config(work / "cfg.yaml", "bench-glow", work / "work", manifest, work / "cache",
                                experiment="bench-job-cpu", registered_model="bench-glow", **ray)
    started = []
    try:
        for script in ("ray-head.sh", "mlflow-server.sh"):
            r = _run(script, "start", env, 300)
            started.append(script)
            if r.returncode:
                raise SystemExit(f"{script} did not start:\n{r.stdout}\n{r.stderr}")
        print(f"head environment: {' '.join(args.head_env) or '(the platform default)'}; ray: {args.ray}")
        for i, job in enumerate(args.jobs):
            script, ae = job.removesuffix("-ae"), job.endswith("-ae")
            extra = list(AE_ARGS) if ae else []
            if ae and script == "train":
                extra += [a for k, v in AE_CLOCK.items() for a in ("--set", f"train.{k}={v}")]
            time.sleep(3)  # the head settles between jobs
            sid, t, c = f"bench-{i}-{job}", time.time(), machine_cpu_seconds()
            r = raycli.submit(env, sid, ["python", f"jobs/{script}.py", "--config", str(config), *extra])
            status = raycli.job_status(env, sid)
            print(f"{job:9s} {status:10s} {time.time() - t:6.1f} s wall {machine_cpu_seconds() - c:7.1f} CPU-s",
                  flush=True)
            if r.returncode:
                print(r.stdout[-3000:], r.stderr[-2000:])
    finally:
        for script in reversed(started):
            _run(script, "stop", env, 120)


if __name__ == "__main__":
    main()
