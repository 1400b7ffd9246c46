"""Patch scorers by kind: anything with ``log_prob(x: (B,1,S,S,S)) -> (B,)`` that scoring can use.

The flow's ``log_prob`` is an exact log-likelihood; a baseline (e.g. the autoencoder) exposes a
likelihood *proxy* under the same name so the same grid, map, decision and metrics apply to it.
"""

from __future__ import annotations

import os

import torch

from .flow import Glow3D


def model_kind(path: str | os.PathLike) -> str:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return str(payload.get("format", "")) if isinstance(payload, dict) else ""


def load_patch_scorer(path: str | os.PathLike, map_location=None):
    kind = model_kind(path)
    if kind.startswith("ct3dflow-ae"):
        from .baselines import ConvAE3D

        return ConvAE3D.load(path, map_location=map_location)
    return Glow3D.load(path, map_location=map_location)


def prepare_for_scoring(model, device, batch_size: int = 64, bf16: bool = False):
    """The model as scoring should run it: on CUDA a Glow3D gets the fast path and CUDA graphs
    (:mod:`ct3dflow.flow.fast`, exact in fp32); elsewhere, and for baselines, the model itself."""
    model = model.to(device).eval()
    if torch.device(device).type != "cuda" or not isinstance(model, Glow3D):
        return model
    from .flow.fast import optimise

    return optimise(model, device, mode="score", compile=False, batch_size=batch_size,
                    autocast_dtype=torch.bfloat16 if bf16 else None)
