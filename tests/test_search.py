"""The one operating-point search (ct3dflow.detect.search) and the one schema (ct3dflow.detect.operating_point)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ct3dflow.detect import OperatingPoint, get_kind
from ct3dflow.detect.decision import abnormal_region
from ct3dflow.detect.evaluate import evaluate
from ct3dflow.detect.patch_map import PatchScores
from ct3dflow.detect.search import (
    ScoredStudy,
    best_trial,
    check_studies,
    choose_T,
    grid_search,
    reference_folds,
    threshold_rule,
    trial_volumes,
)
from ct3dflow.detect.voxel_map import DepthReference, VoxelScore, smooth_in_mask
from ct3dflow.metrics import choose_threshold

VOXEL, PATCH = get_kind("voxel"), get_kind("patch")
SP = (2.0, 2.0, 2.0)


def _sphere_study(rng, lesion: bool, n=36, r=15.0):
    """A ball-shaped 'lung' whose voxel map is smooth healthy noise, with a block of very low values if sick."""
    zz, yy, xx = np.mgrid[:n, :n, :n]
    mask = ((zz - n / 2) ** 2 + (yy - n / 2) ** 2 + (xx - n / 2) ** 2) < r**2
    vmap = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.0).astype(np.float32)
    if lesion:
        c = n // 2 + int(rng.integers(-3, 4))
        vmap[c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] -= 5.0
    return vmap, mask


def voxel_studies(rng, labels, stride=8):
    out = []
    for i, y in enumerate(labels):
        vmap, mask = _sphere_study(rng, bool(y))
        out.append(ScoredStudy(f"s{i}", int(y), "nodule" if y else None, mask.astype(np.uint8), SP,
                               VoxelScore(vmap, stride, "top_latent", 8, 10)))
    return out


def test_voxel_search_separates_and_generalises():
    """On validation maps where sick studies hold a 6³ block of low values, the search finds AUROC 1, its
    reference comes from the healthy studies alone, and the chosen point classifies fresh studies."""
    rng = np.random.default_rng(0)
    val = voxel_studies(rng, [0] * 6 + [1] * 6)
    op, trials = grid_search(VOXEL, val, {"sigma_vox": [1.0], "tau_z": [3.0, 4.0], "v_min_cm3": [0.0, 0.1]})
    assert len(trials) == 4 and trials.iloc[0]["auroc"] == 1.0 and op.validation["auroc"] == 1.0
    assert op.map == "voxel" and op.scoring == {"stride": 8, "part": "top_latent", "patch_size": 8}
    assert op.params["sigma_vox"] == 1.0 and op.threshold_cm3 >= 0
    healthy = DepthReference.fit([smooth_in_mask(s.score.voxel_map, s.permissive, 1.0) for s in val[:6]],
                                 [s.permissive for s in val[:6]])
    assert op.reference["median"] == pytest.approx(healthy.median)
    assert op.reference["scale"] == pytest.approx(healthy.scale)
    again = OperatingPoint.from_dict(json.loads(json.dumps(op.to_dict())))
    assert again == op
    fresh = voxel_studies(rng, [0, 0, 0, 1, 1, 1])
    ev = evaluate(VOXEL, again, fresh, n_boot=50)
    assert ev["metrics"]["accuracy"] == 1.0 and ev["operating_point"] == op.to_dict()
    with pytest.raises(ValueError, match="cannot evaluate patch-map scores"):
        evaluate(PATCH, again, fresh)


def test_reference_folds_are_dealt_by_study_id_per_class():
    rng = np.random.default_rng(5)
    val = voxel_studies(rng, [0, 1, 0, 1, 0, 0, 1, 0, 0])  # 6 normals, 3 abnormal
    fold, k = reference_folds(val, 4)
    assert k == 4 and sorted(np.bincount(fold[[0, 2, 4, 5, 7, 8]])) == [1, 1, 2, 2]
    assert list(fold[[1, 3, 6]]) == [0, 1, 2]  # abnormal ones round-robin too
    shuffled = [val[i] for i in (8, 3, 0, 5, 1, 7, 2, 6, 4)]
    again, _ = reference_folds(shuffled, 4)
    assert {s.study_id: f for s, f in zip(shuffled, again)} == {s.study_id: f for s, f in zip(val, fold)}
    assert reference_folds(val, 10)[1] == 6  # more folds than normals: leave one normal out
    assert reference_folds(val[:2], 4)[1] == 1  # a single normal: in-sample
    with pytest.raises(ValueError, match="reference_folds"):
        reference_folds(val, 0)


def test_cross_fitted_volumes_judge_each_normal_by_a_reference_fitted_without_it():
    """The search's volumes, recomputed by hand: each study's z against the depth reference of the normals
    outside its fold. In-sample (folds=1) the normals look more typical than cross-fitted, which is the bias
    the cross-fitting removes; the stored reference is still the one of all validation normals."""
    rng = np.random.default_rng(6)
    val = voxel_studies(rng, [0] * 8 + [1] * 4)
    params = {"sigma_vox": 1.0, "tau_z": 2.5, "v_min_cm3": 0.0}
    fold, k = reference_folds(val, 4)
    smoothed = [smooth_in_mask(s.score.voxel_map, s.permissive, 1.0) for s in val]
    by_hand = []
    for i, s in enumerate(val):
        out = [j for j in range(8) if fold[j] != fold[i]]
        ref = DepthReference.fit([smoothed[j] for j in out], [val[j].permissive for j in out])
        by_hand.append(abnormal_region(-np.abs(ref.z(smoothed[i], s.permissive)), s.permissive, -2.5, 0.0, SP)[0])
    crossed = trial_volumes(VOXEL, val, params, folds=4)
    np.testing.assert_allclose(crossed, by_hand, rtol=1e-6)
    in_sample = trial_volumes(VOXEL, val, params, folds=1)
    assert np.median(in_sample[:8]) < np.median(crossed[:8])
    op, _ = grid_search(VOXEL, val, {k_: [v] for k_, v in params.items()}, folds=4)
    full = DepthReference.fit(smoothed[:8], [s.permissive for s in val[:8]])
    assert op.reference["median"] == pytest.approx(full.median)
    assert op.validation["reference_folds"] == 4
    assert op.validation["normal_volume_median_cm3"] == pytest.approx(np.median(crossed[:8]))


def test_exact_ties_go_to_the_stricter_simpler_setting_whatever_the_order():
    """Every v_min below one voxel gives the same volumes: the tie goes to the larger v_min, then (patch) the
    lower τ and smaller σ; shuffling the trials changes nothing."""
    rng = np.random.default_rng(1)
    val = voxel_studies(rng, [0] * 5 + [1] * 5)
    op, trials = grid_search(VOXEL, val, {"sigma_vox": [1.0], "tau_z": [3.0], "v_min_cm3": [0.0, 0.001, 0.002]})
    assert trials["objective"].nunique() == 1 and op.params["v_min_cm3"] == 0.002
    patch_trials = pd.DataFrame([
        {"sigma_vox": 3.0, "tau_z": -1.0, "v_min_cm3": 0.0, "objective": 1.001},
        {"sigma_vox": 1.0, "tau_z": -1.0, "v_min_cm3": 0.0, "objective": 1.001},
        {"sigma_vox": 1.0, "tau_z": -2.0, "v_min_cm3": 0.0, "objective": 1.001},
        {"sigma_vox": 1.0, "tau_z": -2.0, "v_min_cm3": 2.0, "objective": 1.001},
        {"sigma_vox": 0.5, "tau_z": -2.0, "v_min_cm3": 2.0, "objective": 0.9},
        {"sigma_vox": 0.1, "tau_z": -2.0, "v_min_cm3": 2.0, "objective": float("nan")},
    ])
    for seed in range(3):
        b = best_trial(PATCH, patch_trials.sample(frac=1.0, random_state=seed))
        assert (b["sigma_vox"], b["tau_z"], b["v_min_cm3"]) == (1.0, -2.0, 2.0)
    # the voxel map's stricter τ is the larger |z|
    vox = patch_trials.assign(tau_z=[3.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    b = best_trial(VOXEL, vox.sample(frac=1.0, random_state=4))
    assert (b["sigma_vox"], b["tau_z"], b["v_min_cm3"]) == (1.0, 5.0, 2.0)


def test_specificity_rule_buys_specificity_on_validation():
    y = np.array([0] * 10 + [1] * 10)
    s = np.r_[np.arange(10.0), np.arange(10.0) + 5.5]  # normals 0..9, abnormals 5.5..14.5
    t_f1 = choose_threshold(y, s, "f1")
    t90 = choose_threshold(y, s, "specificity", target=0.9)
    assert t90 == pytest.approx(8.25)  # the lowest T with 9 of 10 normals at or below it
    assert ((s[y == 0] <= t90).mean() >= 0.9) and t90 >= t_f1 - 1e-9
    assert choose_threshold(y, s, "specificity", target=1.0) == pytest.approx(9.25)
    rng = np.random.default_rng(2)
    val = voxel_studies(rng, [0] * 6 + [1] * 6)
    op, _ = grid_search(VOXEL, val, {"sigma_vox": [1.0], "tau_z": [2.0], "v_min_cm3": [0.0]},
                        threshold_rule("specificity", 0.9))
    assert op.threshold_rule == {"rule": "specificity", "target": 0.9} and op.validation["specificity"] >= 0.9
    with pytest.raises(ValueError, match="target"):
        threshold_rule("specificity")
    with pytest.raises(ValueError, match="unknown threshold rule"):
        threshold_rule("accuracy")


def test_a_malformed_operating_point_names_what_is_wrong(tmp_path):
    from ct3dflow.detect.operating_point import SCHEMA

    good = {"schema": SCHEMA, "map": "voxel", "params": {"sigma_vox": 1, "tau_z": 3, "v_min_cm3": 0},
            "threshold_cm3": 2.0, "reference": {}}
    assert OperatingPoint.from_dict({**good, "threshold_rule": "youden"}).threshold_rule == {"rule": "youden"}
    for bad, says in [({**good, "params": [1, 2]}, "field of the wrong shape"),
                      ({**good, "threshold_cm3": "high"}, "value of the wrong type.*'high'"),
                      ({**good, "threshold_rule": {"rule": "specificity"}}, "specificity rule needs its target"),
                      ({**good, "threshold_rule": "f1"}, "unknown threshold rule 'f1'"),
                      ({**good, "schema": "ct3dflow.operating_point/3"}, "newer ct3dflow"),
                      ({"map": "voxel", "sigma_vox": 1.0, "threshold_cm3": 1.0, "reference": {}}, "lacks.*'tau_z'")]:
        with pytest.raises(ValueError, match=says):
            OperatingPoint.from_dict(bad)
    (tmp_path / "op.yaml").write_text("map: voxel\n", encoding="utf-8")
    with pytest.raises(ValueError, match="op.yaml is not JSON"):
        OperatingPoint.load(tmp_path / "op.yaml")
    (tmp_path / "op.json").write_text(json.dumps({**good, "params": [1]}), encoding="utf-8")
    with pytest.raises(ValueError, match="op.json: operating point has a field of the wrong shape"):
        OperatingPoint.load(tmp_path / "op.json")


def test_youden_rule_does_not_flag_everything_where_best_f1_does():
    """On a weak map with many abnormal studies the best F1 can be "flag every study"; Youden's J (sensitivity +
    specificity − 1, zero for flagging all) keeps a T that passes normals (the demo's rule)."""
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    vols = np.array([0.0, 1.0, 5.0, 0.5, 2.0, 6.0, 7.0])
    assert choose_T(y, vols, threshold_rule("best_f1")) == pytest.approx(0.25)  # 6 of 7 flagged, 1 normal passes
    assert choose_T(y, vols, threshold_rule("youden")) == pytest.approx(5.5)  # J 0.5: half the abnormal, no normal
    rng = np.random.default_rng(2)
    val = voxel_studies(rng, [0] * 6 + [1] * 6)
    op, _ = grid_search(VOXEL, val, {"sigma_vox": [1.0], "tau_z": [2.0], "v_min_cm3": [0.0]}, threshold_rule("youden"))
    again = OperatingPoint.from_dict(json.loads(json.dumps(op.to_dict())))
    assert again.threshold_rule == {"rule": "youden"} and "Youden" in again.describe()
    m = op.validation
    assert m["sensitivity"] + m["specificity"] >= 1.0


def test_patch_search_on_stored_scores_and_mixed_settings_refused():
    rng = np.random.default_rng(3)
    shape = (30, 30, 30)
    centres = np.stack(np.meshgrid(*[np.arange(4.0, 30, 6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    studies = []
    for i, y in enumerate([0] * 5 + [1] * 5):
        lp = rng.normal(-100, 1, len(centres))
        if y:
            lp[len(lp) // 2] -= 30
        studies.append(ScoredStudy(f"p{i}", y, None, np.ones(shape, np.uint8), SP,
                                   PatchScores(centres - 3.5, centres, lp, 8, 6, shape)))
    op, trials = grid_search(PATCH, studies, {"sigma_vox": [1.5], "tau_z": [-4.0, -3.0], "v_min_cm3": [0.0]})
    assert op.validation["auroc"] == 1.0 and op.scoring == {"patch_size": 8, "stride": 6}
    healthy = np.concatenate([s.score.log_p for s in studies[:5]])
    assert op.reference["mean"] == pytest.approx(healthy.mean())
    assert op.reference["std"] == pytest.approx(healthy.std(ddof=1))
    studies[0].score.stride = 4
    with pytest.raises(ValueError, match="different settings"):
        check_studies(PATCH, studies)
    with pytest.raises(ValueError, match="normal and abnormal"):
        check_studies(PATCH, studies[:5])


def test_operating_points_of_earlier_versions_are_read():
    legacy_patch = {"sigma_vox": 4.0, "tau_z": -2.0, "v_min_cm3": 0.5, "threshold_cm3": 5.0, "healthy_mean": -10.0,
                    "healthy_std": 2.0}
    op = OperatingPoint.from_dict(legacy_patch)
    assert op.map == "patch" and op.reference == {"mean": -10.0, "std": 2.0}
    assert PATCH.level(op.params, op.reference) == -14
    legacy_voxel = {"map": "voxel", "part": "top_latent", "stride": 6, "sigma_vox": 2.0, "tau_z": 4.0,
                    "v_min_cm3": 0.0, "threshold_cm3": 1.8,
                    "reference": {"bins": [0.0], "median": [1.0], "scale": [2.0]}}
    op = OperatingPoint.from_dict(legacy_voxel)
    assert op.map == "voxel" and op.scoring == {"stride": 6, "part": "top_latent"} and op.param("tau_z") == 4.0
    assert OperatingPoint.from_dict(op.to_dict()) == op
    with pytest.raises(ValueError, match="lacks"):
        OperatingPoint.from_dict({"sigma_vox": 1.0})
    with pytest.raises(ValueError, match="unknown map kind 'nope'"):
        get_kind("nope")
