"""Export a member's networks to ONNX for ``ichdet bundle --runtime onnx``, each checked against torch first.

Per fold, a 2D run gives one graph ``image`` uint8 (N, C, H, W) -> ``embedding`` (N, features + 6): the
input normalisation and the pooled embedding with the logits (what :class:`ichdet.infer.passes.FoldPasses`
computes with torch; a 2D member reads the logits, its sequence members the whole row), with a dynamic
batch. A sequence member gives one graph ``features`` (B, L, F), ``mask`` (B, L) -> ``logits`` (B, L, 6)
with dynamic batch and series length.

Exporters. The TorchScript exporter (``dynamo=False``) for the CNNs and the bidirectional GRU: it traces
timm's networks in about half the time of ``torch.export`` with the same graph, and it is the one that
exports ``pack_padded_sequence`` (as the ONNX GRU's ``sequence_lens``), which ``torch.export`` cannot
trace (data-dependent lengths). The dynamo exporter for the transformer sequence model: the TorchScript
one bakes the traced series length into the attention's reshapes, so any other length fails.

Every graph is run by onnxruntime on sample inputs of other shapes than the traced ones (other batch
sizes, series lengths and padding) next to the torch network; the largest absolute difference of any
output must be at most :data:`TOLERANCE`, or the export is refused, naming the network and the difference.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from ichdet.errors import RunFailed
from ichdet.infer.members import Member, load_state
from ichdet.infer.onnx_runtime import FEATURES_KEY, session
from ichdet.models.backbones import build_seq_model, input_stats
from ichdet.models.engine import Normalizer, embed
from ichdet.names import LABELS

__all__ = ["OPSET", "TOLERANCE", "export_2d", "export_seq", "member_graphs"]

#: Largest absolute difference between the ONNX graph's and the torch network's outputs that is accepted.
TOLERANCE = 1e-4
OPSET = 18
_CPU = torch.device("cpu")


class _Embedding(nn.Module):
    """uint8 images -> normalised -> :func:`embed` (the torch computation a 2D graph replaces)."""

    def __init__(self, model: nn.Module, in_chans: int) -> None:
        super().__init__()
        self.model = model
        self.normalize = Normalizer(*input_stats(model, in_chans), channels_last=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed(self.model, self.normalize(images))


def _legacy(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, dynamo=False,  # type: ignore[arg-type]  # a file object works
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic, opset_version=OPSET)
    return buf.getvalue()


def _dynamo(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
            dynamic: Sequence[dict[int, torch.export.Dim]]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=tuple(dynamic), opset_version=OPSET, verbose=False)
    assert program is not None
    return bytes(program.model_proto.SerializeToString())


def _with_metadata(graph: bytes, props: dict[str, str]) -> bytes:
    model = onnx.load_from_string(graph)
    onnx.helper.set_model_props(model, props)
    return bytes(model.SerializeToString())


def check_graph(graph: bytes, reference: Callable[..., torch.Tensor], samples: Sequence[dict[str, torch.Tensor]],
                what: str, valid: Callable[[dict[str, torch.Tensor]], np.ndarray] | None = None) -> float:
    """The largest absolute difference between ``graph`` (onnxruntime) and ``reference`` (torch) over ``samples``.

    ``valid`` picks the outputs that count (a sequence's real slices, not its padding). RunFailed naming
    ``what`` and the difference when it exceeds :data:`TOLERANCE`.
    """
    sess = session(graph, what)
    worst = 0.0
    for feed in samples:
        with torch.inference_mode():
            ref = reference(*feed.values()).float().numpy()
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        keep = valid(feed) if valid is not None else np.ones(ref.shape[:-1], bool)
        diff = float(np.abs(got - ref)[keep].max()) if keep.any() else 0.0
        if not np.isfinite(diff) or got.shape != ref.shape:
            diff = float("inf")
        worst = max(worst, diff)
    if worst > TOLERANCE:
        raise RunFailed(f"{what}: the ONNX export differs from the torch network by up to {worst:.3g} "
                        f"(more than {TOLERANCE:g}); refusing to bundle it. Bundle with --runtime torch")
    return worst


def export_2d(model: nn.Module, in_chans: int, image_size: int, what: str) -> tuple[bytes, float]:
    """A 2D fold's graph (uint8 images -> embedding and logits, dynamic batch), checked; and its largest difference."""
    module = _Embedding(model.to(_CPU).float().eval(), in_chans).eval()
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, in_chans, image_size, image_size), dtype=torch.uint8, generator=gen)

    graph = _legacy(module, (images(2),), ["image"], ["embedding"], {"image": {0: "batch"}, "embedding": {0: "batch"}})
    graph = _with_metadata(graph, {FEATURES_KEY: str(int(model.num_features))})  # type: ignore[arg-type]
    worst = check_graph(graph, module, [{"image": images(1)}, {"image": images(3)}], what)
    return graph, worst


def _series(n: int, length: int, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` random series of up to ``length`` slices; series ``i`` > 0 shorter by ``2 i`` (padding)."""
    mask = torch.ones(n, length, dtype=torch.bool)
    for i in range(1, n):
        mask[i, max(1, length - 2 * i):] = False
    return {"features": torch.randn(n, length, width, generator=gen) * 3, "mask": mask}


def export_seq(model: nn.Module, n_features: int, kind: str, what: str) -> tuple[bytes, float]:
    """A sequence fold's graph (dynamic batch and series length), checked; and its largest difference."""
    model = model.to(_CPU).float().eval()
    gen = torch.Generator().manual_seed(0)
    trace = _series(2, 7, n_features, gen)
    names = ["features", "mask"]
    if kind == "bigru":
        axes = {"features": {0: "batch", 1: "slices"}, "mask": {0: "batch", 1: "slices"},
                "logits": {0: "batch", 1: "slices"}}
        graph = _legacy(model, tuple(trace.values()), names, ["logits"], axes)
    else:
        batch, slices = torch.export.Dim("batch", min=1), torch.export.Dim("slices", min=2)
        graph = _dynamo(model, tuple(trace.values()), names, ["logits"],
                        [{0: batch, 1: slices}, {0: batch, 1: slices}])
    samples = [_series(1, 5, n_features, gen), _series(3, 12, n_features, gen), _series(1, 40, n_features, gen)]
    worst = check_graph(graph, model, samples, what, valid=lambda feed: feed["mask"].numpy())
    return graph, worst


def member_graphs(m: Member) -> tuple[dict[str, bytes], float]:
    """The bundle entries ``members/<name>/fold<k>.onnx`` of one member or base run, and their largest difference."""
    out: dict[str, bytes] = {}
    worst = 0.0
    for k in m.folds:
        what = f"member {m.name} fold {k}"
        if m.kind == "2d":
            cfg = m.run_config
            graph, diff = export_2d(m.load_fold(k, _CPU), cfg.data.in_chans, cfg.data.image_size, what)
        else:
            widths = [int(b.load_fold(k, _CPU).num_features) + len(LABELS) for b in m.bases]  # type: ignore[arg-type]
            model = build_seq_model(m.seq_config.model, sum(widths), [int(s) for s in np.cumsum(widths) - len(LABELS)])
            load_state(model, m.weight_bytes(k), f"{m.source} {what}")
            graph, diff = export_seq(model, sum(widths), m.seq_config.model.kind, what)
        out[f"members/{m.name}/fold{k}.onnx"] = graph
        worst = max(worst, diff)
    return out, worst
