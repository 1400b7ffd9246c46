"""The anatomy map plus the parenchyma density (ct3dflow.detect.density_map, ``scoring.map: anatomy-density``):
the density is read in the strict lung and ignores thin vessels; a haze the flow's map does not see is found,
normal vessels are not; density_weight scales the density's |z| (0: the anatomy map); the kind scores through
score_row."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from ct3dflow.detect import OperatingPoint, get_kind
from ct3dflow.detect.anatomy_map import AnatomyMap
from ct3dflow.detect.bite import lung_bite
from ct3dflow.detect.blobs import BLOB_SIGMAS, bright_blobness
from ct3dflow.detect.density_map import (
    AnatomyDensityMap,
    DensityScore,
    below_normalised,
    core_bins,
    lung_core,
    parenchyma_density,
)
from ct3dflow.detect.search import ScoredStudy, grid_search
from ct3dflow.detect.voxel_map import VoxelScore
from ct3dflow.preprocess import normalise

SP = (2.0, 2.0, 2.0)
LUNG, TISSUE, HAZE = -0.37, 0.05, -0.22  # normalised CT: about −850 HU, +60 HU and −670 HU


def _chest(rng, haze: bool, shape=(40, 48, 72)):
    """(CT, strict lungs, permissive lungs): two box lungs in soft tissue, noisy parenchyma, a few thin bright
    'vessels' (2×2-voxel lines, different in every study), and with ``haze`` a 7³ ground-glass block."""
    strict = np.zeros(shape, bool)
    strict[4:36, 6:42, 4:32] = True
    strict[4:36, 6:42, 40:68] = True
    ct = np.where(strict, LUNG, TISSUE).astype(np.float32) + 0.01 * rng.standard_normal(shape).astype(np.float32)
    for _ in range(6):
        z, y = int(rng.integers(8, 32)), int(rng.integers(10, 38))
        ct[z:z + 2, y:y + 2, 6:30] = TISSUE  # a vessel along x through the right lung
        x = int(rng.integers(44, 64))
        ct[z:z + 2, 8:40, x:x + 2] = TISSUE
    block = np.zeros(shape, bool)
    if haze:
        z, y, x = 20 + int(rng.integers(-3, 4)), 24, 16
        block[z - 3:z + 4, y - 3:y + 4, x - 3:x + 4] = True
        ct[block] = HAZE + 0.01 * rng.standard_normal(block.sum())
    permissive = ndimage.binary_dilation(strict, iterations=2)
    return ct, strict.astype(np.uint8), permissive.astype(np.uint8), block


def _tiny_flow():
    from ct3dflow.flow import Glow3D

    torch.manual_seed(0)
    g = Glow3D(levels=2, steps=1, width=8, patch_size=8)
    g.initialize(0.1 * torch.randn(4, 1, 8, 8, 8) - 0.3)
    return g.eval()


def _study(rng, i, label):
    ct, strict, permissive, _ = _chest(rng, bool(label))
    flow = ndimage.gaussian_filter(rng.standard_normal(ct.shape), 1.0).astype(np.float32)  # blind to the haze
    score = DensityScore(flow, 8, size=8, parenchyma=parenchyma_density(ct, strict))
    return ScoredStudy(f"s{i}", label, "ground_glass" if label else None, permissive, SP, score)


def test_parenchyma_density_ignores_thin_vessels_and_the_lung_edge_and_sees_a_haze():
    rng = np.random.default_rng(0)
    ct, strict, _, block = _chest(rng, haze=True)
    d = parenchyma_density(ct, strict, margin=0)  # the whole strict mask
    inside = strict != 0
    assert np.isnan(d[~inside]).all() and np.isfinite(d[inside]).all()
    healthy = inside.copy()
    healthy[ndimage.binary_dilation(block, iterations=4)] = False  # the haze and the cubes that reach it
    # vessels and the soft tissue beyond the lung's edge leave the median at the lung's value
    assert np.abs(d[healthy] - LUNG).max() < 0.03
    assert d[4, 6, 4] == pytest.approx(LUNG, abs=0.02)  # a corner voxel: most of its cube is tissue
    with np.errstate(invalid="ignore"):
        mean = ndimage.uniform_filter(np.where(inside, ct, 0.0), 7) / ndimage.uniform_filter(inside.astype(float), 7)
    assert np.abs(mean[healthy] - LUNG).max() > 0.06  # what a mean would do on the vessels
    core = ndimage.binary_erosion(block, iterations=2)  # where the haze fills most of a cube
    assert core.sum() == 27 and np.abs(d[core] - HAZE).max() < 0.03
    with pytest.raises(ValueError, match="between 0 and 100"):
        AnatomyDensityMap().settings({"density_percentile": 100}, 8)


def test_a_narrower_window_reads_a_small_emphysema_pocket_that_the_7_voxel_window_smooths_away():
    """A dark pocket 5 voxels across (about −990 HU in lung of −850; a 0.6 cm³ part of a small emphysema): a
    separable median over 7 voxels per axis keeps a voxel only where each pass's window is mostly pocket, and the
    ball's chords off its centre are shorter than 4, so nothing of it is left; over 3 or 5 voxels it reads as
    pocket. (Why family B's small emphysema is missed; the window stays 7, because a narrower one lost family A's
    ground glass in the search, docs/RESULTS.md 2026-12-07 08:00.)"""
    rng = np.random.default_rng(3)
    ct, strict, _, _ = _chest(rng, haze=False)
    zz, yy, xx = np.ogrid[:40, :48, :72]
    pocket = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 16) ** 2 <= 2.5**2
    emphysema = LUNG - 0.065
    ct[pocket] = emphysema + 0.01 * rng.standard_normal(pocket.sum())
    dark = {w: np.mean(parenchyma_density(ct, strict, size=w)[pocket] < LUNG - 0.0325) for w in (3, 5, 7)}
    assert dark[7] == 0.0 and dark[5] > 0.9 and dark[3] > 0.9, dark


def test_the_margin_keeps_the_partial_volume_at_the_lung_edge_out_of_the_density():
    """A denser outer shell of the strict mask (partial volume with the pleura and the diaphragm) reads as dense
    lung at margin 0; at the default margin of 2 voxels the density is read in the core only, at the lung's
    value, and the haze is still found."""
    rng = np.random.default_rng(6)
    ct, strict, _, block = _chest(rng, haze=True)
    inside = strict != 0
    shell = inside & ~ndimage.binary_erosion(inside)
    ct[shell] = -0.25  # about −720 HU: half lung, half tissue
    edge = inside & ~ndimage.binary_erosion(inside, iterations=3) & ~ndimage.binary_dilation(block, iterations=4)
    whole = parenchyma_density(ct, strict, margin=0)
    assert np.mean(whole[edge] - LUNG > 0.05) > 0.3  # the shell moves the median near the edge
    d = parenchyma_density(ct, strict)
    core = lung_core(strict)
    np.testing.assert_array_equal(core, ndimage.binary_erosion(inside, iterations=2))
    assert np.isnan(d[~core]).all() and np.isfinite(d[core]).all()
    healthy = core & ~ndimage.binary_dilation(block, iterations=4)
    assert np.abs(d[healthy] - LUNG).max() < 0.03
    assert np.abs(d[ndimage.binary_erosion(block, iterations=2)] - HAZE).max() < 0.03
    # its bands lie as deep in the lung as the flow's, less the margin
    assert core_bins((0.0, 2.0, 4.0, 6.0, 9.0, 13.0), 2) == (0.0, 2.0, 4.0, 7.0, 11.0)
    assert core_bins((0.0, 2.0, 4.0), 0) == (0.0, 2.0, 4.0)
    kind = AnatomyDensityMap()
    scores = [DensityScore(np.zeros_like(ct), 8, size=8, parenchyma=p, density_margin=m)
              for p, m in ((d, 2), (whole, 0))]
    with pytest.raises(ValueError, match="different margins"):
        kind.fit_reference(scores, [strict, strict], {"sigma_vox": 1.0})
    assert kind.settings({}, 8)["density_margin"] == 2
    assert kind.settings({"density_margin": 0}, 8)["density_margin"] == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="density_margin must be a whole number"):
            kind.settings({"density_margin": bad}, 8)


def test_the_aerated_reading_keeps_a_thick_vessel_inside_the_lung_out_of_the_density():
    """The strict mask fills its holes, so a hilar vessel lies inside its core; read over every core voxel, the
    median is dense around it, read over the aerated lung (below −300 HU) it stays at the lung's value, and a haze
    (about −670 HU) is still read."""
    rng = np.random.default_rng(7)
    ct, strict, _, block = _chest(rng, haze=True)
    soft = np.float32(normalise(np.float32(40.0)))  # a vessel's blood, +40 HU
    vessel = np.zeros(ct.shape, bool)
    vessel[16:24, 8:40, 50:55] = True  # 8 × 5 voxels across (16 × 10 mm), in the left lung (the haze is in the right)
    ct[vessel] = soft
    near = ndimage.binary_dilation(vessel, iterations=3) & ~vessel & (lung_core(strict) != 0)
    plain = parenchyma_density(ct, strict)
    aerated = parenchyma_density(ct, strict, below=below_normalised(-300.0))
    np.testing.assert_array_equal(np.isfinite(aerated), lung_core(strict))  # the same core, so the same bands
    inside = vessel & (lung_core(strict) != 0)
    assert np.mean(plain[inside] - LUNG > 0.3) > 0.5  # read over every core voxel, the vessel is dense lung
    assert np.abs(aerated[near] - LUNG).max() < 0.03 and np.abs(aerated[inside] - LUNG).max() < 0.03
    assert np.abs(aerated[ndimage.binary_erosion(block, iterations=2)] - HAZE).max() < 0.03
    assert below_normalised("off") is None and below_normalised(float("nan")) is None
    for bad in (0.0, -1000, 100, "-300", True):
        with pytest.raises(ValueError, match="density_below_hu must be a CT number"):
            AnatomyDensityMap().settings({"density_below_hu": bad}, 8)
    assert AnatomyDensityMap().settings({"density_below_hu": "off"}, 8)["density_below_hu"] == "off"
    assert AnatomyDensityMap().settings({"density_below_hu": False}, 8)["density_below_hu"] == "off"  # YAML's off


def test_the_aerated_threshold_follows_the_study_s_own_hu_window():
    """``density_below_hu`` is a CT number: a study preprocessed with another HU window (here the scanner's full
    range) is read at the same voxels as with the default one; put on the default window's scale instead, −300 HU
    would lie above the vessel's blood and read it as lung."""
    from ct3dflow.preprocess import PreprocessConfig, denormalise

    ct, strict, permissive, _ = _chest(np.random.default_rng(2), haze=True)
    vessel = np.zeros(ct.shape, bool)
    vessel[16:24, 8:40, 50:55] = True
    ct[vessel] = normalise(np.float32(40.0))
    wide = PreprocessConfig(hu_min=-1024.0, hu_max=3071.0)
    ct_wide = normalise(denormalise(ct), wide)
    study = SimpleNamespace(volume=ct_wide, strict=strict, permissive=permissive, spacing=SP,
                            hu_window=(wide.hu_min, wide.hu_max))
    kind = get_kind("anatomy-density")
    got = kind.score(_tiny_flow(), study, kind.settings({"stride": 8, "precision": "fp32"}, 8)).parenchyma
    default = parenchyma_density(ct, strict, below=below_normalised(-300.0))
    core = lung_core(strict)
    np.testing.assert_allclose(denormalise(got[core], wide), denormalise(default[core]), atol=1.0)  # HU
    wrong = parenchyma_density(ct_wide, strict, below=below_normalised(-300.0))  # the default window's threshold
    inside = vessel & core
    assert np.mean(denormalise(wrong[inside], wide) > -300.0) > 0.5 > np.mean(denormalise(got[inside], wide) > -300)


def test_density_score_round_trips_and_a_plain_voxel_map_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    s = _study(rng, 0, 1).score
    kind = get_kind("anatomy-density")
    back = kind.load_score(kind.save_score(s, tmp_path / kind.score_file))
    np.testing.assert_array_equal(back.parenchyma, s.parenchyma)
    np.testing.assert_array_equal(back.voxel_map, s.voxel_map)
    assert kind.score_settings(back) == {**get_kind("anatomy").score_settings(s), "density_percentile": 50.0,
                                         "density_margin": 2, "density_below_hu": "off", "blobs": "off",
                                         "bite": "off"}
    # a file written before the margin was recorded was read in the whole strict mask, and so is a point without it
    np.savez(tmp_path / "old.npz", **{k: v for k, v in s.arrays().items() if k != "density_margin"})
    assert kind.load_score(tmp_path / "old.npz").density_margin == 0
    from ct3dflow.detect.row import resolve_settings

    old = OperatingPoint("anatomy-density", {}, 1.0, {}, {"stride": 8, "patch_size": 8, "density_percentile": 50.0})
    assert resolve_settings(kind, {"density_margin": 2}, 8, old)["density_margin"] == 0
    assert resolve_settings(kind, {"density_below_hu": -300}, 8, old)["density_below_hu"] == "off"
    assert resolve_settings(kind, {}, 8, old)["blobs"] == resolve_settings(kind, {}, 8, old)["bite"] == "off"
    assert resolve_settings(kind, {}, 8)["density_margin"] == 2
    assert resolve_settings(kind, {}, 8)["density_below_hu"] == -300.0
    assert resolve_settings(kind, {}, 8)["blobs"] == (1.5, 2.5, 3.5) and resolve_settings(kind, {}, 8)["bite"] == 3
    VoxelScore(s.voxel_map, 8, size=8).save(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match="without the parenchyma density.*anatomy-density"):
        kind.load_score(tmp_path / "plain.npz")


def test_ground_glass_the_flow_misses_is_found_by_the_density_and_normal_vessels_are_not():
    """The flow's map here is noise (blind to the haze), so the anatomy kind ranks at chance; the density
    finds every haze, and the normals' vessels (different in every study) stay below the threshold."""
    rng = np.random.default_rng(2)
    val = [_study(rng, i, y) for i, y in enumerate([0] * 6 + [1] * 6)]
    space = {"sigma_vox": [1.0], "tau_z": [4.0], "v_min_cm3": [0.5], "density_weight": [0.0, 0.5, 1.0],
             "blob_weight": [0.0]}
    op, _ = grid_search(AnatomyDensityMap(), val, space)
    anat, _ = grid_search(AnatomyMap(), val, {k: v for k, v in space.items() if k != "density_weight"})
    assert op.validation["auroc"] == 1.0 and anat.validation["auroc"] < 0.8
    fresh = [_study(rng, 100 + i, y) for i, y in enumerate([0, 0, 0, 1, 1, 1])]
    vols = np.array([get_kind("anatomy-density").decide(s.score, s.permissive, SP, op)[0] for s in fresh])
    assert vols[3:].min() > 0.3 * 7**3 * 0.008 and vols[:3].max() < 0.5, vols  # haze 2.7 cm³; normals ≈ 0
    again = OperatingPoint.from_dict(op.to_dict())
    assert again.map == "anatomy-density" and set(again.reference) == {"type", "flow", "density"}  # no blobs
    assert again.params["density_weight"] in (0.5, 1.0)


def test_density_weight_scales_only_the_density_and_weight_0_is_the_anatomy_map():
    rng = np.random.default_rng(3)
    val = [_study(rng, i, 0) for i in range(4)]
    kind = AnatomyDensityMap()
    params = {"sigma_vox": 1.0, "density_weight": 1.0}
    ref = kind.fit_reference([s.score for s in val], [s.permissive for s in val], params)
    s = _study(rng, 9, 1)
    z_flow, z_density, z_blob, z_bite = kind.z_maps(s.score, s.permissive, 1.0, ref)
    assert np.isnan(z_blob).all() and np.isnan(z_bite).all()  # scored without either, the reference has neither
    a1 = kind.atypicality(s.score, s.permissive, params, ref)
    a2 = kind.atypicality(s.score, s.permissive, {**params, "density_weight": 0.5}, ref)
    haze = z_density > 2 * z_flow + 1.0  # voxels where the density decides
    assert haze.sum() > 50
    np.testing.assert_allclose(-a1[haze], z_density[haze], rtol=1e-6)
    np.testing.assert_allclose(-a2[haze], np.maximum(z_density[haze] / 2, z_flow[haze]), rtol=1e-6)
    flow_side = np.isfinite(z_flow) & ~(z_density > z_flow)  # the flow decides at weight 1, so also at 0.5
    np.testing.assert_allclose(a2[flow_side & (s.permissive != 0)], -z_flow[flow_side & (s.permissive != 0)],
                               rtol=1e-6)
    moved = {**ref, "density": {**ref["density"], "bands": [{**b, "median": b["median"] + 0.05}
                                                            for b in ref["density"]["bands"]]}}
    a3 = kind.atypicality(s.score, s.permissive, params, moved)
    assert not np.allclose(np.nan_to_num(a3), np.nan_to_num(a1))  # a new reference is not served stale
    a0 = kind.atypicality(s.score, s.permissive, {**params, "density_weight": 0.0}, ref)
    np.testing.assert_array_equal(a0, AnatomyMap().atypicality(s.score, s.permissive, params, ref["flow"]))


def test_the_platform_default_is_the_anatomy_map_with_the_aerated_density():
    """Unset, ``scoring.map`` is anatomy-density, reading the aerated lung (docs/RESULTS.md, 2026-12-07)."""
    from ct3dflow.config import load_config

    kind = get_kind(None)
    assert isinstance(kind, AnatomyDensityMap) and kind.calibration == "mad" and 0.0 in kind.space["density_weight"]
    assert load_config(None).scoring["map"] == "anatomy-density"
    assert kind.settings({}, 8)["density_below_hu"] == -300.0


def test_the_kind_scores_a_study_through_score_row(tmp_path):
    """The predictor is the voxel map's (the same flow map as ``anatomy``); the density comes with it."""
    from ct3dflow.detect.row import resolve_settings, score_row

    g = _tiny_flow()
    ct, strict, permissive, _ = _chest(np.random.default_rng(4), haze=True, shape=(24, 28, 40))
    study = SimpleNamespace(volume=ct, strict=strict, permissive=permissive, spacing=SP)
    kind = get_kind("anatomy-density")
    settings = resolve_settings(kind, {"map": "anatomy-density", "stride": 8, "precision": "fp32"}, 8)
    row = score_row(g, kind, "s0", "p", study, settings, tmp_path, write_outputs=False)
    assert row["status"] == "ok", row["error"]
    got = kind.load_score(row["score_path"])
    plain = get_kind("anatomy")
    ref = plain.score(g, study, resolve_settings(plain, {"stride": 8, "precision": "fp32"}, 8))
    np.testing.assert_array_equal(got.voxel_map, ref.voxel_map)
    np.testing.assert_array_equal(got.parenchyma, parenchyma_density(ct, strict, below=below_normalised(-300.0)))
    assert kind.score_settings(got)["density_below_hu"] == -300.0


def test_the_search_fits_the_references_once_per_sigma_and_not_per_density_weight():
    """map_params (σ, weight) rebuild the map; reference_params (σ) alone refit the references."""
    fits = []

    class Counting(AnatomyDensityMap):
        def fit_reference(self, scores, masks, params):
            fits.append(float(params["sigma_vox"]))
            return super().fit_reference(scores, masks, params)

    rng = np.random.default_rng(5)
    val = [_study(rng, i, y) for i, y in enumerate([0] * 4 + [1] * 2)]
    counts = []
    for weights in ([1.0], [0.0, 0.5, 1.0]):
        fits.clear()
        space = {"sigma_vox": [0.0, 1.0], "tau_z": [4.0], "v_min_cm3": [0.0], "density_weight": weights,
                 "blob_weight": [0.0]}
        op, trials = grid_search(Counting(), val, space, folds=2)
        assert len(trials) == 2 * len(weights)
        counts.append(len(fits))
    # per σ its 2 folds (again for the best σ if it was not the last), then the full one: never per weight,
    # which would be 2 folds × 6 map builds
    assert max(counts) <= 2 * 2 + 2 + 1, counts


def _nodule_study(rng, i, label, blobs=True):
    """A chest whose flow map is noise; abnormal ones hold a solid ball of 4.5 voxels radius (a 2.9 cm³ nodule,
    +60 HU) deep in a lung. Normals have their 2-voxel vessels only."""
    ct, strict, permissive, _ = _chest(rng, haze=False)
    if label:
        c = np.array([20, 24, 16 if rng.random() < 0.5 else 54]) + rng.integers(-3, 4, 3)
        z, y, x = np.ogrid[:ct.shape[0], :ct.shape[1], :ct.shape[2]]
        ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 4.5**2
        ct[ball] = TISSUE
    flow = ndimage.gaussian_filter(rng.standard_normal(ct.shape), 1.0).astype(np.float32)
    blob = bright_blobness(ct, lung_core(permissive, 2)) if blobs else None
    score = DensityScore(flow, 8, size=8, parenchyma=parenchyma_density(ct, strict, below=below_normalised(-300.0)),
                         density_below_hu=-300.0, blob=blob, blob_sigmas=BLOB_SIGMAS if blobs else ())
    return ScoredStudy(f"n{i}", label, "nodule" if label else None, permissive, SP, score)


def _the_solid_channel_is_taken(make, seed, v_min, part):
    """Searched on 6 normal and 6 abnormal studies of ``make``, the solid-lesion channel (reference ``part``) is
    taken and separates them, where the flow's noise alone (blob_weight 0) does not; the point, stored and read
    back, decides 6 fresh studies right. Returns the point and the fresh studies."""
    rng = np.random.default_rng(seed)
    val = [make(rng, i, y) for i, y in enumerate([0] * 6 + [1] * 6)]
    space = {"sigma_vox": [1.0], "tau_z": [4.0], "v_min_cm3": [v_min], "density_weight": [0.0],
             "blob_weight": [0.0, 0.5, 1.0]}
    op, _ = grid_search(AnatomyDensityMap(), val, space)
    without, _ = grid_search(AnatomyDensityMap(), val, {**space, "blob_weight": [0.0]})
    assert op.validation["auroc"] == 1.0 and without.validation["auroc"] < 0.8
    assert op.params["blob_weight"] > 0 and set(op.reference) == {"type", "flow", "density", part}
    fresh = [make(rng, 100 + i, y) for i, y in enumerate([0, 0, 0, 1, 1, 1])]
    again = OperatingPoint.from_dict(op.to_dict())
    vols = np.array([get_kind("anatomy-density").decide(s.score, s.permissive, SP, again)[0] for s in fresh])
    assert vols[3:].min() > v_min and vols[:3].max() < v_min, vols
    return op, fresh


def _weight_0_is_the_kind_without(part, study, op, bare, match):
    """At blob_weight 0 the map of ``study`` is, exactly, that of the kind without ``part`` (``bare``, the same
    study scored without it; the reference without that part); at the chosen weight ``bare`` is refused."""
    kind, bare = AnatomyDensityMap(), bare.score
    bare.voxel_map, bare.parenchyma = study.score.voxel_map, study.score.parenchyma
    params = {**op.params, "blob_weight": 0.0}
    np.testing.assert_array_equal(kind.atypicality(study.score, study.permissive, params, op.reference),
                                  kind.atypicality(bare, study.permissive, params,
                                                   {k: v for k, v in op.reference.items() if k != part}))
    with pytest.raises(ValueError, match=match):
        kind.atypicality(bare, study.permissive, op.params, op.reference)


def test_a_nodule_the_flow_misses_is_found_by_the_blob_response_and_vessels_are_not():
    """The bright-blob response (ct3dflow.detect.blobs) against its healthy tail per band: the search takes it,
    every nodule is found, the normals' vessels (tubes, different in every study) are not. The density is left
    out (weight 0): on this noiseless toy lung its healthy MAD is so small that the aerated reading's filling around
    a solid ball shows too."""
    op, fresh = _the_solid_channel_is_taken(_nodule_study, 7, 0.5, "blob")
    _weight_0_is_the_kind_without("blob", fresh[3], op, _nodule_study(np.random.default_rng(0), 0, 0, blobs=False),
                                  "weighs the bright-blob response but this study was scored without it.*score it")


def test_blob_settings_round_trip_and_mixed_scales_are_refused(tmp_path):
    kind = AnatomyDensityMap()
    s = _nodule_study(np.random.default_rng(8), 0, 1).score
    back = kind.load_score(kind.save_score(s, tmp_path / kind.score_file))
    np.testing.assert_array_equal(back.blob, s.blob)
    assert kind.score_settings(back)["blobs"] == BLOB_SIGMAS
    assert kind.settings({"blobs": "off"}, 8)["blobs"] == kind.settings({"blobs": False}, 8)["blobs"] == "off"
    assert kind.settings({"blobs": [2, 3]}, 8)["blobs"] == (2.0, 3.0)
    for bad in ([], [0], [9.0], ["2"], [True], 2.0, "on"):
        with pytest.raises(ValueError, match="scoring.blobs must be a list of scales"):
            kind.settings({"blobs": bad}, 8)
    other = _nodule_study(np.random.default_rng(9), 1, 0).score
    other.blob_sigmas = (2.0,)
    with pytest.raises(ValueError, match="different scales.*one scoring.blobs"):
        kind.fit_reference([s, other], [np.ones(s.voxel_map.shape, bool)] * 2, {"sigma_vox": 1.0})


def _pleural_study(rng, i, label, bite=True):
    """Two ellipsoid lungs (smooth walls, as a healthy lung's are) in soft tissue, and a flow map of noise; abnormal
    ones hold a half-ball of soft tissue (radius 5 voxels) pressing into a lung from its lateral wall, as a pleural
    consolidation does: the strict mask gives way, the permissive one (the healthy shape) holds it. Scored without
    the blobs, so that the bite alone carries the solid-lesion channel."""
    shape = (40, 48, 72)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    strict = np.zeros(shape, np.uint8)
    for lab, cx in ((1, 18), (2, 54)):
        c = np.array([20, 24, cx]) + rng.integers(-1, 2, 3)
        strict[((z - c[0]) / 15.0) ** 2 + ((y - c[1]) / 19.0) ** 2 + ((x - c[2]) / 14.0) ** 2 <= 1] = lab
    permissive = ndimage.binary_dilation(strict != 0, iterations=2).astype(np.uint8)
    ct = np.where(strict != 0, LUNG, TISSUE).astype(np.float32) + 0.01 * rng.standard_normal(shape).astype(np.float32)
    if label:
        xs = np.nonzero(strict.any(axis=(0, 1)))[0]
        tip = xs.min() if rng.random() < 0.5 else xs.max()  # the lateral wall of the right or the left lung
        zc, yc = 20 + int(rng.integers(-3, 4)), 24 + int(rng.integers(-3, 4))
        pit = ((z - zc) ** 2 + (y - yc) ** 2 + (x - tip) ** 2 <= 25) & (permissive != 0)
        ct[pit], strict[pit] = TISSUE, 0
    flow = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0).astype(np.float32)
    score = DensityScore(flow, 8, size=8, parenchyma=parenchyma_density(ct, strict, below=below_normalised(-300.0)),
                         density_below_hu=-300.0, bite=lung_bite(strict, lung_core(permissive, 2)) if bite else None,
                         bite_opening=3 if bite else 0)
    return ScoredStudy(f"p{i}", label, "consolidation" if label else None, permissive, SP, score)


def test_a_pleural_lesion_the_flow_misses_is_found_by_the_lung_s_bite():
    """The lung's bite (ct3dflow.detect.bite) against its healthy tail per band, in the solid-lesion channel at
    blob_weight: the search takes it and every half-ball on the lung's wall is found; without it (weight 0) the
    flow's noise ranks them at chance. Weight 0 is the kind without the bite, exactly, and a reference with a bite
    part refuses a study scored without one."""
    op, fresh = _the_solid_channel_is_taken(_pleural_study, 11, 0.1, "bite")
    # the bite's bands are split from front to back (the hilum apart from the paravertebral gutter), no others
    assert op.reference["bite"]["anterior_posterior"] == 3 and op.reference["flow"]["anterior_posterior"] == 1
    kind, s = AnatomyDensityMap(), fresh[3]
    *_, z_blob, z_bite = kind.z_maps(s.score, s.permissive, 1.0, op.reference)
    assert np.isnan(z_blob).all()  # no blobs were scored
    assert np.nanmax(z_bite) > 4.0 / op.params["blob_weight"]
    _weight_0_is_the_kind_without("bite", s, op, _pleural_study(np.random.default_rng(0), 0, 0, bite=False),
                                  "weighs the lung's bite but this study was scored without it.*score it")


def test_bite_settings_round_trip_and_mixed_openings_are_refused(tmp_path):
    kind = AnatomyDensityMap()
    s = _pleural_study(np.random.default_rng(12), 0, 1).score
    back = kind.load_score(kind.save_score(s, tmp_path / kind.score_file))
    np.testing.assert_array_equal(back.bite, s.bite)
    assert kind.score_settings(back)["bite"] == 3 and back.blob is None
    assert kind.settings({}, 8)["bite"] == 3
    assert kind.settings({"bite": "off"}, 8)["bite"] == kind.settings({"bite": False}, 8)["bite"] == "off"
    assert kind.settings({"bite": 2}, 8)["bite"] == 2
    for bad in (0, 9, 2.5, "3", True, [3]):
        with pytest.raises(ValueError, match="scoring.bite must be the opening"):
            kind.settings({"bite": bad}, 8)
    other = _pleural_study(np.random.default_rng(13), 1, 0, bite=False).score
    with pytest.raises(ValueError, match="different openings.*one scoring.bite"):
        kind.fit_reference([s, other], [np.ones(s.voxel_map.shape, bool)] * 2, {"sigma_vox": 1.0})
