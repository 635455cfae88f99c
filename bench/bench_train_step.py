"""ichdet's training step against a bare timm training step: same architecture, weights, batch, device.

ichdet's side is the real code: a ``Trainer`` from :func:`ichdet.train.loop.build_trainer` (on a small
synthetic cache made in a temporary folder), and :func:`ichdet.train.loop.train_one_epoch` itself, run
over a stand-in loader that yields one pre-made batch ``--steps`` times. So every step is exactly
what training does per batch, nothing replicated: uint8 batch to the device, ``Normalizer``
(uint8 -> float, mean/std, channels_last when configured), the autocast of
:func:`ichdet.models.engine.precision`, ``WeightedBCE``, ``zero_grad``, ``scaler.scale(loss).backward()``,
``unscale_`` + ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``, ``scheduler.step``, the
running loss on the device and the every-10-steps ``loss.item()`` of the progress bar.

The bare side: ``timm.create_model(arch, num_classes=6)`` with ichdet's initial weights, the batch
already normalized as float on the device (in the same memory format), the same autocast,
``F.binary_cross_entropy_with_logits``, ``zero_grad`` / ``backward`` / ``AdamW.step`` (and a plain
GradScaler for fp16). Both loops are warmed up, then timed in interleaved repeats (order rotated),
each repeat ``--steps`` steps with the device queue drained around it. Reported: median ms/step,
images/s, the ratio of medians and the median of the per-repeat ratios; target ichdet <= 1.1x bare.

Usage::

    .venv/bin/python bench/bench_train_step.py                      # resnet18, 128 px, batch 16, CPU
    .venv/bin/python bench/bench_train_step.py --device cuda --arch seresnext50_32x4d --size 512 --batch 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchbench import (
    autocast_for,
    bare_train_step,
    bare_twin,
    bench_config,
    fixed_batch_epochs,
    interleaved,
    make_cache,
    memory_format,
    pin,
    premade_batch,
    setup,
    temp_dir,
    versus_main,
    versus_report,
    versus_result,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both sides, time them interleaved, return the results (also printed)."""
    from ichdet.cache.store import PixelCache
    from ichdet.models.engine import init_runtime
    from ichdet.train.loop import build_trainer

    device, amp, channels_last = setup(args)
    with temp_dir("ichdet-bench-train-") as tmp:
        start = time.perf_counter()
        cache = PixelCache(make_cache(Path(tmp), size=64, n_images=24))
        setup_s = time.perf_counter() - start
        cfg = bench_config(args.arch, args.size, args.batch, device, amp, channels_last)
        t = build_trainer(cfg, cache, fold=0, rt=init_runtime(str(device)))

        # ---- the batch: one sample set of the real training dataset (augmented uint8 CHW), stacked
        images, target, rows = premade_batch(t.train_loader.dataset, args.batch)
        if args.input == "device":
            host_batch = (images.to(device), target.to(device), rows)
        else:
            host_batch = pin((images, target, rows), device)  # type: ignore[assignment]

        # ---- bare timm: same architecture and initial weights, float input normalized once, ahead of time
        bare = bare_twin(args.arch, t.model, device, channels_last).train()
        with torch.no_grad():
            x_bare = t.normalize(images.to(device)).contiguous(memory_format=memory_format(channels_last))
        y_bare = target.to(device)
        opt = torch.optim.AdamW(bare.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                fused=device.type == "cuda")  # as ichdet.train.loop.build_trainer
        bare_autocast = autocast_for(amp, device)
        bare_scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        def bare_steps(n: int) -> None:
            for _ in range(n):
                bare_train_step(bare, x_bare, y_bare, opt, bare_autocast, bare_scaler)

        # ---- ichdet: the real epoch loop over the same batch, `n` steps
        ichdet_steps = fixed_batch_epochs(t, host_batch)
        ichdet_steps(args.warmup)
        bare_steps(args.warmup)
        ms = interleaved({"ichdet": lambda: ichdet_steps(args.steps), "bare_timm": lambda: bare_steps(args.steps)},
                         args.steps, args.repeats, device)

    settings = {"arch": args.arch, "size": args.size, "batch": args.batch, "amp": amp, "channels_last": channels_last,
                "input": args.input, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                "grad_clip": cfg.train.grad_clip}
    result = versus_result("train_step", device, settings, ms, args.batch, setup_s=round(setup_s, 2))
    versus_report(result, f"train step: {args.arch} {args.size} px, batch {args.batch}, amp {amp}, channels_last "
                          f"{channels_last}, input {args.input}; {args.repeats} x {args.steps} steps interleaved "
                          f"after {args.warmup} warm-up", "step")
    return result


def main(argv: list[str] | None = None) -> int:
    return versus_main(__doc__, 16, run, argv)


if __name__ == "__main__":
    sys.exit(main())
