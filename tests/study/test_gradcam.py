"""Grad-CAM: exact maps of hand-built networks, a real timm backbone, model inputs and overlay images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ichdet.errors import ConfigError
from ichdet.models.backbones import build_model, input_stats
from ichdet.models.config import DataConfig, ModelConfig
from ichdet.names import LABELS
from ichdet.study.gradcam import cam_overlays, cam_target_layer, model_inputs, overlay_rgb, study_figures
from ichdet.study.html import REPORT_WINDOWS

SIZE = 32


class BlobNet(nn.Module):
    """features = mean over channels of the normalised input (1x1 conv), logit j = sign_j * mean(features).

    Grad-CAM's channel weight is then sign_j / (H * W) (> 0 for +1), so the map of label j is
    relu(sign_j * features), scaled to [0, 1]: computable by hand from the input.
    """

    def __init__(self, signs: list[float]) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(1, len(LABELS), bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0 / 3.0)
            self.head.weight.copy_(torch.tensor(signs).view(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def blob_image(value: int = 255, background: int = 0) -> np.ndarray:
    """uint8 (1, 3, SIZE, SIZE): a bright square at rows/cols 8..15 on a dark background."""
    img = np.full((1, 3, SIZE, SIZE), background, np.uint8)
    img[:, :, 8:16, 8:16] = value
    return img


def expected_cam(images: np.ndarray, sign: float) -> np.ndarray:
    """relu(sign * mean_c normalised input), divided by its maximum: the map BlobNet must give."""
    mean, std = (t.numpy().reshape(1, 3, 1, 1) for t in input_stats(BlobNet([1.0] * 6), 3))
    feature = ((images / 255.0 - mean) / std).mean(axis=1)
    relu = np.maximum(sign * feature, 0.0)
    return relu / relu.max(axis=(1, 2), keepdims=True)


CFG = DataConfig(image_size=SIZE)


@pytest.mark.parametrize(("label", "sign", "value"), [
    ("any", 1.0, 255),            # the logit grows with the blob: the blob is the map
    ("any", 1.0, 160),            # a dimmer blob, still above the normalised mean
    ("epidural", -1.0, 255),      # the logit falls with brightness: the dark background is the map
])
def test_cam_of_blob_net_is_known(label: str, sign: float, value: int) -> None:
    signs = [1.0] * len(LABELS)
    signs[LABELS.index(label)] = sign
    images = blob_image(value)
    cam = cam_overlays([BlobNet(signs)], CFG, images, label=label)
    assert cam.shape == (1, SIZE, SIZE) and cam.dtype == np.float32
    np.testing.assert_allclose(cam, expected_cam(images.astype(np.float64), sign), atol=1e-5)
    inside = cam[0, 8:16, 8:16]
    assert (inside.min() == pytest.approx(1.0, abs=1e-5)) == (sign > 0)


@pytest.mark.parametrize(("context", "frozen"), [(torch.no_grad, False), (torch.inference_mode, False),
                                               (torch.no_grad, True)])
def test_cam_inside_a_no_grad_caller(context: type, frozen: bool) -> None:
    images, model = blob_image(), BlobNet([1.0] * 6).requires_grad_(not frozen)
    with context():
        cam = cam_overlays([model], CFG, images)
    np.testing.assert_allclose(cam, expected_cam(images.astype(np.float64), 1.0), atol=1e-5)


def test_cam_is_mean_over_models() -> None:
    images = blob_image()
    up, down = BlobNet([1.0] * 6), BlobNet([-1.0] * 6)
    cam = cam_overlays([up, down], CFG, images, label="subdural")
    expected = (expected_cam(images.astype(np.float64), 1.0) + expected_cam(images.astype(np.float64), -1.0)) / 2
    np.testing.assert_allclose(cam, expected, atol=1e-5)
    np.testing.assert_allclose(cam, 0.5, atol=1e-5)  # blob and background each lit by one model


def test_cam_of_timm_resnet18() -> None:
    """A real backbone whose "any" logit is the sum of the pooled layer4 features: its CAM is that sum
    over channels of layer4's (post-ReLU) output, scaled to [0, 1] and resized (bilinear) to the image."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False), in_chans=3).eval()
    with torch.no_grad():
        model.fc.weight[LABELS.index("any")] = 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert cam_target_layer(model, 3, 64) is model.layer4
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    cam = cam_overlays([model, model], DataConfig(image_size=64), images, label="any")
    assert cam.shape == (2, 64, 64) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0.0 and cam.max() <= 1.0
    features: list[torch.Tensor] = []
    handle = model.layer4.register_forward_hook(lambda _m, _a, out: features.append(out))
    mean, std = input_stats(model, 3)
    with torch.no_grad():
        model((torch.from_numpy(images).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    handle.remove()
    summed = features[0].sum(1).numpy()
    for k in range(2):
        scaled = (summed[k] - summed[k].min()) / (1e-7 + summed[k].max() - summed[k].min())
        np.testing.assert_allclose(cam[k], cv2.resize(scaled, (64, 64)), atol=1e-4)
    assert cam.std() > 0.05  # a map, not a constant
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("images", "label", "match"), [
    (np.zeros((1, 3, 8, 8), np.float32), "any", "uint8"),
    (np.zeros((1, 2, 8, 8), np.uint8), "any", "2 channels"),
    (np.zeros((1, 3, 8, 8), np.uint8), "bleed", "not one of"),
])
def test_cam_bad_input(images: np.ndarray, label: str, match: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=match):
        cam_overlays([BlobNet([1.0] * 6)], CFG, images, label=label)


def test_model_inputs_2_5d_channels() -> None:
    cfg = DataConfig(image_size=16, windows=["brain"], slice_offsets=[-1, 0, 1])
    # brain 40/80: 0 HU -> 0, 40 HU -> 128, 80 HU -> 255
    hus = [np.full((8, 8), hu, np.float32) for hu in (0.0, 40.0, 80.0)]
    out = model_inputs(hus, cfg)
    assert out.shape == (3, 3, 16, 16) and out.dtype == np.uint8
    # channel i is the slice at offset i - 1; past an end the slice itself stands in
    assert out[:, :, 0, 0].tolist() == [[0, 0, 128], [0, 128, 255], [128, 255, 255]]


def test_overlay_rgb_colours_the_cam() -> None:
    hu = np.full((16, 16), 40.0, np.float32)
    cam = np.zeros((8, 8), np.float32)
    cam[:4, :4] = 1.0
    rgb = overlay_rgb(hu, cam, "brain")
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[2, 2].astype(int), rgb[12, 12].astype(int)
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where the CAM is 1, blue where it is 0


def test_study_figures_top_slices() -> None:
    probs = [0.1, 0.9, 0.4]
    # the part of a study result (docs/study-result.md) that study_figures reads
    study = {"study_instance_uid": "1.2.3", "series": [{"series_instance_uid": "1.2.3.4", "slices": [
        {"index": i, "sop_instance_uid": f"1.2.3.4.{i}", "probabilities": {label: p for label in LABELS}}
        for i, p in enumerate(probs)]}]}
    hu_by_sop = {f"1.2.3.4.{i}": np.where(np.arange(24)[:, None] > 11, 60.0, 0.0) * np.ones((24, 24), np.float32)
                 for i in range(3)}
    figs = study_figures(study, hu_by_sop, [BlobNet([1.0] * 6)], DataConfig(image_size=SIZE, slice_offsets=[-1, 0, 1],
                         windows=["brain"]), top_k=2)
    assert [f.position for f in figs.slices] == [1, 2]
    assert [f.sop_uid for f in figs.slices] == ["1.2.3.4.1", "1.2.3.4.2"]
    assert list(figs.slices[0].overlays) == list(REPORT_WINDOWS)
    assert len(figs.overlays()) == 2 * len(REPORT_WINDOWS)
    assert figs.overlay_sources() == ["1.2.3.4.1"] * len(REPORT_WINDOWS) + ["1.2.3.4.2"] * len(REPORT_WINDOWS)
    assert all(img.shape == (24, 24, 3) for img in figs.overlays())
