"""One polling loop for the tests: wait until something holds, or fail saying what was awaited.

Tests that wait on a process, a server or a job call ``wait_for`` instead of writing their own
deadline loop, so a timeout reads the same everywhere ("timed out after 30 s waiting for <what>;
last: <the last value or error>") and the interval and deadline live in one place.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.2,
             what: str | Callable[[], str] = "the condition",
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that.

    An exception of a type in ``ignore`` counts as "not yet" (e.g. ``requests.ConnectionError`` while a
    server starts); any other exception propagates at once (a process that died is a failure now, not
    after the timeout). After ``timeout`` seconds: ``AssertionError`` naming ``what`` (a text, or a callable
    asked for one then, e.g. to describe the jobs still running) and the last value or ignored error.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError(f"Expected timeout >= 0 and interval > 0, but got {timeout} and {interval}")
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}; last: {last!r:.2000}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
