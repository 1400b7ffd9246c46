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
