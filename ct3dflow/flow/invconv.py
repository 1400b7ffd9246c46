"""Invertible 1×1×1 convolution, LU-parametrised (GLOW §3.2), in 3D.

Follows GLOW's LU decomposition ``W = P · L · (U + diag(sign(s) · exp(log|s|)))`` with ``P`` a fixed
permutation, ``L`` lower-triangular with unit diagonal and ``U`` strictly upper-triangular, initialised
from a random rotation (as rosinality/glow-pytorch ``InvConv2dLU``). The log-determinant is
``D·H·W · Σ log|s|`` — O(C) instead of an O(C³) ``slogdet``.

Departures: the weight is assembled with autocast disabled, in float32 (float64 for a float64 model), and
the convolution itself also runs in float32 under bf16 autocast, so the main stream of the flow never
passes through a bf16 rounding here (the 1×1×1 conv is cheap next to the coupling networks). The inverse
for :meth:`reverse` is computed in float64.

Speed (numerically identical results): the permutation ``P`` is applied as a row gather instead of a
``C×C`` matmul, and in eval mode under ``torch.no_grad`` the assembled ``W`` is cached
(:func:`weight_cache_key`): the cache is dropped by ``train()``/``eval()`` and is rebuilt whenever a
parameter or buffer changes in place (``load_state_dict``, in-place ops: their ``_version`` counters
move), after any optimizer step (fused optimizers do not move ``_version``, so a global optimizer
step hook counts steps, :func:`optimizer_steps`), when a tensor moves (``.to()``: data pointer, device,
dtype) or when the requested dtype differs. Direct ``.data`` edits are not seen: call ``eval()`` after
them. It is never used with autograd enabled, inside ``torch.compile`` or during CUDA-graph capture (there ``W`` is
recomputed from the parameters, so a captured graph follows in-place weight updates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .dtypes import work_dtype as _work_dtype

_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


# Fused optimizers (``Adam(fused=True)``, also on CUDA) update parameters without moving their version
# counters; every ``Optimizer.step`` anywhere in the process therefore invalidates the weight caches.
register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many ``torch.optim.Optimizer.step`` calls this process has made (any optimizer)."""
    return _optimizer_steps[0]


def weight_cache_key(tensors, *extra) -> tuple | None:
    """A key that changes whenever one of ``tensors`` is modified in place (``_version``), replaced or
    moved (data pointer, dtype, device), or any optimizer steps.

    ``None`` (do not cache) for inference tensors, which have no version counter. Direct ``.data``
    edits are not seen: call ``eval()`` (or ``train()``) afterwards, which drops the caches.
    """
    try:
        return (_optimizer_steps[0], *extra, *((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors))
    except RuntimeError:
        return None


def caching_allowed(module: nn.Module) -> bool:
    """Eval mode, no autograd, not tracing for ``torch.compile``, not capturing a CUDA graph."""
    if module.training or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


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
        self._w_cache: tuple | None = None  # (key, W) in eval mode under no_grad; see weight_cache_key
        self._aux_cache: dict = {}  # for ct3dflow.flow.fast (fused ActNorm + W), same rules

    def train(self, mode: bool = True):
        self._w_cache = None
        self._aux_cache = {}
        return super().train(mode)

    def _lu_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.w_l, self.w_u, self.log_s, self.w_p, self.sign_s, self.l_mask, self.eye)

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(C, C)`` matrix, assembled outside autocast in float32 (float64 for a float64 model)."""
        dt = dtype or _work_dtype(self.w_l)
        with torch.autocast(device_type=self.w_l.device.type, enabled=False):
            lmask = self.l_mask.to(dt)
            lower = self.w_l.to(dt) * lmask + self.eye.to(dt)
            upper = self.w_u.to(dt) * lmask.T + torch.diag(self.sign_s.to(dt) * torch.exp(self.log_s.to(dt)))
            # P @ L as a row gather (P is a permutation matrix: P[i, perm[i]] = 1), bit-identical to the matmul
            perm = self.w_p.argmax(dim=1)
            return lower.index_select(0, perm) @ upper

    def cached_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`weight`, cached in eval mode under ``no_grad`` (see the module docstring)."""
        dt = dtype or _work_dtype(self.w_l)
        if not caching_allowed(self):
            return self.weight(dt)
        key = weight_cache_key(self._lu_tensors(), dt)
        if key is None:
            return self.weight(dt)
        if self._w_cache is None or self._w_cache[0] != key:
            self._w_cache = (key, self.weight(dt))
        return self._w_cache[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = _work_dtype(x)
        n_spatial = x.shape[2] * x.shape[3] * x.shape[4]
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = self.cached_weight(dt)
            y = F.conv3d(x.to(dt), w.view(self.channels, self.channels, 1, 1, 1))
            logdet = (n_spatial * self.log_s.to(dt).sum()).expand(x.shape[0])
        return y, logdet

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        dt = _work_dtype(y)
        with torch.autocast(device_type=y.device.type, enabled=False):
            w_inv = torch.linalg.inv(self.weight(torch.float64)).to(dt)
            return F.conv3d(y.to(dt), w_inv.view(self.channels, self.channels, 1, 1, 1))
