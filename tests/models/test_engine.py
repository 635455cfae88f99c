"""The inference engine: device checks before any work, and the dependency rule (never the trainer)."""

from __future__ import annotations

import pytest
import torch

from ichdet.errors import ConfigError
from ichdet.models.engine import check_device, init_runtime

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(("device", "expected"), [("cpu", "cpu"), ("cpu:0", "cpu:0")])
def test_available_devices_pass(device: str, expected: str) -> None:
    assert check_device(device) == torch.device(expected)


@pytest.mark.parametrize(("device", "match"), [
    (f"cuda:{GPUS}", rf"device 'cuda:{GPUS}' is not available: this machine has "),
    ("cuda:7" if GPUS < 8 else f"cuda:{GPUS}", r"is not available: this machine has"),
    ("tpu", r"device 'tpu' is not a device name; use auto, cpu, cuda or cuda:N"),
    ("meta", r"device 'meta': ichdet runs on cpu, cuda or mps"),
])
def test_unavailable_devices_are_config_errors(device: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_device(device)
    with pytest.raises(ConfigError, match=match):
        init_runtime(device)


def test_cuda_only_where_there_is_a_gpu() -> None:
    if GPUS:
        assert check_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match=r"device 'cuda' is not available: this machine has no CUDA device"):
            check_device("cuda")


def test_auto_picks_an_available_device() -> None:
    rt = init_runtime("auto")
    assert rt.device.type == ("cuda" if GPUS else "cpu")
    assert (rt.rank, rt.world_size, rt.is_main) == (0, 1, True)
