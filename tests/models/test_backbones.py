from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ichdet.errors import ConfigError
from ichdet.models.backbones import build_model, input_stats, resolve_backbone, unwrap
from ichdet.models.config import ModelConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEED = {  # config -> timm architecture the seed's model maps to
    "seresnext50_224": "seresnext50_32x4d",
    "seresnext50_512": "seresnext50_32x4d",
    "vgg19": "vgg19",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_b2": "efficientnet_b2",
    "resnet34": "resnet34",
}


@pytest.mark.parametrize(("name", "arch"), sorted(SEED.items()))
def test_every_seed_config_builds_its_architecture(name: str, arch: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml", ["model.pretrained=false"])
    model = build_model(cfg.model, cfg.data.in_chans)
    assert model.pretrained_cfg["architecture"] == arch
    assert model.num_classes == 6
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, cfg.data.in_chans, 64, 64))
    assert out.shape == (1, 6)


@pytest.mark.parametrize(("name", "arch"), [("se_resnext50_32x4d", "seresnext50_32x4d"),
                                            ("resnet18", "resnet18"), ("convnext_tiny", "convnext_tiny"),
                                            ("resnet34.a1_in1k", "resnet34.a1_in1k")])  # a pretrained tag
def test_resolve_backbone(name: str, arch: str) -> None:
    assert resolve_backbone(name) == arch


def test_unknown_backbone_names_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet35'.*Did you mean.*resnet34"):
        resolve_backbone("resnet35")


@pytest.mark.parametrize("in_chans", [1, 3, 9])
def test_in_chans_and_gradients(in_chans: int) -> None:
    model = build_model(ModelConfig(backbone="resnet18"), in_chans)
    out = model(torch.randn(2, in_chans, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 6)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    mean, std = input_stats(model, in_chans)  # ImageNet's three channel statistics, repeated over the channels
    assert mean.tolist() == pytest.approx([(0.485, 0.456, 0.406)[i % 3] for i in range(in_chans)])
    assert std.tolist() == pytest.approx([(0.229, 0.224, 0.225)[i % 3] for i in range(in_chans)])


def test_pretrained_offline_without_file_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.weights.*model.pretrained=false"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True), 3)


def _saved(arch: str, classes: int, path: Path) -> dict[str, torch.Tensor]:
    """A model of ``arch`` with ``classes`` outputs saved as safetensors at ``path``; its state."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_model(ModelConfig(backbone=arch), 3, num_classes=classes)
             .state_dict().items()}
    save_file(state, str(path))
    return state


def _conv1(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_chans, weight)


@pytest.mark.parametrize(("source", "classes", "in_chans", "expected"), [
    ("resnet18", 6, 3, "exact"),  # same architecture and head: every tensor as saved
    ("resnet18", 1000, 3, "new head"),  # an ImageNet head: the body loaded, the head new, and the log says so
    ("resnet18", 1000, 9, "new head"),  # ... the first convolution adapted to 9 input channels
    ("resnet34", 6, 3, r"does not fit model.backbone resnet18: 80 tensors resnet18 does not have "
                       r"\(layer1\.2\.bn1\.bias, layer1\.2\.bn1\.running_mean, "
                       r"layer1\.2\.bn1\.running_var and 77 more\)\. Give weights of resnet18 \(or set model.backbone"),
    ("convnext_atto", 1000, 3, r"does not fit model.backbone resnet18: 100 tensors of resnet18 missing "
                               r"\(conv1\.weight, bn1\.weight, bn1\.bias and 97 more\); 128 tensors resnet18 does "
                               r"not have \(head\.fc\.bias, head\.fc\.weight, head\.norm\.bias and 125 more\)\."),
])
def test_model_weights_across_architectures(tmp_path: Path, caplog: pytest.LogCaptureFixture, source: str,
                                            classes: int, in_chans: int, expected: str) -> None:
    path = tmp_path / f"{source}.safetensors"
    saved = _saved(source, classes, path)
    cfg = ModelConfig(backbone="resnet18", pretrained=True, weights=path)
    if expected not in {"exact", "new head"}:
        with caplog.at_level(logging.INFO, logger="ichdet.models.backbones"), \
                pytest.raises(ConfigError, match=rf"model.weights: {path} {expected}"):
            build_model(cfg, in_chans)
        assert caplog.text == ""  # nothing said to be loaded
        return
    with caplog.at_level(logging.INFO, logger="ichdet.models.backbones"):
        model = build_model(cfg, in_chans)
    state = model.state_dict()
    body = [k for k in saved if not k.startswith("fc.")]
    assert all(torch.equal(state[k], saved[k]) for k in body if k != "conv1.weight")
    assert torch.equal(state["conv1.weight"], _conv1(in_chans, saved["conv1.weight"]))
    assert model.fc.out_features == 6
    if expected == "exact":
        assert torch.equal(state["fc.weight"], saved["fc.weight"]) and caplog.text == ""
    else:
        assert f"model.weights {path}: its classifier head has 1000 outputs, not 6; the head is newly initialised, " \
               "the rest of resnet18 is loaded" in caplog.text


def test_missing_weights_file() -> None:
    with pytest.raises(ConfigError, match=r"model.weights: /nope.safetensors does not exist"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights=Path("/nope.safetensors")), 3)


def _resnet18_safetensors(path: Path) -> bytes:
    from safetensors.torch import save_file

    source = build_model(ModelConfig(backbone="resnet18"), 3, num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path.read_bytes()


@pytest.mark.parametrize(("name", "content"), [
    ("w.pth", b"these are not weights\n"),
    ("w.bin", b""),
    ("w.safetensors", b"this is text pretending to be safetensors"),
    ("w.safetensors", "truncated"),
])
def test_weights_file_that_is_not_weights(tmp_path: Path, name: str, content: bytes | str) -> None:
    path = tmp_path / name
    if content == "truncated":
        path.write_bytes(_resnet18_safetensors(tmp_path / "full.safetensors")[:5000])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=rf"model.weights: {path} is not usable weights of resnet18 \(.+\)"):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights=path), 3)


def test_unwrap_compiled_and_ddp_like() -> None:
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper()) is inner

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module under ``_orig_mod``
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = module

    assert unwrap(Compiled(Wrapper())) is inner
    assert unwrap(inner) is inner


def test_model_weights_with_a_body_tensor_of_another_shape_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    state = {k: v.contiguous() for k, v in build_model(ModelConfig(backbone="resnet18"), 3).state_dict().items()}
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # a narrower layer: not this architecture
    save_file(state, str(path))
    with pytest.raises(ConfigError, match=rf"model.weights: {path} does not fit model.backbone resnet18: 1 of "
                                          r"other shapes \(layer1\.0\.conv1\.weight \(32, 64, 3, 3\) vs "
                                          r"\(64, 64, 3, 3\)\)\."):
        build_model(ModelConfig(backbone="resnet18", pretrained=True, weights=path), 3)
