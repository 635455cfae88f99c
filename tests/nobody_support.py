"""Run a function as the unprivileged user ``nobody``: root reads every folder, so permission tests need
someone who cannot."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any


def as_nobody(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child that drops to nobody when run as root; its JSON-able result, read back."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, send the result back, exit without cleanup
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(write, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    return json.loads(data)
