"""Progress bars (tqdm) that switch off cleanly when not wanted or when output is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    """Bars only make sense on a terminal: in a log file or a pipe they are noise (``0chunk [00:00, ?chunk/s]``)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None,
                 unit: str = "it") -> Iterator[T]:
    """``items``, with a bar on stderr when ``enabled`` and stderr is a terminal."""
    if not (enabled and on_terminal()):
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False,
                    file=sys.stderr, mininterval=0.5)
