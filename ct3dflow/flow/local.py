"""Where in a patch the log-likelihood comes from: a per-voxel decomposition of ``Glow3D.log_prob``.

Not in the paper (which scores whole patches). Every term of the GLOW log-likelihood lives on the grid of
its level: at level ``l`` (after ``l`` squeezes) a cell covers ``(2**l)³`` voxels. The coupling
log-scales, the split priors' ``−log σ`` and ``log N(ε)`` are per cell; ActNorm and the 1×1×1
convolution add the same amount to every cell. Spreading each cell's terms evenly over its voxels gives a
``(B, S, S, S)`` map whose sum over voxels is ``log_prob(x)`` exactly (``part="all"``).

``part="top_latent"`` keeps only ``−½‖ε‖²`` of the coarsest level: how unusual the patch's coarse
structure (mean density of 2**L-voxel blocks and their arrangement) is, without the log-determinants and
fine-level terms that reward local smoothness and noise statistics. Flows' likelihoods are dominated by
such low-level statistics (Kirichenko et al. 2020; Schirrmeister et al. 2020, who also found the coarse
latents the more semantic part); on the phantoms this term sees density changes (ground glass,
emphysema, consolidation) that the full log-likelihood misses (docs/RESULTS.md).

:func:`local_log_prob` runs the reference layers. :func:`top_latent_energy` gives the ``top_latent`` part per
cell through ``glow.encode``, so it runs on the fast encoder when one is installed (on CUDA,
:func:`ct3dflow.models.prepare_flow_encoder`). Neither needs gradients.
"""

from __future__ import annotations

import math

import torch

from .dtypes import work_dtype
from .glow import Glow3D
from .squeeze import squeeze3d

_LOG_2PI = math.log(2.0 * math.pi)
PARTS = ("all", "top_latent")


def _spread(cell_map: torch.Tensor, size: int) -> torch.Tensor:
    """(B, s, s, s) per-cell values → (B, S, S, S) per-voxel values (each cell's value shared evenly)."""
    f = size // cell_map.shape[-1]
    out = cell_map / float(f**3)
    for dim in (1, 2, 3):
        out = out.repeat_interleave(f, dim=dim)
    return out


@torch.no_grad()
def top_latent_energy(glow: Glow3D, x: torch.Tensor) -> torch.Tensor:
    """``−½‖ε_L‖²`` of the coarsest latent per cell, ``(B, s, s, s)`` with ``s = S / 2**L``: the
    ``top_latent`` part of :func:`local_log_prob` before it is spread over each cell's voxels. It reads the
    last level's block of ``glow.encode(x)`` (the standardised latent of the learned top prior)."""
    c, s = glow.latent_shapes[-1][0], glow.latent_shapes[-1][1]
    eps = glow.encode(x)[:, -c * s**3 :]
    dt = work_dtype(eps)
    return -0.5 * eps.to(dt).reshape(x.shape[0], c, s, s, s).pow(2).sum(1)


@torch.no_grad()
def local_log_prob(glow: Glow3D, x: torch.Tensor, part: str = "all") -> torch.Tensor:
    """Per-voxel log-likelihood terms ``(B, S, S, S)`` of the patches ``x`` ``(B, 1, S, S, S)``.

    ``part="all"``: sums over voxels to ``glow.log_prob(x)``. ``part="top_latent"``: ``−½‖ε_L‖²`` of the
    coarsest latent only (no constants, no log-determinants), spread over each cell's voxels.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    x = x.to(glow._param_dtype())
    dt = work_dtype(x)
    size = x.shape[-1]
    total = torch.zeros((x.shape[0], size, size, size), dtype=dt, device=x.device)
    keep_all = part == "all"
    h = x
    for i, block in enumerate(glow.blocks):
        h = squeeze3d(h)
        n_cells = h.shape[2] * h.shape[3] * h.shape[4]
        cell = torch.zeros((h.shape[0], *h.shape[2:]), dtype=dt, device=x.device)
        for step in block:
            h, ld = step.actnorm(h)
            cell += (ld.to(dt) / n_cells)[:, None, None, None] if keep_all else 0.0
            h, ld = step.invconv(h)
            cell += (ld.to(dt) / n_cells)[:, None, None, None] if keep_all else 0.0
            c = step.coupling
            x_a, x_b = h[:, : c.n_a], h[:, c.n_a :]
            shift, log_scale = c._shift_logscale(x_a, dt)
            h = torch.cat([x_a.to(dt), (x_b.to(dt) + shift) * torch.exp(log_scale)], dim=1)
            if keep_all:
                cell += log_scale.sum(1)
        if i < glow.levels - 1:
            split = glow.splits[i]
            kept, z = h[:, : split.n_keep], h[:, split.n_keep :]
            mean, log_sd = split._mean_logsd(kept, dt)
            eps = (z.to(dt) - mean) * torch.exp(-log_sd)
            if keep_all:
                cell += (-log_sd - 0.5 * (eps.pow(2) + _LOG_2PI)).sum(1)
            h = kept
        else:
            log_sd = glow.prior.log_sd.to(dt)
            eps = (h.to(dt) - glow.prior.mean.to(dt)) * torch.exp(-log_sd)
            if keep_all:
                cell += (-log_sd - 0.5 * (eps.pow(2) + _LOG_2PI)).sum(1)
            else:
                cell += (-0.5 * eps.pow(2)).sum(1)
        if keep_all or i == glow.levels - 1:
            total += _spread(cell, size)
    return total
