"""Names every stage shares: the six labels in the challenge's order, and one "did you mean" rule for every
name a user types (config keys, window presets, model names)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["LABELS", "close_matches", "did_you_mean"]

#: The RSNA 2019 labels, in the order of every (N, 6) array and table in ichdet.
LABELS: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)


def close_matches(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` that look like ``name``, best first (difflib's ratio >= ``cutoff``).

    The comparison ignores case, so ``Brain`` finds ``brain``; the choices are returned as spelled.
    """
    by_folded: dict[str, str] = {}
    for choice in choices:
        by_folded.setdefault(choice.casefold(), choice)
    found = difflib.get_close_matches(name.casefold(), list(by_folded), n=n, cutoff=cutoff)
    return [by_folded[f] for f in found]


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``" Did you mean 'a', 'b'?"`` for the close matches of ``name``, or ``""`` when there are none.

    Example:
        >>> did_you_mean("brian", ["brain", "blood", "soft"])
        " Did you mean 'brain'?"
    """
    close = close_matches(name, choices, n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
