"""2×2×2 squeeze, the multi-scale split with a learned conditional prior, and the top-level prior.

* :class:`Squeeze3d` — GLOW's space-to-depth squeeze extended to 3D: ``(B, C, D, H, W)`` →
  ``(B, 8C, D/2, H/2, W/2)``; volume-preserving (log-det 0).
* :class:`Split3d` — GLOW's ``split2d`` (RealNVP multi-scale architecture): half the channels ``z`` leave
  the flow and are modelled by a diagonal Gaussian whose mean and log-std come from a
  :class:`~ct3dflow.flow.coupling.ZeroConv3d` of the kept half (learned conditional prior).
* :class:`LearnedPrior3d` — the prior of the last level: a diagonal Gaussian with learned, zero-initialised
  per-position mean and log-std parameters. GLOW/rosinality use a zero-initialised convolution applied to
  zeros (``learntop``), which with zero padding is the same as a learned per-channel bias; parameters per
  position cost ``2·C·s³`` (27,648 at 512×3³) instead of ``27·C·2C`` (14.2 M at C = 512).

Departure from GLOW (which adds ``log N(z; μ, σ)`` to the objective): the splits and the top prior
*standardise* what leaves the flow, ``ε = (z − μ) / σ``, and return ``−Σ log σ`` as a log-determinant.
Then ``log p(x) = log N(ε; 0, I) + Σ logdet`` is the same number, and ``encode(x) = ε`` is an exactly
standard-normal latent whose Jacobian determinant accounts for everything.
"""

from __future__ import annotations

import torch
from torch import nn

from .coupling import ZeroConv3d
from .dtypes import work_dtype as _work_dtype


def squeeze3d(x: torch.Tensor) -> torch.Tensor:
    b, c, d, h, w = x.shape
    if d % 2 or h % 2 or w % 2:
        raise ValueError(f"squeeze needs even spatial sizes, got {tuple(x.shape[2:])}")
    x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * 8, d // 2, h // 2, w // 2)


def unsqueeze3d(x: torch.Tensor) -> torch.Tensor:
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // 8, 2, 2, 2, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // 8, d * 2, h * 2, w * 2)


class Squeeze3d(nn.Module):
    """``forward -> (squeezed, 0)``; ``reverse`` is the inverse permutation."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze3d(x), torch.zeros(x.shape[0], dtype=_work_dtype(x), device=x.device)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return unsqueeze3d(y)


class Split3d(nn.Module):
    """Keep the first half of the channels; standardise the second with a prior conditioned on the first.

    ``forward(x) -> (kept, eps, logdet)`` with ``eps = (z − μ(kept)) / σ(kept)`` of shape
    ``(B, C − C//2, D, H, W)`` and ``logdet = −Σ log σ``; ``reverse(kept, eps) -> x``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.n_keep = channels // 2
        self.n_out = channels - self.n_keep
        self.prior = ZeroConv3d(self.n_keep, 2 * self.n_out)

    def _mean_logsd(self, kept: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.prior(kept)
        with torch.autocast(device_type=kept.device.type, enabled=False):
            h = h.to(dt)
            return h[:, 0::2], h[:, 1::2]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = _work_dtype(x)
        kept, z = x[:, : self.n_keep], x[:, self.n_keep :]
        mean, log_sd = self._mean_logsd(kept, dt)
        with torch.autocast(device_type=x.device.type, enabled=False):
            eps = (z.to(dt) - mean) * torch.exp(-log_sd)
            logdet = -log_sd.flatten(1).sum(1)
        return kept, eps, logdet

    def reverse(self, kept: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        dt = _work_dtype(kept)
        mean, log_sd = self._mean_logsd(kept, dt)
        with torch.autocast(device_type=kept.device.type, enabled=False):
            z = mean + torch.exp(log_sd) * eps.to(dt)
            return torch.cat([kept.to(dt), z], dim=1)


class LearnedPrior3d(nn.Module):
    """Top-level diagonal Gaussian with learned per-position mean and log-std (zero-initialised).

    ``forward(z) -> (eps, logdet)``, ``reverse(eps) -> z``.
    """

    def __init__(self, channels: int, spatial: int):
        super().__init__()
        shape = (1, channels, spatial, spatial, spatial)
        self.mean = nn.Parameter(torch.zeros(shape))
        self.log_sd = nn.Parameter(torch.zeros(shape))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = _work_dtype(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            log_sd = self.log_sd.to(dt)
            eps = (z.to(dt) - self.mean.to(dt)) * torch.exp(-log_sd)
            logdet = (-log_sd.sum()).expand(z.shape[0])
        return eps, logdet

    def reverse(self, eps: torch.Tensor) -> torch.Tensor:
        dt = _work_dtype(eps)
        with torch.autocast(device_type=eps.device.type, enabled=False):
            return self.mean.to(dt) + torch.exp(self.log_sd.to(dt)) * eps.to(dt)
