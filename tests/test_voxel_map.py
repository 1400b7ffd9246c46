"""The voxel map kind (ct3dflow.detect.voxel_map): window averaging of local log-likelihood terms, the
top-latent predictor on the fast encoder, the depth-banded healthy reference, the two-sided decision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ct3dflow.detect import OperatingPoint, get_kind
from ct3dflow.detect.grid import window_grid
from ct3dflow.detect.voxel_map import DepthReference, VoxelScore, depth_bands, smooth_in_mask, voxel_log_p_volume
from ct3dflow.flow import Glow3D
from ct3dflow.flow.local import local_log_prob, top_latent_energy

VOXEL = get_kind("voxel")

torch.set_num_threads(2)


def _glow() -> Glow3D:
    torch.manual_seed(0)
    g = Glow3D(levels=2, steps=1, width=8, patch_size=8)
    g.initialize(0.1 * torch.randn(4, 1, 8, 8, 8) - 0.3)
    return g.eval()


def _ball(shape, centre, r) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= r * r


def test_windows_are_averaged_and_uncovered_voxels_are_nan():
    g = _glow()
    rng = np.random.default_rng(0)
    vol = (0.05 * rng.standard_normal((16, 24, 24)) - 0.3).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[2:6, 2:6, 2:6] = True  # touches only the windows at the corner
    m = voxel_log_p_volume(g, window_grid(vol, mask, 8, 8), part="all")
    assert m.shape == vol.shape
    assert np.isfinite(m[:8, :8, :8]).all() and np.isnan(m[8:, 8:, 8:]).all()
    # stride == size: no overlap, so the first window's voxels hold exactly its own terms
    ref = local_log_prob(g, torch.from_numpy(vol[None, None, :8, :8, :8]), part="all")[0].numpy()
    assert np.allclose(m[:8, :8, :8], ref, rtol=1e-5, atol=1e-5)
    # with overlap (stride 4) a voxel is the mean of the windows that cover it
    m4 = voxel_log_p_volume(g, window_grid(vol, mask, 8, 4), part="all")
    w = [local_log_prob(g, torch.from_numpy(vol[None, None, a : a + 8, 0:8, 0:8]), part="all")[0].numpy()
         for a in (0, 4)]
    assert m4[5, 1, 1] == pytest.approx((w[0][5, 1, 1] + w[1][1, 1, 1]) / 2, rel=1e-5)


def test_top_latent_map_equals_the_local_decomposition_and_runs_on_the_fast_encoder():
    """The top-latent predictor reads glow.encode (the fast encoder where installed): per voxel it equals the
    reference decomposition's top_latent part, and the fast encoder (forced on the CPU) gives the same map."""
    from ct3dflow.models import prepare_flow_encoder

    g = _glow()
    rng = np.random.default_rng(3)
    vol = (0.05 * rng.standard_normal((12, 16, 20)) - 0.3).astype(np.float32)
    mask = np.ones(vol.shape, bool)
    x = torch.from_numpy(vol[None, None, :8, :8, :8])
    cells = top_latent_energy(g, x)
    ref = local_log_prob(g, x, part="top_latent")
    assert cells.shape == (1, 2, 2, 2) and torch.allclose(cells.repeat_interleave(4, 1).repeat_interleave(4, 2)
                                                          .repeat_interleave(4, 3) / 64, ref, rtol=1e-5, atol=1e-6)
    grid = window_grid(vol, mask, 8, 4)
    reference = voxel_log_p_volume(g, grid, part="top_latent")
    fast = prepare_flow_encoder(_glow(), "cpu", force=True)
    assert fast.fast is not None
    m = voxel_log_p_volume(fast, grid, part="top_latent", batch_size=5)
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0
    np.testing.assert_allclose(m, reference, rtol=2e-5, atol=2e-6)


def test_bf16_precision_only_rounds_the_map_and_auto_follows_the_hardware():
    """scoring.precision: bf16 runs the coupling networks under bf16 autocast: the map moves by rounding, not
    more (the detection experiment chose the same operating point with it); auto is bf16 where it is native."""
    from ct3dflow.detect.voxel_map import DEFAULT_PRECISION, use_bf16
    from ct3dflow.flow.dtypes import bf16_available

    assert not use_bf16("fp32") and use_bf16("bf16") and use_bf16("auto") == bf16_available("cpu")
    with pytest.raises(ValueError, match="scoring.precision"):
        use_bf16("fp16")
    assert VOXEL.settings({}, 8)["precision"] == DEFAULT_PRECISION == "auto"
    g = _glow()
    with torch.no_grad():  # a freshly initialised coupling ends in zeros (an identity); give it weights, as trained
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rng = np.random.default_rng(4)
    vol = (0.05 * rng.standard_normal((12, 16, 20)) - 0.3).astype(np.float32)
    grid = window_grid(vol, np.ones(vol.shape, bool), 8, 4)
    fp32 = voxel_log_p_volume(g, grid, part="top_latent")
    bf16 = voxel_log_p_volume(g, grid, part="top_latent", bf16=True)
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] > 0.99


def test_depth_reference_standardises_healthy_maps_per_band():
    rng = np.random.default_rng(1)
    shape = (40, 40, 40)
    mask = _ball(shape, (20, 20, 20), 16)
    band = depth_bands(mask)
    assert band[0, 0, 0] == -1 and band[20, 20, 20] == 5 and band[20, 20, 4] == 0

    def healthy():  # the healthy level falls towards the border, the spread grows
        return np.where(mask, 2.0 * band + (1.0 + 0.5 * (5 - band)) * rng.standard_normal(shape), np.nan)

    ref = DepthReference.fit([healthy() for _ in range(3)], [mask] * 3)
    z = ref.z(healthy(), mask)
    for b in range(6):
        zb = z[band == b]
        assert abs(np.median(zb)) < 0.15 and 0.85 < 1.4826 * np.median(np.abs(zb)) < 1.15, b
    assert np.isnan(z[~mask]).all()
    assert DepthReference.from_dict(ref.to_dict()) == ref


def test_two_sided_decision_counts_both_tails_and_drops_small_components():
    """A voxel map whose z against a flat reference is −6 in one ball, +6 in another and 9 in one stray voxel:
    |z| > τ counts both balls (ground glass can be *more* likely than lung), v_min drops the stray voxel."""
    shape = (30, 30, 30)
    mask = np.ones(shape, bool)
    vmap = np.zeros(shape, np.float32)
    vmap[_ball(shape, (8, 8, 8), 4)] = -6.0
    vmap[_ball(shape, (20, 20, 20), 4)] = +6.0
    vmap[2, 25, 2] = 9.0
    reference = {"bins": [0.0], "median": [0.0], "scale": [1.0]}  # one band: z = the map itself
    spacing = (2.0, 2.0, 2.0)
    n_ball = int(_ball(shape, (8, 8, 8), 4).sum())

    def decide(tau, vmin):
        op = OperatingPoint("voxel", {"sigma_vox": 0.0, "tau_z": tau, "v_min_cm3": vmin}, 1.0, reference)
        return VOXEL.decide(VoxelScore(vmap, 8), mask, spacing, op)

    vol, ab, atyp = decide(4.0, 0.0)
    assert ab.sum() == 2 * n_ball + 1 and vol == pytest.approx(ab.sum() * 0.008) and atyp.max() <= 0
    assert decide(4.0, 0.05)[1].sum() == 2 * n_ball
    assert decide(7.0, 0.0)[0] == pytest.approx(0.008)


def test_smoothing_stays_inside_the_mask():
    shape = (20, 20, 20)
    mask = np.zeros(shape, bool)
    mask[5:15, 5:15, 5:15] = True
    v = np.where(mask, 1.0, 100.0).astype(np.float32)  # huge values outside must not leak in
    s = smooth_in_mask(v, mask, 2.0)
    assert np.allclose(s[mask], 1.0, atol=1e-4) and np.isnan(s[~mask]).all()


def test_gaussian_merge_weights_windows_by_their_centre_and_travels_with_the_score(tmp_path):
    """``scoring.merge: gaussian``: where windows do not overlap it is the mean; where they do, a voxel is the
    mean of the windows' terms weighted by a Gaussian (σ = size/8) around each window's centre. The setting
    is recorded in the score (so the operating point's scoring carries it) and a bad name fails at once."""
    from ct3dflow.detect.voxel_map import window_weight

    g = _glow()
    with torch.no_grad():  # a fresh flow is local (identity couplings): give its windows context
        for name, prm in g.named_parameters():
            if "coupling" in name:
                prm.add_(0.2 * torch.randn_like(prm))
    rng = np.random.default_rng(5)
    vol = (0.05 * rng.standard_normal((16, 8, 8)) - 0.3).astype(np.float32)
    mask = np.ones(vol.shape, bool)
    grid8 = window_grid(vol, mask, 8, 8)
    assert np.allclose(voxel_log_p_volume(g, grid8, part="all", merge="gaussian"),
                       voxel_log_p_volume(g, grid8, part="all"), rtol=1e-5, atol=1e-6)
    m = voxel_log_p_volume(g, window_grid(vol, mask, 8, 4), part="all", merge="gaussian")
    w = [local_log_prob(g, torch.from_numpy(vol[None, None, a : a + 8]), part="all")[0].numpy() for a in (0, 4)]
    wt = window_weight(8, "gaussian").numpy()
    assert wt[3, 3, 3] == pytest.approx(wt[4, 4, 4]) and wt[0, 3, 3] < 0.2 * wt[3, 3, 3]
    # voxel z = 5 lies at offset 5 of the window at 0 and at offset 1 of the window at 4
    want = (wt[5, 2, 6] * w[0][5, 2, 6] + wt[1, 2, 6] * w[1][1, 2, 6]) / (wt[5, 2, 6] + wt[1, 2, 6])
    assert m[5, 2, 6] == pytest.approx(want, rel=1e-5)
    assert abs(m[5, 2, 6] - (w[0][5, 2, 6] + w[1][1, 2, 6]) / 2) > 1e-4  # and it is not the plain mean

    class Study:
        volume, permissive = vol, mask

    settings = VOXEL.settings({"stride": 4, "merge": "gaussian", "precision": "fp32"}, 8)
    score = VOXEL.score(g, Study, settings)
    assert VOXEL.score_settings(score)["merge"] == "gaussian"
    assert VOXEL.load_score(score.save(tmp_path / "v.npz")).merge == "gaussian"
    assert "merge" not in VOXEL.score_settings(VOXEL.score(g, Study, VOXEL.settings({"stride": 4}, 8)))
    with pytest.raises(ValueError, match="scoring.merge must be one of"):
        VOXEL.settings({"merge": "median"}, 8)


def test_interleaved_phases_add_the_diagonally_shifted_grid_and_travel_with_the_score(tmp_path):
    """``scoring.phases: 2``: the windows of one grid plus the same grid shifted by stride/2 on every axis at
    once (clipped to the volume), so twice the windows, each voxel's value the mean over both grids' windows;
    the setting is recorded in the score and its operating point's scoring."""
    rng = np.random.default_rng(3)
    vol = (0.05 * rng.standard_normal((24, 24, 24)) - 0.3).astype(np.float32)
    mask = np.ones(vol.shape, bool)
    one, two = window_grid(vol, mask, 8, 8), window_grid(vol, mask, 8, 8, phases=2)
    c1, c2 = {tuple(c) for c in one.corners.tolist()}, {tuple(c) for c in two.corners.tolist()}
    shifted = {tuple(min(v + 4, 16) for v in c) for c in c1}
    # per axis 0, 8, 16 and 4, 12, 16 (20 clips onto 16): only (16, 16, 16) is in both grids
    assert c2 == c1 | shifted and len(c1) == 27 and len(two) == 27 + 26
    g = _glow()
    m = voxel_log_p_volume(g, two, part="all")
    w = {a: local_log_prob(g, torch.from_numpy(vol[None, None, a : a + 8, a : a + 8, a : a + 8]),
                           part="all")[0].numpy() for a in (0, 4)}
    # voxel (5, 5, 5): the window at the origin (offset 5) and the shifted one at (4, 4, 4) (offset 1)
    assert m[5, 5, 5] == pytest.approx((w[0][5, 5, 5] + w[4][1, 1, 1]) / 2, rel=1e-5)

    class Study:
        volume, permissive = vol, mask

    score = VOXEL.score(g, Study, VOXEL.settings({"stride": 8, "phases": 2, "precision": "fp32"}, 8))
    assert score.n_windows == len(two) and VOXEL.score_settings(score)["phases"] == 2
    assert VOXEL.load_score(score.save(tmp_path / "v.npz")).phases == 2
    assert "phases" not in VOXEL.score_settings(VOXEL.score(g, Study, VOXEL.settings({"stride": 8}, 8)))


def test_an_operating_point_without_phases_or_merge_keeps_the_scoring_it_was_chosen_with():
    """A point written before ``phases``/``merge`` were recorded was chosen on one mean-merged grid: the
    job's scoring section (or a later default) must not re-map its studies another way; a point that
    records them keeps them."""
    from ct3dflow.detect.row import resolve_settings

    def point(scoring):
        return OperatingPoint("voxel", {"sigma_vox": 1.0, "tau_z": 4.0, "v_min_cm3": 0.0}, 1.0, {}, scoring)

    job = {"stride": 12, "phases": 2, "merge": "gaussian"}
    old = resolve_settings(VOXEL, job, 24, point({"stride": 12, "patch_size": 24, "part": "top_latent"}))
    assert (old["phases"], old["merge"]) == (1, "mean")
    new = resolve_settings(VOXEL, {"stride": 6}, 24, point({"stride": 12, "patch_size": 24, "phases": 2}))
    assert (new["stride"], new["phases"], new["merge"]) == (12, 2, "mean")
    assert resolve_settings(VOXEL, job, 24)["phases"] == 2  # no point: the job's scoring


def test_cpu_scorers_run_channels_last_and_give_the_contiguous_maps():
    """On the CPU both scorers (the voxel map's encoder, the patch map's log_prob) run the reference layers with
    channels-last convolution weights, oneDNN's fast layout (docs/BENCHMARKS.md): the same map and the same
    log-likelihoods as the contiguous layout, up to float32 summation order."""
    import copy

    from ct3dflow.models import prepare_flow_encoder, prepare_for_scoring

    g = _glow()
    with torch.no_grad():  # trained-like weights: a fresh coupling ends in zeros
        gen = torch.Generator().manual_seed(5)
        for p in g.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    rng = np.random.default_rng(6)
    vol = (0.05 * rng.standard_normal((12, 16, 20)) - 0.3).astype(np.float32)
    grid = window_grid(vol, np.ones(vol.shape, bool), 8, 4)
    reference = voxel_log_p_volume(g, grid, part="top_latent")
    x = torch.from_numpy(vol[None, None, :8, :8, :8]).repeat(3, 1, 1, 1, 1)
    with torch.no_grad():
        log_p = g.log_prob(x)

    def convs_channels_last(model):
        w = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
        return bool(w) and all(t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
                               for t in w if t.shape[2] > 1)

    assert not convs_channels_last(g)
    enc = prepare_flow_encoder(copy.deepcopy(g), "cpu")
    assert enc.fast is None and convs_channels_last(enc)
    np.testing.assert_allclose(voxel_log_p_volume(enc, grid, part="top_latent"), reference, rtol=1e-5, atol=1e-6)
    scorer = prepare_for_scoring(copy.deepcopy(g), "cpu")
    assert convs_channels_last(scorer)
    with torch.no_grad():
        torch.testing.assert_close(scorer.log_prob(x), log_p, rtol=1e-6, atol=1e-3)


def test_v_min_0_keeps_every_component_without_labelling_and_agrees_with_the_labelled_path():
    """v_min 0 skips the component labelling; a v_min below one voxel labels and keeps every component, so the
    two must give the same region and volume, voxel for voxel."""
    from ct3dflow.detect.decision import abnormal_region

    rng = np.random.default_rng(7)
    mask = _ball((24, 24, 24), (12, 12, 12), 11)
    atyp = np.where(mask, -np.abs(rng.standard_normal(mask.shape)) * 2, np.nan).astype(np.float32)
    vol0, ab0 = abnormal_region(atyp, mask, -2.5, 0.0, (2.0, 2.0, 2.0))
    vol1, ab1 = abnormal_region(atyp, mask, -2.5, 1e-9, (2.0, 2.0, 2.0))
    assert ab0.sum() > 20 and vol0 == pytest.approx(vol1) and np.array_equal(ab0, ab1)
    assert abnormal_region(atyp, mask, -2.5, 0.05, (2.0, 2.0, 2.0))[0] < vol0  # single voxels go


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_smoothing_on_the_mask_box_is_the_whole_scan_s(sigma):
    """smooth_in_mask works on the mask's box and the kernel's reach: the normalised convolution of the whole scan."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = np.zeros((30, 34, 40), bool)
    mask[8:20, 10:25, 12:30] = True
    mask[0:4, 12:16, 14:18] = True  # touches the scan's edge, where the filter reflects
    v = rng.normal(size=mask.shape).astype(np.float32)
    num = ndimage.gaussian_filter(np.where(mask, v, 0.0).astype(np.float32), sigma)
    den = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    want = np.where(mask, num / np.maximum(den, 1e-6), np.nan)
    got = smooth_in_mask(v, mask, sigma)
    assert np.allclose(got[mask], want[mask], rtol=1e-6, atol=1e-7) and np.isnan(got[~mask]).all()
    assert np.array_equal(depth_bands(mask), np.where(mask, np.digitize(ndimage.distance_transform_edt(mask),
                                                                         [2.0, 4.0, 6.0, 9.0, 13.0]), -1))
