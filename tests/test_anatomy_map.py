"""The anatomy-aware reference (ct3dflow.detect.anatomy_map, the platform's default kind): bands read off the
lung mask, MAD or quantile calibration, and the point of it — normal hilar structure stops being flagged, a
lesion still is."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ct3dflow.detect import OperatingPoint, get_kind
from ct3dflow.detect.anatomy_map import AnatomyMap, anatomy_coordinates, band_index
from ct3dflow.detect.search import ScoredStudy, grid_search
from ct3dflow.detect.voxel_map import VoxelScore

SP = (2.0, 2.0, 2.0)


def _lungs(shape=(44, 56, 80)):
    """Two box-shaped lungs either side of a 'mediastinum' gap (LPS: the right lung at small x)."""
    m = np.zeros(shape, bool)
    m[4:40, 6:50, 4:36] = True
    m[4:40, 6:50, 44:76] = True
    return m


def test_coordinates_follow_the_lungs():
    m = _lungs()
    depth, lat, ver = anatomy_coordinates(m)
    assert lat[20, 20, 35] == 0.0 and lat[20, 20, 4] == 1.0  # right lung: medial edge at large x
    assert lat[20, 20, 44] == 0.0 and lat[20, 20, 75] == 1.0  # left lung: medial edge at small x
    assert ver[4, 20, 10] == 0.0 and ver[39, 20, 10] == 1.0  # base to apex
    assert depth[20, 20, 4] == 1.0 and (depth[~m] == 0).all()
    full, d = band_index(m, (0.0, 2.0, 4.0), 3, 3)
    assert full.max() == 3 * 3 * 3 - 1 and (full[~m] == -1).all() and (d[m] >= 0).all()


def _healthy_map(rng, m, hilum_boost=6.0, bimodal=True):
    """Smooth noise, plus normal 'vessels' near each lung's medial edge at mid-height (the hilum): bright in
    half of the hilar voxels (``bimodal``), or raised throughout a hilum that fills the medial, mid-height band
    (a band's median and MAD absorb a shift only where the band is the structure; see
    test_mad_bands_do_not_absorb_a_two_mode_hilum)."""
    v = ndimage.gaussian_filter(rng.standard_normal(m.shape), 1.0)
    _, lat, ver = anatomy_coordinates(m)
    if bimodal:
        hilum = m & (lat < 0.25) & (np.abs(ver - 0.5) < 0.2)
        v[hilum] += hilum_boost * (rng.random(hilum.sum()) < 0.5)
    else:
        hilum = m & (lat < 1 / 3) & (ver >= 1 / 3) & (ver < 2 / 3)
        v[hilum] += hilum_boost * (0.8 + 0.4 * rng.random(hilum.sum()))
    return v.astype(np.float32)


def _studies(rng, labels, bimodal=True):
    m = _lungs()
    out = []
    for i, y in enumerate(labels):
        v = _healthy_map(rng, m, bimodal=bimodal)
        if y:  # a lesion in the periphery: low values in a 5³ block
            z, yy, x = 20 + int(rng.integers(-4, 4)), 24, 10
            v[z - 2:z + 3, yy - 2:yy + 3, x - 2:x + 3] -= 6.0
        out.append(ScoredStudy(f"s{i}", y, "nodule" if y else None, m.astype(np.uint8), SP, VoxelScore(v, 8, size=8)))
    return out


@pytest.mark.parametrize("kind, bimodal", [(AnatomyMap(), False), (AnatomyMap(calibration="quantile"), True)],
                         ids=["mad-raised-hilum", "quantile-bimodal-hilum"])
def test_hilar_structure_is_absorbed_and_the_lesion_is_still_found(kind, bimodal):
    """Median/MAD bands (the default) absorb a hilum whose values are raised throughout its band; a hilum where
    only some voxels are bright (a two-mode band) needs the quantile calibration: its MAD sits in one mode."""
    rng = np.random.default_rng(0)
    val = _studies(rng, [0] * 6 + [1] * 6, bimodal)
    space = {"sigma_vox": [0.0], "tau_z": [4.0], "v_min_cm3": [0.0]}
    depth_op, _ = grid_search(get_kind("voxel"), val, space)
    anat_op, _ = grid_search(kind, val, space)
    fresh = _studies(rng, [0, 0, 0, 1, 1, 1], bimodal)
    normal = [s for s in fresh if s.label == 0]

    def volumes(k, op, studies):
        return np.array([k.decide(s.score, s.permissive, SP, op)[0] for s in studies])

    depth_normal = volumes(get_kind("voxel"), depth_op, normal)
    anat_normal = volumes(kind, anat_op, normal)
    assert np.median(depth_normal) > 5.0, "the depth reference should flag the hilar 'vessels' of normal studies"
    assert np.median(anat_normal) < 0.2 * np.median(depth_normal)
    sick = volumes(kind, anat_op, [s for s in fresh if s.label == 1])
    assert sick.min() > anat_normal.max(), (sick, anat_normal)
    again = OperatingPoint.from_dict(anat_op.to_dict())
    assert again.reference["type"] == "anatomy" and again.reference["calibration"] == kind.calibration


def test_mad_bands_do_not_absorb_a_two_mode_hilum():
    """Why the quantile calibration exists: with half of the hilar voxels bright, the band's median and MAD
    sit in the dark mode, and the bright normal voxels stay flagged (the limit of the default)."""
    rng = np.random.default_rng(0)
    val = _studies(rng, [0] * 6 + [1] * 6, bimodal=True)
    op, _ = grid_search(AnatomyMap(), val, {"sigma_vox": [0.0], "tau_z": [4.0], "v_min_cm3": [0.0]})
    normal = _studies(rng, [0, 0, 0], bimodal=True)
    assert np.median([AnatomyMap().decide(s.score, s.permissive, SP, op)[0] for s in normal]) > 5.0


def test_the_anatomy_kind_uses_mad_and_old_quantile_points_still_map():
    """``scoring.map: anatomy`` is the kind with median/MAD bands; a point fitted with the quantile calibration
    (before MAD was chosen) carries its calibration and maps exactly as it was chosen."""
    kind = get_kind("anatomy")
    assert kind.name == "anatomy" and kind.calibration == "mad"
    rng = np.random.default_rng(3)
    val = _studies(rng, [0] * 4)
    params = {"sigma_vox": 1.0}
    old = AnatomyMap(calibration="quantile")
    ref_q = old.fit_reference([s.score for s in val], [s.permissive for s in val], params)
    ref_mad = kind.fit_reference([s.score for s in val], [s.permissive for s in val], params)
    assert ref_q["calibration"] == "quantile" and "quantiles" in ref_q["bands"][0]
    assert ref_mad["calibration"] == "mad" and "quantiles" not in ref_mad["bands"][0]
    s = _studies(rng, [1])[0]
    a_q = kind.atypicality(s.score, s.permissive, params, ref_q)
    np.testing.assert_array_equal(a_q, old.atypicality(s.score, s.permissive, params, ref_q))
    a_mad = kind.atypicality(s.score, s.permissive, params, ref_mad)
    inside = s.permissive != 0
    # the two calibrations differ, so the equality above means something
    assert not np.allclose(a_q[inside], a_mad[inside])


def test_quantile_calibration_makes_healthy_z_standard_normal_per_band():
    rng = np.random.default_rng(1)
    m = _lungs()
    heavy = [np.where(m, rng.standard_t(2, m.shape), np.nan).astype(np.float32) for _ in range(4)]  # heavy tails
    kind = AnatomyMap(lateral=1, vertical=1, calibration="quantile")
    ref = kind.fit_reference([VoxelScore(h, 8) for h in heavy], [m] * 4, {"sigma_vox": 0.0})
    z = -kind.atypicality(VoxelScore(np.where(m, rng.standard_t(2, m.shape), np.nan).astype(np.float32), 8), m,
                          {"sigma_vox": 0.0}, ref)
    share = np.mean(z[m] > 3.0)
    assert share == pytest.approx(2 * (1 - 0.99865), rel=0.35)  # |z| > 3 as often as for a normal distribution
    mad = AnatomyMap(lateral=1, vertical=1, calibration="mad")
    ref_mad = mad.fit_reference([VoxelScore(h, 8) for h in heavy], [m] * 4, {"sigma_vox": 0.0})
    z_mad = -mad.atypicality(VoxelScore(heavy[0], 8), m, {"sigma_vox": 0.0}, ref_mad)
    assert np.mean(z_mad[m] > 3.0) > 3 * share  # MAD z of a heavy-tailed healthy distribution flags far more


def test_lung_fraction_bands_absorb_what_a_thin_lung_tip_does_to_normal_maps():
    """Where a window holds little lung (a thin tip beside the mediastinum) healthy values differ from a flat
    pleura at the same depth; fraction bands tell the two apart, depth bands cannot."""
    from ct3dflow.detect.anatomy_map import lung_fraction

    m = np.zeros((40, 60, 60), bool)
    m[4:36, 8:52, 8:40] = True  # a box-shaped lung ...
    m[4:36, 26:34, 40:56] = True  # ... with a thin tongue into the 'mediastinum'
    f = lung_fraction(m)
    assert f[20, 30, 24] > 0.7 and f[20, 30, 52] < 0.4  # deep in the box vs. the tip of the tongue
    full, d = band_index(m, (0.0, 2.0, 4.0), 1, 1, fraction=3)
    assert set(np.unique(full[m])) <= set(range(9)) and (full[~m] == -1).all()
    tongue = m & (f < 1 / 3)
    rng = np.random.default_rng(2)

    def healthy():
        v = ndimage.gaussian_filter(rng.standard_normal(m.shape), 1.0).astype(np.float32)
        v[tongue] += 3.0  # normal anatomy the windows see at the tip
        return v

    space = {"sigma_vox": [0.0], "tau_z": [4.0], "v_min_cm3": [0.0]}
    val = [ScoredStudy(f"n{i}", 0, None, m.astype(np.uint8), SP, VoxelScore(healthy(), 8, size=8)) for i in range(4)]
    for i in range(4):
        v = healthy()
        v[18:23, 20:25, 18:23] -= 6.0
        val.append(ScoredStudy(f"a{i}", 1, "nodule", m.astype(np.uint8), SP, VoxelScore(v, 8, size=8)))
    kinds = {"depth": AnatomyMap(1, 1, "mad"), "fraction": AnatomyMap(1, 1, "mad", fraction=3)}
    normal_cm3 = {}
    for name, kind in kinds.items():
        op, _ = grid_search(kind, val, space)
        normal_cm3[name] = np.median([kind.decide(VoxelScore(healthy(), 8, size=8), m, SP, op)[0] for _ in range(3)])
        assert op.reference.get("fraction", 1) == kind.fraction
    assert normal_cm3["depth"] > 2.0 and normal_cm3["fraction"] < 0.1 * normal_cm3["depth"], normal_cm3


def test_band_index_is_kept_per_mask_content_and_callers_cannot_change_what_is_kept():
    from ct3dflow.detect import anatomy_map

    m = _lungs()
    fresh = anatomy_map._band_index(m, (0.0, 2.0, 4.0), 3, 3, 1)
    first = band_index(m, (0.0, 2.0, 4.0), 3, 3)
    first[0][:] = 7  # a caller scribbling on its copy
    again = band_index(m.copy().astype(np.uint8), (0.0, 2.0, 4.0), 3, 3)  # the same content, another array
    for a, b in zip(again, fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    other = m.copy()
    other[20:30, 20:30, 10:20] = False  # a hole: other depths
    np.testing.assert_array_equal(band_index(other, (0.0, 2.0, 4.0), 3, 3)[0],
                                  anatomy_map._band_index(other, (0.0, 2.0, 4.0), 3, 3, 1)[0])
    assert not np.array_equal(band_index(m, (0.0, 2.0, 6.0), 3, 3)[1], fresh[1])  # other bins, other bands


def test_the_band_cache_keeps_to_its_budget(monkeypatch):
    from ct3dflow.detect import anatomy_map

    m = _lungs()
    monkeypatch.setattr(anatomy_map, "BAND_CACHE_BYTES", 0)  # CT3DFLOW_BAND_CACHE_MB=0: nothing kept
    full, _ = band_index(m, (0.0, 2.0, 4.0, 8.0), 3, 3)
    assert full.max() == 4 * 9 - 1 and len(anatomy_map._BAND_CACHE) == 0
    one = m.sum() * (4 + 2)  # int32 anatomy band and int16 depth band per mask voxel
    monkeypatch.setattr(anatomy_map, "BAND_CACHE_BYTES", int(1.5 * one))
    anatomy_map.clear_band_cache()
    for bins in ((0.0, 2.0), (0.0, 3.0), (0.0, 4.0)):
        band_index(m, bins, 3, 3)
    assert list(anatomy_map._BAND_CACHE)[-1][2] == (0.0, 4.0) and len(anatomy_map._BAND_CACHE) == 1


def test_anterior_posterior_bands_keep_the_hilum_s_tail_away_from_the_back_of_the_lung():
    """The lung's bite (ct3dflow.detect.bite) is large at the hilum (medial, mid-way from front to back) in every
    healthy study, and a consolidation in the paravertebral gutter (medial, at the back) lies in the same bands:
    split in three from front to back, the gutter's healthy tail is its own."""
    from ct3dflow.detect.anatomy_map import anatomy_z, fit_anatomy_reference

    m = _lungs()
    bins = (0.0, 2.0, 4.0)
    plain, _ = band_index(m, bins, 3, 3)
    split, _ = band_index(m, bins, 3, 3, anterior_posterior=3)
    assert (split[m] // 3 == plain[m]).all() and (split[~m] == -1).all()  # each band in three, nothing else
    assert (split[:, 6][m[:, 6]] % 3 == 0).all() and (split[:, 49][m[:, 49]] % 3 == 2).all()  # front 0, back 2
    hilum = np.zeros(m.shape, bool)
    hilum[18:26, 24:32, 30:36] = True  # medial side of the right lung, mid-way from front to back
    gutter = np.zeros(m.shape, bool)
    gutter[18:26, 42:48, 30:36] = True  # the same medial band, at the back
    rng = np.random.default_rng(5)

    def healthy():
        v = np.abs(0.1 * rng.standard_normal(m.shape)).astype(np.float32)
        v[hilum] += 4.0
        return v

    maps = [healthy() for _ in range(4)]
    lesion = healthy()
    lesion[gutter] += 2.0
    z = {}
    for ap in (1, 3):
        ref = fit_anatomy_reference(maps, [m] * 4, bins, 3, 3, "tail", anterior_posterior=ap)
        assert ref["anterior_posterior"] == ap
        z[ap] = anatomy_z(ref, lesion, m)
    # z = 3.09 · v / (the band's healthy 99.9th percentile), v ≈ 2.08 in the gutter: against the hilum's 4.0 +
    # about 0.3, 1.5; against the gutter's own |0.1·N| (99.9th percentile 0.33), 19.5
    assert 1.0 < np.median(z[1][gutter]) < 2.0 and 15.0 < np.median(z[3][gutter]) < 25.0, (np.median(z[1][gutter]),
                                                                                             np.median(z[3][gutter]))
    old = fit_anatomy_reference(maps, [m] * 4, bins, 3, 3, "tail")
    del old["anterior_posterior"]  # a reference fitted before the split existed maps as it did
    np.testing.assert_array_equal(anatomy_z(old, lesion, m), z[1])


def _two_irregular_lungs(shape=(30, 40, 52), touch_edge=False, seed=0):
    """Two lumpy lungs (unions of balls) either side of a gap; one touches the scan's edge where asked."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    m = np.zeros(shape, bool)
    for x0, x1 in ((4, 22), (30, 48)):
        for _ in range(6):
            c = rng.integers([6, 8, x0 + 3], [24, 32, x1 - 3])
            m |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < rng.integers(16, 40)
    if touch_edge:
        m[:3, 10:20, 8:16] = True
    return m


@pytest.mark.parametrize("touch_edge", [False, True])
def test_bands_read_on_the_mask_box_are_those_of_the_whole_scan(touch_edge):
    """The bands are computed on the mask's bounding box (one voxel around it): the same as the whole scan's."""
    from ct3dflow.detect.anatomy_map import DEFAULT_DEPTH_BINS, clear_band_cache, lung_fraction

    m = _two_irregular_lungs(touch_edge=touch_edge)
    depth, lat, ver = anatomy_coordinates(m)  # on the whole scan
    d = np.digitize(depth, np.asarray(DEFAULT_DEPTH_BINS)[1:])
    fi = np.minimum((lung_fraction(m) * 3).astype(int), 2)
    want = ((d * 3 + np.minimum((lat * 3).astype(int), 2)) * 3 + np.minimum((ver * 3).astype(int), 2)) * 3 + fi
    clear_band_cache()
    full, depth_band = band_index(m, DEFAULT_DEPTH_BINS, 3, 3, fraction=3)
    assert np.array_equal(full, np.where(m, want, -1)) and np.array_equal(depth_band, np.where(m, d, -1))
    assert len(np.unique(depth_band[m])) >= 4  # the lungs are thick enough to reach the deep bands
