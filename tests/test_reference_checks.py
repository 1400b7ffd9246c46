"""experiments/reference_checks.py: the study-normalised and density references of issue 16's checks, the ceiling
(``oracle``) and the two-densities candidate; experiments/study_fusion.py's choice."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import reference_checks as rc  # noqa: E402

from ct3dflow.detect.voxel_map import VoxelScore, depth_bands  # noqa: E402


def lung_ball(shape=(36, 36, 36), r=16.0) -> np.ndarray:
    z, y, x = np.indices(shape) - (np.asarray(shape)[:, None, None, None] - 1) / 2
    return (np.sqrt(z**2 + y**2 + x**2) <= r).astype(np.uint8)


def test_a_study_wide_offset_per_depth_band_and_scale_are_taken_off():
    rng = np.random.default_rng(0)
    mask = lung_ball()
    band = depth_bands(mask)
    m = np.where(mask != 0, rng.normal(size=mask.shape), np.nan).astype(np.float32)
    shifted = (3.0 * m + np.where(band >= 0, 0.5 * band, 0.0) - 2.0).astype(np.float32)  # a scanner's doing
    centred, centred_shifted = rc.study_normalised(m, mask, False), rc.study_normalised(shifted, mask, False)
    for b in np.unique(band[band >= 0]):
        sel = (band == b) & np.isfinite(m)
        if sel.sum() > 50:  # bands this small keep their values, by design
            assert abs(np.median(centred_shifted[sel])) < 1e-5
            np.testing.assert_allclose(centred_shifted[sel], 3.0 * centred[sel], atol=1e-4)
    np.testing.assert_allclose(rc.study_normalised(shifted, mask, True)[np.isfinite(m)],
                               rc.study_normalised(m, mask, True)[np.isfinite(m)], atol=1e-4)


def test_the_density_reference_flags_a_dense_blob_and_not_healthy_lung():
    rng = np.random.default_rng(1)
    mask = lung_ball()

    def study(blob: bool) -> rc.Maps:
        density = (-0.36 + 0.01 * rng.normal(size=mask.shape)).astype(np.float32)  # normalised lung
        if blob:
            density[10:14, 10:14, 4:8] = 0.3  # a consolidation-like block at the lung's edge
        flow = VoxelScore(rng.normal(size=mask.shape).astype(np.float32), stride=12, size=24)
        return rc.Maps(flow, density, mask != 0)

    kind, params = rc.Candidate("density"), {"sigma_vox": 1.0}
    normals = [study(False) for _ in range(4)]
    ref = kind.fit_reference(normals, [mask] * 4, params)
    assert set(ref) == {"density"}  # no flow map in this candidate
    sick, healthy = kind.atypicality(study(True), mask, params, ref), kind.atypicality(study(False), mask, params, ref)
    assert np.nanmin(sick[10:14, 10:14, 4:8]) < -10  # |z| far beyond any τ of the search
    assert np.nanmin(healthy) > -8
    both = rc.Candidate("flow+density")
    assert set(both.fit_reference(normals, [mask] * 4, params)) == {"flow", "density"}


def _scored(i: int, label: int, blob: bool, rng, mask):
    from ct3dflow.detect.search import ScoredStudy

    density = (-0.36 + 0.01 * rng.normal(size=mask.shape)).astype(np.float32)
    if blob:
        density[14:20, 14:20, 14:20] = 0.3
    flow = VoxelScore(rng.normal(size=mask.shape).astype(np.float32), stride=12, size=24)
    return ScoredStudy(f"s{i}", label, "consolidation" if label else None, mask, (2.0, 2.0, 2.0),
                       rc.Maps(flow, density, mask != 0))


def test_the_oracle_is_the_best_test_auroc_over_the_grid_and_never_better():
    """A dense block that only a low τ flags: the ceiling is 1.0 at that τ; with τ beyond every |z| it is 0.5."""
    rng = np.random.default_rng(2)
    mask = lung_ball()
    val = [_scored(i, int(i >= 4), i >= 4, rng, mask) for i in range(8)]
    test = [_scored(10 + i, int(i >= 3), i >= 3, rng, mask) for i in range(6)]
    kind = rc.Candidate("density")
    top, at = rc.oracle(kind, val, test, {"sigma_vox": [1.0], "tau_z": [1e6, 8.0]})
    assert top == 1.0 and at["tau_z"] == 8.0 and at["sigma_vox"] == 1.0
    top, at = rc.oracle(kind, val, test, {"sigma_vox": [1.0], "tau_z": [1e6]})
    assert top == 0.5  # nothing flagged anywhere: every study ties


def test_two_densities_adds_the_outer_density_only_at_its_weight():
    """The second density (the permissive core's) flags a block the strict one cannot hold, at outer_weight > 0;
    at 0 the kind is anatomy-density exactly."""
    from ct3dflow.detect.density_map import DensityScore

    rng = np.random.default_rng(3)
    mask = lung_ball()

    def score(block: bool):
        outer = (-0.36 + 0.01 * rng.normal(size=mask.shape)).astype(np.float32)
        if block:
            outer[14:20, 14:20, 14:20] = 0.3  # subpleural consolidation: dense, outside the strict mask
        strict = (-0.36 + 0.01 * rng.normal(size=mask.shape)).astype(np.float32)
        s = DensityScore(rng.normal(size=mask.shape).astype(np.float32), 12, size=24,
                         parenchyma=np.where(mask != 0, strict, np.nan), density_margin=0)
        s.outer = np.where(mask != 0, outer, np.nan).astype(np.float32)
        return s

    kind = rc.TwoDensities()
    normals = [score(False) for _ in range(4)]
    params = {"sigma_vox": 1.0, "density_weight": 0.5, "outer_weight": 0.0}
    ref = kind.fit_reference(normals, [mask] * 4, params)
    sick = score(True)
    off = kind.atypicality(sick, mask, params, ref)
    on = kind.atypicality(sick, mask, {**params, "outer_weight": 1.0}, ref)
    np.testing.assert_array_equal(off, rc.AnatomyDensityMap().atypicality(sick, mask, params, ref))
    assert np.nanmin(off[15:19, 15:19, 15:19]) > -8 and np.nanmax(on[15:19, 15:19, 15:19]) < -10


def test_study_fusion_chooses_the_flow_alone_on_a_tie_and_the_density_where_it_separates():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import study_fusion as sf

    y = np.array([0, 0, 0, 1, 1, 1])
    n_t, n_d = len(sf.TAUS), len(sf.TAUS_DENSITY)
    vf = np.tile(np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]), (1, n_t))  # the flow ranks perfectly
    vd = np.zeros((6, n_d))
    auc, (sigma, j, k, r) = sf.choose(y, {1.0: (vf, vd)}, sf.RATIOS)
    assert auc == 1.0 and np.isinf(r) and k == 0  # a tie goes to the flow alone
    vf = np.tile(np.array([[5.0], [0.0], [5.0], [0.0], [5.0], [0.0]]), (1, n_t))  # the flow is blind
    vd[3:] = 100.0  # the density finds every lesion at every τ_density
    auc, (sigma, j, k, r) = sf.choose(y, {1.0: (vf, vd)}, sf.RATIOS)
    assert auc == 1.0 and r in (1.0, 2.0, 5.0, 10.0)
    np.testing.assert_array_equal(sf.fused(vf[:, 0], vd[:, 0], 10.0), np.maximum(vf[:, 0], vd[:, 0] / 10.0))
    np.testing.assert_array_equal(sf.fused(vf[:, 0], vd[:, 0], np.inf), vf[:, 0])


def test_plateness_answers_a_thin_bright_wall_and_not_a_tube_or_a_ball():
    """The bright-sheet channel measured for honeycombing's walls (and left out): σ²·(|λ1| − |λ2|)."""
    z, y, x = np.mgrid[:33, :33, :33].astype(np.float64) - 16
    s = 1.0
    wall = np.exp(-(z * z) / (2 * s * s)).astype(np.float32)
    tube = np.exp(-(y * y + z * z) / (2 * s * s)).astype(np.float32)
    ball = np.exp(-(x * x + y * y + z * z) / (2 * s * s)).astype(np.float32)
    region = np.zeros(wall.shape, bool)
    region[8:25, 8:25, 8:25] = True
    got = {name: rc.plateness(img, region) for name, img in (("wall", wall), ("tube", tube), ("ball", ball))}
    assert np.isnan(got["wall"][~region]).all()
    # at the centre of a Gaussian wall of width s, smoothed by σ: |λ1| = σ²·s/(s²+σ²)^{3/2}, λ2 = 0 (σ = 1.5 wins)
    expect = max(g * g * s / (s * s + g * g) ** 1.5 for g in (1.0, 1.5))
    np.testing.assert_allclose(got["wall"][16, 16, 16], expect, rtol=0.05)
    assert got["tube"][16, 16, 16] < 0.02 * expect and got["ball"][16, 16, 16] < 0.02 * expect


def test_flow_weight_scales_the_flow_alone_and_at_1_is_anatomy_density():
    """anatomy-flow-weight: at flow_weight 1 the default exactly; at 0.5 a voxel flagged by the flow alone has half
    its |z|, and one the density flags keeps the density's."""
    from ct3dflow.detect.density_map import DensityScore

    rng = np.random.default_rng(5)
    mask = lung_ball()

    def score(flow_block: bool, dense_block: bool):
        flow = rng.normal(size=mask.shape).astype(np.float32)
        dens = (-0.36 + 0.01 * rng.normal(size=mask.shape)).astype(np.float32)
        if flow_block:
            flow[6:12, 14:20, 14:20] += 40.0
        if dense_block:
            dens[14:20, 14:20, 14:20] = 0.3
        return DensityScore(flow, 12, size=24, parenchyma=np.where(mask != 0, dens, np.nan), density_margin=0)

    kind = rc.FlowWeight()
    params = {"sigma_vox": 1.0, "density_weight": 1.0, "blob_weight": 0.0, "flow_weight": 1.0}
    ref = kind.fit_reference([score(False, False) for _ in range(4)], [mask] * 4, params)
    sick = score(True, True)
    full = kind.atypicality(sick, mask, params, ref)
    half = kind.atypicality(sick, mask, {**params, "flow_weight": 0.5}, ref)
    np.testing.assert_array_equal(full, rc.AnatomyDensityMap().atypicality(sick, mask, params, ref))
    flow_only = (slice(7, 11), slice(15, 19), slice(15, 19))
    np.testing.assert_allclose(half[flow_only], 0.5 * full[flow_only], rtol=1e-6)
    assert np.nanmax(full[flow_only]) < -10
    dense = (slice(15, 19), slice(15, 19), slice(15, 19))
    np.testing.assert_array_equal(half[dense], full[dense])
