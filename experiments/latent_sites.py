"""Where a lesion shows in the flow's coarsest latent: its energy, or the local mean of the latent vectors.

    .venv/bin/python experiments/latent_sites.py --run work/experiments/det-a \
        --out work/experiments/latent-sites --test --tau 3 4 6 8 10 14 20

Not in the paper, and not a map kind: a measurement of whether the next
voxel map should compute it. The platform's voxel map keeps, per cell of the coarsest level (8³ voxels at L=3),
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
2. **analyse** — healthy references from the *normal validation studies*, per depth band as the voxel map
   does: median/MAD of the energy; the mean vector and a shrunk covariance (10 % towards the identity;
   ``--covariance diagonal`` keeps only its diagonal) of the σ-smoothed mean vectors. Statistics per site:
   ``|z|`` of the energy (the voxel map's term), the squared distance of the mean vector from its band's
   healthy mean, its Mahalanobis distance, the larger of the energy z and the Mahalanobis z (``combined``)
   and the larger of the energy z and the mean-shift z (``energy or shift``). Site AUROC per kind
   (references in-sample): lesion sites (≥ 50 % lesion) of abnormal studies against every permissive-mask
   site of the normal studies. Patient AUROC by the platform's decision (sites with z > τ in components
   ≥ v_min, their volume), **cross-fitted** as the platform's search is (``--folds``, default 4: each study
   judged by references fitted without its fold's normals), the in-sample figure beside it;
3. **test** (``--test``) — the test split extracted too and tested once per statistic at its best
   cross-fitted validation point (σ, τ, v_min), with the references of all validation normals and T by the
   best validation F1.

Writes ``<out>/sites/<study>.npz`` (``sites-test/`` with ``--test``; resumable) and ``<out>/latent_sites.md``.
docs/RESULTS.md has what it measured: lesion sites stand out in the mean vectors (ground glass above all),
but cross-fitted the patient decision is no better than the energy's, so this is not a map kind.
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
STATISTICS = ("energy", "mean shift", "Mahalanobis", "combined", "energy or shift")


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
    out = Path(a.out) / getattr(a, "out_sites", "sites")
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


def load_sites(folder: Path) -> list[dict]:
    return [dict(np.load(f, allow_pickle=False)) for f in sorted(Path(folder).glob("*.npz"))]


def prepare(studies: list[dict], sigma: float) -> None:
    """σ-smoothed energy and mean vectors of every study, in its permissive sites (in place)."""
    bins = np.asarray(DEFAULT_DEPTH_BINS)
    for s in studies:
        s["inside"] = (s["mask"] >= 0.5) & (s["count"] > 0)
        s["band"] = np.digitize(s["depth"], bins[1:])
        s["e"] = smooth(s["energy"], s["inside"], sigma)
        s["m"] = smooth(s["mean"].astype(np.float32), s["inside"], sigma)


def fit_reference(normals: list[dict], covariance: str = "full") -> dict:
    """Per depth band: the energy's median/MAD, the mean vectors' mean and shrunk precision, and the robust
    centre and spread of the squared shift and the Mahalanobis distance (their one-sided z) — all from
    ``normals`` only."""
    nb = len(DEFAULT_DEPTH_BINS)
    ref = {"energy": {}, "mu": {}, "prec": {}, "mean shift": {}, "Mahalanobis": {}}
    for b in range(nb):
        if not any(((s["band"] == b) & s["inside"]).any() for s in normals):
            continue  # a band no normal reaches (none on the real archives; small test volumes)
        ref["energy"][b] = robust(np.concatenate([s["e"][(s["band"] == b) & s["inside"]] for s in normals]))
        v = np.concatenate([s["m"][:, (s["band"] == b) & s["inside"]].T for s in normals]).astype(np.float64)
        ref["mu"][b] = v.mean(0)
        cov = np.cov(v.T)
        if covariance == "diagonal":
            cov = np.diag(np.diag(cov))
        ref["prec"][b] = np.linalg.inv(0.9 * cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    raw = [_distances(s, ref) for s in normals]
    for name in ("mean shift", "Mahalanobis"):
        for b in ref["mu"]:
            ref[name][b] = robust(np.concatenate([r[name][(s["band"] == b) & s["inside"]]
                                                  for r, s in zip(raw, normals, strict=True)]))
    return ref


def _distances(s: dict, ref: dict) -> dict:
    shift, maha = np.zeros(s["e"].shape, np.float32), np.zeros(s["e"].shape, np.float32)
    for b in ref["mu"]:
        sel = s["band"] == b
        dv = s["m"][:, sel].T - ref["mu"][b]
        shift[sel] = (dv**2).sum(1)
        maha[sel] = np.einsum("ij,jk,ik->i", dv, ref["prec"][b], dv)
    return {"mean shift": shift, "Mahalanobis": maha}


def site_statistics(s: dict, ref: dict) -> dict:
    """z per site for every statistic of :data:`STATISTICS` against ``ref`` (high = atypical)."""
    out = _distances(s, ref)
    ez = np.zeros(s["e"].shape, np.float32)
    for b in ref["mu"]:
        sel = s["band"] == b
        ez[sel] = np.abs(s["e"][sel] - ref["energy"][b][0]) / ref["energy"][b][1]
        for name in ("mean shift", "Mahalanobis"):
            out[name][sel] = (out[name][sel] - ref[name][b][0]) / ref[name][b][1]
    out["energy"] = ez
    out["combined"] = np.maximum(ez, out["Mahalanobis"])
    out["energy or shift"] = np.maximum(ez, out["mean shift"])  # no covariance to overfit
    return out


def folds_of(studies: list[dict], ids: list[str], k: int) -> np.ndarray:
    """Round-robin folds in study-id order, normals and abnormal studies each on their own (as
    ct3dflow.detect.search.reference_folds deals them)."""
    fold = np.zeros(len(studies), int)
    for label in (0, 1):
        idx = sorted((i for i, s in enumerate(studies) if int(s["label"]) == label), key=lambda i: ids[i])
        for j, i in enumerate(idx):
            fold[i] = j % k
    return fold


def counts(stats: dict, inside: np.ndarray, taus, v_mins=(0.0,), names=STATISTICS) -> dict:
    """{(statistic, τ, v_min): abnormal volume in cm³} of one study, by the platform's decision
    (:func:`ct3dflow.detect.decision.abnormal_region`): its sites with z > τ, components under v_min removed
    (a site is 4³ voxels of 2 mm)."""
    from ct3dflow.detect.decision import abnormal_region

    out = {}
    for n in names:
        for t in taus:
            for v in v_mins:
                out[(n, t, v)] = abnormal_region(-stats[n], inside, -t, v, (2.0 * SITE,) * 3)[0]
    return out


def analyse(a) -> str:
    from sklearn.metrics import roc_auc_score

    from ct3dflow.metrics import bootstrap_ci, choose_threshold, patient_metrics

    folder = Path(a.out) / "sites"
    ids = [f.stem for f in sorted(folder.glob("*.npz"))]
    studies = load_sites(folder)
    normals = [s for s in studies if int(s["label"]) == 0]
    kinds = sorted({str(s["pathology"]) for s in studies} - {"normal"})
    y = np.array([int(s["label"]) for s in studies])
    fold = folds_of(studies, ids, a.folds)
    lines = [f"{len(studies)} validation studies ({len(normals)} normal); site = {SITE}³ voxels; site AUROCs "
             f"against in-sample references; patient AUROCs cross-fitted over {a.folds} folds of the normals", ""]
    val_auc = {}  # (statistic, σ, τ) -> cross-fitted patient AUROC
    for sigma in a.sigma:
        prepare(studies, sigma)
        ref = fit_reference(normals, a.covariance)
        raw = [site_statistics(s, ref) for s in studies]
        healthy = {n: np.concatenate([r[n][s["inside"]] for r, s in zip(raw, studies, strict=True)
                                      if int(s["label"]) == 0]) for n in STATISTICS}
        lines += [f"**σ = {sigma:g} site(s)**: site AUROC, lesion sites against healthy sites (in-sample)", "",
                  "| kind | " + " | ".join(STATISTICS) + " |", "|---" * (len(STATISTICS) + 1) + "|"]
        for k in kinds:
            cells = []
            for n in STATISTICS:
                les = np.concatenate([r[n][s["inside"] & (s["lesion"] >= 0.5)]
                                      for r, s in zip(raw, studies, strict=True) if str(s["pathology"]) == k])
                auc = roc_auc_score(np.r_[np.ones(les.size), np.zeros(healthy[n].size)], np.r_[les, healthy[n]])
                cells.append(f"{auc:.3f}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        insample = [counts(r, s["inside"], a.tau, a.v_min) for r, s in zip(raw, studies, strict=True)]
        crossed: list[dict] = [{} for _ in studies]
        for k in range(a.folds):
            ref_k = fit_reference([s for s, f in zip(studies, fold, strict=True) if f != k and int(s["label"]) == 0],
                                  a.covariance)
            for i in np.nonzero(fold == k)[0]:
                crossed[i] = counts(site_statistics(studies[i], ref_k), studies[i]["inside"], a.tau, a.v_min)
        cols = [(t, v) for t in a.tau for v in a.v_min]
        lines += ["", "Patient AUROC of the abnormal volume (sites with z > τ in components ≥ v_min): cross-fitted "
                  "(in-sample)", "", "| statistic | " + " | ".join(f"τ {t:g}, v_min {v:g}" for t, v in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for n in STATISTICS:
            cells = []
            for t, v in cols:
                vols = [c[(n, t, v)] for c in crossed]
                cf = roc_auc_score(y, vols)
                val_auc[(n, sigma, t, v)] = (cf, vols)
                cells.append(f"{cf:.3f} ({roc_auc_score(y, [c[(n, t, v)] for c in insample]):.3f})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if not a.test:
        return "\n".join(lines)
    # the test split, once: per statistic the (σ, τ, v_min) of the best cross-fitted validation AUROC (ties:
    # the smaller σ, then the larger τ and v_min), the reference of all validation normals, T by best F1
    test_folder = Path(a.out) / "sites-test"
    tests = load_sites(test_folder)
    yt = np.array([int(s["label"]) for s in tests])
    lines += [f"**Test split, once** ({len(tests)} studies, {int((yt == 0).sum())} normal): per statistic the "
              "point of the best cross-fitted validation AUROC, the reference of all validation normals, T by "
              "best validation F1", "",
              "| statistic | σ, τ, v_min | val AUROC (cross-fitted) | **test AUROC (95 % CI)** | specificity | "
              "normals' median cm³ | " + " | ".join(kinds) + " |", "|---" * (6 + len(kinds)) + "|"]
    test_stats: dict[float, list[dict]] = {}  # σ → the test studies' z against all validation normals
    for n in STATISTICS:
        best = max(((r[0], -sg, t, v) for (m, sg, t, v), r in val_auc.items() if m == n))
        cf, sigma, tau, v_min = best[0], -best[1], best[2], best[3]
        if sigma not in test_stats:
            prepare(studies, sigma)
            prepare(tests, sigma)
            ref = fit_reference(normals, a.covariance)
            test_stats[sigma] = [site_statistics(s, ref) for s in tests]
        vol = np.array([counts(z, s["inside"], [tau], [v_min], [n])[(n, tau, v_min)]
                        for z, s in zip(test_stats[sigma], tests, strict=True)])
        t_val = choose_threshold(y, np.asarray(val_auc[(n, sigma, tau, v_min)][1]), "f1")
        m = patient_metrics(yt, vol, t_val)
        ci = bootstrap_ci(yt, vol, t_val)
        per_kind = []
        for k in kinds:
            sel = np.array([str(s["pathology"]) in (k, "normal") for s in tests])
            per_kind.append(f"{roc_auc_score(yt[sel], vol[sel]):.2f}")
        lo, hi = ci.get("auroc", (float("nan"), float("nan")))
        lines.append(f"| {n} | {sigma:g}, {tau:g}, {v_min:g} | {cf:.3f} | **{m['auroc']:.3f}** ({lo:.2f}–{hi:.2f}) | "
                     f"{m.get('specificity', float('nan')):.3f} | {np.median(vol[yt == 0]):.1f} | "
                     + " | ".join(per_kind) + " |")
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
    p.add_argument("--v-min", type=float, nargs="+", default=[0.0, 1.0, 5.0],
                   help="cm³: abnormal components smaller than this are dropped (the platform's v_min)")
    p.add_argument("--covariance", default="full", choices=["full", "diagonal"],
                   help="the healthy covariance of the mean vectors per depth band (diagonal: 128 numbers a band)")
    p.add_argument("--folds", type=int, default=4, help="cross-fitting folds of the patient-level references")
    p.add_argument("--test", action="store_true",
                   help="also extract the test split and test each statistic once at its validation point")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    np.seterr(all="ignore")
    extract(a)
    if a.test:
        extract(argparse.Namespace(**{**vars(a), "split": "test", "out_sites": "sites-test"}))
    md = analyse(a)
    name = "latent_sites.md" if a.covariance == "full" else f"latent_sites-{a.covariance}.md"
    (Path(a.out) / name).write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
