"""Patch scorers by kind: anything with ``log_prob(x: (B,1,S,S,S)) -> (B,)`` that scoring can use.

The flow's ``log_prob`` is an exact log-likelihood; a baseline (e.g. the autoencoder) exposes a
likelihood *proxy* under the same name so the same grid, map, decision and metrics apply to it.
"""

from __future__ import annotations

import os

import torch

from .flow import Glow3D


def model_kind(path: str | os.PathLike) -> str:
    from .flow.persist import read_model_file

    payload = read_model_file(path)
    return str(payload.get("format", "")) if isinstance(payload, dict) else ""


def load_patch_scorer(path: str | os.PathLike, map_location=None):
    kind = model_kind(path)
    if kind.startswith("ct3dflow-ae"):
        from .baselines import ConvAE3D

        return ConvAE3D.load(path, map_location=map_location)
    return Glow3D.load(path, map_location=map_location)


def channels_last_on_cpu(model, device):
    """On the CPU, ``model`` with its 3-D convolution weights in the channels-last layout (in place; returned).

    oneDNN's 3-D convolutions then run without reordering their operands, and the activations follow the
    weights' layout through every elementwise step: on 2 AMD EPYC cores with AVX2, the detection model's voxel
    map of a realistic study took 21.0 s instead of 29.2 s, a training step of it 1.40 s instead of 1.62 s
    (docs/BENCHMARKS.md). The numbers equal the contiguous layout's up to
    float32 summation order. Elsewhere (CUDA) the model is returned unchanged: the fast path has its own layout.
    """
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last_3d)
    return model


def prepare_for_scoring(model, device, batch_size: int = 64, bf16: bool = False):
    """The model as the patch map's scorer runs it (``.log_prob``): on CUDA a Glow3D gets the fast path and
    CUDA graphs (:mod:`ct3dflow.flow.fast`, exact in fp32); elsewhere, and for baselines, the reference layers
    with channels-last weights (:func:`channels_last_on_cpu`; the CPU's fast path, docs/BENCHMARKS.md)."""
    model = model.to(device).eval()
    if torch.device(device).type != "cuda" or not isinstance(model, Glow3D):
        return channels_last_on_cpu(model, device)
    from .flow.fast import optimise

    return optimise(model, device, mode="score", compile=False, batch_size=batch_size,
                    autocast_dtype=torch.bfloat16 if bf16 else None)


def prepare_flow_encoder(glow: Glow3D, device, force: bool = False) -> Glow3D:
    """The flow as the voxel map's scorer runs it (``.encode``): on CUDA the fast encoder of
    :mod:`ct3dflow.flow.fast` (channels-last, folded ActNorm, tap GEMMs; exact in fp32) without CUDA graphs,
    whose fixed batch the per-window latent does not need; on the CPU the reference layers with channels-last
    weights (:func:`channels_last_on_cpu`; ``force`` installs the fast encoder there instead, for the
    exactness test)."""
    glow = glow.to(device).eval()
    if torch.device(device).type != "cuda" and not force:
        return channels_last_on_cpu(glow, device)
    from .flow.fast import optimise

    optimise(glow, device, mode="score", compile=False, cuda_graphs=False, force_cpu=force)
    return glow
