from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ichdet.errors import CheckpointError
from ichdet.models.checkpoint import load_state, load_weights, save_state, save_weights


class _Payload:
    """Unpickling this would create a file: what a malicious checkpoint does with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to load.*could run code"):
        load_state(evil)
    with pytest.raises(CheckpointError, match=r"refused to load"):
        load_weights(torch.nn.Linear(2, 2), evil)
    assert not marker.exists()


def test_state_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
             "history": [{"epoch": 1, "val_loss": 0.5}], "config": {"train": {"lr": 1e-3}}}
    save_state(state, tmp_path / "ck" / "last.pt")
    back = load_state(tmp_path / "ck" / "last.pt")
    assert back["epoch"] == 3
    assert back["history"] == state["history"]
    assert torch.equal(back["model"]["weight"], model.weight)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["last.pt"]  # no temp file left


def test_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    save_weights(model, tmp_path / "w.safetensors")
    other = load_weights(torch.nn.Linear(3, 2), tmp_path / "w.safetensors")
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(CheckpointError, match=r"do not fit the configured architecture"):
        load_weights(torch.nn.Linear(4, 2), tmp_path / "w.safetensors")


@pytest.mark.parametrize(("content", "match"), [(b"", "not a readable"), (b"garbage" * 10, "not a readable")])
def test_unreadable_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_state(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "nope.pt")
