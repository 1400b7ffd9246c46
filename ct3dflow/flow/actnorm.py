"""Activation normalisation (GLOW §3.1), in 3D.

Follows GLOW (Kingma & Dhariwal 2018) and rosinality/glow-pytorch: a per-channel affine map
``y = (x + loc) * exp(log_scale)`` whose parameters are set once from the first batch so that the
output has zero mean and unit variance per channel ("data-dependent initialisation").

Departures:

* the "done" flag is a registered buffer ``initialized`` (uint8), so it is saved in the state dict and
  loading a checkpoint never re-initialises the layer (a plain Python attribute would be lost);
* the scale is stored as a log (like chrischute/glow), so it stays positive;
* the log-determinant is always computed in float32 (or float64 for a float64 model), also under
  bf16 autocast.

Initialisation happens in :meth:`ActNorm3d.initialize` (called by ``Glow3D.initialize`` /
``FlowTrainer.initialise`` before DDP wraps the model). As in GLOW, an uninitialised layer in training
mode also initialises itself from its first forward input; in eval mode it stays the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from .dtypes import work_dtype as _stat_dtype


class ActNorm3d(nn.Module):
    """Per-channel affine normalisation of a ``(B, C, D, H, W)`` tensor; ``forward -> (y, logdet)``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._known_initialized = False  # caches a True buffer value, to avoid a device sync per forward

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set loc/scale so that this batch comes out with zero mean, unit std per channel."""
        xf = x.detach().to(_stat_dtype(x))
        flat = xf.transpose(0, 1).reshape(self.channels, -1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1, unbiased=False)
        self.loc.copy_((-mean).view_as(self.loc))
        self.log_scale.copy_((-torch.log(std + self.eps)).view_as(self.log_scale))
        self.initialized.fill_(1)
        self._known_initialized = True

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        n_spatial = x.shape[2] * x.shape[3] * x.shape[4]
        with torch.autocast(device_type=x.device.type, enabled=False):
            ls = self.log_scale.to(_stat_dtype(self.log_scale))
            return (n_spatial * ls.sum()).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self.is_initialized():
            self.initialize(x)
        y = (x + self.loc) * torch.exp(self.log_scale)
        return y, self._logdet(x)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.loc
