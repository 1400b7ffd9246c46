"""Where a lesion shows in the flow's coarsest latent: its energy, or the local mean of the latent vectors.

    .venv/bin/python experiments/latent_sites.py --run work/experiments/det-a \
        --model work/experiments/det-a/model/model-step700.pt --out work/experiments/latent-sites-700

Not in the paper, and not (yet) a map kind: a measurement on validation studies that tells what the next
voxel map should compute. The platform's voxel map keeps, per cell of the coarsest level (8³ voxels at L=3),
only the energy ``‖ε_L‖²`` of the standardised latent, a χ² with 128 degrees of freedom: a lesion that moves
ε by a small *consistent* shift δ raises it by ‖δ‖², against a healthy spread of ≈ 16. The mean of ε over
the windows and neighbouring cells that cover a place averages that spread away while a consistent shift
stays. This script measures both on one model and one validation split:

1. **extract** — for every validation study (run folder of ``experiments/detection.py``), the windows of the
   voxel map's grid (stride 12); each window's top latent ε (128 channels × 3³ cells) is accumulated on a
   lattice of 4-voxel sites (a cell covers 2³ sites; a window shifted back at the volume's far edge lands
   on the nearest site): the mean ε vector and the mean energy over the covering windows; beside them the
   site's share of the permissive mask, its depth into it and (abnormal studies, regenerated from the
   phantom seed) its share of lesion;
2. **analyse** — healthy references from the *normal validation studies* (in-sample: this is a first look,
   not a cross-fitted operating point), per depth band as the voxel map does: median/MAD of the energy; the
   mean vector and a shrunk covariance (10 % towards the identity; ``--covariance diagonal`` keeps only its
   diagonal) of the σ-smoothed mean vectors. Statistics
   per site: ``|z|`` of the energy (the voxel map's term), the squared distance of the mean vector from its
   band's healthy mean, its Mahalanobis distance, and the larger of the energy z and the Mahalanobis z
   (``combined``). Site AUROC per kind: lesion sites (≥ 50 % lesion) of abnormal studies against every
   permissive-mask site of the normal studies. A crude patient proxy: AUROC over studies of the number of
   sites with z > τ.

Writes ``<out>/sites/<study>.npz`` (resumable) and ``<out>/latent_sites.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from ct3dflow.cache import StudyCache  # noqa: E402
from ct3dflow.detect.grid import window_grid  # noqa: E402
from ct3dflow.detect.voxel_map import DEFAULT_DEPTH_BINS, smooth_in_mask  # noqa: E402
from ct3dflow.pipeline import manifest_rows  # noqa: E402

SITE = 4  # voxels per lattice site and axis: half a coarsest cell at L = 3
STATISTICS = ("energy", "mean shift", "Mahalanobis", "combined")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- extract
def site_latents(glow, study, stride: int, batch_size: int = 32) -> dict:
    """Mean top-latent vector, mean energy and window count per lattice site (padded frame)."""
    import torch

    size = glow.patch_size
    grid = window_grid(study.volume, study.permissive, size, stride)
    c, s = glow.latent_shapes[-1][0], glow.latent_shapes[-1][1]
    per = size // s // SITE  # sites per cell and axis
    shape = tuple(int(np.ceil(n / SITE)) + 1 for n in grid.padded.shape)
    total = np.zeros((c, *shape), np.float32)
    energy = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.float32)
    n = s * per
    with torch.no_grad():
        for corners, x in grid.batches(batch_size):
            eps = glow.encode(torch.from_numpy(x))[:, -c * s**3:].reshape(len(x), c, s, s, s).numpy()
            for corner, e in zip(np.asarray(corners), eps, strict=True):
                lz, ly, lx = (int(round(v / SITE)) for v in corner)
                box = (slice(lz, lz + n), slice(ly, ly + n), slice(lx, lx + n))
                total[(slice(None), *box)] += e.repeat(per, 1).repeat(per, 2).repeat(per, 3)
                energy[box] += (e**2).sum(0).repeat(per, 0).repeat(per, 1).repeat(per, 2)
                count[box] += 1
    k = np.maximum(count, 1)
    return {"mean": (total / k).astype(np.float16), "energy": energy / k, "count": count,
            "pad_before": np.asarray(grid.pad_before)}


def on_sites(values: np.ndarray, pad_before, shape) -> np.ndarray:
    """The mean of a study-grid array over each lattice site (padded frame, zeros beyond the study)."""
    out = np.zeros(tuple(n * SITE for n in shape), np.float32)
    z, y, x = pad_before
    v = np.asarray(values, np.float32)
    out[z:z + v.shape[0], y:y + v.shape[1], x:x + v.shape[2]] = v
    return out.reshape(shape[0], SITE, shape[1], SITE, shape[2], SITE).mean((1, 3, 5))


def extract(a) -> None:
    import torch
    from detection import lesion_on_grid

    from ct3dflow.models import load_patch_scorer

    torch.set_num_threads(a.threads)
    glow = load_patch_scorer(a.model or Path(a.run) / "model" / "model.pt").eval()
    rows = [r for r in manifest_rows(Path(a.run) / "archive" / "manifest.parquet") if r["split"] == a.split]
    cache = StudyCache(Path(a.run) / "cache")
    out = Path(a.out) / "sites"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for i, r in enumerate(rows):
        f = out / f"{r['study_id']}.npz"
        if f.exists():
            continue
        st = cache.load(r["study_id"])
        d = site_latents(glow, st, a.stride)
        shape = d["count"].shape
        d["mask"] = on_sites(st.permissive != 0, d["pad_before"], shape)
        d["depth"] = on_sites(ndimage.distance_transform_edt(st.permissive != 0), d["pad_before"], shape)
        if r["label"]:
            d["lesion"] = on_sites(lesion_on_grid(r, st, a.size), d["pad_before"], shape)
        np.savez_compressed(f, label=int(r["label"]), pathology=str(r.get("pathology") or "normal"), **d)
        log(f"extract {i + 1}/{len(rows)} {r['study_id']} ({time.time() - t0:.0f} s)")


# ------------------------------------------------------------------------------------------- analyse
def smooth(values: np.ndarray, inside: np.ndarray, sigma: float) -> np.ndarray:
    """The voxel map's smoothing in the mask (σ in sites; NaN outside ``inside``), channel by channel for the
    mean vectors."""
    if values.ndim == 4:
        return np.stack([smooth_in_mask(v, inside, sigma) for v in values])
    return smooth_in_mask(values, inside, sigma)


def robust(v: np.ndarray) -> tuple[float, float]:
    med = float(np.median(v))
    return med, max(1.4826 * float(np.median(np.abs(v - med))), 1e-6)


def analyse(a) -> str:
    from sklearn.metrics import roc_auc_score

    studies = [dict(np.load(f, allow_pickle=False)) for f in sorted((Path(a.out) / "sites").glob("*.npz"))]
    bins = np.asarray(DEFAULT_DEPTH_BINS)
    normals = [s for s in studies if int(s["label"]) == 0]
    kinds = sorted({str(s["pathology"]) for s in studies} - {"normal"})
    lines = [f"{len(studies)} validation studies ({len(normals)} normal); site = {SITE}³ voxels; references "
             "in-sample from the normal studies", ""]
    for sigma in a.sigma:
        for s in studies:
            s["inside"] = (s["mask"] >= 0.5) & (s["count"] > 0)
            s["band"] = np.digitize(s["depth"], bins[1:])
            s["e"] = smooth(s["energy"], s["inside"], sigma)
            s["m"] = smooth(s["mean"].astype(np.float32), s["inside"], sigma)
        e_ref, mu, prec = {}, {}, {}
        for b in range(len(bins)):
            e_ref[b] = robust(np.concatenate([s["e"][(s["band"] == b) & s["inside"]] for s in normals]))
            v = np.concatenate([s["m"][:, (s["band"] == b) & s["inside"]].T for s in normals])
            mu[b] = v.mean(0)
            cov = np.cov(v.T)
            if a.covariance == "diagonal":
                cov = np.diag(np.diag(cov))
            prec[b] = np.linalg.inv(0.9 * cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov)))
        for s in studies:
            shift, maha, ez = (np.zeros(s["e"].shape, np.float32) for _ in range(3))
            for b in range(len(bins)):
                sel = s["band"] == b
                dv = s["m"][:, sel].T - mu[b]
                shift[sel] = (dv**2).sum(1)
                maha[sel] = np.einsum("ij,jk,ik->i", dv, prec[b], dv)
                ez[sel] = np.abs(s["e"][sel] - e_ref[b][0]) / e_ref[b][1]
            s["raw"] = {"energy": ez, "mean shift": shift, "Mahalanobis": maha}
        for name in ("mean shift", "Mahalanobis"):  # one-sided z per band, as the energy's
            for b in range(len(bins)):
                ref = robust(np.concatenate([s["raw"][name][(s["band"] == b) & s["inside"]] for s in normals]))
                for s in studies:
                    sel = s["band"] == b
                    s["raw"][name][sel] = (s["raw"][name][sel] - ref[0]) / ref[1]
        for s in studies:
            s["raw"]["combined"] = np.maximum(s["raw"]["energy"], s["raw"]["Mahalanobis"])
        healthy = {n: np.concatenate([s["raw"][n][s["inside"]] for s in normals]) for n in STATISTICS}
        lines += [f"**σ = {sigma:g} site(s)**: site AUROC, lesion sites against healthy sites", "",
                  "| kind | " + " | ".join(STATISTICS) + " |", "|---" * (len(STATISTICS) + 1) + "|"]
        for k in kinds:
            cells = []
            for n in STATISTICS:
                les = np.concatenate([s["raw"][n][s["inside"] & (s["lesion"] >= 0.5)] for s in studies
                                      if str(s["pathology"]) == k])
                auc = roc_auc_score(np.r_[np.ones(les.size), np.zeros(healthy[n].size)], np.r_[les, healthy[n]])
                cells.append(f"{auc:.3f}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        y = np.array([int(s["label"]) for s in studies])
        lines += ["", "Patient proxy (in-sample): AUROC of the number of sites with z > τ", "",
                  "| statistic | " + " | ".join(f"τ = {t:g}" for t in a.tau) + " |", "|---" * (len(a.tau) + 1) + "|"]
        for n in STATISTICS:
            cells = [f"{roc_auc_score(y, [float((s['raw'][n][s['inside']] > t).sum()) for s in studies]):.3f}"
                     for t in a.tau]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run folder of experiments/detection.py (archive, cache, model)")
    p.add_argument("--model", default=None, help="model file (default <run>/model/model.pt; e.g. a snapshot)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--size", default="small")
    p.add_argument("--stride", type=int, default=12)
    p.add_argument("--sigma", type=float, nargs="+", default=[0.0, 1.0], help="smoothing in sites")
    p.add_argument("--tau", type=float, nargs="+", default=[3.0, 4.0, 5.0, 6.0])
    p.add_argument("--covariance", default="full", choices=["full", "diagonal"],
                   help="the healthy covariance of the mean vectors per depth band (diagonal: 128 numbers a band)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    extract(a)
    md = analyse(a)
    name = "latent_sites.md" if a.covariance == "full" else f"latent_sites-{a.covariance}.md"
    (Path(a.out) / name).write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
