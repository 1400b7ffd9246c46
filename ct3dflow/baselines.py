"""Baselines scored by the same grid, map, decision and metrics as the flow (the paper's "AE" row).

:class:`ConvAE3D` is a 3D convolutional autoencoder with the surface of :class:`ct3dflow.flow.Glow3D`
(``forward(x) == log_prob(x)``, ``dim``, ``bits_per_dim``, ``initialize``, ``config``, ``save``/``load``),
so :class:`ct3dflow.train.FlowTrainer`, the Ray Train job, scoring and the MLflow registry handle it
unchanged (``TrainConfig(model="ae")``).

**The likelihood proxy.** An autoencoder has no density. We read its decoder as a Gaussian with a fixed
standard deviation ``s`` per voxel, ``p(x) = N(x; AE(x), s²·I)``::

    log_prob(x) = −‖x − AE(x)‖² / (2 s²) − D/2 · log(2π s²)

with ``D`` voxels per patch. For a fixed ``s`` this is an affine, decreasing function of the squared
reconstruction error, so

* maximising it (what ``FlowTrainer`` does: it minimises the bits/dim of ``log_prob``) is minimising the
  MSE — the ordinary autoencoder objective, with the trainer's warm-up, clipping, non-finite guard and
  1-HU dequantisation noise (a negligible denoising term) applied unchanged;
* the decision does not depend on ``s`` at all: τ is a z-score of the healthy validation patch values and
  the Log P map is a convex combination of patch values, so any affine change of ``ℓ_p`` cancels.
  ``s`` only sets the scale of the reported nats and bits/dim. Default ``s = 8 HU`` (``8/1220`` of the
  normalised range), roughly the noise level of a 2 mm resampled chest CT; ``noise_hu`` changes it.

**Architecture** (configurable, tiny for tests): ``depth`` stride-2 convolution stages halve the patch
each (``patch_size`` must be divisible by ``2**depth``) and double the channels from ``width``; a 1×1×1
bottleneck to ``latent_channels``; the decoder mirrors it with transposed convolutions; SiLU activations,
a linear output. With ``TrainConfig(model="ae")``, ``levels`` is the depth and ``width`` the first
stage's channels (``steps`` is unused).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .flow import HU_BINS, nats_to_bits_per_dim
from .flow.persist import SavedModule

FORMAT = "ct3dflow-ae-v1"
DEFAULT_NOISE_HU = 8.0

__all__ = ["FORMAT", "ConvAE3D"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.SiLU())


class ConvAE3D(SavedModule, nn.Module):
    """3D convolutional autoencoder with a Gaussian-decoder log-likelihood proxy (see the module doc)."""

    KIND = "ae"
    FORMAT = FORMAT
    FORMAT_FAMILY = "ct3dflow-ae"
    FILE_WHAT = "ct3dflow autoencoder"

    def __init__(self, depth: int = 3, width: int = 16, patch_size: int = 48, latent_channels: int | None = None,
                 in_channels: int = 1, noise_hu: float = DEFAULT_NOISE_HU):
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1:
            raise ValueError("depth, width and in_channels must be positive")
        if patch_size % (2**depth):
            raise ValueError(f"patch_size {patch_size} is not divisible by 2**depth = {2**depth}")
        if not noise_hu > 0:
            raise ValueError("noise_hu (the decoder's standard deviation in HU) must be positive")
        self.depth, self.width, self.patch_size, self.in_channels = depth, width, patch_size, in_channels
        self.latent_channels = int(latent_channels or width)
        self.noise_hu = float(noise_hu)
        chans = [width * 2**i for i in range(depth + 1)]
        enc: list[nn.Module] = [_block(in_channels, chans[0])]
        for i in range(depth):
            enc += [nn.Conv3d(chans[i], chans[i + 1], 4, stride=2, padding=1), nn.SiLU()]
        enc += [nn.Conv3d(chans[-1], self.latent_channels, 1)]
        dec: list[nn.Module] = [nn.Conv3d(self.latent_channels, chans[-1], 1), nn.SiLU()]
        for i in reversed(range(depth)):
            dec += [nn.ConvTranspose3d(chans[i + 1], chans[i], 4, stride=2, padding=1), nn.SiLU()]
        dec += [nn.Conv3d(chans[0], in_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.dim = in_channels * patch_size**3

    # ----------------------------------------------------------------------------------- configuration
    def config(self) -> dict:
        return {"depth": self.depth, "width": self.width, "patch_size": self.patch_size,
                "latent_channels": self.latent_channels, "in_channels": self.in_channels,
                "noise_hu": self.noise_hu}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def noise_std(self) -> float:
        """``s`` in the normalised units of the patches (one HU is ``1/1220``)."""
        return self.noise_hu / HU_BINS

    def is_initialized(self) -> bool:
        return True

    def initialize(self, x: torch.Tensor) -> bool:
        """Nothing to initialise from data (the flow's ActNorm needs it); returns False."""
        return False

    # ------------------------------------------------------------------------------------ model
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def squared_error(self, x: torch.Tensor) -> torch.Tensor:
        """``‖x − AE(x)‖²`` per sample, ``(B,)`` in float32."""
        r = self.reconstruct(x)
        return (x.float() - r.float()).pow(2).flatten(1).sum(1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian-decoder proxy ``−‖x − AE(x)‖²/(2s²) − D/2·log(2πs²)``, ``(B,)`` nats."""
        s2 = self.noise_std**2
        return -self.squared_error(x) / (2.0 * s2) - 0.5 * self.dim * math.log(2.0 * math.pi * s2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Same 1-HU-bin convention as the flow: ``(−log p(x) + D·log 1220) / (D·log 2)``."""
        return nats_to_bits_per_dim(self.log_prob(x), self.dim)
