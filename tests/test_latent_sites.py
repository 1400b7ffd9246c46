"""experiments/latent_sites.py: the cross-fitted references of its patient-level comparison."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import latent_sites  # noqa: E402

SHAPE = (10, 10, 10)


def site_study(rng, label: int, shift: float = 0.0, block=slice(3, 7), channels: int = 4) -> dict:
    """One study's sites as ``extract`` stores them: every site inside the mask, one depth band; ``shift``
    moves the mean vectors of a cubic block of sites along the first channel."""
    mean = rng.normal(size=(channels, *SHAPE)).astype(np.float32)
    mean[0, block, block, block] += shift
    return {"mean": mean, "energy": rng.chisquare(channels, size=SHAPE).astype(np.float32),
            "count": np.ones(SHAPE, np.float32), "mask": np.ones(SHAPE, np.float32),
            "depth": np.full(SHAPE, 20.0, np.float32), "label": label,
            "pathology": "nodule" if label else "normal"}


def test_folds_deal_each_class_round_robin_in_study_id_order():
    rng = np.random.default_rng(0)
    studies = [site_study(rng, lab) for lab in (1, 0, 0, 1, 0, 0, 0)]
    ids = ["g", "b", "a", "c", "e", "d", "f"]
    fold = latent_sites.folds_of(studies, ids, 2)
    normals = sorted((i for i in range(7) if studies[i]["label"] == 0), key=lambda i: ids[i])  # a b d e f
    assert [fold[i] for i in normals] == [0, 1, 0, 1, 0]
    assert [fold[i] for i in (3, 0)] == [0, 1]  # abnormal: c, g


def test_a_normal_outlier_is_partly_absorbed_in_sample_and_flagged_cross_fitted():
    rng = np.random.default_rng(1)
    normals = [site_study(rng, 0) for _ in range(3)] + [site_study(rng, 0, shift=5.0, block=slice(2, 8))]
    latent_sites.prepare(normals, sigma=0.0)
    odd = normals[-1]
    vol = {name: latent_sites.counts(latent_sites.site_statistics(odd, ref), odd["inside"], [4.0])
           for name, ref in (("in", latent_sites.fit_reference(normals)),
                             ("cross", latent_sites.fit_reference(normals[:-1])))}
    block = 6**3 * 0.512  # cm³: 216 sites of 4³ voxels of 2 mm
    # judged by the other normals, the whole shifted block is abnormal; a reference fitted with it widens
    # along its direction and lets a third of it pass: why the search cross-fits
    assert vol["cross"][("Mahalanobis", 4.0, 0.0)] >= 0.9 * block
    assert vol["in"][("Mahalanobis", 4.0, 0.0)] <= 0.75 * vol["cross"][("Mahalanobis", 4.0, 0.0)]
    # the energy (the χ² spread of the raw values, drawn apart from the mean vectors here) does not see it
    assert vol["cross"][("energy", 4.0, 0.0)] < 0.1 * block


def test_counts_drop_components_under_v_min():
    rng = np.random.default_rng(2)
    normals = [site_study(rng, 0) for _ in range(6)]
    sick = site_study(rng, 1, shift=8.0)
    latent_sites.prepare(normals + [sick], sigma=0.0)
    ref = latent_sites.fit_reference(normals)
    c = latent_sites.counts(latent_sites.site_statistics(sick, ref), sick["inside"], [4.0], [0.0, 5.0, 40.0])
    block = 64 * 0.512  # 32.8 cm³: kept at v_min 5, dropped at v_min 40
    assert c[("Mahalanobis", 4.0, 5.0)] == pytest.approx(block, rel=0.1)
    assert c[("Mahalanobis", 4.0, 40.0)] == 0.0
