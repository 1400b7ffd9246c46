"""The nightly screening on realistic studies: seconds per study, and the Ray job against a sequential loop.

    .venv/bin/python bench/screen.py [--studies 4] [--model work/experiments/detection/model/model.pt]
                                     [--strides 12 6] [--map anatomy] [--write-docs]

Inputs, made once: ``--studies`` chest phantoms written as DICOM series of 512 × 512 × 300 slices
(0.7 × 0.7 × 1.0 mm, as a thin-slice chest CT; ≈ 150 × 179 × 179 voxels on the 2 mm grid), and the detection
model of ``experiments/detection.py`` (L=3, K=8, width 64, 24³) when it exists, else the same architecture
freshly initialised (the speed is the same; say which in the output). Then, in one run, on this machine:

1. **scoring alone**: the voxel map of each study through the core scorer (:class:`ct3dflow.detect.batch.Scorer`,
   the one the Ray actors run), at each ``--strides`` (the default first), 2 torch threads; then **the decision
   alone** on that map (σ-smoothing, z against the healthy reference, components, volume) with the depth
   reference (``voxel``) and with the anatomy bands (``anatomy``), each fitted on the first (healthy) study;
2. **the whole row, sequentially**: :func:`ct3dflow.detect.batch.score_locally` (hash, read, resample, masks,
   cache, voxel map, decision, NIfTI + PNG) from a cold cache, with 1 and with 2 torch threads;
3. **the Ray job**: :func:`ct3dflow.adapters.ray_screen.screen_job` in a fresh process on ``ray.init(num_cpus=2)``
   from a cold cache, with 1 and with 2 scoring actors, the MLflow run on a local SQLite store made beforehand;
   then with one actor of ``--actor-threads`` torch threads (``ray.scoring_threads``; default 2: the loop's
   threads in one actor, a preprocessing task beside it).

``--write-docs`` replaces this benchmark's section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform  # the standard library's, not the repository's platform/ folder
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _machine import cpu_model, write_docs_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.detect import DEFAULT_KIND  # noqa: E402

SHAPE, SPACING = (300, 512, 512), (0.7, 0.7, 1.0)  # (z, y, x) slices, (x, y, z) mm
DETECTION_MODEL = ROOT / "work" / "experiments" / "detection" / "model" / "model.pt"
SECTION = "## Archive screening on realistic studies (`bench/screen.py`)"
DECISION_PARAMS = {"sigma_vox": 2.0, "tau_z": 4.0, "v_min_cm3": 1.0}  # speed only: not a tuned point
PACS_SECTION = "## Archive screening, the folder path against the PACS path (`bench/screen.py --pacs`, issue 13)"


def make_inputs(d: Path, n: int, model_path: Path | None, small: bool = False,
                map_kind: str = "anatomy") -> tuple[Path, Path, str, dict]:
    """The archive (n DICOM studies, 2 of every 3 abnormal), the model and an operating point of ``map_kind`` for
    it (the whole-row and Ray rows decide with it)."""
    import torch

    from ct3dflow.detect import OperatingPoint, get_kind
    from ct3dflow.models import load_patch_scorer
    from ct3dflow.preprocess import PreprocessConfig, preprocess_study
    from ct3dflow.synthetic import PATHOLOGIES, make_phantom, write_dicom_series
    from ct3dflow.train import TrainConfig

    arch = d / "archive"
    t0 = time.time()
    for i in range(n):
        kind = None if i % 3 == 0 else PATHOLOGIES[i % len(PATHOLOGIES)]
        size = {"size": "small"} if small else {"shape": SHAPE, "spacing": SPACING}
        write_dicom_series(make_phantom(7000 + i, kind, **size), arch / f"study{i:02d}")
    print(f"archive: {n} DICOM series in {time.time() - t0:.0f} s", flush=True)
    if model_path and model_path.exists():
        shutil.copy(model_path, d / "model.pt")
        which = f"the detection model ({model_path})"
    else:
        from ct3dflow.patches import extract_patches, sample_patch_corners

        torch.manual_seed(0)
        model = TrainConfig(levels=3, steps=8, width=64, patch_size=24).build_model()
        st = preprocess_study(arch / "study00")
        x = extract_patches(st.volume, sample_patch_corners(st.strict, 24, 64, 0.5, 0), 24)[:, None]
        model.initialize(torch.from_numpy(x))
        model.eval().save(d / "model.pt")
        which = "an initialised, untrained model of the detection architecture (no detection model on disk)"
    # an operating point whose reference comes from one healthy study (speed only: the numbers are not tuned)
    model = load_patch_scorer(d / "model.pt")
    kind = get_kind(map_kind)
    healthy = preprocess_study(arch / "study00", PreprocessConfig())
    settings = kind.settings({}, model.patch_size)
    score = kind.score(kind.prepare(model, "cpu"), healthy, settings)
    ref = kind.fit_reference([score], [healthy.permissive], DECISION_PARAMS)
    op = OperatingPoint(kind.name, DECISION_PARAMS, 5.0, ref,
                        {k: settings[k] for k in ("patch_size", "stride", "part")})
    op.save(d / "op.json")
    return arch, d / "model.pt", which, {"grid": list(healthy.volume.shape), "windows": score.n_windows}


def run_scoring_alone(d: Path, arch: Path, model_path: Path, strides: list[int]) -> list[dict]:
    """The voxel map of every (preprocessed) study through the core Scorer, per stride."""
    import torch

    from ct3dflow.cache import StudyCache
    from ct3dflow.detect import OperatingPoint, get_kind
    from ct3dflow.models import load_patch_scorer
    from ct3dflow.preprocess import PreprocessConfig

    torch.set_num_threads(2)
    cache = StudyCache(d / "pre-cache")
    studies = sorted(p for p in arch.iterdir())
    for p in studies:
        cache.get_or_compute(p.name, p, PreprocessConfig())
    model = load_patch_scorer(model_path)
    kind = get_kind("voxel")
    predictor = kind.prepare(model, "cpu")
    rows = []
    for stride in strides:
        settings = kind.settings({"stride": stride}, model.patch_size)
        secs, windows, maps = [], [], []
        for p in studies:
            st = cache.load(p.name)
            t0 = time.time()
            score = kind.score(predictor, st, settings)
            secs.append(time.time() - t0)
            windows.append(score.n_windows)
            maps.append((st, score))
        rows.append({"mode": f"voxel map only, stride {stride} (core scorer, 2 threads)", "studies": len(studies),
                     "seconds_per_study": sum(secs) / len(secs), "windows": sum(windows) / len(windows)})
        print(rows[-1], flush=True)
        if stride != strides[0]:
            continue
        for name in ("voxel", "anatomy"):  # the decision on the default stride's maps
            k = get_kind(name)
            ref = k.fit_reference([maps[0][1]], [maps[0][0].permissive], DECISION_PARAMS)
            op = OperatingPoint(name, DECISION_PARAMS, 5.0, ref, {})
            t0 = time.time()
            for st, score in maps:
                k.decide(score, st.permissive, st.spacing, op)
            rows.append({"mode": f"decision only, {name} reference (σ-smoothing, z, components, volume)",
                         "studies": len(studies), "seconds_per_study": (time.time() - t0) / len(maps),
                         "windows": float("nan")})
            print(rows[-1], flush=True)
    return rows


def run_sequential(d: Path, arch: Path, model_path: Path, threads: int) -> dict:
    import torch

    from ct3dflow.detect.batch import ScoringPlan, score_locally
    from ct3dflow.discovery import discover_studies
    from ct3dflow.models import load_patch_scorer
    from ct3dflow.preprocess import PreprocessConfig

    torch.set_num_threads(threads)
    model = load_patch_scorer(model_path)
    tag = f"seq{threads}"
    op = json.loads((d / "op.json").read_text())
    plan = ScoringPlan.make(op["map"], {}, model.patch_size, op, str(model_path),
                            "bench/1", PreprocessConfig(patch_size=model.patch_size).to_dict(), d / tag / "cache",
                            d / tag / "results")
    t0 = time.time()
    res, _ = score_locally(discover_studies(arch), plan, model)
    dt = time.time() - t0
    row = {"mode": f"sequential loop, whole row ({threads} torch thread{'s' if threads > 1 else ''})",
           "studies": len(res), "ok": int((res.status == "ok").sum()), "seconds": dt,
           "seconds_per_study": dt / len(res)}
    print(row, flush=True)
    return row


def run_ray_child(d: Path, arch: Path | str, model_path: Path, actors: int, source: dict | None = None,
                  label: str = "", threads: int | None = None) -> dict:
    """In a fresh process (one ray.init per process): the screening job on a 2-CPU local Ray. ``arch`` is a folder
    or a ``dicomweb+`` URL (then ``source`` holds its credentials). ``threads``: ray.scoring_threads (torch threads
    per actor; None: Ray's default, one for the actors' half CPU)."""
    work = d / f"ray{actors}{'-pacs' if source else ''}{f'-t{threads}' if threads else ''}"
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
import mlflow, ray
from ct3dflow.config import load_config
from ct3dflow.adapters.ray_screen import screen_job
db = "sqlite:///{d}/mlflow.db"
mlflow.MlflowClient(db).search_experiments()  # the schema exists before timing
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
cfg = load_config({str(ROOT / "configs" / "screen.yaml")!r}, {{
    "work_dir": {str(work)!r}, "data": {{"cache_dir": {str(work / "cache")!r}}},
    "operating_point": json.load(open({str(d / "op.json")!r})),
    "ray": {{"preprocess_workers": 2, "scoring_actors": {actors}, "preprocess_cpus": 0.5, "scoring_cpus": 0.5,
            "scoring_threads": {threads!r}}},
    "mlflow": {{"tracking_uri": db, "system_metrics": False}}, "source": {source or {}!r}}})
t0 = time.time()
s = screen_job(cfg, {str(arch)!r}, model={str(model_path)!r})
s["seconds"] = time.time() - t0
print("BENCH " + json.dumps(s))
"""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", errors="replace", env=env,
                       timeout=3600)
    m = re.search(r"^BENCH (.*)$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"ray run with {actors} actor(s) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    s = json.loads(m.group(1))
    each = f" with {threads} torch threads{' each' if actors > 1 else ''}" if threads else ""
    row = {"mode": f"Ray job, 2 CPUs, {actors} scoring actor{'s' if actors > 1 else ''}{each} (whole row){label}",
           "studies": s["found"], "ok": s["ok"], "seconds": s["seconds"],
           "seconds_per_study": s["seconds"] / s["found"]}
    print(row, flush=True)
    return row


def run_pacs(d: Path, arch: Path, model_path: Path, actors: int = 2) -> tuple[dict, float]:
    """The same studies through the PACS path: a real Orthanc with its DICOMweb plugin on 127.0.0.1
    (platform/orthanc.sh), seeded over STOW-RS (not timed as screening), then the screening job retrieving
    them over WADO-RS and storing its SR and SEG back. Returns the row and the seeding seconds."""
    import pydicom

    from ct3dflow.adapters.dicomweb import DicomWebSource

    port = 8062
    env = {**os.environ, "CT3DFLOW_STATE": str(d / "orthanc-state"), "ORTHANC_HTTP_PORT": str(port)}
    orthanc = ["bash", str(ROOT / "platform" / "orthanc.sh")]
    r = subprocess.run(orthanc + ["start"], env=env, capture_output=True, text=True, timeout=120)
    try:
        if r.returncode != 0:
            raise RuntimeError(f"Orthanc did not start: {r.stdout}{r.stderr}")
        url = f"http://127.0.0.1:{port}/dicom-web"
        creds = str(d / "orthanc-state" / f"orthanc-{port}" / "credentials.json")
        client = DicomWebSource.from_config(f"dicomweb+{url}", {"credentials_file": creds}).client()
        t0 = time.time()
        for study in sorted(arch.iterdir()):
            client.store_instances([pydicom.dcmread(f) for f in sorted(study.glob("*.dcm"))])
        seeding = time.time() - t0
        print(f"PACS seeded with {len(list(arch.iterdir()))} studies in {seeding:.0f} s", flush=True)
        row = run_ray_child(d, f"dicomweb+{url}", model_path, actors,
                            source={"credentials_file": creds, "lookback_days": None},
                            label=", from the PACS: WADO-RS in, SR + SEG stored back")
        return row, seeding
    finally:
        subprocess.run(orthanc + ["stop"], env=env, capture_output=True, text=True, timeout=120)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--model", default=str(DETECTION_MODEL))
    ap.add_argument("--strides", type=int, nargs="+", default=[12, 6])
    ap.add_argument("--pacs", action="store_true", help="also the PACS path (needs Orthanc + its DICOMweb plugin)")
    ap.add_argument("--skip-alone", action="store_true", help="no scoring-alone and sequential rows")
    ap.add_argument("--actor-threads", type=int, nargs="*", default=[2],
                    help="also the Ray job with one scoring actor of this many torch threads (ray.scoring_threads)")
    ap.add_argument("--small", action="store_true", help="the tests' small phantoms instead of realistic studies")
    ap.add_argument("--map", default=DEFAULT_KIND, choices=["voxel", "anatomy"],
                    help="the operating point's kind for the whole-row and Ray rows (default: the platform's, "
                         "%(default)s)")
    ap.add_argument("--skip-ray", action="store_true", help="no Ray rows")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    started = datetime.now().isoformat(timespec="seconds")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="ct3dflow-bench-screen-") as tmp:
        d = Path(tmp)
        arch, model_path, which, info = make_inputs(d, args.studies, Path(args.model), args.small, args.map)
        alone = [] if args.skip_alone else run_scoring_alone(d, arch, model_path, args.strides)
        seq = [] if args.skip_alone else [run_sequential(d, arch, model_path, t) for t in (1, 2)]
        configs = [(2, None)] if args.skip_alone else [(1, None), (2, None)]
        configs += [(1, t) for t in args.actor_threads]
        ray_rows = [] if args.skip_ray else [run_ray_child(d, arch, model_path, n, threads=t) for n, t in configs]
        seeding = None
        if args.pacs:
            pacs_row, seeding = run_pacs(d, arch, model_path)
            ray_rows.append(pacs_row)
    best = min(r["seconds"] for r in seq or ray_rows[:1])
    baseline = "the best sequential loop" if seq else "the folder Ray job"
    source = "the small test phantoms" if args.small else \
        f"{SHAPE[2]} × {SHAPE[1]} × {SHAPE[0]} voxels ({SPACING[0]} × {SPACING[1]} × {SPACING[2]} mm)"
    lines = [
        PACS_SECTION if args.pacs else SECTION, "",
        f"- date: {started}; CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); Python {_platform.python_version()}",
        f"- command: `python bench/screen.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_average()}",
        f"- input: {args.studies} phantom chest CTs as DICOM series of {source}, {info['grid'][2]} × "
        f"{info['grid'][1]} × {info['grid'][0]} on the 2 mm grid, {info['windows']} windows of 24³ at stride "
        f"{args.strides[0]}; model: {which}; the whole rows decide with an operating point of the {args.map} kind",
    ]
    if alone:
        lines += ["", "| mode | studies | s per study | windows per study |", "|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['studies']} | {r['seconds_per_study']:.1f} | "
                  f"{'—' if r['windows'] != r['windows'] else format(r['windows'], '.0f')} |" for r in alone]
    lines += ["", f"| mode | studies | ok | seconds | s per study | studies/min | vs {baseline} |",
              "|---|---|---|---|---|---|---|"]
    for r in seq + ray_rows:
        lines.append(f"| {r['mode']} | {r['studies']} | {r['ok']} | {r['seconds']:.1f} | "
                     f"{r['seconds_per_study']:.1f} | {60 * r['studies'] / r['seconds']:.2f} | "
                     f"{best / r['seconds']:.2f}× |")
    if seeding is not None:
        lines += ["", f"Seeding the PACS over STOW-RS (not part of the screening rows): {seeding:.0f} s. Each run "
                  "starts from a cold cache; the PACS row includes discovery over QIDO-RS, retrieval over WADO-RS and "
                  "storing one SR (and, for a flagged study, one SEG) per study back over STOW-RS."]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_docs_section(lines[0], text, ROOT / "docs" / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
