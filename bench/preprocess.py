"""Benchmark: read → resample to 2 mm → lung masks of one 512×512×300 DICOM study, on ONE core.

    make bench-preprocess            # or: .venv/bin/python bench/preprocess.py [--repeats 3] [--no-append]

Builds a synthetic torso (0.7×0.7×1.0 mm, 300 slices of 512×512, int16 DICOM with rescale) once in a
temporary folder (reused across runs), times ``ct3dflow`` stage by stage (median of ``--repeats``), and, in
the same run and on the same input, MONAI's LoadImage → Orientation("LPS") → Spacing(2 mm) →
ScaleIntensityRange (the ``bench`` extra; if MONAI is missing, only ours is printed). Threads are pinned to
one (SimpleITK, OpenMP/MKL/BLAS, torch). The markdown table is printed and written into
docs/BENCHMARKS.md (the section is replaced when it exists).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _machine import cpu_model  # noqa: E402
from dicom_helpers import synthetic_torso, write_dicom_series  # noqa: E402

from ct3dflow import lungs  # noqa: E402
from ct3dflow.io import read_ct  # noqa: E402
from ct3dflow.preprocess import PreprocessConfig, normalise, resample_isotropic  # noqa: E402

SHAPE = (300, 512, 512)  # (z, y, x)
SPACING = (0.7, 0.7, 1.0)  # (x, y, z) mm
HEADING = "## Preprocessing on one core (`bench/preprocess.py`)"


def build_series(folder: Path) -> Path:
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    hu, _ = synthetic_torso(SHAPE, SPACING, noise_hu=20.0)
    write_dicom_series(hu, folder, spacing=SPACING, origin=(-179.0, -179.0, -150.0))
    done.write_text("ok\n", encoding="utf-8")
    print(f"wrote {SHAPE[0]} slices to {folder} in {time.perf_counter() - t:.1f} s", flush=True)
    return folder


def run_ours(folder: Path, cfg: PreprocessConfig) -> tuple[dict, tuple]:
    t = {}
    t0 = time.perf_counter()
    img, _ = read_ct(folder)
    t["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    iso = resample_isotropic(img, cfg.spacing_mm, cfg.pad_hu)
    hu = sitk.GetArrayFromImage(iso)
    t["resample"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    sp = iso.GetSpacing()
    strict = lungs.strict_lung_mask(hu, sp)
    t["strict mask"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    lungs.permissive_lung_mask(hu, strict, sp)
    t["permissive mask"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    normalise(hu, cfg)
    t["normalise"] = time.perf_counter() - t4
    t["total"] = time.perf_counter() - t0
    r, l = lungs.lung_volumes_cm3(strict, sp)
    return t, (hu.shape, r, l)


def run_monai(folder: Path) -> tuple[dict, tuple] | None:
    try:
        import torch
        from monai.transforms import LoadImage, Orientation, ScaleIntensityRange, Spacing
    except Exception as exc:  # noqa: BLE001 — any import problem means "MONAI missing"
        print(
            f"MONAI is missing ({type(exc).__name__}: {exc}); install the bench extra: pip install '.[bench]'"
        )
        return None
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    load = LoadImage(image_only=True, ensure_channel_first=True, reader="PydicomReader")
    orient = Orientation(axcodes="LPS")
    spacing = Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear", padding_mode="border")
    scale = ScaleIntensityRange(a_min=-1020.0, a_max=200.0, b_min=-0.5, b_max=0.5, clip=True)
    t = {}
    t0 = time.perf_counter()
    x = load(str(folder))
    t["read"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    x = orient(x)
    t["orientation"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    x = spacing(x)
    t["resample"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    x = scale(x)
    t["normalise"] = time.perf_counter() - t3
    t["total"] = time.perf_counter() - t0
    return t, (tuple(x.shape[1:]),)


def median_runs(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    if runs[0] is None:
        return None
    keys = runs[0][0].keys()
    return {k: statistics.median(r[0][k] for r in runs) for k in keys}, runs[-1][1]




def write_section(text: str) -> Path:
    path = ROOT / "docs" / "BENCHMARKS.md"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        old = old[:start].rstrip("\n") + ("\n\n" + old[nxt + 1 :] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ct3dflow-bench-512x512x300")
    ap.add_argument("--no-append", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = ap.parse_args(argv)

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    folder = build_series(args.data)
    cfg = PreprocessConfig()
    ours = median_runs(lambda: run_ours(folder, cfg), args.repeats)
    monai = median_runs(lambda: run_monai(folder), args.repeats)

    t, (shape, r, l) = ours
    rows = [
        "| pipeline | read s | resample s | masks s | normalise s | total s | output (z, y, x) |",
        "|---|---|---|---|---|---|---|",
        f"| ct3dflow (SimpleITK; anti-aliased) | {t['read']:.2f} | {t['resample']:.2f} | "
        f"{t['strict mask'] + t['permissive mask']:.2f} (strict {t['strict mask']:.2f}, permissive "
        f"{t['permissive mask']:.2f}) | {t['normalise']:.2f} | {t['total']:.2f} | {shape} |",
        f"| ct3dflow read → resample only | {t['read']:.2f} | {t['resample']:.2f} | – | – | "
        f"{t['read'] + t['resample']:.2f} | {shape} |",
    ]
    if monai is not None:
        m, (mshape,) = monai
        rows.append(
            f"| MONAI LoadImage(PydicomReader) → Orientation(LPS) → Spacing(2 mm, bilinear) → "
            f"ScaleIntensityRange | {m['read']:.2f} | {m['orientation'] + m['resample']:.2f} "
            f"(orientation {m['orientation']:.2f}) | – | {m['normalise']:.2f} | "
            f"{m['total']:.2f} | {mshape} (x, y, z) |"
        )
    else:
        rows.append("| MONAI | not installed (`pip install '.[bench]'`) | | | | | |")
    import scipy

    versions = f"SimpleITK {sitk.Version.VersionString()}, numpy {np.__version__}, scipy {scipy.__version__}"
    if monai is not None:
        import monai as _monai
        import torch

        versions += f", MONAI {_monai.__version__}, torch {torch.__version__}"
    section = "\n".join(
        [
            HEADING,
            "",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- CPU: {cpu_model()}, **1 thread** (SimpleITK global threads = 1, "
            f"OMP/MKL/OpenBLAS = 1, torch 1); "
            f"Python {platform.python_version()}; {versions}",
            "- command: `make bench-preprocess` (or `.venv/bin/python bench/preprocess.py`)",
            f"- input: synthetic torso, DICOM series of {SHAPE[0]} slices × 512×512 int16, spacing "
            f"{SPACING} mm (x, y, z); median of {args.repeats} runs; the files are in the page cache",
            f"- our lungs on this input: right {r:.0f} cm³, left {l:.0f} cm³",
            "",
            *rows,
            "",
            "Notes: MONAI's Spacing does no anti-aliasing before downsampling and builds no lung masks; ours "
            "block-averages (BinShrink) by the integer factor, adds the residual Gaussian on "
            "the binned grid, "
            "then interpolates linearly onto the `floor((n−1)·s/2)+1` grid. The machine is shared (2 cores, "
            "other jobs running), so the figures are indicative.",
        ]
    )
    print(section)
    if not args.no_append:
        print(f"\nwritten to {write_section(section)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
