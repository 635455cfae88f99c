"""Run the DICOM node with the stand-in analyser: ``python tests/serve/serve_node.py CONFIG [LOG] [SECONDS]``.

The network tests start this as a child process so that they can SIGKILL it; the real command
(``ichdet serve``, with a bundle) is exercised in test_serve_e2e.py."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from serve_support import stand_in_analyser

from ichdet.serve import load_serve_config, run_node

if __name__ == "__main__":
    config, log, seconds = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "", sys.argv[3:4]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    cfg = load_serve_config(config, {})
    run_node(cfg, stand_in_analyser(Path(log) if log else None, float(seconds[0]) if seconds else 0.0))
