"""Maximum-likelihood training of the 3D GLOW: one step, validation, trainer state, a local loop.

The paper trains with Adam (lr 1e-4, weight decay 1e-5), batch 10 on 2 GPUs, 50,000 iterations. What it
leaves out and this module adds (DESIGN §4.6): ActNorm initialised from data once (before DDP wraps the
model), linear learning-rate warm-up, gradient-norm clipping, optional bf16 autocast with log-dets in
float32, and a guard so that a non-finite loss or gradient never reaches the weights (the step is
skipped and counted).

Loss: the mean bits per dimension of the dequantised batch, ``(−log p(x̃) + D·log 1220) / (D·log 2)``
(see :meth:`ct3dflow.flow.Glow3D.bits_per_dim`); it is an affine function of the mean negative
log-likelihood in nats, so it has the same optimum, and its scale (≈ 1–10) does not depend on the patch
size, which keeps ``grad_clip`` meaningful across patch sizes.

Dequantisation: HU values are integers before resampling, one HU being ``1/1220`` of the normalised range;
training adds centred uniform noise ``U(−½, ½)·dequant_hu/1220`` to every voxel (centred so the mean
intensity is unchanged; the data are already interpolated, hence not on an exact HU lattice).
Validation scores the patches without noise, in float32, so it is deterministic.

Ray/DDP: the trainer accepts a model wrapped in ``DistributedDataParallel``; it calls ``model(x)`` (which
is ``log_prob``) for the loss so the DDP hooks run, and uses ``getattr(model, "module", model)`` for
everything else. The skip decision is all-reduced across ranks, so all ranks skip or step together.
This module imports torch and numpy only (no Ray, no MLflow).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .flow import DEFAULT_WIDTH, HU_BINS, Glow3D, nats_to_bits_per_dim

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"


@dataclass
class TrainConfig:
    """Training settings. Paper values: L=4, K=64, Adam lr 1e-4, weight decay 1e-5, 50,000 iterations,
    batch 10 over 2 GPUs (``batch_size`` here is per process)."""

    model: str = "glow3d"  # "glow3d" (the flow) or "ae" (ct3dflow.baselines.ConvAE3D: levels = depth)
    levels: int = 4
    steps: int = 64
    width: int = DEFAULT_WIDTH
    patch_size: int = 48
    batch_size: int = 5
    iterations: int = 50_000
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 1000
    # the last part of a run at lr × lr_decay_factor (0: no decay): after this fraction of ``iterations``, or of
    # ``max_minutes`` when a clock is set, whichever comes first (docs/RESULTS.md's recipe: 0.8 and 0.1)
    lr_decay_at: float = 0.0
    lr_decay_factor: float = 0.1
    # max global gradient norm of the bits/dim loss (<= 0 disables); the paper-sized model starts at ≈ 14
    # (docs/BENCHMARKS.md), so 50 only catches spikes
    grad_clip: float = 50.0
    min_lung_fraction: float = 0.5
    dequant_hu: float = 1.0  # width of the uniform dequantisation noise, in HU (0 disables)
    val_every: int = 1000  # 0 disables validation in train_local
    n_val_patches: int = 256
    val_batch_size: int = 8
    checkpoint_every: int = 1000
    init_batches: int = 4  # batches concatenated for the ActNorm data initialisation in train_local
    max_consecutive_skips: int = 50  # train_local stops with FloatingPointError after this many
    # bf16 autocast (log-dets stay float32) on CUDA, and on a CPU with native bf16 where the coarsest level is
    # at least 3³ (cpu_bf16_refusal says why not elsewhere, and training runs in float32)
    bf16: bool = False
    gradient_checkpointing: bool = False
    fast: bool = True  # on CUDA: the fast path of ct3dflow.flow.fast (exact; no effect on CPU)
    seed: int = 0
    # > 0: stop after this many minutes of updates if ``iterations`` are not reached first (a job scaled to the
    # time a machine has, e.g. `make demo`); counted from the first update of each attempt, so a resumed run
    # gets a new budget. The model is saved where it stopped, and the run records the steps it reached.
    max_minutes: float = 0.0
    # fine-tuning: start from this trained model file (a ``.pt`` of Glow3D.save or the baseline's) instead of a
    # fresh model, e.g. a model trained elsewhere adapted to a site's own healthy studies (issue 16; whether it
    # helps depends on the site: measure it on validation, docs/RESULTS.md). Its ActNorm is already initialised,
    # so the data initialisation is skipped; the architecture settings must be the model's.
    init_model: str = ""

    def __post_init__(self):
        if not 0.0 <= self.lr_decay_at < 1.0:
            raise ValueError(f"train.lr_decay_at = {self.lr_decay_at:g}: a fraction of the run in [0, 1) "
                             "(0 turns the decay off; the recipe uses 0.8)")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            raise ValueError(f"train.lr_decay_factor = {self.lr_decay_factor:g}: a factor in (0, 1] (the recipe: 0.1)")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a ``train`` section; each value is checked against its type (errors name ``train.<key>``)."""
        from .settings import typed_dataclass

        return typed_dataclass(cls, d, "train")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def build_model(self) -> Glow3D:
        """The model ``model`` names: the 3D GLOW, or the autoencoder baseline (``levels`` → its depth,
        ``width`` → its first stage's channels; ``steps`` unused)."""
        if self.model == "ae":
            from .baselines import ConvAE3D

            model = ConvAE3D(depth=self.levels, width=self.width, patch_size=self.patch_size)
        elif self.model == "glow3d":
            model = Glow3D(self.levels, self.steps, self.width, in_channels=1, patch_size=self.patch_size)
            model.gradient_checkpointing = self.gradient_checkpointing
        else:
            raise ValueError(f"unknown train.model {self.model!r}: use 'glow3d' or 'ae'")
        return self._start_from(model) if self.init_model else model

    def _start_from(self, fresh):
        """The model of ``init_model``, checked to be what this section would build (``fresh``)."""
        from .models import load_patch_scorer

        path = Path(self.init_model)
        if not path.is_file():
            raise FileNotFoundError(f"train.init_model {self.init_model!r} is not a file: give the path of a trained "
                                    "model (a model.pt; the Ray train job also takes models:/NAME@champion), or leave "
                                    "train.init_model empty to train a new model")
        saved = load_patch_scorer(path, map_location="cpu")
        if type(saved) is not type(fresh) or saved.config() != fresh.config():
            raise ValueError(f"train.init_model {path} is a {type(saved).__name__} {saved.config()}, but the train "
                             f"section builds a {type(fresh).__name__} {fresh.config()}: set train.model, levels, "
                             "steps, width and patch_size to the model's")
        if isinstance(saved, Glow3D):
            saved.gradient_checkpointing = self.gradient_checkpointing
        return saved


# the coarsest level, in voxels per side, below which oneDNN's CPU bf16 conv3d weight gradients break
MIN_CPU_BF16_SIDE = 3


def cpu_bf16_refusal(cfg: TrainConfig, device) -> str | None:
    """Why bf16 autocast training must not run on ``device`` (None: it may). CUDA always may. A CPU may where
    bf16 is native (AMX or AVX-512 BF16: 1.45× the float32 step of the detection model on 2 AMD EPYC cores,
    docs/BENCHMARKS.md) and the coarsest level is at least 3³: at 2³ oneDNN's bf16 conv3d weight gradients
    are wrong (measured with torch 2.13: cosine 0 against float32 for 8³ patches at L=2; ≥ 0.998 per
    parameter at 16³/L=2 and 24³/L=3)."""
    from .flow.dtypes import bf16_available

    if torch.device(device).type == "cuda":
        return None
    if not bf16_available(device):
        return "this CPU has no native bf16 (AMX or AVX-512 BF16), and emulated bf16 is slower than float32"
    side = cfg.patch_size // 2 ** cfg.levels
    if side < MIN_CPU_BF16_SIDE:
        return (f"the coarsest level is {side}³ ({cfg.patch_size}³ patches, {cfg.levels} levels), where the "
                f"CPU's bf16 conv3d gradients are wrong; it needs at least {MIN_CPU_BF16_SIDE}³")
    return None


def _unwrap(model: torch.nn.Module) -> Glow3D:
    return getattr(model, "module", model)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class FlowTrainer:
    """Adam + warm-up + clipping + non-finite guard around a (possibly DDP-wrapped) :class:`Glow3D`."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device | str = "cpu"):
        self.model = model
        self.cfg = cfg
        self.device = torch.device(device)
        self.glow = _unwrap(model)
        if model is self.glow:  # not yet wrapped in DDP, whose gradient buckets follow the layout it saw
            from .models import channels_last_on_cpu

            channels_last_on_cpu(self.glow, self.device)
        self.optimizer = torch.optim.Adam(self.glow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.skipped_steps = 0
        self.lr_decayed_by_clock = False  # the clock's share of the decay rule (lr_at has the steps' share)
        why_not = cpu_bf16_refusal(cfg, self.device) if cfg.bf16 else None
        self.bf16 = bool(cfg.bf16) and why_not is None
        if why_not:
            warnings.warn(f"train.bf16 is off on this {self.device.type}: {why_not}; training runs in float32",
                          stacklevel=2)
        rank = torch.distributed.get_rank() if _distributed() else 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(cfg.seed) * 1000 + rank)
        if cfg.fast and self.device.type == "cuda" and isinstance(self.glow, Glow3D):
            from .flow.fast import optimise

            # before DDP wraps the model; CUDA graphs only in a single process (DDP's hooks need eager)
            fast = optimise(self.model, self.device, mode="train", compile=False,
                            cuda_graphs=False if _distributed() else None)
            if not _distributed():
                self.model = fast

    # ------------------------------------------------------------------------------------------ steps
    def lr_at(self, step: int) -> float:
        """Learning rate of the ``step``-th update (1-based): linear warm-up to ``cfg.lr``, then ``cfg.lr`` ×
        ``lr_decay_factor`` once the updates done pass ``lr_decay_at`` of ``iterations`` (or the clock did)."""
        lr = self.cfg.lr if self.cfg.warmup_steps <= 0 else self.cfg.lr * min(1.0, step / self.cfg.warmup_steps)
        return lr * self.cfg.lr_decay_factor if self.in_lr_decay(step) else lr

    def in_lr_decay(self, step: int) -> bool:
        at = self.cfg.lr_decay_at
        return at > 0 and (self.lr_decayed_by_clock or (step - 1) / self.cfg.iterations > at)

    def note_clock(self, fraction_spent: float) -> None:
        """Tell the trainer how much of its wall-clock budget is spent: past ``lr_decay_at`` the decay starts
        (and stays). Under DDP the ranks must agree on it (the Ray loop all-reduces the flag instead)."""
        if 0 < self.cfg.lr_decay_at < fraction_spent:
            self.lr_decayed_by_clock = True

    def initialise(self, batch: torch.Tensor) -> bool:
        """ActNorm data initialisation, once (no-op when already initialised). Call before DDP wraps.

        GLOW initialises from a large batch; pass several batches concatenated if you can (it runs under
        ``no_grad``, so memory is modest). If a process group is already initialised, rank 0's result is
        broadcast to all ranks, so that calling it after wrapping in DDP is still consistent.
        """
        x = batch.to(self.device, torch.float32)
        done = self.glow.initialize(x)
        if _distributed():
            flag = torch.tensor([int(done)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if int(flag):
                with torch.no_grad():
                    for t in [*self.glow.parameters(), *self.glow.buffers()]:
                        torch.distributed.broadcast(t.data, src=0)
        return done

    def _dequantise(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.dequant_hu <= 0:
            return x
        u = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x + (u - 0.5) * (self.cfg.dequant_hu / HU_BINS)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, batch: torch.Tensor) -> dict:
        """One update. Returns ``{loss, bits_per_dim, skipped, grad_norm, lr, step}``."""
        self.model.train()
        x = self._dequantise(batch.to(self.device, torch.float32))
        lr = self.lr_at(self.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            log_p = self.model(x)
        bpd = nats_to_bits_per_dim(log_p.float(), self.glow.dim)
        loss = bpd.mean()
        loss.backward()  # also for a non-finite loss, so that DDP ranks stay in step
        params = [p for p in self.glow.parameters() if p.grad is not None]
        if self.cfg.grad_clip and self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        if _distributed():
            flag = ok.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag.bool()
        skipped = not bool(ok)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            self.step += 1
        return {
            "loss": float(loss.detach()),
            "bits_per_dim": float(loss.detach()),
            "skipped": skipped,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "step": self.step,
        }

    @torch.no_grad()
    def validate(self, patches: torch.Tensor, batch_size: int | None = None) -> float:
        """Mean bits/dim of ``patches`` ``(N, 1, S, S, S)`` (no noise, float32, eval mode)."""
        batch_size = batch_size or self.cfg.val_batch_size
        was_training = self.glow.training
        self.glow.eval()
        total, n = 0.0, 0
        for i in range(0, len(patches), batch_size):
            x = patches[i : i + batch_size].to(self.device, torch.float32)
            total += float(self.glow.bits_per_dim(x).double().sum())
            n += len(x)
        self.glow.train(was_training)
        return total / max(n, 1)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.glow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "lr_decayed_by_clock": self.lr_decayed_by_clock,
            "rng": rng,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.glow.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.lr_decayed_by_clock = bool(state.get("lr_decayed_by_clock", False))
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "generator" in rng:
            self.generator.set_state(rng["generator"].cpu())
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Atomic: write ``path.tmp`` then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))


# ---------------------------------------------------------------------------------------------- loops
class TimeBudget:
    """``minutes`` of wall clock from now (``<= 0``: no limit): :attr:`TrainConfig.max_minutes`."""

    def __init__(self, minutes: float):
        self.minutes = float(minutes)
        self.deadline = time.monotonic() + 60.0 * self.minutes if self.minutes > 0 else math.inf

    @property
    def limited(self) -> bool:
        return math.isfinite(self.deadline)

    def spent(self) -> bool:
        return time.monotonic() >= self.deadline

    def fraction_spent(self) -> float:
        """Share of the budget used so far (0 without a limit)."""
        if not self.limited:
            return 0.0
        return 1.0 - max(0.0, self.deadline - time.monotonic()) / (60.0 * self.minutes)


def train_local(
    cfg: TrainConfig,
    batches: Iterator[torch.Tensor],
    val_patches: torch.Tensor | None,
    out_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    log_fn: Callable[[int, dict], None] | None = None,
) -> Glow3D:
    """Single-process training to ``cfg.iterations`` updates (or ``cfg.max_minutes``, whichever comes first);
    resumes from ``out_dir/checkpoint.pt``.

    ``batches`` yields float32 ``(B, 1, S, S, S)`` tensors. Checkpoints every ``cfg.checkpoint_every``
    updates (and at the end), validates every ``cfg.val_every`` updates on ``val_patches``, calls
    ``log_fn(step, metrics)`` after every update attempt, and writes the final model with
    :meth:`Glow3D.save` to ``out_dir/model.pt``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = cfg.build_model().to(device)
    trainer = FlowTrainer(model, cfg, device)
    ckpt = out / CHECKPOINT_NAME
    pending: list[torch.Tensor] = []
    if ckpt.exists():
        trainer.load_checkpoint(ckpt)
    else:
        pending = [next(batches) for _ in range(max(1, cfg.init_batches))]
        trainer.initialise(torch.cat(pending))
    last_saved = trainer.step
    consecutive_skips = 0
    budget = TimeBudget(cfg.max_minutes)
    while trainer.step < cfg.iterations and not budget.spent():
        trainer.note_clock(budget.fraction_spent())
        batch = pending.pop(0) if pending else next(batches)
        metrics = trainer.train_step(batch)
        metrics["skipped_steps"] = trainer.skipped_steps
        step = trainer.step
        if not metrics["skipped"]:
            if cfg.val_every and val_patches is not None and len(val_patches) and step % cfg.val_every == 0:
                metrics["val_bits_per_dim"] = trainer.validate(val_patches)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                trainer.save_checkpoint(ckpt)
                last_saved = step
        if log_fn is not None:
            log_fn(step, metrics)
        consecutive_skips = consecutive_skips + 1 if metrics["skipped"] else 0
        if consecutive_skips >= cfg.max_consecutive_skips > 0:
            trainer.save_checkpoint(out / "diverged.pt")
            raise FloatingPointError(
                f"{consecutive_skips} non-finite steps in a row at step {trainer.step}: training diverged "
                f"(state saved to {out / 'diverged.pt'}); lower lr or grad_clip, or raise warmup_steps"
            )
    if last_saved != trainer.step or not ckpt.exists():
        trainer.save_checkpoint(ckpt)
    glow = trainer.glow
    glow.eval()
    glow.save(out / MODEL_NAME)
    return glow


def patch_batches_from_arrays(
    volumes: list[np.ndarray], stricts: list[np.ndarray], cfg: TrainConfig, seed: int,
    exclude: list[np.ndarray | None] | None = None,
) -> Iterator[torch.Tensor]:
    """Endless ``(B, 1, S, S, S)`` float32 batches of random patches with enough strict lung.

    Each patch picks a volume uniformly among those with at least one valid window, then a window
    uniformly among its valid ones (:mod:`ct3dflow.patches`). ``exclude`` (one mask or None per volume): no
    window touching it is ever sampled (a lesion and its margin in an otherwise healthy study).
    """
    from . import patches as P

    if len(volumes) != len(stricts):
        raise ValueError("volumes and stricts must have the same length")
    size = cfg.patch_size
    valid = [P.valid_patch_corners(s, size, cfg.min_lung_fraction) for s in stricts]
    for i, ex in enumerate(exclude or []):
        if ex is not None and len(valid[i]):
            valid[i] = valid[i][P.box_sums(P.integral_image(ex), valid[i], size) == 0]
    usable = [i for i, v in enumerate(valid) if len(v)]
    if not usable:
        raise ValueError(
            f"no volume has a {size}³ patch with ≥ {100 * cfg.min_lung_fraction:g} % strict lung; "
            "lower min_lung_fraction or check the lung masks"
        )
    rng = np.random.default_rng(seed)
    while True:
        which = rng.choice(usable, size=cfg.batch_size)
        out = np.empty((cfg.batch_size, 1, size, size, size), dtype=np.float32)
        for vi in np.unique(which):
            rows = np.flatnonzero(which == vi)
            corners = P.sample_patch_corners(
                stricts[vi], size, len(rows), cfg.min_lung_fraction, rng, valid_corners=valid[vi]
            )
            out[rows, 0] = P.extract_patches(volumes[vi], corners, size)
        yield torch.from_numpy(out)

