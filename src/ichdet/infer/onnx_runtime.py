"""A bundle's ONNX graphs run through onnxruntime, in place of the torch networks they were exported from.

:mod:`ichdet.infer.onnx_export` writes two kinds of graph per fold (see there for the exporters):

* a 2D run's CNN, ``image`` uint8 (N, C, H, W) -> ``embedding`` float32 (N, features + 6): the input
  normalisation (:class:`ichdet.models.engine.Normalizer`) and :func:`ichdet.models.engine.embed` in one
  graph, so the pass feeds it the uint8 batch the torch path would normalise;
* a sequence member's model, ``features`` float32 (B, L, F) and ``mask`` bool (B, L) -> ``logits``
  float32 (B, L, 6).

Both are wrapped as parameterless :class:`torch.nn.Module` subclasses taking and returning torch tensors,
so :mod:`ichdet.infer.passes` and :mod:`ichdet.infer.seq_predict` treat a bundle's ONNX networks as
they treat its torch ones (``.to``, ``.eval``, calling them). A session runs on the CPU
(``CPUExecutionProvider``), or on CUDA when the caller's device is a GPU and onnxruntime has the CUDA
provider; its intra-op threads are the cores this process may use, shared out among torchrun's ranks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from ichdet.errors import CheckpointError

__all__ = ["OnnxEmbedder", "OnnxSequence", "cpu_threads", "session"]

#: The graph's metadata key for a CNN's embedding width (timm's ``num_features``).
FEATURES_KEY = "ichdet.num_features"


def cpu_threads() -> int:
    """Cores this process may use (its CPU affinity), divided among torchrun's local ranks; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))))


def session(graph: bytes, what: str, device: torch.device | None = None, level: str = "all",
            threads: int | None = None) -> Any:
    """An onnxruntime InferenceSession of ``graph`` (ONNX bytes); CheckpointError naming ``what`` if unreadable.

    ``level``: onnxruntime's graph optimisation level (``disable``, ``basic``, ``extended``, ``all``).
    """
    import onnxruntime as ort  # only where an ONNX bundle runs

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1  # the graphs are chains: parallel branches would only compete for cores
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(graph, options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types for an unreadable graph
        raise CheckpointError(f"{what}: not an ONNX graph onnxruntime can run ({str(err).splitlines()[0]})") from None


def _torch(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(array).to(like.device)


class OnnxEmbedder(nn.Module):
    """A 2D fold's ONNX graph: uint8 images (N, C, H, W) -> float32 embedding and logits (N, features + 6)."""

    def __init__(self, graph: bytes, what: str, device: torch.device | None = None) -> None:
        super().__init__()
        self.session = session(graph, what, device)
        meta = self.session.get_modelmeta().custom_metadata_map
        if FEATURES_KEY not in meta:
            raise CheckpointError(f"{what}: the ONNX graph does not say its embedding width ({FEATURES_KEY}); "
                                  "write the bundle again with `ichdet bundle --runtime onnx`")
        self.num_features = int(meta[FEATURES_KEY])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding and logits of every image (uint8, not normalised: the graph does that)."""
        x = np.ascontiguousarray(images.cpu().numpy())
        return _torch(self.session.run(None, {"image": x})[0], images)


class OnnxSequence(nn.Module):
    """A sequence fold's ONNX graph: features (B, L, F) and mask (B, L) -> logits (B, L, 6), as SequenceModel."""

    def __init__(self, graph: bytes, what: str, device: torch.device | None = None) -> None:
        super().__init__()
        self.session = session(graph, what, device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of every slice of every series (padding as the torch model: masked out)."""
        feed = {"features": np.ascontiguousarray(x.float().cpu().numpy()),
                "mask": np.ascontiguousarray(mask.cpu().numpy().astype(bool))}
        return _torch(self.session.run(None, feed)[0], x)
