"""Invertible 1×1×1 convolution, LU-parametrised (GLOW §3.2), in 3D.

Follows GLOW's LU decomposition ``W = P · L · (U + diag(sign(s) · exp(log|s|)))`` with ``P`` a fixed
permutation, ``L`` lower-triangular with unit diagonal and ``U`` strictly upper-triangular, initialised
from a random rotation (as rosinality/glow-pytorch ``InvConv2dLU``). The log-determinant is
``D·H·W · Σ log|s|`` — O(C) instead of an O(C³) ``slogdet``.

Departures: the weight is assembled with autocast disabled, in float32 (float64 for a float64 model), and
the convolution itself also runs in float32 under bf16 autocast, so the main stream of the flow never
passes through a bf16 rounding here (the 1×1×1 conv is cheap next to the coupling networks). The inverse
for :meth:`reverse` is computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class InvConv3dLU(nn.Module):
    """``y = W x`` over channels at every voxel; ``forward -> (y, logdet)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("w_p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.w_l = nn.Parameter(lower * self.l_mask)
        self.w_u = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(C, C)`` matrix, assembled outside autocast in float32 (float64 for a float64 model)."""
        dt = dtype or _work_dtype(self.w_l)
        with torch.autocast(device_type=self.w_l.device.type, enabled=False):
            lmask = self.l_mask.to(dt)
            lower = self.w_l.to(dt) * lmask + self.eye.to(dt)
            upper = self.w_u.to(dt) * lmask.T + torch.diag(self.sign_s.to(dt) * torch.exp(self.log_s.to(dt)))
            return self.w_p.to(dt) @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = _work_dtype(x)
        n_spatial = x.shape[2] * x.shape[3] * x.shape[4]
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = self.weight(dt)
            y = F.conv3d(x.to(dt), w.view(self.channels, self.channels, 1, 1, 1))
            logdet = (n_spatial * self.log_s.to(dt).sum()).expand(x.shape[0])
        return y, logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        dt = _work_dtype(y)
        with torch.autocast(device_type=y.device.type, enabled=False):
            w_inv = torch.linalg.inv(self.weight(torch.float64)).to(dt)
            return F.conv3d(y.to(dt), w_inv.view(self.channels, self.channels, 1, 1, 1))
