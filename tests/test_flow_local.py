"""Per-voxel decomposition of the GLOW log-likelihood (ct3dflow.flow.local)."""

from __future__ import annotations

import pytest
import torch

from ct3dflow.flow import Glow3D
from ct3dflow.flow.local import local_log_prob

torch.set_num_threads(2)


def _model(levels=2, size=8) -> Glow3D:
    torch.manual_seed(0)
    g = Glow3D(levels=levels, steps=2, width=8, patch_size=size).double()
    x = 0.1 * torch.randn(6, 1, size, size, size, dtype=torch.float64) - 0.3
    g.initialize(x)
    with torch.no_grad():  # away from the zero-initialised layers, where the terms are trivial
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_all_terms_sum_to_log_prob(levels):
    g = _model(levels=levels)
    x = 0.1 * torch.randn(3, 1, 8, 8, 8, dtype=torch.float64) - 0.3
    m = local_log_prob(g, x, part="all")
    assert m.shape == (3, 8, 8, 8)
    with torch.no_grad():
        ref = g.log_prob(x)
    assert torch.allclose(m.sum((1, 2, 3)), ref, rtol=1e-10, atol=1e-8)
    assert m.std() > 0  # not one number spread evenly


def test_top_latent_is_half_squared_norm_of_the_coarsest_epsilon():
    g = _model(levels=2)
    x = 0.1 * torch.randn(2, 1, 8, 8, 8, dtype=torch.float64) - 0.3
    with torch.no_grad():
        eps = g.encode(x)
    c, s = g.latent_shapes[-1][0], g.latent_shapes[-1][1]
    top = eps[:, -c * s**3 :].reshape(2, c, s, s, s)
    m = local_log_prob(g, x, part="top_latent")
    assert torch.allclose(m.sum((1, 2, 3)), -0.5 * top.pow(2).sum((1, 2, 3, 4)), rtol=1e-10)
    # each top cell covers a 4³ block (two squeezes): constant inside, its own share of the cell's terms
    cell = (-0.5 * top.pow(2).sum(1))[0, 1, 0, 1] / 64
    assert torch.allclose(m[0, 4:8, 0:4, 4:8], cell.expand(4, 4, 4))


def test_a_local_change_moves_the_map_mostly_where_it_happened():
    g = _model(levels=2)
    x = 0.1 * torch.randn(1, 1, 8, 8, 8, dtype=torch.float64) - 0.3
    y = x.clone()
    y[0, 0, :2, :2, :2] += 0.5
    d = (local_log_prob(g, y) - local_log_prob(g, x)).abs()[0]
    assert d[:4, :4, :4].sum() > d[4:, 4:, 4:].sum()


def test_unknown_part_is_rejected():
    with pytest.raises(ValueError, match="part must be one of"):
        local_log_prob(_model(), torch.zeros(1, 1, 8, 8, 8, dtype=torch.float64), part="fine")
