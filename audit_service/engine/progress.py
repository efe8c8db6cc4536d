"""``ProgressFn``: how long work reports how far it got (the engine, the reference runs, the sandbox).

``progress(fraction in [0, 1], stage name)`` is called often (once per probe chunk): it must be cheap.
"""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[float, str], None]


def no_progress(fraction: float, stage: str) -> None:
    """The default: report nothing."""
