"""Model files: configuration + state dict, written atomically, read with ``torch.load(weights_only=True)``.

Shared by :class:`~ct3dflow.flow.Glow3D` and the baselines (:class:`ct3dflow.baselines.ConvAE3D`): a class
sets ``FORMAT`` (written into the file), ``FORMAT_FAMILY`` (what a readable file's format starts with),
``FILE_WHAT`` (for the error message) and implements ``config()``; its constructor takes that config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch


class SavedModule:
    FORMAT: ClassVar[str] = ""
    FORMAT_FAMILY: ClassVar[str] = ""
    FILE_WHAT: ClassVar[str] = "ct3dflow model"

    def save(self, path: str | os.PathLike) -> None:
        """Write configuration + state dict (atomically: tmp file, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": self.FORMAT,
            "config": self.config(),
            "dtype": str(next(self.parameters()).dtype).removeprefix("torch."),
            # CPU tensors: a model trained on a GPU must load on a CPU-only scoring node
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None):
        payload = read_model_file(path)
        family = cls.FORMAT_FAMILY or cls.FORMAT
        if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith(family):
            raise ValueError(f"{path} is not a {cls.FILE_WHAT} file (format {cls.FORMAT!r} expected)")
        try:
            model = cls(**payload["config"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is a {cls.FILE_WHAT} file whose configuration this version cannot build "
                             f"({type(exc).__name__}: {exc}); was it written by another version of ct3dflow?") from None
        model.to(getattr(torch, payload.get("dtype", "float32")))
        model.load_state_dict(payload["state_dict"])
        if isinstance(map_location, str | torch.device):
            model.to(map_location)
        return model


def read_model_file(path: str | os.PathLike):
    """The payload of a model file (``torch.load`` with ``weights_only=True``: a file cannot run code), or an
    error that names the file and says what a model file is."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {path} not found") from None
    except Exception as exc:  # noqa: BLE001 - torch's unpickling advice (weights_only=False) would be unsafe here
        raise ValueError(f"{path} is not a ct3dflow model file (the model.pt of `ct3dflow train-local` or of the "
                         f"train job; torch could not read it: {type(exc).__name__})") from None
