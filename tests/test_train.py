"""FlowTrainer / train_local: non-finite guard, learning on structured patches, state and resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ct3dflow.flow import Glow3D
from ct3dflow.train import FlowTrainer, TrainConfig, patch_batches_from_arrays, train_local

torch.set_num_threads(2)


def smooth_lung_patches(n: int, size: int, seed: int) -> torch.Tensor:
    """Structured synthetic patches: Gaussian-smoothed noise (σ 1.5 voxels, ±60 HU) around −860 HU plus
    10 HU white noise, normalised like the pipeline ((clip(hu, −1020, 200) + 1020) / 1220 − 0.5)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * 1.5**2))
    k = k / k.sum()
    x = torch.randn(n, 1, size + 8, size + 8, size + 8, generator=g)
    x = F.conv3d(x, k.view(1, 1, 9, 1, 1))
    x = F.conv3d(x, k.view(1, 1, 1, 9, 1))
    x = F.conv3d(x, k.view(1, 1, 1, 1, 9))
    x = x / x.std()
    hu = -860.0 + 60.0 * x + 10.0 * torch.randn(x.shape, generator=g)
    return ((hu.clamp(-1020, 200) + 1020) / 1220 - 0.5).float()


def _tiny_cfg(**kw) -> TrainConfig:
    base = dict(levels=2, steps=2, width=16, patch_size=16, batch_size=8, lr=1e-3, warmup_steps=10,
                iterations=300, val_every=0, checkpoint_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _endless(data: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(0, len(data), (batch,), generator=g)]


def test_config_round_trip():
    cfg = _tiny_cfg(bf16=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().lr == 1e-4 and TrainConfig().weight_decay == 1e-5
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"nonsense": 1})


def test_non_finite_batch_never_reaches_weights():
    torch.manual_seed(0)
    cfg = _tiny_cfg(patch_size=8, width=8)
    model = cfg.build_model()
    trainer = FlowTrainer(model, cfg, "cpu")
    data = smooth_lung_patches(8, 8, seed=1)
    assert trainer.initialise(data)
    assert not trainer.initialise(data + 1.0)  # once only
    good = trainer.train_step(data)
    assert not good["skipped"] and trainer.step == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = data.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    out = trainer.train_step(bad)
    assert out["skipped"] and trainer.skipped_steps == 1 and trainer.step == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # an inf patch too; afterwards training goes on
    bad[0, 0, 0, 0, 0] = float("inf")
    assert trainer.train_step(bad)["skipped"] and trainer.skipped_steps == 2
    assert not trainer.train_step(data)["skipped"] and trainer.step == 2


def test_warmup_is_linear():
    trainer = FlowTrainer(_tiny_cfg(patch_size=8, width=4).build_model(), _tiny_cfg(lr=1e-3, warmup_steps=10))
    assert trainer.lr_at(1) == pytest.approx(1e-4)
    assert trainer.lr_at(5) == pytest.approx(5e-4)
    assert trainer.lr_at(10) == trainer.lr_at(1000) == pytest.approx(1e-3)


def test_tiny_model_learns_structured_patches():
    torch.manual_seed(0)
    cfg = _tiny_cfg(iterations=300)
    train = smooth_lung_patches(256, 16, seed=0)
    val = smooth_lung_patches(32, 16, seed=1)
    model = cfg.build_model()
    trainer = FlowTrainer(model, cfg, "cpu")
    trainer.initialise(train[:64])
    before = trainer.validate(val)
    batches = _endless(train, cfg.batch_size, seed=0)
    for step in range(1, cfg.iterations + 1):
        trainer.train_step(next(batches))
        # stop once the assertion is decided: validation every 25 steps costs far less than the steps
        if step % 25 == 0 and trainer.validate(val) < before - 0.5:
            break
    after = trainer.validate(val)
    assert trainer.skipped_steps == 0
    assert after < before - 0.5, (before, after, step)


def test_bf16_on_cpu_refuses_a_2_cubed_coarsest_level_and_trains_in_float32():
    """8³ patches at L=2 leave a 2³ coarsest level, where oneDNN's bf16 conv3d weight gradients are wrong:
    the trainer says so and runs exactly the float32 step (on any CPU: without native bf16 it refuses too)."""
    data = smooth_lung_patches(4, 8, seed=2)
    steps = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = _tiny_cfg(patch_size=8, width=8, bf16=bf16)
        if bf16:
            with pytest.warns(UserWarning, match="train.bf16 is off on this cpu"):
                trainer = FlowTrainer(cfg.build_model(), cfg, "cpu")
            assert not trainer.bf16
        else:
            trainer = FlowTrainer(cfg.build_model(), cfg, "cpu")
        trainer.initialise(data)
        steps.append(trainer.train_step(data))
    assert not steps[1]["skipped"]
    assert steps[1]["loss"] == steps[0]["loss"] and steps[1]["grad_norm"] == steps[0]["grad_norm"]


def test_cpu_bf16_refusal_names_the_reason():
    from ct3dflow.flow.dtypes import bf16_available
    from ct3dflow.train import cpu_bf16_refusal

    assert cpu_bf16_refusal(_tiny_cfg(patch_size=8), "cuda") is None
    tiny = cpu_bf16_refusal(_tiny_cfg(patch_size=8), "cpu")
    ok = cpu_bf16_refusal(_tiny_cfg(patch_size=16), "cpu")
    if bf16_available("cpu"):
        assert "coarsest level is 2³" in tiny and ok is None
    else:
        assert "no native bf16" in tiny and "no native bf16" in ok


@pytest.mark.skipif(not __import__("ct3dflow.flow.dtypes", fromlist=["x"]).bf16_available("cpu"),
                    reason="bf16 training on a CPU needs native bf16 (AMX or AVX-512 BF16)")
def test_bf16_step_on_a_native_bf16_cpu_follows_the_float32_gradient():
    """Where the CPU runs bf16 natively and the coarsest level is 4³: the step really runs in bf16 (the loss
    moves by rounding) and its gradient points where the float32 gradient points."""
    data = smooth_lung_patches(8, 16, seed=2)
    losses, grads = [], []
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = _tiny_cfg(bf16=bf16, grad_clip=0.0)
        model = cfg.build_model()
        trainer = FlowTrainer(model, cfg, "cpu")
        assert trainer.bf16 == bf16
        trainer.initialise(data)
        with torch.no_grad():  # off the identity init, so every coupling layer has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trainer.optimizer.step = lambda: None  # keep the weights: compare the two gradients at one point
        out = trainer.train_step(data)
        assert not out["skipped"] and np.isfinite(out["grad_norm"])
        losses.append(out["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[1] != losses[0] and losses[1] == pytest.approx(losses[0], rel=0.02)
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast training needs a CUDA GPU")
def test_bf16_step_on_cuda_is_finite_and_close_to_float32():
    data = smooth_lung_patches(8, 16, seed=2)
    losses = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        cfg = _tiny_cfg(bf16=bf16, fast=False)
        trainer = FlowTrainer(cfg.build_model().cuda(), cfg, "cuda")
        trainer.initialise(data)
        out = trainer.train_step(data)
        assert not out["skipped"] and np.isfinite(out["grad_norm"])
        losses.append(out["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


def test_train_local_resumes(tmp_path):
    cfg = _tiny_cfg(patch_size=8, width=8, iterations=4, checkpoint_every=2, val_every=2, batch_size=4)
    data = smooth_lung_patches(32, 8, seed=3)
    val = smooth_lung_patches(4, 8, seed=4)
    logged: list[tuple[int, dict]] = []
    m1 = train_local(cfg, _endless(data, 4, 0), val, tmp_path, "cpu", lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    assert "val_bits_per_dim" in logged[1][1]
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "model.pt").exists()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    logged.clear()
    cfg2 = TrainConfig.from_dict({**cfg.to_dict(), "iterations": 8})
    m2 = train_local(cfg2, _endless(data, 4, 1), val, tmp_path, "cpu", lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [5, 6, 7, 8]  # resumed at 4, not from scratch
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 8
    loaded = Glow3D.load(tmp_path / "model.pt")
    assert loaded.is_initialized()
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(val), m2.log_prob(val))
        assert not torch.equal(m1.log_prob(val), m2.log_prob(val))


def test_trainer_state_round_trip():
    torch.manual_seed(0)
    cfg = _tiny_cfg(patch_size=8, width=8)
    data = smooth_lung_patches(4, 8, seed=5)
    t1 = FlowTrainer(cfg.build_model(), cfg)
    t1.initialise(data)
    t1.train_step(data)
    state = t1.state_dict()
    t2 = FlowTrainer(cfg.build_model(), cfg)
    t2.load_state_dict(state)
    assert t2.step == 1 and t2.glow.is_initialized()
    r1, r2 = t1.train_step(data), t2.train_step(data)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)  # same weights, same dequantisation noise


def test_ddp_style_wrapper_is_unwrapped():
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: .module and forward
        def __init__(self, m):
            super().__init__()
            self.module = m
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.module(x)

    cfg = _tiny_cfg(patch_size=8, width=8)
    glow = cfg.build_model()
    data = smooth_lung_patches(4, 8, seed=6)
    FlowTrainer(glow, cfg).initialise(data)
    wrapped = Wrapper(glow)
    trainer = FlowTrainer(wrapped, cfg)
    assert trainer.glow is glow
    assert not trainer.train_step(data)["skipped"] and wrapped.calls == 1


def test_patch_batches_from_arrays():
    rng = np.random.default_rng(0)
    vol = rng.uniform(-0.5, 0.5, size=(24, 24, 24)).astype(np.float32)
    strict = np.zeros((24, 24, 24), np.uint8)
    strict[4:20, 4:20, 4:20] = 1
    empty = np.zeros_like(strict)
    cfg = _tiny_cfg(patch_size=8, batch_size=6, min_lung_fraction=0.9)
    it = patch_batches_from_arrays([vol, vol], [strict, empty], cfg, seed=0)
    b = next(it)
    assert b.shape == (6, 1, 8, 8, 8) and b.dtype == torch.float32
    with pytest.raises(ValueError):
        next(patch_batches_from_arrays([vol], [empty], cfg, seed=0))


def test_train_local_stops_on_its_time_budget_and_saves_the_model(tmp_path):
    """``train.max_minutes``: training against the clock stops where the budget ends and keeps what it has."""
    from ct3dflow.train import MODEL_NAME, TimeBudget

    assert not TimeBudget(0).limited and not TimeBudget(0).spent() and TimeBudget(1e-9).limited
    cfg = _tiny_cfg(patch_size=8, width=8, iterations=10**6, checkpoint_every=10**6, val_every=0, batch_size=4,
                    max_minutes=0.01)  # 0.6 s: a handful of steps, never a million
    cfg = dataclasses.replace(cfg, warmup_steps=0, lr_decay_at=0.5)  # and the second half of the clock at lr/10
    logged: list[int] = []
    rates: list[float] = []
    train_local(cfg, _endless(smooth_lung_patches(16, 8, seed=3), 4, 0), None, tmp_path, "cpu",
                lambda s, m: (logged.append(s), rates.append(m["lr"])))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 0 < state["step"] == logged[-1] < 10**6
    decayed = int(np.argmax(np.isclose(rates, 1e-4)))
    assert 0 < decayed and np.allclose(rates[:decayed], 1e-3) and np.allclose(rates[decayed:], 1e-4), rates
    assert (tmp_path / MODEL_NAME).exists()


def test_train_local_stops_when_diverged(tmp_path):
    cfg = _tiny_cfg(patch_size=8, width=8, iterations=10, max_consecutive_skips=3, init_batches=1)
    data = smooth_lung_patches(4, 8, seed=7)
    data[:, :, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        train_local(cfg, _endless(data, 4, 0), None, tmp_path, "cpu")
    assert (tmp_path / "diverged.pt").exists() and not (tmp_path / "model.pt").exists()


def test_cpu_trainer_keeps_conv_weights_channels_last_and_trains_as_the_contiguous_layout():
    """On the CPU the trainer puts the convolution weights in the channels-last layout (oneDNN's fast one,
    docs/BENCHMARKS.md); three updates give the contiguous layout's losses and weights up to float32 rounding."""
    cfg = _tiny_cfg(patch_size=8, width=8)
    data = smooth_lung_patches(8, 8, seed=7)
    torch.manual_seed(0)
    fast = FlowTrainer(cfg.build_model(), cfg)
    convs = [m.weight for m in fast.glow.modules() if isinstance(m, torch.nn.Conv3d) and m.weight.shape[2] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
                         for w in convs)
    torch.manual_seed(0)
    plain = FlowTrainer(cfg.build_model(), cfg)
    plain.glow.to(memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in plain.glow.modules() if isinstance(m, torch.nn.Conv3d))
    for t in (fast, plain):
        t.initialise(data)
    for _ in range(3):
        a, b = fast.train_step(data), plain.train_step(data)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for p, q in zip(fast.glow.parameters(), plain.glow.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_the_last_part_of_a_run_goes_at_a_tenth_of_the_rate_by_steps_or_by_clock():
    """``train.lr_decay_at`` (docs/RESULTS.md's recipe: the last 20 % at lr/10): past that fraction of the
    iterations, or of the clock, whichever comes first; the clock's share survives a checkpoint."""
    cfg = _tiny_cfg(patch_size=8, width=4, lr=1e-3, warmup_steps=0, iterations=10, lr_decay_at=0.8)
    trainer = FlowTrainer(cfg.build_model(), cfg)
    # the 9th update follows 8 done (0.8, not past it); the 10th follows 9 (0.9)
    assert [trainer.lr_at(s) for s in (1, 9, 10)] == pytest.approx([1e-3, 1e-3, 1e-4])
    trainer.note_clock(0.5)
    assert trainer.lr_at(1) == pytest.approx(1e-3)
    trainer.note_clock(0.81)
    trainer.note_clock(0.0)  # once started, it stays
    assert trainer.lr_at(1) == pytest.approx(1e-4)
    again = FlowTrainer(cfg.build_model(), cfg)
    again.load_state_dict(trainer.state_dict())
    assert again.lr_at(1) == pytest.approx(1e-4)
    off = FlowTrainer(cfg.build_model(), dataclasses.replace(cfg, lr_decay_at=0.0))
    off.note_clock(0.99)
    assert off.lr_at(10) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"train.lr_decay_at = 1: a fraction of the run in \[0, 1\)"):
        TrainConfig.from_dict({"lr_decay_at": 1.0})
    with pytest.raises(ValueError, match="train.lr_decay_factor"):
        TrainConfig(lr_decay_factor=0.0)


def test_train_local_fine_tunes_from_init_model(tmp_path):
    """``train.init_model``: training starts from the given model's weights and ActNorm (not a fresh model,
    not re-initialised on the new data), and improves it on the new data."""
    cfg = _tiny_cfg(patch_size=8, width=8, iterations=30, batch_size=4, warmup_steps=0)
    source = train_local(cfg, _endless(smooth_lung_patches(32, 8, seed=3), 4, 0), None, tmp_path / "a", "cpu")
    # the "site": the same structure, darker and noisier (a denser protocol would be brighter)
    site = smooth_lung_patches(64, 8, seed=5) - 40 / 1220
    site_val = smooth_lung_patches(16, 8, seed=6) - 40 / 1220
    first: list[float] = []
    tuned_cfg = dataclasses.replace(cfg, init_model=str(tmp_path / "a" / "model.pt"), lr=1e-4, iterations=40,
                                    val_every=1, seed=1)
    tuned = train_local(tuned_cfg, _endless(site, 4, 1), site_val, tmp_path / "b", "cpu",
                        lambda s, m: first.append(m.get("val_bits_per_dim", np.nan)))
    scratch = train_local(dataclasses.replace(tuned_cfg, init_model=""), _endless(site, 4, 1), site_val,
                          tmp_path / "c", "cpu")
    source.eval()
    with torch.no_grad():
        before, after, fresh = (m.bits_per_dim(site_val).mean().item() for m in (source, tuned, scratch))
    # one update at lr 1e-4 from the source, not from a data-initialised fresh flow
    assert abs(first[0] - before) < 0.05 * abs(before), (first[0], before)
    assert after < before - 0.01, (before, after)
    assert after < fresh, (after, fresh)  # 40 steps from the source beat 40 steps from scratch


def test_init_model_must_exist_and_match_the_architecture(tmp_path):
    cfg = _tiny_cfg(patch_size=8, width=8)
    with pytest.raises(FileNotFoundError, match="train.init_model"):
        dataclasses.replace(cfg, init_model=str(tmp_path / "missing.pt")).build_model()
    cfg.build_model().save(tmp_path / "m.pt")
    loaded = dataclasses.replace(cfg, init_model=str(tmp_path / "m.pt")).build_model()
    assert isinstance(loaded, Glow3D) and loaded.config() == cfg.build_model().config()
    with pytest.raises(ValueError, match="width"):
        dataclasses.replace(cfg, width=16, init_model=str(tmp_path / "m.pt")).build_model()
    with pytest.raises(ValueError, match="ConvAE3D"):
        dataclasses.replace(cfg, model="ae", levels=1, init_model=str(tmp_path / "m.pt")).build_model()
