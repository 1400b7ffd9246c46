"""3D GLOW normalizing flow.

One small module per layer, each ``forward(x) -> (y, logdet)`` and ``reverse(y) -> x``.
"""

from .actnorm import ActNorm3d
from .coupling import AffineCoupling3d, CouplingNet3d, ZeroConv3d
from .glow import DEFAULT_WIDTH, HU_BINS, FlowStep3d, Glow3D, nats_to_bits_per_dim
from .invconv import InvConv3dLU
from .squeeze import LearnedPrior3d, Split3d, Squeeze3d, squeeze3d, unsqueeze3d

__all__ = [
    "DEFAULT_WIDTH",
    "HU_BINS",
    "ActNorm3d",
    "AffineCoupling3d",
    "CouplingNet3d",
    "FlowStep3d",
    "Glow3D",
    "InvConv3dLU",
    "LearnedPrior3d",
    "Split3d",
    "Squeeze3d",
    "ZeroConv3d",
    "nats_to_bits_per_dim",
    "squeeze3d",
    "unsqueeze3d",
]
