"""Checkpoints that rebuild themselves and load safely.

``last.pt`` (training state, every epoch) is a plain dict of tensors, numbers and strings, loaded
with ``torch.load(weights_only=True)``; ``best.safetensors`` holds the weights prediction uses.
A file that would need arbitrary code to unpickle is refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ichdet.errors import CheckpointError
from ichdet.io import atomic_path


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write a training-state dict atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training-state dict with ``weights_only=True``; refuse anything that runs code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not unsafe:
            raise CheckpointError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None
        raise CheckpointError(
            f"{path}: refused to load: unpickling it could run code ({unsafe[0]}). Only load "
            "checkpoints from a source you trust, and convert them to safetensors first.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, found {type(state).__name__}")
    return state


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write a model's weights as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors (or a ``weights_only`` ``.pt`` state) into ``model``; every key must match."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        state = load_state(path)
        tensors = state.get("model", state)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the configured architecture: "
                              f"{str(err).splitlines()[0]}") from None
    return model
