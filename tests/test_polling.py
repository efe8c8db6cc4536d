"""The shared polling helper: it returns the first truthy value, names what it waited for, stops early on
a real error and treats the listed errors as "not yet"."""

from __future__ import annotations

import time

import pytest
from polling import wait_for


def test_returns_the_first_truthy_value():
    calls = iter([0, None, "", {"status": "done"}])
    assert wait_for(lambda: next(calls), timeout=5, interval=0.001, what="the job") == {"status": "done"}


def test_times_out_naming_what_and_the_last_value():
    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for the server; last: False"):
        wait_for(lambda: False, timeout=0.05, interval=0.01, what="the server")


def test_what_may_be_asked_at_the_end():
    state = {"n": 0}

    def tick() -> bool:
        state["n"] += 1
        return False

    with pytest.raises(AssertionError, match=r"waiting for 3 jobs \(checked [1-9]\d* times\)"):
        wait_for(tick, timeout=0.03, interval=0.005, what=lambda: f"3 jobs (checked {state['n']} times)")


def test_listed_errors_mean_not_yet_and_others_propagate_at_once():
    attempts = iter([ConnectionError("refused"), ConnectionError("refused"), 7])

    def flaky() -> int:
        item = next(attempts)
        if isinstance(item, Exception):
            raise item
        return item

    assert wait_for(flaky, timeout=5, interval=0.001, ignore=(ConnectionError,)) == 7
    with pytest.raises(AssertionError, match=r"last: ConnectionError\('refused'\)"):
        wait_for(lambda: (_ for _ in ()).throw(ConnectionError("refused")), timeout=0.02, interval=0.005,
                 ignore=(ConnectionError,))
    start = time.monotonic()
    with pytest.raises(KeyError):
        wait_for(lambda: {}["missing"], timeout=30, interval=0.01)
    assert time.monotonic() - start < 15  # at once, not after the 30 s timeout


def test_rejects_a_nonsense_interval():
    with pytest.raises(ValueError, match="interval > 0"):
        wait_for(lambda: True, timeout=1, interval=0)
