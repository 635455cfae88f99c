"""ichdet's inference against a bare ``torch.no_grad(): model(x)`` loop over the same batches.

ichdet's side is the real prediction path: a run folder (``config.yaml`` + ``fold0/best.safetensors``,
written in a temporary folder) loaded by :func:`ichdet.models.rundir.load_run_model`, the ``Normalizer`` and
autocast that :func:`ichdet.infer.predict.predict_run` builds, and :func:`ichdet.models.engine.predict_batches`
over a DataLoader of ``--steps`` pre-made uint8 batches (pinned on CUDA, as ``predict_run``'s
loader hands them over): copy to the device, normalize, autocast, sigmoid, results to the host.
Compared without TTA; the h-flip TTA (what ``ichdet predict`` does by default) is timed in the same
interleaved repeats and reported for information (it runs the network twice, so ~2x is expected).

The bare side: the same architecture with the same weights, eval mode and memory format, the
batches already normalized as float on the device, the same autocast, ``model(x)`` per batch, the
outputs kept on the device. Reported: median ms/batch, images/s, ratio; target ichdet <= 1.1x bare.

Usage::

    .venv/bin/python bench/bench_inference.py                      # resnet18, 128 px, batch 32, CPU
    .venv/bin/python bench/bench_inference.py --device cuda --arch seresnext50_32x4d --size 512 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchbench import (
    autocast_for,
    bare_twin,
    bench_config,
    interleaved,
    memory_format,
    paired_ratio,
    pin,
    random_batches,
    setup,
    temp_dir,
    versus_main,
    versus_report,
    versus_result,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both sides, time them interleaved, return the results (also printed)."""
    from ichdet.models.backbones import build_model, input_stats
    from ichdet.models.checkpoint import save_weights
    from ichdet.models.config import config_to_yaml
    from ichdet.models.engine import Normalizer, init_runtime, precision, predict_batches
    from ichdet.models.rundir import load_run_model

    device, amp, channels_last = setup(args)
    cfg = bench_config(args.arch, args.size, args.batch, device, amp, channels_last)
    rt = init_runtime(str(device))
    with temp_dir("ichdet-bench-infer-") as tmp:
        # ---- a trained run as `ichdet predict` finds it, loaded the way predict_run loads it
        run_dir = Path(tmp) / "run"
        (run_dir / "fold0").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        torch.manual_seed(0)
        save_weights(build_model(cfg.model, cfg.data.in_chans), run_dir / "fold0" / "best.safetensors")
        model, run_cfg = load_run_model(run_dir, run_dir / "fold0" / "best.safetensors", rt.device)
    mean, std = input_stats(model, run_cfg.data.in_chans)
    normalize = Normalizer(mean, std, run_cfg.train.channels_last).to(rt.device)
    autocast, _ = precision(rt.device, run_cfg.train.amp)

    # ---- the same batches for both: uint8 for ichdet's loader, normalized float on the device for bare
    batches = random_batches(args.steps, args.batch, run_cfg.data.in_chans, args.size)
    if args.input == "device":
        batches = [(b[0].to(device), b[1], b[2]) for b in batches]
    else:  # pinned ahead, as predict_run's loader (pin_memory, workers) delivers them: not timed here
        batches = [pin(b, device) for b in batches]  # type: ignore[misc]
    loader: DataLoader[Any] = DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)  # type: ignore[arg-type]
    with torch.no_grad():
        x_bare = [normalize(b[0].to(device)).contiguous(memory_format=memory_format(channels_last)) for b in batches]

    bare = bare_twin(args.arch, model, device, channels_last).eval()
    bare_autocast = autocast_for(amp, device)

    def bare_loop() -> list[torch.Tensor]:
        with torch.no_grad(), bare_autocast():
            return [bare(x) for x in x_bare]

    def ichdet_loop(tta: bool) -> None:
        predict_batches([model], normalize, loader, rt.device, autocast, tta)

    # ---- same outputs (same weights, same batches): a check that the comparison is like for like
    _, (probs,) = predict_batches([model], normalize, loader, rt.device, autocast, tta=False)
    bare_probs = torch.sigmoid(torch.cat(bare_loop()).float()).cpu().numpy()
    max_diff = float(abs(probs - bare_probs).max())

    # ---- warm-up: the check above was one untimed pass of both; then `--warmup` batches of each loop
    warm: DataLoader[Any] = DataLoader(batches[:max(1, args.warmup)], batch_size=None)  # type: ignore[arg-type]
    for tta in (False, True):
        predict_batches([model], normalize, warm, rt.device, autocast, tta)
    with torch.no_grad(), bare_autocast():
        [bare(x) for x in x_bare[:max(1, args.warmup)]]
    start = time.perf_counter()
    ms = interleaved({"ichdet": lambda: ichdet_loop(False), "bare_timm": bare_loop,
                      "ichdet_tta": lambda: ichdet_loop(True)}, args.steps, args.repeats, device)
    settings = {"arch": args.arch, "size": args.size, "batch": args.batch, "amp": amp, "channels_last": channels_last,
                "input": args.input, "batches": args.steps, "repeats": args.repeats, "warmup": args.warmup}
    result = versus_result("inference", device, settings, ms, args.batch, timed_s=round(time.perf_counter() - start, 1),
                           max_abs_prob_diff=max_diff, tta_ratio=paired_ratio(ms, "ichdet_tta", "bare_timm"))
    versus_report(result, f"inference: {args.arch} {args.size} px, batch {args.batch}, amp {amp}, channels_last "
                          f"{channels_last}, input {args.input}; {args.repeats} x {args.steps} batches interleaved "
                          f"after a check pass and {args.warmup} warm-up batches", "batch")
    print(f"  with h-flip TTA / bare: {result['tta_ratio']:.3f} (information; two forward passes)")
    print(f"  max |p_ichdet - p_bare| = {result['max_abs_prob_diff']:.2e}")
    return result


def main(argv: list[str] | None = None) -> int:
    return versus_main(__doc__, 32, run, argv)


if __name__ == "__main__":
    sys.exit(main())
