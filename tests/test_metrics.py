import numpy as np
import pytest

from ct3dflow.metrics import (
    bootstrap_ci,
    choose_threshold,
    patient_metrics,
    roc_curve_data,
    stratified_resample_indices,
    table1,
    table1_row,
)


def test_patient_metrics_hand_computed():
    y = [0, 0, 0, 0, 1, 1, 1]
    s = [0.0, 0.0, 2.0, 6.0, 1.0, 5.0, 9.0]
    m = patient_metrics(y, s, threshold=3.0)  # predicted: s > 3 → idx 3, 5, 6
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 1)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (7, 3, 4)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUROC: pairs (pos, neg) with pos > neg, ties 1/2: pos 1 beats 2 zeros (2), 5 beats 3 (3), 9 beats 4
    assert m["auroc"] == pytest.approx((2 + 3 + 4) / 12)
    # the rule is strict: a score equal to the threshold is normal
    assert patient_metrics(y, s, threshold=6.0)["fp"] == 0


def test_perfect_separation():
    y = [0, 0, 0, 1, 1]
    s = [0.0, 0.1, 0.2, 3.0, 4.0]
    m = patient_metrics(y, s, 1.0)
    assert m["auroc"] == 1.0 and m["f1"] == 1.0 and m["accuracy"] == 1.0
    roc = roc_curve_data(y, s)
    assert set(roc) == {"fpr", "tpr", "thresholds"}
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0


def test_one_class_auroc_nan():
    m = patient_metrics([0, 0], [1.0, 2.0], 1.5)
    assert np.isnan(m["auroc"]) and np.isnan(m["sensitivity"]) and m["specificity"] == 0.5


def test_bootstrap_ci_contains_point_and_is_stratified():
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 12)
    s = np.concatenate([rng.normal(0, 1, 30), rng.normal(1.5, 1, 12)])
    m = patient_metrics(y, s, 0.7)
    ci = bootstrap_ci(y, s, 0.7, n_boot=300, seed=1)
    for k in ("auroc", "f1", "accuracy", "sensitivity", "specificity"):
        lo, hi = ci[k]
        assert lo <= m[k] <= hi, k
        assert lo < hi
    r = np.random.default_rng(5)
    for _ in range(50):
        idx = stratified_resample_indices(y, r)
        assert (y[idx] == 1).sum() == 12 and (y[idx] == 0).sum() == 30
    assert bootstrap_ci(y, s, 0.7, n_boot=50, seed=3) == bootstrap_ci(y, s, 0.7, n_boot=50, seed=3)


def test_choose_threshold_separates():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.0, 0.0, 0.4, 1.0, 3.0, 7.0, 12.0])
    for crit in ("youden", "f1"):
        t = choose_threshold(y, s, crit)
        assert 1.0 < t < 3.0 and t == pytest.approx(2.0)
        m = patient_metrics(y, s, t)
        assert m["accuracy"] == 1.0
    # all-zero normals: a threshold between observed scores, never equal to one
    t = choose_threshold([0, 0, 1, 1], [0.0, 0.0, 0.0, 5.0])
    assert t not in (0.0, 5.0) and 0.0 < t < 5.0
    with pytest.raises(ValueError):
        choose_threshold([1, 1], [0.0, 1.0])
    with pytest.raises(ValueError):
        choose_threshold([0, 1], [0.0, 1.0], criterion="max")


def test_table1():
    m = {"auroc": 0.91234, "f1": 0.8, "accuracy": 0.875}
    row = table1_row("CT-3DFlow", m)
    assert row == "| CT-3DFlow | 0.912 | 0.800 | 0.875 |"
    row_ci = table1_row("x", m, {"auroc": (0.8, 0.95)})
    assert "0.912 (0.800–0.950)" in row_ci
    t = table1([("CT-3DFlow", m), ("baseline", {"auroc": float("nan"), "f1": 0.5, "accuracy": 0.5})])
    lines = t.strip().splitlines()
    assert lines[0] == "| Method | AUROC | F1 | Accuracy |" and len(lines) == 4
    assert "| baseline | — | 0.500 | 0.500 |" in t


def test_auroc_equals_sklearns_with_ties_and_one_class():
    """The bootstrap's AUROC (midranks) against sklearn's roc_auc_score, on scores with many ties (abnormal
    volumes are often exactly 0) and without; one class present gives NaN."""
    from sklearn.metrics import roc_auc_score

    from ct3dflow.metrics import _auroc

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        s = rng.integers(0, 4, n).astype(float) if trial % 2 else rng.normal(size=n)
        expected = roc_auc_score(y, s) if 0 < y.sum() < n else float("nan")
        assert _auroc(y, s) == pytest.approx(expected, abs=1e-12, nan_ok=True), (y, s)
