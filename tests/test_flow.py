"""3D GLOW: per-layer invertibility and log-determinants against brute-force Jacobians, the whole model's
change-of-variables identity, save/load, and the paper-sized model."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

from ct3dflow.flow import (
    DEFAULT_WIDTH,
    ActNorm3d,
    AffineCoupling3d,
    FlowStep3d,
    Glow3D,
    InvConv3dLU,
    LearnedPrior3d,
    Split3d,
    Squeeze3d,
)

torch.set_num_threads(2)


def _perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Move every parameter away from its (often zero / identity) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _brute_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of a single-sample map, by jacrev over the flattened input."""

    def flat(v):
        return fn(v.reshape(x.shape)).reshape(-1)

    jac = jacrev(flat)(x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs


def _layers():
    return {
        "actnorm": lambda: ActNorm3d(4),
        "invconv": lambda: InvConv3dLU(4),
        "coupling": lambda: AffineCoupling3d(4, width=6),
        "step": lambda: FlowStep3d(4, width=6),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_layer_inverse_and_logdet(name):
    torch.manual_seed(1)
    layer = _layers()[name]().double()
    x = torch.randn(2, 4, 2, 2, 2, dtype=torch.float64)
    layer.train()
    layer(x)  # ActNorm initialises from its first training batch
    _perturb(layer)
    layer.eval()
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (2,)
    torch.testing.assert_close(layer.reverse(y), x, rtol=1e-9, atol=1e-9)
    for b in range(2):
        brute = _brute_logdet(lambda v: layer(v)[0], x[b : b + 1])
        torch.testing.assert_close(logdet[b], brute, rtol=1e-9, atol=1e-9)


def test_squeeze_is_a_permutation():
    sq = Squeeze3d()
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    y, logdet = sq(x)
    assert y.shape == (2, 24, 2, 3, 4)
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(sq.reverse(y), x)
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)
    # the 8 values of one 2×2×2 block land in the 8 channels of one voxel
    block = x[0, 0, :2, :2, :2].flatten()
    assert torch.equal(torch.sort(y[0, 0:8, 0, 0, 0]).values, torch.sort(block).values)
    brute = _brute_logdet(lambda v: sq(v)[0], x[:1])
    assert abs(float(brute)) < 1e-12


def test_split_and_prior_standardise_exactly():
    torch.manual_seed(2)
    split = Split3d(8).double()
    prior = LearnedPrior3d(4, 2).double()
    _perturb(split)
    _perturb(prior)
    x = torch.randn(2, 8, 2, 2, 2, dtype=torch.float64)
    kept, eps, logdet = split(x)
    assert kept.shape == (2, 4, 2, 2, 2) and eps.shape == (2, 4, 2, 2, 2)
    torch.testing.assert_close(split.reverse(kept, eps), x, rtol=1e-10, atol=1e-10)

    def joint(v):  # (kept, eps) as a map of x: its Jacobian determinant is the split's logdet
        k, e, _ = split(v)
        return torch.cat([k.flatten(1), e.flatten(1)], 1)

    torch.testing.assert_close(logdet[0], _brute_logdet(joint, x[:1]), rtol=1e-9, atol=1e-9)
    z = torch.randn(2, 4, 2, 2, 2, dtype=torch.float64)
    e, ld = prior(z)
    torch.testing.assert_close(prior.reverse(e), z)
    torch.testing.assert_close(ld[0], _brute_logdet(lambda v: prior(v)[0], z[:1]))


def _tiny(size=8, seed=0, train_steps=5):
    torch.manual_seed(seed)
    model = Glow3D(levels=2, steps=2, width=8, in_channels=1, patch_size=size).double()
    data = 0.1 * torch.randn(8, 1, size, size, size, dtype=torch.float64) - 0.35
    assert model.initialize(data)
    assert not model.initialize(data)  # once only
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(train_steps):
        opt.zero_grad()
        loss = -model(data).mean()
        loss.backward()
        opt.step()
    model.eval()
    return model, data


def test_model_shapes_match_the_docstring():
    model = Glow3D(levels=4, steps=1, width=4, patch_size=48)
    assert model.level_shapes == [(8, 24, 24, 24), (32, 12, 12, 12), (128, 6, 6, 6), (512, 3, 3, 3)]
    assert model.latent_shapes == [(4, 24, 24, 24), (16, 12, 12, 12), (64, 6, 6, 6), (512, 3, 3, 3)]
    assert sum(math.prod(s) for s in model.latent_shapes) == 48**3 == model.dim
    with pytest.raises(ValueError):
        Glow3D(levels=4, steps=1, width=4, patch_size=40)


def test_whole_model_change_of_variables_exact():
    model, data = _tiny()
    # training moved the zero-initialised layers away from zero
    assert model.blocks[0][0].coupling.net.zero.conv.weight.abs().max() > 0
    assert model.splits[0].prior.conv.weight.abs().max() > 0
    x = data[:2]
    with torch.no_grad():
        lp = model.log_prob(x)
        eps = model.encode(x)
    assert eps.shape == (2, 8**3)
    for b in range(2):
        jac = jacrev(lambda v: model.encode(v.reshape(1, 1, 8, 8, 8)).reshape(-1))(x[b].reshape(-1))
        sign, logabs = torch.linalg.slogdet(jac)
        expected = -0.5 * (eps[b] ** 2 + math.log(2 * math.pi)).sum() + logabs
        rel = abs(float((lp[b] - expected).detach())) / abs(float(expected.detach()))
        assert rel <= 1e-6, rel
    torch.testing.assert_close(model.decode(eps), x, rtol=1e-5, atol=1e-5)


def test_bits_per_dim_definition():
    model, data = _tiny(train_steps=1)
    lp = model.log_prob(data[:2])
    d = 8**3
    torch.testing.assert_close(model.bits_per_dim(data[:2]), (-lp + d * math.log(1220)) / (d * math.log(2)))


def test_save_load_identical_and_no_reinit(tmp_path):
    model, data = _tiny()
    path = tmp_path / "m.pt"
    model.save(path)
    loaded = Glow3D.load(path)
    assert loaded.config() == model.config()
    assert loaded.is_initialized()
    assert next(loaded.parameters()).dtype == torch.float64
    loaded.train()  # an initialised ActNorm does not re-initialise, even in training mode
    an = loaded.blocks[0][0].actnorm
    before = an.loc.detach().clone()
    with torch.no_grad():
        loaded(data + 5.0)
    assert torch.equal(an.loc, before)
    loaded.eval()
    assert torch.equal(loaded.log_prob(data), model.log_prob(data))


def test_a_file_that_is_not_a_model_is_named_and_never_unpickled(tmp_path):
    from ct3dflow.models import load_patch_scorer

    (tmp_path / "op.json").write_text('{"map": "voxel"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"op.json is not a ct3dflow model file \(the model.pt of") as e:
        load_patch_scorer(tmp_path / "op.json")
    assert "weights_only=False" not in str(e.value)  # torch's own advice would run the file's code
    with pytest.raises(FileNotFoundError, match="model file .*nope.pt not found"):
        load_patch_scorer(tmp_path / "nope.pt")
    model, _ = _tiny()
    model.save(tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["config"]["bogus"] = 1  # a file of another version
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="configuration this version cannot build.*another version"):
        Glow3D.load(tmp_path / "other.pt")


def test_sample_shape_and_finite():
    model, _ = _tiny(train_steps=1)
    s = model.sample(3, temperature=0.7)
    assert s.shape == (3, 1, 8, 8, 8) and torch.isfinite(s).all()


def test_bf16_autocast_keeps_logdet_float32():
    torch.manual_seed(0)
    model = Glow3D(levels=2, steps=1, width=8, patch_size=8)
    x = 0.1 * torch.randn(2, 1, 8, 8, 8)
    model.initialize(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = model(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    ref = model(x)
    assert torch.allclose(lp, ref, rtol=0.05)


def test_flops_and_params_positive():
    model = Glow3D(levels=2, steps=2, width=8, patch_size=8)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.flops_per_patch() > 0


@pytest.mark.slow
def test_paper_size_builds_and_scores_one_patch():
    """The paper's model (L=4, K=64, width 512: ≈ 0.5 B parameters) is built on the meta device, which counts
    its parameters without allocating or initialising them; one 48³ patch then goes through the paper's depth,
    every level and step, at a width a CPU test can afford (the paper's width is exercised on the GPU)."""
    with torch.device("meta"):
        paper = Glow3D(levels=4, steps=64)
    assert paper.width == DEFAULT_WIDTH
    assert 0.45e9 < paper.num_parameters() < 0.55e9
    torch.manual_seed(0)
    model = Glow3D(levels=4, steps=64, width=16).eval()
    x = (0.05 * torch.randn(1, 1, 48, 48, 48) - 0.37).clamp(-0.5, 0.5)
    with torch.no_grad():
        lp = model.log_prob(x)
    assert lp.shape == (1,) and torch.isfinite(lp).all()
    assert len(model.blocks) == 4 and all(len(block) == 64 for block in model.blocks)
