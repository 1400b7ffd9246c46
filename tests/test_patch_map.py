import numpy as np
import pytest
import torch

from ct3dflow.detect import OperatingPoint, get_kind
from ct3dflow.detect.decision import abnormal_region
from ct3dflow.detect.grid import window_grid
from ct3dflow.detect.outputs import preview_size, write_map_nifti, write_preview_png
from ct3dflow.detect.patch_map import PatchScores, healthy_reference, log_p_map, patch_log_likelihoods
from ct3dflow.errors import CTInputError
from ct3dflow.patches import inference_grid

PATCH = get_kind("patch")


def patch_op(sigma=3.0, tau_z=-1.0, v_min=0.0, t=0.5, mean=0.0, std=1.0) -> OperatingPoint:
    return OperatingPoint("patch", {"sigma_vox": sigma, "tau_z": tau_z, "v_min_cm3": v_min}, t,
                          {"mean": mean, "std": std})


def scores(model, vol, perm, size, stride, batch_size=16):
    return patch_log_likelihoods(model, window_grid(vol, perm, size, stride), batch_size)


class ToyModel(torch.nn.Module):
    """log_prob = −Σ (x − c)²: the 'healthy' patch is constant c."""

    def __init__(self, c=-0.3):
        super().__init__()
        self.c = c
        self.calls = 0
        self.modes = set()

    def log_prob(self, x):
        assert x.dtype == torch.float32 and x.ndim == 5 and x.shape[1] == 1
        self.calls += x.shape[0]
        self.modes.add(self.training)
        return -((x - self.c) ** 2).flatten(1).sum(1)


def _grid_centres(shape, size, stride):
    g = inference_grid(shape, size, stride)
    return g + (size - 1) / 2.0


# ------------------------------------------------------------------------------------------ log_p_map
def test_log_p_map_constant_in_constant_out():
    shape = (30, 34, 38)
    c = _grid_centres(shape, 12, 10)
    for sigma in (0.0, 1.5, 6.0):
        m = log_p_map(shape, c, np.full(len(c), -7.25), sigma)
        assert m.dtype == np.float32 and m.shape == shape
        np.testing.assert_allclose(m, -7.25, rtol=1e-6)


def test_log_p_map_small_sigma_gives_patch_value_at_centre_and_is_convex():
    shape = (30, 34, 38)
    rng = np.random.default_rng(0)
    c = np.round(_grid_centres(shape, 12, 10))  # integer centres
    lp = rng.normal(-100, 20, len(c))
    m = log_p_map(shape, c, lp, 0.3)
    ci = c.astype(int)
    np.testing.assert_allclose(m[ci[:, 0], ci[:, 1], ci[:, 2]], lp, rtol=1e-5)
    # half-integer centres (corner + 5.5) are splatted; small σ still returns the patch value there
    c2 = _grid_centres(shape, 12, 10)
    m2 = log_p_map(shape, c2, lp, 0.2)  # windows 2 voxels apart: σ must be small
    f = np.floor(c2).astype(int)
    np.testing.assert_allclose(m2[f[:, 0], f[:, 1], f[:, 2]], lp, rtol=1e-4)
    for sigma in (0.3, 2.0, 8.0):
        mm = log_p_map(shape, c2, lp, sigma)
        assert np.isfinite(mm).all()
        assert mm.min() >= lp.min() - 1e-3 and mm.max() <= lp.max() + 1e-3


def test_low_patch_region_grows_with_sigma():
    shape = (60, 60, 60)
    c = _grid_centres(shape, 20, 10)
    lp = np.zeros(len(c))
    mid = np.argmin(np.abs(c - 29.5).sum(1))
    lp[mid] = -100.0
    sizes = []
    for sigma in (2.0, 4.0, 6.0):
        m = log_p_map(shape, c, lp, sigma)
        assert m.min() < -25
        sizes.append(int((m < -10).sum()))
    assert sizes[0] < sizes[1] < sizes[2]


def test_log_p_map_mask_and_far_voxels():
    shape = (40, 40, 40)
    c = np.array([[5.0, 5.0, 5.0], [34.0, 34.0, 34.0]])
    mask = np.zeros(shape, np.uint8)
    mask[:, :, :20] = 1
    m = log_p_map(shape, c, np.array([-1.0, -9.0]), 1.0, mask=mask)
    assert np.isnan(m[:, :, 20:]).all()
    assert np.isfinite(m[:, :, :20]).all()
    # far from both centres (beyond 4σ) the nearest patch's value is used
    assert m[0, 0, 0] == pytest.approx(-1.0)
    assert m[39, 39, 0] == pytest.approx(-9.0)  # nearer to (34, 34, 34)
    m2 = log_p_map(shape, c, np.array([-1.0, -np.inf]), 1.0)
    assert np.isfinite(m2).all() and m2.min() == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------ abnormal volume
def test_abnormal_region_known_cube_and_vmin():
    shape = (40, 40, 40)
    lpm = np.zeros(shape, np.float32)
    lpm[5:15, 5:15, 5:15] = -10  # 1000 voxels × 8 mm³ = 8 cm³
    lpm[30:32, 30:32, 30:32] = -10  # 8 voxels = 0.064 cm³
    mask = np.ones(shape, np.uint8)
    vol, ab = abnormal_region(lpm, mask, -5.0, 0.0, (2.0, 2.0, 2.0))
    assert vol == pytest.approx(8.064)
    vol, ab = abnormal_region(lpm, mask, -5.0, 1.0, (2.0, 2.0, 2.0))
    assert vol == pytest.approx(8.0) and ab.sum() == 1000 and ab.dtype == bool
    # outside the mask nothing counts; NaN never counts
    mask[:, :, :10] = 0
    lpm2 = lpm.copy()
    lpm2[mask == 0] = np.nan
    vol, _ = abnormal_region(lpm2, mask, -5.0, 0.0, (2.0, 2.0, 2.0))
    assert vol == pytest.approx((500 + 8) * 0.008)
    # diagonal neighbours join under 26-connectivity
    d = np.zeros((5, 5, 5), np.float32)
    d[1, 1, 1] = d[2, 2, 2] = -1
    vol, ab = abnormal_region(d, np.ones_like(d), -0.5, 2.0, (1, 1, 1000.0))
    assert vol == pytest.approx(2.0)


def test_level_and_reference():
    op = patch_op(sigma=4, tau_z=-2, v_min=0.5, t=3, mean=-10, std=2)
    assert PATCH.level(op.params, op.reference) == -14
    assert OperatingPoint.from_dict(op.to_dict()) == op
    ref = healthy_reference([np.array([1.0, 3.0]), PatchScores(np.zeros((1, 3)), np.zeros((1, 3)), np.array([2.0]))])
    assert ref["mean"] == pytest.approx(2.0) and ref["std"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- patch scoring
def _study():
    shape = (40, 44, 36)
    vol = np.full(shape, -0.3, dtype=np.float32)
    perm = np.zeros(shape, np.uint8)
    perm[4:36, 4:40, 2:20] = 1  # only the x < 20 half
    vol[22:28, 30:36, 8:14] = 0.4  # bright blob, inside the mask
    return vol, perm


def test_patch_log_likelihoods_detects_blob_and_respects_mask(tmp_path):
    vol, perm = _study()
    model = ToyModel(-0.3)
    size, stride = 16, 10
    model.train()
    ps = scores(model, vol, perm, size, stride, batch_size=7)
    assert model.calls == len(ps) and model.modes == {False} and model.training  # mode restored
    grid = inference_grid(vol.shape, size, stride)
    touching = [c for c in grid if perm[c[0]:c[0] + size, c[1]:c[1] + size, c[2]:c[2] + size].any()]
    assert len(ps) == len(touching) < len(grid)
    np.testing.assert_allclose(ps.centres, ps.corners + 7.5)
    blob_win = np.array([
        ((c[0] <= 22) & (c[0] + size >= 28) & (c[1] <= 30) & (c[1] + size >= 36) & (c[2] <= 8)
         & (c[2] + size >= 14)) for c in ps.corners
    ])
    assert blob_win.any()
    assert ps.log_p[blob_win].max() < ps.log_p[~blob_win].max()
    assert ps.corners[np.argmin(ps.log_p)] in ps.corners[blob_win]
    assert np.argmin(ps.log_p) in np.flatnonzero(ps.log_p < -1)
    assert np.all(ps.log_p[ps.log_p > -1e-6] == 0)  # windows without any blob voxel are perfect
    # round-trip
    p = ps.save(tmp_path / "s" / "scores.npz")
    back = PatchScores.load(p)
    np.testing.assert_array_equal(back.corners, ps.corners)
    np.testing.assert_array_equal(back.centres, ps.centres)
    np.testing.assert_array_equal(back.log_p, ps.log_p)
    assert (back.size, back.stride, back.shape) == (16, 10, vol.shape)
    # the decision from stored scores localises the blob
    v, ab, m = PATCH.decide(back, perm, (2.0, 2.0, 2.0), patch_op())
    assert v > 0 and ab.any() and np.isnan(m[perm == 0]).all()
    zc, yc, xc = np.argwhere(ab).mean(0)
    assert 14 < zc < 36 and 20 < yc < 44


def test_padding_small_volume_and_empty_mask():
    vol = np.full((20, 50, 50), -0.3, dtype=np.float32)
    perm = np.zeros_like(vol, dtype=np.uint8)
    perm[5:15, 10:40, 10:40] = 1
    ps = scores(ToyModel(-0.3), vol, perm, 24, 20)
    assert ps.corners[:, 0].min() == -2  # padded by 4 → 2 before, corners in original coordinates
    np.testing.assert_allclose(ps.centres[:, 0], 9.5)
    with pytest.raises(CTInputError, match="mask"):
        scores(ToyModel(), vol, np.zeros_like(perm), 24, 20)


def test_score_decide_and_outputs(tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    from ct3dflow.detect.decision import is_abnormal

    vol, perm = _study()
    op = patch_op()
    ps = scores(ToyModel(-0.3), vol, perm, 16, 10, batch_size=8)
    vol_cm3, abnormal, lpm = PATCH.decide(ps, perm, (2.0, 2.0, 2.0), op)
    assert is_abnormal(vol_cm3, op.threshold_cm3) and vol_cm3 > 0.5 and not is_abnormal(0.5, 0.5)
    summary = PATCH.summary(ps)
    assert summary["n_patches"] == len(ps) and summary["log_p_min"] < summary["log_p_mean"] <= 0
    ref = sitk.Image([vol.shape[2], vol.shape[1], vol.shape[0]], sitk.sitkUInt8)
    ref.SetSpacing((2.0, 2.0, 2.0))
    ref.SetOrigin((-10.0, 5.0, 100.0))
    p = write_map_nifti(lpm, ref, tmp_path / "map.nii.gz")
    img = sitk.ReadImage(str(p))
    assert img.GetSize() == ref.GetSize() and img.GetSpacing() == (2.0, 2.0, 2.0)
    assert img.GetOrigin() == (-10.0, 5.0, 100.0) and img.GetPixelID() == sitk.sitkFloat32
    inside = perm > 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img)[inside], lpm[inside])
    p3 = write_map_nifti(lpm, ref, tmp_path / "map3.nii.gz", fill_value=-1e6)
    assert np.all(sitk.GetArrayFromImage(sitk.ReadImage(str(p3)))[~inside] == -1e6)
    p2 = write_map_nifti(lpm, ((2, 2, 2), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                               tmp_path / "map2.nii.gz")
    assert sitk.ReadImage(str(p2)).GetSize() == ref.GetSize()
    with pytest.raises(ValueError):
        write_map_nifti(lpm[:-1], ref, tmp_path / "bad.nii.gz")
    png = write_preview_png(vol, lpm, abnormal, tmp_path / "prev.png", title="toy",
                            level=PATCH.level(op.params, op.reference))
    im = Image.open(png)
    assert im.size == preview_size(vol.shape) and im.mode == "RGB"
    a = np.asarray(im)
    assert a.std() > 1 and (a[..., 0].astype(int) - a[..., 1]).max() > 50  # some red overlay
    # no abnormal region, no tau: still a picture
    png2 = write_preview_png(vol, lpm, np.zeros_like(perm), tmp_path / "prev2.png")
    assert Image.open(png2).size == preview_size(vol.shape)


def test_bf16_precision_only_rounds_the_patch_log_likelihoods():
    """scoring.precision applies to the patch map too: bf16 autocast moves an autoencoder's window scores by
    rounding only, the default is auto, and a wrong value is refused with the setting's name."""
    from ct3dflow.baselines import ConvAE3D

    assert PATCH.settings({}, 8)["precision"] == "auto"
    assert PATCH.settings({"precision": "fp32"}, 8)["precision"] == "fp32"
    torch.manual_seed(0)
    ae = ConvAE3D(depth=2, width=8, patch_size=8).eval()
    rng = np.random.default_rng(3)
    vol = (0.05 * rng.standard_normal((12, 16, 20)) - 0.3).astype(np.float32)
    grid = window_grid(vol, np.ones(vol.shape, bool), 8, 4)
    fp32 = patch_log_likelihoods(ae, grid).log_p
    bf16 = patch_log_likelihoods(ae, grid, bf16=True).log_p
    assert not np.array_equal(bf16, fp32)  # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)
    assert np.corrcoef(bf16, fp32)[0, 1] > 0.99
    study = type("S", (), {"volume": vol, "permissive": np.ones(vol.shape, np.uint8)})()
    with pytest.raises(ValueError, match="scoring.precision"):
        PATCH.score(ae, study, PATCH.settings({"precision": "fp16"}, 8))
