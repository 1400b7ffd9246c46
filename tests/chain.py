"""The platform's chain, run once per test session with `ray job submit` against the session's real Ray head and MLflow
server (conftest's ``jobs_done``): for CT-3DFlow on the ``anatomy-density`` map (the default ``anatomy`` voxel map
and the parenchyma density, against anatomy-banded references; opt-in, so the chain runs it through every job) train
(stopped after its first checkpoint, then resumed) → tune → the nightly screening of tonight's archive (a hostile
one, tests/tonight_archive.py: the first job's scoring actor is killed and the job stopped mid-run, the second
resumes it) → evaluate; for the AE baseline on the paper's patch map train → tune → evaluate (one evaluate job for
both champions). The CT-3DFlow champion is announced as soon as it is tuned, and the nightly screening's outcome as
soon as it is done, so the tests that need only those (test_pacs.py, test_screen.py) run beside the rest of the
chain. Several test modules read the chain; conftest starts it in the background when the session starts, while
the tests that do not need it run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import raycli
import yaml
from tonight_archive import tonights_archive, write_config

from ct3dflow.synthetic import make_archive

# 60 steps with a checkpoint every 10: the first train job is stopped after its first checkpoint, well before
# it could finish, and the second submission resumes it (test_ray_jobs)
TINY_TRAIN = {"levels": 2, "steps": 2, "width": 8, "patch_size": 16, "batch_size": 4, "iterations": 60,
              "lr": 2e-3, "warmup_steps": 5, "val_every": 30, "n_val_patches": 8, "checkpoint_every": 10,
              "min_lung_fraction": 0.5, "seed": 0}
# exact ties on purpose: every v_min below one voxel (0.008 cm³) gives the same volumes, so the tie-break decides
# (two trials per kind, one after the other in one reused trial actor)
TUNE = {"num_samples": 1, "threshold_cm3": [0.0, 1.0e6], "seed": 0, "n_boot": 200, "max_concurrent_trials": 1,
        "anatomy-density": {"sigma_vox": {"grid": [1.0]}, "tau_z": {"grid": [2.0]},
                            "v_min_cm3": {"grid": [0.0, 0.0001]}, "density_weight": {"grid": [0.5]},
                            "blob_weight": {"grid": [0.5]}},
        "patch": {"sigma_vox": {"grid": [1.0]}, "tau_z": {"grid": [-1.0]}, "v_min_cm3": {"grid": [0.0, 0.0001]}}}
GLOW, AE = "ct3dflow-glow3d-te", "ct3dflow-ae-te"
TWO_WORKERS = ("--set", "ray.num_workers=2")
AE_ARGS = ("--set", "train.model=ae", "--set", "name=te-ae", "--set", f"mlflow.registered_model={AE}",
           "--set", "scoring.map=patch")  # the paper's AE row: an autoencoder has no flow to map per voxel
# the AE trains against the clock, on both workers: 6 s of a 2,000-step budget it cannot finish, the last 3 s of
# them at lr/10 (test_ray_jobs)
AE_CLOCK = {"iterations": 2000, "max_minutes": 0.1, "checkpoint_every": 1000, "lr_decay_at": 0.5}


def sentinel_manifest(real: Path, out: Path) -> tuple[Path, list[str]]:
    """The real manifest with every test row replaced by a sentinel whose file does not exist."""
    df = pd.read_parquet(real)
    df["path"] = [str(real.parent / p) for p in df["path"]]
    test = df["split"] == "test"
    sentinels = [f"sentinel-test-{i}" for i in range(int(test.sum()))]
    df.loc[test, "study_id"] = sentinels
    df.loc[test, "path"] = [str(out.parent / "does-not-exist" / f"{s}.nii.gz") for s in sentinels]
    df.to_parquet(out)
    return out, sentinels


def add_broken_rows(manifest: Path, folder: Path, dup_id: str, dup_path: str) -> dict[str, str]:
    """Rows the train job's preprocessing must turn into error rows (no split: tune and evaluate never see
    them): a missing file, an empty folder, a folder without DICOM, a duplicate study id. Returns id → reason."""
    (folder / "empty").mkdir(parents=True)
    (folder / "notdicom").mkdir()
    (folder / "notdicom" / "a.txt").write_text("hello")
    bad = pd.DataFrame([{"study_id": "missing", "path": str(folder / "nope.nii.gz")},
                        {"study_id": "empty", "path": str(folder / "empty")},
                        {"study_id": "notdicom", "path": str(folder / "notdicom")},
                        {"study_id": dup_id, "path": dup_path}])
    pd.concat([pd.read_parquet(manifest), bad], ignore_index=True).to_parquet(manifest)
    return {"missing": "not found", "empty": "empty", "notdicom": "none is DICOM", dup_id: "duplicate"}


def write_chain_config(path: Path, name: str, work: Path, manifest: Path, cache: Path, experiment: str = "ct3dflow-te",
                       registered_model: str = GLOW, **ray) -> Path:
    """The chain's job configuration (tiny CT-3DFlow, two Ray Train workers on half a CPU each); ``ray`` overrides
    its ray section (bench/job_cpu.py)."""
    cfg = {"name": name, "work_dir": str(work), "data": {"manifest": str(manifest), "cache_dir": str(cache)},
           "train": TINY_TRAIN, "scoring": {"map": "anatomy-density", "stride": 8, "batch_size": 32}, "tune": TUNE,
           # one Ray Train worker, two where a test is about every rank (the AE's clock: DDP hangs unless both
           # stop at one step); each worker is a process of ≈ 25 CPU-s here (docs/BENCHMARKS.md)
           "ray": {"num_workers": 1, "use_gpu": False, "backend": "gloo", "cpus_per_worker": 0.5, "log_every": 5,
                   "preprocess_workers": 1, "preprocess_cpus": 0.5, "scoring_actors": 1, "scoring_cpus": 0.5,
                   # one Ray worker process each: a process costs a job ≈ 5 CPU-s to start on 2 cores, and
                   # these studies and patches are tiny (docs/BENCHMARKS.md)
                   "preprocess_concurrency": 1, "sampling_concurrency": 1, **ray},
           "mlflow": {"experiment": f"{experiment}-train", "comparison_experiment": f"{experiment}-comparison",
                      "registered_model": registered_model}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_stopped_then_resumed(env: dict, config: Path, run_dir: Path, run) -> dict:
    """The CT-3DFlow train job is submitted, stopped (`ray job stop`) once its first checkpoint is on disk, and
    submitted again with the same name: the second submission resumes it and gives the chain its model."""
    r = raycli.submit(env, "te-train-glow-stopped", ["python", "jobs/train.py", "--config", str(config)], wait=False)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 400
    while not (ckpts := sorted(run_dir.glob("checkpoint_*/metrics.json"))):
        status = raycli.job_status(env, "te-train-glow-stopped")
        assert status in ("PENDING", "RUNNING"), raycli.job_logs(env, "te-train-glow-stopped")[-3000:]
        assert time.time() < deadline, "no checkpoint within 400 s"
        time.sleep(0.2)
    first_seen = json.loads(ckpts[0].read_text())["step"]
    time.sleep(1.0)  # let Ray Train register it before the stop
    raycli.ray_cli(env, "job", "stop", "te-train-glow-stopped", timeout=120)
    status = raycli.job_status(env, "te-train-glow-stopped")
    assert status == "STOPPED", f"the first train job was not stopped mid-run ({status}): raise train.iterations"
    out = {"first_seen": first_seen, "status": status,
           "on_disk": sorted({json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/metrics.json")}),
           "first_run_id": (run_dir / "mlflow_run_id").read_text().strip()}
    out["log"] = run("te-train-glow", "jobs/train.py")
    return out


def run_chain(env: dict, tmp: Path, champion: Future | None = None, nightly: Future | None = None,
              ready=None) -> dict:
    """The chain; ``champion`` (when given) gets the CT-3DFlow champion's model file as soon as its operating
    point is tuned, and ``nightly`` the nightly screening's outcome once it is done, so the tests that need
    only those (the PACS and screening tests) go on while the rest of the chain (the AE, the evaluations)
    runs; each gets the chain's exception if the chain fails before. ``ready`` (when given) waits for the Ray
    head and the MLflow server: the chain writes its archives first, while they start."""
    try:
        return _run_chain(env, tmp, champion, nightly, ready)
    except BaseException as exc:
        for future in (champion, nightly):
            if future is not None and not future.done():
                future.set_exception(exc)
        raise


def parts_of(work: Path) -> dict[str, int]:
    """A screening job's result parts (one per study, an error row's too): file name → modification time."""
    return {p.name: p.stat().st_mtime_ns for p in (work / "results" / "parts").glob("*.parquet")}


def ok_parts(work: Path, seen: dict | None = None) -> dict[str, int]:
    """The parts of studies scored (an error row has a part too). ``seen`` keeps each part's status by (name,
    time), so that a poll reads only the parts written since the last one."""
    parts, seen, now = work / "results" / "parts", {} if seen is None else seen, parts_of(work)
    for k, v in now.items():
        if (k, v) not in seen:
            seen[k, v] = pd.read_parquet(parts / k).status.iloc[0] == "ok"
    return {k: v for k, v in now.items() if seen[k, v]}


def _wait_ok_parts(env, sid: str, work: Path, k: int, seen: dict, timeout: float = 240) -> int:
    """Waits until the job has ``k`` studies scored, or has ended, or ``timeout`` passed; returns how many
    (``seen``: :func:`ok_parts`'s statuses, kept across the night's polls)."""
    deadline = time.time() + timeout
    while (n := len(ok_parts(work, seen))) < k:
        if time.time() > deadline or raycli.job_status(env, sid) not in ("PENDING", "RUNNING"):
            break
        time.sleep(0.3)
    return n


def screening_interrupted(env, sid: str, entrypoint: list[str], work: Path) -> dict:
    """The screening job is submitted; its scoring actor is killed (SIGKILL) once its first study is scored, and
    the job is stopped (`ray job stop`) as soon as the actor Ray started in its place has scored one more. What
    it saw is returned for test_screen.py to check: the pids of the actors in the logs, the studies done at the
    kill and at the stop, the parts on disk with their times, the job's status and logs."""
    r = raycli.submit(env, sid, entrypoint, wait=False)
    assert r.returncode == 0, r.stderr
    deadline, pid = time.time() + 240, None
    while pid is None and time.time() < deadline and raycli.job_status(env, sid) in ("PENDING", "RUNNING"):
        m = re.search(r"scoring actor pid (\d+) loaded", raycli.job_logs(env, sid))
        pid = int(m.group(1)) if m else None
        time.sleep(0.3)
    assert pid, raycli.job_logs(env, sid)[-3000:]
    seen: dict = {}  # each part's status, read once for the whole night
    out = {"killed": pid, "done_before_kill": _wait_ok_parts(env, sid, work, 1, seen)}
    with contextlib.suppress(ProcessLookupError):  # gone already: the job ended (test_screen.py says so)
        os.kill(pid, signal.SIGKILL)
    done = len(ok_parts(work, seen))  # what the killed actor finished; any further part is a new actor's
    # stopped at once when the new actor's first part lands (the job's logs reach the REST API seconds late,
    # and by then the tiny studies may all be done): its pid is read from the logs afterwards
    _wait_ok_parts(env, sid, work, done + 1, seen)
    out["status"] = raycli.stop_job(env, sid)
    out["logs"] = raycli.job_logs(env, sid)
    out["pids"] = {int(p) for p in re.findall(r"scoring actor pid (\d+) loaded", out["logs"])}
    time.sleep(1)
    out["parts"], out["ok"] = parts_of(work), set(ok_parts(work, seen))
    return out


def nightly_screening(env: dict, run, tonight: dict, folder: Path, tracking_uri: str) -> dict:
    """The nightly screening job with the CT-3DFlow champion (its map kind and operating point from the model
    version's tag) over tonight's archive (``tonights_archive``), as a hard night goes: the first submission's
    scoring actor is killed and the job is stopped mid-run (``screening_interrupted``); tonight's last study
    arrives; the second submission resumes the night. Returns the archive, its expectations, the job's work
    folder, the second job's logs and what the first one saw (``interrupted``)."""
    work = folder / "work"
    # one actor of 2 torch threads on its half CPU: ray.scoring_threads reaches the actor (test_screen.py)
    cfg = write_config(folder / "screen.yaml", work, tracking_uri, GLOW, scoring_threads=2)
    entry = ["python", "jobs/screen.py", "--config", str(cfg), "--archive", str(tonight["archive"])]
    sid = "te-screen-nightly"
    interrupted = screening_interrupted(env, f"{sid}-stopped", [*entry, "--run-name", f"{sid}-stopped"], work)
    held, late = tonight["late"]
    held.rename(late)
    logs = run(sid, "jobs/screen.py", "--archive", str(tonight["archive"]), "--run-name", sid, config=cfg)
    return {**tonight, "work": work, "cfg": cfg, "logs": logs, "interrupted": interrupted}


def _run_chain(env: dict, tmp: Path, champion: Future | None, nightly: Future | None, ready) -> dict:
    df = make_archive(tmp / "archive", n_normal=6, n_abnormal=4, seed=3, splits=(0.5, 0.25, 0.25))
    real = tmp / "archive" / "manifest.parquet"
    tune_manifest, sentinels = sentinel_manifest(real, tmp / "tune_manifest.parquet")
    dup = df[df.split != "test"].iloc[0]  # a duplicate of a test study would bring the test split back in
    broken = add_broken_rows(tune_manifest, tmp / "broken", str(dup.study_id), str(real.parent / dup.path))
    if ready is not None:
        ready()
    # tonight's archive is needed by the nightly screening only: written while the first jobs run
    tonight_pool = ThreadPoolExecutor(1, thread_name_prefix="tonight")
    tonight = tonight_pool.submit(tonights_archive, tmp / "nightly" / "archive")
    tonight_pool.shutdown(wait=False)
    work = tmp / "work"
    config = write_chain_config(tmp / "cfg.yaml", "te-glow", work, tune_manifest, tmp / "cache")
    evaluate = ("--set", f"data.manifest={real}")
    out: dict = {"tmp": tmp, "work": work, "df": df, "sentinels": sentinels, "statuses": {}, "config": config,
                 "broken": broken}

    timings = out["timings"] = {}

    def run(sid, script, *extra, config=config):
        t = time.time()
        r = raycli.submit(env, sid, ["python", script, "--config", str(config), *extra])
        timings[sid] = round(time.time() - t, 1)
        status, log = raycli.job_status(env, sid), r.stdout[-12000:] + r.stderr[-3000:]
        out["statuses"][sid] = (status, log)
        assert status == "SUCCEEDED", f"{sid}: {log}"
        return r.stdout

    out["resume"] = train_stopped_then_resumed(env, config, work / "ray_results" / "te-glow", run)
    run("te-tune-glow", "jobs/tune.py")
    out["model_file"] = next((work / "ray_results").glob("te-glow/model.pt"))
    if champion is not None:
        champion.set_result({"model_file": out["model_file"], "registered_model": GLOW})
    out["nightly"] = nightly_screening(env, run, tonight.result(), tmp / "nightly", env["MLFLOW_TRACKING_URI"])
    if nightly is not None:
        nightly.set_result(out["nightly"])
    clock = tuple(a for k, v in AE_CLOCK.items() for a in ("--set", f"train.{k}={v}"))
    run("te-train-ae", "jobs/train.py", *AE_ARGS, *clock, *TWO_WORKERS)
    run("te-tune-ae", "jobs/tune.py", *AE_ARGS)
    # snapshot before the test split is ever used
    out["after_tune_files"] = [str(p) for p in work.rglob("*")] + [str(p) for p in (tmp / "cache").rglob("*")]
    # both champions in one evaluate job, each with its own operating point and map kind (jobs/evaluate.py)
    run("te-eval", "jobs/evaluate.py", *evaluate, "--model", f"models:/{GLOW}@champion", f"models:/{AE}@champion")
    (tmp / "timings.json").write_text(json.dumps(timings, indent=1))  # seconds per job, to keep the suite short
    return out
