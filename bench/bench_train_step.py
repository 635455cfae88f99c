"""ichdet's training step against a bare timm training step: same architecture, weights, batch, device.

ichdet's side is the real code: a ``Trainer`` from :func:`ichdet.train.build_trainer` (on a small
synthetic cache made in a temporary folder), and :func:`ichdet.train.train_one_epoch` itself, run
over a stand-in loader that yields one pre-made batch ``--steps`` times. So every step is exactly
what training does per batch, nothing replicated: uint8 batch to the device, ``Normalizer``
(uint8 -> float, mean/std, channels_last when configured), the autocast of
:func:`ichdet.train.precision`, ``WeightedBCE``, ``zero_grad``, ``scaler.scale(loss).backward()``,
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
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _torchbench import (
    TARGET_RATIO,
    FixedBatchLoader,
    add_common_args,
    autocast_for,
    bench_config,
    describe_machine,
    interleaved,
    machine_line,
    make_cache,
    memory_format,
    paired_ratio,
    pin,
    premade_batch,
    resolve_amp,
    resolve_device,
    summarize,
    temp_dir,
    write_json,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build both sides, time them interleaved, return the results (also printed)."""
    import timm

    from ichdet.cache import PixelCache
    from ichdet.models import resolve_backbone, unwrap
    from ichdet.train import build_trainer, init_runtime, train_one_epoch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
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
        bare = timm.create_model(resolve_backbone(args.arch), num_classes=6)
        bare.load_state_dict(unwrap(t.model).state_dict())
        bare = bare.to(device).to(memory_format=memory_format(channels_last)).train()
        with torch.no_grad():
            x_bare = t.normalize(images.to(device)).contiguous(memory_format=memory_format(channels_last))
        y_bare = target.to(device)
        opt = torch.optim.AdamW(bare.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        bare_autocast = autocast_for(amp, device)
        bare_scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        def bare_steps(n: int) -> None:
            for _ in range(n):
                with bare_autocast():
                    loss = F.binary_cross_entropy_with_logits(bare(x_bare).float(), y_bare)
                opt.zero_grad(set_to_none=True)
                bare_scaler.scale(loss).backward()
                bare_scaler.step(opt)
                bare_scaler.update()

        # ---- ichdet: the real epoch loop over the same batch, `n` steps
        def ichdet_steps(n: int) -> None:
            train_one_epoch(dataclasses.replace(t, train_loader=FixedBatchLoader(host_batch, n)),
                            epoch=0, progress=False)

        ichdet_steps(args.warmup)
        bare_steps(args.warmup)
        ms = interleaved({"ichdet": lambda: ichdet_steps(args.steps), "bare_timm": lambda: bare_steps(args.steps)},
                         args.steps, args.repeats, device)

    stats = summarize(ms, args.batch)
    ratio_of_medians = stats["ichdet"]["median_ms"] / stats["bare_timm"]["median_ms"]  # type: ignore[operator]
    result: dict[str, Any] = {
        "bench": "train_step", "machine": describe_machine(device),
        "settings": {"arch": args.arch, "size": args.size, "batch": args.batch, "amp": amp,
                     "channels_last": channels_last, "input": args.input, "steps": args.steps,
                     "repeats": args.repeats, "warmup": args.warmup, "grad_clip": cfg.train.grad_clip},
        "setup_s": round(setup_s, 2), "results": stats,
        "ratio_of_medians": ratio_of_medians, "ratio_paired_median": paired_ratio(ms, "ichdet", "bare_timm"),
        "ratio_of_minima": stats["ichdet"]["min_ms"] / stats["bare_timm"]["min_ms"],  # type: ignore[operator]
        "target_ratio": TARGET_RATIO, "pass": ratio_of_medians <= TARGET_RATIO}
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    """Print the results table."""
    s = result["settings"]
    print(machine_line(result["machine"]))
    print(f"train step: {s['arch']} {s['size']} px, batch {s['batch']}, amp {s['amp']}, "
          f"channels_last {s['channels_last']}, input {s['input']}; {s['repeats']} x {s['steps']} steps "
          f"interleaved after {s['warmup']} warm-up")
    for name, st in result["results"].items():
        print(f"  {name:10s} median {st['median_ms']:9.2f} ms/step  (min {st['min_ms']:.2f}, max {st['max_ms']:.2f})"
              f"  {st['images_per_s']:8.1f} img/s")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"  ichdet / bare: {result['ratio_of_medians']:.3f} (ratio of medians), "
          f"{result['ratio_paired_median']:.3f} (median of per-repeat ratios), "
          f"{result['ratio_of_minima']:.3f} (ratio of minima); target <= {TARGET_RATIO} on the medians: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, batch=16)
    args = parser.parse_args(argv)
    result = run(args)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
