"""Run every CPU benchmark in turn (never in parallel: they would measure each other) into bench_out/.

    .venv/bin/python bench/run_all.py [--quick]

Each script prints its own machine description, medians, ratios and verdicts, and writes JSON to
``bench_out/<name>.json``; docs/benchmarks.md records the figures. ``bench/gpu.sh`` is separate: it
needs a GPU machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: script -> extra arguments (the 1-thread settings are the per-core figures the targets name).
BENCHES: dict[str, list[str]] = {
    "bench_preprocess.py": [],
    "bench_loader.py": [],
    "bench_labels_scale.py": ["--baseline"],
    "bench_train_step.py": ["--threads", "1"],
    "bench_inference.py": ["--threads", "1"],
    "bench_bombs.py": [],
    "bench_report.py": ["--repeats", "3"],
    "bench_onnx.py": [],
}


def main() -> int:
    """Run the benchmarks; the exit status is 1 if any script failed to run (not if a target was missed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of each script's default")
    parser.add_argument("--out", type=Path, default=HERE.parent / "bench_out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for script, extra in BENCHES.items():
        cmd = [sys.executable, str(HERE / script), *extra, "--json", str(args.out / f"{Path(script).stem}.json")]
        if args.quick:
            cmd += ["--repeats", "3"]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
