"""3D GLOW (Kingma & Dhariwal 2018) for 48³ CT patches, as in CT-3DFlow (DESIGN §4.6).

Architecture, for ``levels=4, steps=64, in_channels=1, patch_size=48``::

    x 1×48³ ─squeeze→ 8×24³ ─K steps→ split (4 leave, 4 kept)
            ─squeeze→ 32×12³ ─K steps→ split (16 leave, 16 kept)
            ─squeeze→ 128×6³ ─K steps→ split (64 leave, 64 kept)
            ─squeeze→ 512×3³ ─K steps→ learned top prior (512×3³ leave)

Each step is :class:`~ct3dflow.flow.actnorm.ActNorm3d` → :class:`~ct3dflow.flow.invconv.InvConv3dLU` →
:class:`~ct3dflow.flow.coupling.AffineCoupling3d`. The latent ``ε`` (``encode``) concatenates, in this
order, the standardised split-offs ``4·24³ + 16·12³ + 64·6³`` and the top ``512·3³``: 110,592 = 48³ values.

Where this departs from GLOW:

* everything is 3D (2×2×2 squeeze, 1×1×1 invertible conv, 3×3×3 coupling convolutions);
* the splits standardise what leaves the flow, ``ε = (z − μ)/σ`` (see :mod:`.squeeze`), so that
  ``log_prob(x) = log N(ε; 0, I) + log|det ∂ε/∂x|`` exactly, and ``decode`` is the exact inverse;
* the top prior has learned per-position mean/log-std parameters instead of a conv applied to zeros;
* log-determinants, the prior terms and the invertible convolution run in float32 also under bf16
  autocast (only the coupling/prior networks use bf16);
* no dequantisation offset is included in :meth:`Glow3D.log_prob`: it is the density of the continuous
  normalised patch in ``[-0.5, 0.5]``. :meth:`Glow3D.bits_per_dim` reports the discrete 1-HU bins:
  the normalised range spans 1220 HU (−1020…200), so one HU is ``1/1220`` and
  ``bpd = (−log p(x) + D·log 1220) / (D·log 2)`` (``D`` voxels per patch).

Width (hidden channels of the coupling networks) is not given in the paper. ``DEFAULT_WIDTH = 256``:
at L=4, K=64 it gives 0.50 G parameters (``num_parameters()``; 128 → 0.26 G, 512 → 1.0 G), ≈ 0.41 TFLOP
per forward pass of one 48³ patch. Activation memory for training is dominated by level 1 (width × 24³
per hidden tensor per step): at width 512 ≈ 7 GB/patch for the 64 level-1 steps alone, so the paper's
batch of 5 per GPU does not fit a 40 GB A100 without gradient checkpointing, while width 256 (≈ 3.6 GB/patch
plus 8 GB for weights, grads and Adam state) does. Set ``gradient_checkpointing = True`` on the model to
recompute each step in the backward pass (less memory, ≈ 1.3× the time).

Fast path: :func:`ct3dflow.flow.fast.optimise` sets :attr:`Glow3D.fast` to an encoder that computes the
same ``(ε, log-det)`` from the same parameters in a channels-last layout with ActNorm folded into the
1×1×1 convolution (and optionally ``torch.compile`` / CUDA graphs on a GPU); ``_encode`` then delegates to
it, except for a training-mode forward of a model whose ActNorm is not initialised yet. ``decode`` and
``sample`` always use the reference layers. The state dict is the same either way.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .actnorm import ActNorm3d
from .coupling import AffineCoupling3d
from .dtypes import work_dtype
from .invconv import InvConv3dLU
from .persist import SavedModule
from .squeeze import LearnedPrior3d, Split3d, squeeze3d, unsqueeze3d

DEFAULT_WIDTH = 256
HU_BINS = 1220  # the normalised range [-0.5, 0.5] spans 1220 HU (clip to [-1020, 200])
FORMAT = "ct3dflow.Glow3D/1"
_LOG_2PI = math.log(2.0 * math.pi)


class FlowStep3d(nn.Module):
    """One GLOW step: ActNorm → invertible 1×1×1 conv → affine coupling; ``forward -> (y, logdet)``."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.actnorm = ActNorm3d(channels)
        self.invconv = InvConv3dLU(channels)
        self.coupling = AffineCoupling3d(channels, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.invconv(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))


class Glow3D(SavedModule, nn.Module):
    """Multi-scale 3D GLOW; ``model(x)`` is ``model.log_prob(x)`` so that DDP hooks run.

    Inputs are ``(B, in_channels, S, S, S)`` with ``S = patch_size`` divisible by ``2**levels``.
    """

    FORMAT = FORMAT
    FILE_WHAT = "ct3dflow Glow3D"
    gradient_checkpointing: bool = False
    # optional ``fast(glow, x) -> (eps, logdet)`` (set by ``ct3dflow.flow.fast.optimise``; None = reference)
    fast = None

    def __init__(
        self,
        levels: int = 4,
        steps: int = 64,
        width: int = DEFAULT_WIDTH,
        in_channels: int = 1,
        patch_size: int = 48,
    ):
        super().__init__()
        if levels < 1 or steps < 1 or width < 1 or in_channels < 1:
            raise ValueError("levels, steps, width and in_channels must be positive")
        if patch_size % (2**levels):
            raise ValueError(f"patch_size {patch_size} is not divisible by 2**levels = {2**levels}")
        self.levels, self.steps, self.width = levels, steps, width
        self.in_channels, self.patch_size = in_channels, patch_size
        self.blocks = nn.ModuleList()
        self.splits = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int, int]] = []
        self.level_shapes: list[tuple[int, int, int, int]] = []  # the shape the K steps of each level see
        c, s = in_channels, patch_size
        for i in range(levels):
            c, s = c * 8, s // 2
            self.level_shapes.append((c, s, s, s))
            self.blocks.append(nn.ModuleList([FlowStep3d(c, width) for _ in range(steps)]))
            if i < levels - 1:
                split = Split3d(c)
                self.splits.append(split)
                self.latent_shapes.append((split.n_out, s, s, s))
                c = split.n_keep
            else:
                self.prior = LearnedPrior3d(c, s)
                self.latent_shapes.append((c, s, s, s))
        self.dim = in_channels * patch_size**3

    # ----------------------------------------------------------------------------------- configuration
    def config(self) -> dict:
        return {
            "levels": self.levels,
            "steps": self.steps,
            "width": self.width,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
        }

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        """Stored trainable parameters (the LU factors are stored as full ``C×C`` matrices, as in GLOW)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_patch(self) -> int:
        """Forward FLOPs of one patch: 2 × multiply-accumulates of all convolutions (training ≈ 3×)."""
        macs = 0
        w = self.width
        for i, (c, s, _, _) in enumerate(self.level_shapes):
            n = s**3
            n_a = c // 2
            n_b = c - n_a
            step = c * c + 27 * n_a * w + w * w + 27 * w * 2 * n_b
            macs += self.steps * step * n
            if i < self.levels - 1:
                split = self.splits[i]
                macs += 27 * split.n_keep * 2 * split.n_out * n
        return 2 * macs

    # ------------------------------------------------------------------------------------ init
    def is_initialized(self) -> bool:
        return all(m.is_initialized() for m in self.modules() if isinstance(m, ActNorm3d))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> bool:
        """ActNorm data initialisation from the batch ``x``, once. Returns True if it initialised anything.

        Call before wrapping the model in DDP (each rank would otherwise initialise from its own data).
        """
        if self.is_initialized():
            return False
        was_training = self.training
        self.train()
        with torch.autocast(device_type=x.device.type, enabled=False):
            self._encode(x)
        self.train(was_training)
        return True

    # ------------------------------------------------------------------------------------ density
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fast is not None and not (self.training and not self.is_initialized()):
            return self.fast(self, x)
        return self._encode_reference(x)

    def _encode_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self._param_dtype())
        dt = work_dtype(x)
        logdet = torch.zeros(x.shape[0], dtype=dt, device=x.device)
        eps_parts = []
        h = x
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            h = squeeze3d(h)
            for step in block:
                if use_ckpt:
                    h, ld = checkpoint(step, h, use_reentrant=False)
                else:
                    h, ld = step(h)
                logdet = logdet + ld.to(dt)
            if i < self.levels - 1:
                h, eps, ld = self.splits[i](h)
            else:
                eps, ld = self.prior(h)
            eps_parts.append(eps.flatten(1))
            logdet = logdet + ld.to(dt)
        return torch.cat(eps_parts, dim=1), logdet

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Standard-normal latent ``ε`` of shape ``(B, D)``; ``log_prob = log N(ε) + log|det ∂ε/∂x|``."""
        return self._encode(x)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample natural-log density ``(B,)`` of the normalised patch (no dequantisation offset)."""
        eps, logdet = self._encode(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            eps = eps.to(logdet.dtype)
            log_normal = -0.5 * (eps.pow(2) + _LOG_2PI).sum(dim=1)
            return log_normal + logdet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """``(−log p(x) + D·log 1220) / (D·log 2)``: bits per voxel of 1-HU bins, ``(B,)``."""
        return nats_to_bits_per_dim(self.log_prob(x), self.dim)

    # ------------------------------------------------------------------------------------ inverse
    def decode(self, eps: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`: ``(B, D)`` → ``(B, in_channels, S, S, S)``."""
        eps = eps.to(self._param_dtype())
        sizes = [math.prod(shape) for shape in self.latent_shapes]
        if eps.shape[1] != sum(sizes):
            raise ValueError(f"latent has {eps.shape[1]} values per sample, expected {sum(sizes)}")
        parts = [p.reshape(eps.shape[0], *shape) for p, shape in
                 zip(torch.split(eps, sizes, dim=1), self.latent_shapes)]
        h = self.prior.reverse(parts[-1])
        for i in reversed(range(self.levels)):
            if i < self.levels - 1:
                h = self.splits[i].reverse(h, parts[i])
            for step in reversed(self.blocks[i]):
                h = step.reverse(h)
            h = unsqueeze3d(h)
        return h

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 0.7, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` patches decoded from ``temperature · N(0, I)`` latents (GLOW's low-temperature sampling)."""
        p = next(self.parameters())
        eps = torch.randn(n, self.dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(eps * temperature)


def nats_to_bits_per_dim(log_prob: torch.Tensor, dim: int, bins: int = HU_BINS) -> torch.Tensor:
    """Bits per dimension of 1/``bins``-wide bins from a continuous log-density in nats."""
    return (-log_prob + dim * math.log(bins)) / (dim * math.log(2.0))
