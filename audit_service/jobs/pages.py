"""The HTML page of a finished audit, rendered once in the worker and stored beside the data, never in the web tier.

Why: a report's figures are matplotlib charts; drawn inside a gevent web worker they held its event loop for over
a minute (issue 19), and every GET drew them again. The worker renders the page when the job finishes, under a
time budget, into ``<data dir>/pages/<job id>.html``; the web tier serves that file (its own URL put in). A page that is missing
(the budget ran out, a duplicate job, an older job) is rendered on demand off the event loop and kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from ..engine.schema import Report
from .store import Job

log = logging.getLogger("audit_service.pages")

#: seconds the worker spends on one page at most; past it the page is left to the first request
RENDER_BUDGET_S = 60


def page_path(data_dir: str | Path, job_id: str) -> Path:
    return Path(data_dir) / "pages" / f"{job_id}.html"


#: stands for the service's own URL in a stored page; the web tier puts the request's in (a saved copy of the
#: page keeps an absolute link to its JSON)
BASE_URL_MARK = "https://audit-service.invalid/"


def render_page(job: Job, report: Report) -> str:
    """The page of ``job`` with its ``report``, its JSON link under ``BASE_URL_MARK``."""
    from ..engine.report.html import render_report_html

    view = {"id": job.id, "inputs": job.inputs, "links": {"report": f"/audits/{job.id}/report"}}
    return render_report_html(report, job=view, base_url=BASE_URL_MARK)


def served_page(path: Path, base_url: str) -> str:
    """A stored page with the service's URL in place of ``BASE_URL_MARK`` (a text replace, no rendering)."""
    return path.read_text(encoding="utf-8").replace(BASE_URL_MARK, base_url.rstrip("/") + "/")


def store_page(data_dir: str | Path, job: Job, report: Report, budget_s: float = RENDER_BUDGET_S
               ) -> Path | None:
    """Render and store the page (atomically); None, logged, when it failed or ran out of its budget."""
    target = page_path(data_dir, job.id)
    try:
        with _time_limit(budget_s):
            html = render_page(job, report)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, target)
        return target
    except Exception as exc:  # noqa: BLE001 - the page is a view; the job's result does not depend on it
        log.warning("job %s: report page not stored (%s); it will be rendered on the first request",
                    job.id, exc)
        return None


class _OutOfTime(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_OutOfTime`` after ``seconds`` (main thread only: elsewhere, no limit)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def _alarm(_signum: int, _frame: object) -> None:
        raise _OutOfTime(f"rendering took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
