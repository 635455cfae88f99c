"""Grad-CAM saliency of the 2D ensemble members (pytorch-grad-cam) and the overlay images made from it.

Each member network sees the same windowed uint8 input the predictor gives it (normalised with the
backbone's own mean/std, as :class:`ichdet.models.engine.Normalizer` does); its Grad-CAM for one label's logit
is taken at the last spatial feature map (the layer before global pooling), scaled to ``[0, 1]`` per image
by pytorch-grad-cam, resized to the image, and the maps are averaged over the members (models x folds).
Sequence models see per-slice embeddings, not pixels: pass the 2D members (their base runs) only.

Example::

    images = model_inputs(hu_slices, data_cfg)                    # (N, C, S, S) uint8
    cams = cam_overlays(models, data_cfg, images, label="any")    # (N, S, S) float32 in [0, 1]
    rgb = overlay_rgb(hu_slices[0], cams[0], window="subdural")   # (H, W, 3) uint8 for the report
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ichdet.dicom.windowing import apply_windows, get_window, resolve_windows
from ichdet.errors import ConfigError
from ichdet.models.backbones import input_stats, unwrap
from ichdet.models.config import DataConfig
from ichdet.names import LABELS
from ichdet.study.html import REPORT_WINDOWS, ReportFigures, SliceFigure, study_slices, top_slices

__all__ = ["cam_overlays", "cam_target_layer", "model_inputs", "overlay_rgb", "study_figures"]

_CPU = torch.device("cpu")


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 at ``size`` x ``size``: area to shrink, bilinear to enlarge (as the data loader does)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    channels = [cv2.resize(np.ascontiguousarray(img[..., c]), (size, size), interpolation=interp)
                for c in range(img.shape[2])]
    return np.stack(channels, axis=-1)


def model_inputs(hu_slices: Sequence[np.ndarray], data_cfg: DataConfig) -> np.ndarray:
    """The windowed uint8 inputs (N, C, S, S) of an ordered series of HU slices, as the predictor builds them.

    Channel ``i * len(windows) + j`` is window ``j`` of the slice at ``slice_offsets[i]``; past either end
    of the series the slice itself stands in (as :class:`ichdet.models.inputs.SliceDataset` does). ``S`` is
    ``data_cfg.image_size``.
    """
    windows = resolve_windows(data_cfg.windows)
    size, n = data_cfg.image_size, len(hu_slices)
    windowed = [_resize(apply_windows(np.asarray(hu, np.float32), windows), size) for hu in hu_slices]
    out = np.empty((n, data_cfg.in_chans, size, size), np.uint8)
    for s in range(n):
        for i, offset in enumerate(data_cfg.slice_offsets):
            at = s + offset if 0 <= s + offset < n else s
            out[s, i * len(windows):(i + 1) * len(windows)] = windowed[at].transpose(2, 0, 1)
    return out


@torch.no_grad()
def cam_target_layer(model: nn.Module, in_chans: int, size: int = 64) -> nn.Module:
    """The module whose output is the network's last spatial feature map (``H * W > 1``) before pooling.

    Found by running a blank image through the network and keeping the last module (in execution
    order; a container after its children) that returned a 4-D tensor with more than one position:
    for a timm ResNet this is ``layer4``, for an EfficientNet the head's activation.
    """
    last: list[nn.Module] = []

    def hook(module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
            last.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        device = next(model.parameters()).device
        model.eval()(torch.zeros(1, in_chans, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if not last:
        raise ConfigError(f"Grad-CAM: {type(model).__name__} has no spatial feature map (no 4-D activation "
                          "larger than 1x1); Grad-CAM needs a convolutional 2D model")
    return last[-1]


class _Normalised(nn.Module):
    """uint8-scale float input -> the backbone's normalisation -> the network (one module for Grad-CAM).

    The arithmetic of :class:`ichdet.models.engine.Normalizer`, out of place: the input here needs a gradient.
    """

    def __init__(self, model: nn.Module, in_chans: int) -> None:
        super().__init__()
        mean, std = input_stats(model, in_chans)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, -1, 1, 1))
        self.register_buffer("shift", (mean / std).view(1, -1, 1, 1))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale - self.shift)


def _label_index(label: str) -> int:
    if label not in LABELS:
        raise ConfigError(f"Grad-CAM label {label!r} is not one of {', '.join(LABELS)}")
    return LABELS.index(label)


def cam_overlays(models: Sequence[nn.Module], data_cfg: DataConfig, images: np.ndarray, label: str = "any",
                 device: torch.device = _CPU, batch_size: int = 8) -> np.ndarray:
    """Grad-CAM of ``label`` for each image, averaged over ``models``: float32 (N, H, W) in ``[0, 1]``.

    ``images`` are the models' windowed uint8 inputs (N, C, H, W) (see :func:`model_inputs`); each model's
    map is scaled to ``[0, 1]`` per image by pytorch-grad-cam before the mean, so every member counts
    the same. The models are moved to ``device`` and left in eval mode, their weights unchanged.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"cam_overlays: expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    if images.shape[1] != data_cfg.in_chans:
        raise ConfigError(f"cam_overlays: images have {images.shape[1]} channels, the models take "
                          f"{data_cfg.in_chans} ({len(data_cfg.windows)} windows x "
                          f"{len(data_cfg.slice_offsets)} slices)")
    if not models:
        raise ConfigError("cam_overlays: no models given")
    target = [ClassifierOutputTarget(_label_index(label))]
    total = np.zeros((images.shape[0], images.shape[2], images.shape[3]), np.float64)
    # Grad-CAM needs gradients even where the caller predicts under no_grad or inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        for model in models:
            net = unwrap(model).to(device)
            layer = cam_target_layer(net, images.shape[1], images.shape[2])
            with GradCAM(model=_Normalised(net, images.shape[1]).to(device), target_layers=[layer]) as cam:
                for start in range(0, len(images), batch_size):
                    # an input that needs a gradient: the maps exist even for frozen (requires_grad=False) weights
                    batch = torch.from_numpy(images[start:start + batch_size]).to(device).float().requires_grad_()
                    total[start:start + len(batch)] += cam(input_tensor=batch, targets=target * len(batch))
            net.zero_grad(set_to_none=True)  # Grad-CAM's backward pass leaves gradients behind
    return np.clip(total / len(models), 0.0, 1.0).astype(np.float32)


def overlay_rgb(hu: np.ndarray, cam: np.ndarray, window: str = "brain", cam_weight: float = 0.4) -> np.ndarray:
    """The slice in ``window`` (grey) with the CAM as a jet heat map on top: uint8 (H, W, 3), RGB.

    ``cam`` (any size, values in ``[0, 1]``) is resized to the slice; ``cam_weight`` is the heat map's
    share of each pixel. An all-zero CAM still tints the slice (deep blue), so an overlay is never
    mistaken for the plain window.
    """
    if hu.ndim != 2 or cam.ndim != 2:
        raise ValueError(f"overlay_rgb: expected 2-D hu and cam, got {hu.shape} and {cam.shape}")
    grey = apply_windows(np.asarray(hu, np.float32), [get_window(window)])[..., 0]
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32) / 255.0
    mask = cv2.resize(np.clip(cam, 0.0, 1.0).astype(np.float32), (hu.shape[1], hu.shape[0]),
                      interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(rgb, mask, use_rgb=True, image_weight=1.0 - cam_weight)


def study_figures(study: Mapping[str, Any], hu_by_sop: Mapping[str, np.ndarray], models: Sequence[nn.Module],
                  data_cfg: DataConfig, top_k: int = 3, label: str = "any",
                  device: torch.device = _CPU) -> ReportFigures:
    """The report's figures of one study: its ``top_k`` slices by ``label`` in the report's windows, with CAMs.

    ``study`` is an entry of the study result's ``studies`` (docs/study-result.md). ``hu_by_sop`` maps each
    SOP Instance UID of the study's ordered slices to its HU array (only the top slices and their
    neighbours are looked up, so a lazy mapping reads no more than those); the model
    inputs of a top slice take its neighbours from the same series (2.5D). ``models`` are the 2D
    members' networks (all folds); their CAMs are averaged.
    """
    ordered = study_slices(study)
    chosen = top_slices(study, top_k, label)
    inputs = []
    for index in chosen:
        # the neighbours (2.5D) come from the same series: study_slices keeps each series contiguous
        series = ordered[index]["series_instance_uid"]
        same = [j for j, other in enumerate(ordered) if other["series_instance_uid"] == series]
        lo = max(same[0], index + min(data_cfg.slice_offsets))
        hi = min(same[-1] + 1, index + max(data_cfg.slice_offsets) + 1)
        around = model_inputs([hu_by_sop[ordered[j]["sop_instance_uid"]] for j in range(lo, hi)], data_cfg)
        inputs.append(around[index - lo])
    if not inputs:
        return ReportFigures()
    cams = cam_overlays(models, data_cfg, np.stack(inputs), label, device)
    figures = []
    for index, cam in zip(chosen, cams, strict=True):
        entry = ordered[index]
        hu = hu_by_sop[entry["sop_instance_uid"]]
        figures.append(SliceFigure(sop_uid=entry["sop_instance_uid"], position=index, label=label,
                                   probabilities=dict(entry["probabilities"]),
                                   overlays={name: overlay_rgb(hu, cam, name) for name in REPORT_WINDOWS}))
    return ReportFigures(slices=figures)
