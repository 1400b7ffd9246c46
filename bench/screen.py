"""Studies/min of the screening job (Ray Data, in-process ``ray.init``) against a plain sequential loop.

    .venv/bin/python bench/screen.py [--studies 20] [--write-docs]

One phantom archive (NIfTI and DICOM studies) and one tiny Glow3D are made once; then, each from a cold
cache and an empty results folder:

- ``sequential``: ``pipeline.preprocess_row`` then ``evaluation.score_row`` per study, one process;
- ``ray, N CPU``: ``ray_screen.screen_job`` in a fresh process with ``ray.init(num_cpus=N)``, N = 1, 2;
- ``ray re-run``: the same job again on the 2-CPU results: every study is skipped (already scored).

The Ray rows time the whole ``screen_job`` call (discovery, the MLflow run on a local SQLite store made
beforehand, Ray Data start-up, actor start, compaction), so they include fixed costs the loop has not.
``--write-docs`` appends (or replaces) this benchmark's section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform  # the standard library's, not the repository's platform/ folder
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE, SPACING = (48, 80, 96), (2.5, 2.5, 3.0)
PATCH, STRIDE = 16, 8
SECTION = "## Archive screening job (`bench/screen.py`)"




def make_inputs(d: Path, n: int) -> Path:
    """The archive (n studies, every 4th one a DICOM series) and a tiny Glow3D (untrained: speed only)."""
    import torch

    from ct3dflow.synthetic import make_phantom, write_dicom_series, write_nifti
    from ct3dflow.train import TrainConfig

    arch = d / "archive"
    for i in range(n):
        ph = make_phantom(9000 + i, shape=SHAPE, spacing=SPACING)
        if i % 4 == 3:
            write_dicom_series(ph, arch / f"dicom{i:02d}")
        else:
            write_nifti(ph, arch / f"study{i:02d}.nii.gz")
    torch.manual_seed(0)
    model = TrainConfig(levels=2, steps=2, width=8, patch_size=PATCH).build_model()
    model.eval()
    model.save(d / "model.pt")
    return arch


def run_sequential(d: Path, arch: Path) -> dict:
    import torch

    from ct3dflow.discovery import discover_studies
    from ct3dflow.evaluation import score_row
    from ct3dflow.models import load_patch_scorer
    from ct3dflow.pipeline import preprocess_row
    from ct3dflow.scoring import OperatingPoint

    torch.set_num_threads(1)
    model = load_patch_scorer(d / "model.pt", map_location="cpu")
    op = OperatingPoint(4.0, -2.0, 0.5, 5.0, -5000.0, 100.0)
    cache, out = d / "seq" / "cache", d / "seq" / "maps"
    t0 = time.time()
    entries = discover_studies(arch)
    ok = 0
    for e in entries:
        r = preprocess_row({"study_id": e["study_id"], "path": e["path"]}, str(cache), {"patch_size": PATCH})
        if r["status"] == "ok":
            with torch.no_grad():
                s = score_row(model, e, cache, out, {"patch_size": PATCH, "stride": STRIDE, "batch_size": 64}, op)
            ok += s["status"] == "ok"
    dt = time.time() - t0
    return {"mode": "sequential loop (1 process, 1 thread)", "studies": len(entries), "ok": ok, "seconds": dt}


def run_ray_child(d: Path, arch: Path, cpus: int, label: str, tag: str, results: str | None = None) -> dict:
    """In a fresh process (one ray.init per process): the screening job on a ``cpus``-CPU local Ray."""
    work = d / tag
    results = results or str(work / "results")
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
import mlflow, ray
from ct3dflow.config import load_config
from ct3dflow.adapters.ray_screen import screen_job
db = "sqlite:///{d}/mlflow.db"
mlflow.MlflowClient(db).search_experiments()  # the schema exists before timing
ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
cfg = load_config({str(ROOT / "configs" / "screen.yaml")!r}, {{
    "work_dir": {str(work)!r}, "data": {{"cache_dir": {str(work / "cache")!r}, "results_dir": {results!r}}},
    "scoring": {{"stride": {STRIDE}, "batch_size": 64}},
    "operating_point": {{"healthy_mean": -5000.0, "healthy_std": 100.0}},
    "ray": {{"preprocess_workers": {cpus}, "scoring_actors": 1, "preprocess_cpus": 1, "scoring_cpus": 1}},
    "mlflow": {{"tracking_uri": db, "system_metrics": False}}}})
t0 = time.time()
s = screen_job(cfg, {str(arch)!r}, model={str(d / "model.pt")!r})
s["seconds"] = time.time() - t0
print("BENCH " + json.dumps(s))
"""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", env=env,
                       timeout=1800)
    m = re.search(r"^BENCH (.*)$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"ray run {label} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    s = json.loads(m.group(1))
    return {"mode": label, "studies": s["found"], "ok": s["ok"], "scored": s["scored"], "skipped": s["skipped"],
            "seconds": s["seconds"]}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    started = datetime.now().isoformat(timespec="seconds")
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ct3dflow-bench-screen-") as tmp:
        d = Path(tmp)
        arch = make_inputs(d, args.studies)
        rows.append(run_sequential(d, arch))
        rows.append(run_ray_child(d, arch, 1, "ray job, 1 CPU worker (preprocessing task and actor 0.5 CPU each)",
                                  "ray1"))
        rows.append(run_ray_child(d, arch, 2, "ray job, 2 CPU workers (preprocessing task and actor 1 CPU each)",
                                  "ray2"))
        rows.append(run_ray_child(d, arch, 2, "ray job re-run, 2 CPUs (every study already scored: skipped)",
                                  "ray2", results=str(d / "ray2" / "results")))
    load_after = load_average()
    cmd = "python bench/screen.py " + " ".join(sys.argv[1:])
    lines = [
        SECTION, "",
        f"- date: {started}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); Python {_platform.python_version()}",
        f"- command: `{cmd.strip()}`",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        f"- input: {args.studies} phantom studies {SHAPE[::-1]} voxels (x, y, z) of {SPACING} mm, every 4th a "
        f"DICOM series, the rest NIfTI; an untrained tiny Glow3D (L=2, K=2, width 8, {PATCH}³ patches), grid "
        f"stride {STRIDE}; cold cache for every row except the re-run",
        "",
        "| mode | studies | ok | seconds | studies/min |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['studies']} | {r['ok']} | {r['seconds']:.1f} | "
                     f"{60 * r['studies'] / r['seconds']:.1f} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        doc = ROOT / "docs" / "BENCHMARKS.md"
        old = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
        if SECTION in old:  # replace our own section only (up to the next "## " heading)
            head, rest = old.split(SECTION, 1)
            nxt = rest.find("\n## ")
            old = head.rstrip("\n") + "\n\n" + (rest[nxt + 1:] if nxt >= 0 else "")
        doc.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")


if __name__ == "__main__":
    main()
