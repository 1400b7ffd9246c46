"""Affine coupling layer (GLOW §3.3, RealNVP), in 3D, and GLOW's zero-initialised convolution.

Follows GLOW / rosinality/glow-pytorch: the first half of the channels ``x_a`` passes unchanged and
parametrises an affine map of the second half, ``y_b = (x_b + shift) * scale`` with
``scale = sigmoid(h + 2)`` (GLOW's code, not the paper's ``exp``), so the layer starts close to the
identity and can only shrink, which keeps the flow stable. The network is
Conv3d 3×3×3 → ReLU → Conv3d 1×1×1 → ReLU → :class:`ZeroConv3d` 3×3×3 (width = hidden channels);
shift and scale are interleaved in its output (``h[:, 0::2]``, ``h[:, 1::2]``) as in GLOW's code.

Departures: GLOW's hidden convolutions use ActNorm, rosinality's a normal(0, 0.05) init; we use the
latter. :class:`ZeroConv3d` pads with zeros (rosinality pads with ones). Scale, log-scale and the
log-determinant are computed in float32 (float64 for a float64 model) even when the network runs under
bf16 autocast, and ``log(scale)`` is taken as ``logsigmoid(h + 2)``, which never gives ``-inf``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import work_dtype as _work_dtype


class ZeroConv3d(nn.Module):
    """3×3×3 convolution with zero-initialised weight and bias and a learned per-channel log-scale.

    ``out = conv(x) * exp(3 * logs)`` as GLOW's ``conv2d_zeros`` (``logscale_factor=3``).
    """

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return h * torch.exp(self.logs * self.logscale_factor).to(h.dtype)


class CouplingNet3d(nn.Module):
    """Conv3d 3×3×3 → ReLU → Conv3d 1×1×1 → ReLU → ZeroConv3d 3×3×3."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv3d(width, width, 1)
        self.zero = ZeroConv3d(width, out_channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0.0, 0.05)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.zero(F.relu(self.conv2(F.relu(self.conv1(x)))))


class AffineCoupling3d(nn.Module):
    """Affine coupling on the second half of the channels; ``forward -> (y, logdet)``."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {channels}")
        self.n_a = channels // 2
        self.n_b = channels - self.n_a
        self.net = CouplingNet3d(self.n_a, 2 * self.n_b, width)

    def _shift_logscale(self, x_a: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x_a)
        with torch.autocast(device_type=x_a.device.type, enabled=False):
            h = h.to(dt)
            return h[:, 0::2], F.logsigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = _work_dtype(x)
        x_a, x_b = x[:, : self.n_a], x[:, self.n_a :]
        shift, log_scale = self._shift_logscale(x_a, dt)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y_b = (x_b.to(dt) + shift) * torch.exp(log_scale)
            logdet = log_scale.flatten(1).sum(1)
            y = torch.cat([x_a.to(dt), y_b], dim=1)
        return y, logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        dt = _work_dtype(y)
        y_a, y_b = y[:, : self.n_a], y[:, self.n_a :]
        shift, log_scale = self._shift_logscale(y_a, dt)
        with torch.autocast(device_type=y.device.type, enabled=False):
            x_b = y_b.to(dt) * torch.exp(-log_scale) - shift
            return torch.cat([y_a.to(dt), x_b], dim=1)
