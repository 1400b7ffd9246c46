"""The bright-blob response (ct3dflow.detect.blobs) against its closed form on a Gaussian ball, and what it leaves
at 0: tubes (vessels), planes (the pleura) and dark blobs; the "tail" calibration it is measured with."""

from __future__ import annotations

import numpy as np
import pytest

from ct3dflow.detect.anatomy_map import TAIL_PERCENTILE, TAIL_Z, anatomy_z, fit_anatomy_reference
from ct3dflow.detect.blobs import bright_blobness

N, C = 41, 20  # a cube of 41³ voxels, centred at 20


def _grid():
    z, y, x = np.mgrid[:N, :N, :N].astype(np.float64) - C
    return z, y, x


def _ball(s, amp=1.0):
    z, y, x = _grid()
    return (amp * np.exp(-(x * x + y * y + z * z) / (2 * s * s))).astype(np.float32)


def _closed_form(s, sigma, amp=1.0):
    """σ²·|λ| at the centre of amp·exp(−r²/2s²) smoothed by a Gaussian of σ: the three eigenvalues are equal,
    −amp·s³/(s²+σ²)^{5/2}."""
    return sigma**2 * amp * s**3 / (s * s + sigma * sigma) ** 2.5


def test_the_response_at_a_gaussian_ball_s_centre_matches_the_closed_form():
    region = np.ones((N, N, N), bool)
    for s in (1.5, 2.0, 3.0):
        for sigma in (1.5, 2.5, 3.5):
            got = bright_blobness(_ball(s), region, (sigma,))[C, C, C]
            np.testing.assert_allclose(got, _closed_form(s, sigma), rtol=0.03, err_msg=f"s {s}, σ {sigma}")
        # over several scales, the largest: σ = s answers best of these (σ²s³/(s²+σ²)^2.5 peaks at σ = s·√(2/3))
        many = bright_blobness(_ball(s), region, (1.5, 2.5, 3.5))[C, C, C]
        np.testing.assert_allclose(many, max(_closed_form(s, g) for g in (1.5, 2.5, 3.5)), rtol=0.03)


def test_tubes_planes_and_dark_blobs_give_nothing_a_ball_does():
    z, y, x = _grid()
    s = 2.0
    tube = np.exp(-(y * y + z * z) / (2 * s * s)).astype(np.float32)  # a vessel along x
    plane = np.exp(-(z * z) / (2 * s * s)).astype(np.float32)  # a sheet, as the pleura or a fissure
    region = np.zeros((N, N, N), bool)
    region[10:31, 10:31, 10:31] = True
    ball = bright_blobness(_ball(s), region)
    assert np.isnan(ball[~region]).all() and np.isfinite(ball[region]).all()
    top = float(np.nanmax(ball))
    assert top == pytest.approx(float(ball[C, C, C])) and top > 0.1
    for name, img in (("tube", tube), ("plane", plane), ("dark ball", -_ball(s))):
        r = bright_blobness(img, region)
        assert np.nanmax(r) < 0.02 * top, name  # 0 up to the Hessian's rounding along the flat directions
    assert np.isnan(bright_blobness(_ball(s), np.zeros_like(region))).all()  # no region, nothing read


def test_the_tail_calibration_measures_a_channel_in_its_healthy_99_9th_percentile():
    """z = 3.09 · v / (healthy 99.9th percentile of the band): a channel that is 0 in most healthy lung (its MAD
    is 0) gets a scale from its tail."""
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    healthy = [np.where(rng.random(mask.shape) < 0.05, rng.exponential(0.01, mask.shape), 0.0).astype(np.float32)
               for _ in range(3)]
    ref = fit_anatomy_reference(healthy, [mask] * 3, bins=(0.0,), lateral=1, vertical=1, calibration="tail")
    top = np.percentile(np.concatenate([h[mask] for h in healthy]), TAIL_PERCENTILE)
    assert ref["bands"][0]["median"] == 0.0
    np.testing.assert_allclose(ref["bands"][0]["scale"], top / TAIL_Z, rtol=1e-6)
    probe = np.full(mask.shape, 2 * top, np.float32)
    z = anatomy_z(ref, probe, mask)
    np.testing.assert_allclose(z[mask], 2 * TAIL_Z, rtol=1e-5)
    assert np.isnan(z[~mask]).all()
