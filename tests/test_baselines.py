"""The autoencoder baseline: the flow's surface, save/load, training through FlowTrainer, blob detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ct3dflow.baselines import ConvAE3D
from ct3dflow.models import load_patch_scorer
from ct3dflow.train import FlowTrainer, TrainConfig

S = 16


def healthy_patches(n: int, seed: int) -> torch.Tensor:
    """Smooth lung-like texture around −860 HU (normalised ≈ −0.37) with a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, S // 4, S // 4, S // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(S, S, S), mode="trilinear", align_corners=False)
    return (-0.37 + 0.02 * x + 0.003 * torch.randn(n, 1, S, S, S, generator=g)).float()


def test_shapes_surface_and_proxy_formula():
    m = ConvAE3D(depth=2, width=8, patch_size=S)
    x = healthy_patches(3, 0)
    assert m.reconstruct(x).shape == x.shape
    lp = m(x)
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    torch.testing.assert_close(lp, m.log_prob(x))
    s2 = (8.0 / 1220) ** 2
    expected = -m.squared_error(x) / (2 * s2) - 0.5 * S**3 * math.log(2 * math.pi * s2)
    torch.testing.assert_close(lp, expected)
    assert m.dim == S**3 and m.bits_per_dim(x).shape == (3,)
    assert m.initialize(x) is False and m.is_initialized()
    assert m.config()["patch_size"] == S and m.num_parameters() > 0
    with pytest.raises(ValueError, match="divisible"):
        ConvAE3D(depth=3, width=8, patch_size=20)


def test_save_load_gives_identical_log_prob(tmp_path):
    torch.manual_seed(0)
    m = ConvAE3D(depth=2, width=8, patch_size=S, noise_hu=5.0).eval()
    x = healthy_patches(2, 1)
    m.save(tmp_path / "ae.pt")
    payload = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert payload["format"].startswith("ct3dflow-ae")
    for back in (ConvAE3D.load(tmp_path / "ae.pt", map_location="cpu"), load_patch_scorer(tmp_path / "ae.pt")):
        assert isinstance(back, ConvAE3D) and back.config() == m.config()
        with torch.no_grad():
            torch.testing.assert_close(back.eval().log_prob(x), m.log_prob(x), rtol=0, atol=0)


def test_train_config_builds_the_ae_and_rejects_unknown_models():
    cfg = TrainConfig(model="ae", levels=2, width=8, patch_size=S)
    m = cfg.build_model()
    assert isinstance(m, ConvAE3D) and (m.depth, m.width, m.patch_size) == (2, 8, S)
    assert TrainConfig.from_dict(cfg.to_dict()).model == "ae"
    with pytest.raises(ValueError, match="unknown train.model"):
        TrainConfig(model="vae").build_model()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    cfg = TrainConfig(model="ae", levels=2, width=8, patch_size=S, batch_size=8, lr=3e-3, warmup_steps=5,
                      iterations=60)
    model = cfg.build_model()
    trainer = FlowTrainer(model, cfg, "cpu")
    val = healthy_patches(16, 99)
    with torch.no_grad():
        before = float(model.squared_error(val).mean())
    assert trainer.initialise(healthy_patches(8, 0)) is False
    losses = [trainer.train_step(healthy_patches(cfg.batch_size, 100 + i))["loss"] for i in range(cfg.iterations)]
    model.eval()
    return model, val, before, losses, trainer


def test_training_with_the_flow_trainer_lowers_reconstruction_error(trained):
    model, val, before, losses, trainer = trained
    with torch.no_grad():
        after = float(model.squared_error(val).mean())
    assert trainer.skipped_steps == 0 and trainer.step == 60
    assert after < 0.2 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert trainer.validate(val) == pytest.approx(float(model.bits_per_dim(val).mean()), rel=1e-5)


def test_log_prob_lower_for_inserted_bright_blob(trained):
    model = trained[0]
    x = healthy_patches(8, 7)
    blob = x.clone()
    blob[:, :, 6:10, 6:10, 6:10] = 0.4  # solid nodule-like (≈ 50 HU) 4³ cube in the middle
    with torch.no_grad():
        assert (model.log_prob(blob) < model.log_prob(x)).all()
