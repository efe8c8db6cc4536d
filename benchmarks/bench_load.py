"""Load test on loopback: 200 submissions from 20 concurrent clients (4 tenants with bearer tokens)
with small models; reports throughput, p50/p99 latency of the API calls, and jobs lost (must be 0).

    .venv/bin/python benchmarks/bench_load.py                       # embedded mode (SQLite + local workers)
    .venv/bin/python benchmarks/bench_load.py --broker redis://127.0.0.1:6379/0   # Celery workers
    .venv/bin/python benchmarks/bench_load.py --submissions 40 --clients 8        # a quick run

Bounded: a fixed number of submissions, threads only, 127.0.0.1 only, a hard deadline (--deadline);
it starts its own service (and Celery workers) in a temp dir and stops everything by itself.

Each client submits (POST /audit, honouring 429 + Retry-After), then follows its job (GET /audits/{id})
until it is final. Every submission has its own seed (no report reuse) unless --reuse. "Lost" means an
accepted job that is missing from the database or not final when the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"n_probes": 8, "n_noise_probes": 8, "ig_steps": 4, "jacobian_probes": 0, "bootstrap": 20,
           "saliency": False}
TENANTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(out: Path, n: int) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import IMAGE_SHAPE, PlainCNN, export_onnx

    return [export_onnx(PlainCNN(seed=i), IMAGE_SHAPE, out / f"m{i}.onnx") for i in range(n)]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


class Stack:
    """The service (and, with a broker, redis-server and Celery workers) in its own process groups."""

    def __init__(self, data: Path, workers: int, web_workers: int, tokens: dict[str, str], broker: str | None) -> None:
        self.procs: list[subprocess.Popen] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "AUDIT_DATA_DIR": str(data), "PYTHONPATH": str(ROOT),
               "AUDIT_TOKENS": ",".join(f"{t}:{n}" for t, n in tokens.items()),
               "AUDIT_MAX_TENANT_JOBS": "40", "AUDIT_MAX_QUEUED": "120", "AUDIT_JOB_TIMEOUT_S": "300"}
        log = open(data.parent / "service.log", "ab")
        if broker == "spawn":
            rport = _free_port()
            self.procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                                                "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL,
                                               start_new_session=True))
            broker = f"redis://127.0.0.1:{rport}/0"
            time.sleep(0.5)
        if broker:
            env["AUDIT_BROKER_URL"] = broker
            for _ in range(workers):
                self.procs.append(subprocess.Popen([sys.executable, "-m", "audit_service.cli", "worker",
                                                    "--processes", "1"], env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "audit_service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "0" if broker else str(workers), "--web-workers", str(web_workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for _ in range(600):
            try:
                if requests.get(self.url + "/healthz", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the service did not start; see service.log")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--submissions", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--workers", type=int, default=2, help="audit workers (local processes or Celery workers)")
    p.add_argument("--web-workers", type=int, default=2)
    p.add_argument("--models", type=int, default=5, help="distinct small models")
    p.add_argument("--broker", default=None, help="redis URL, or 'spawn' to start a redis-server")
    p.add_argument("--reuse", action="store_true", help="identical submissions (reports reused)")
    p.add_argument("--deadline", type=float, default=1500.0, help="stop waiting after this many seconds")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)

    tokens = {f"bench-token-{i:02d}-0123456789abcdef": f"tenant{i}" for i in range(TENANTS)}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        tmp_path = Path(tmp)
        models = _models(tmp_path, args.models)
        data = tmp_path / "data"
        t0 = time.monotonic()
        stack = Stack(data, args.workers, args.web_workers, tokens, args.broker)
        print(f"service up in {time.monotonic() - t0:.1f} s at {stack.url}", file=sys.stderr)
        lock = threading.Lock()
        post_ms: list[float] = []
        get_ms: list[float] = []
        accepted: dict[str, str] = {}  # id -> token
        final: dict[str, str] = {}
        throttled = [0]
        errors: list[str] = []
        counter = iter(range(args.submissions))
        deadline = time.monotonic() + args.deadline
        token_list = list(tokens)

        def timed(what: str, call: Callable[[], requests.Response], into: list[float]) -> requests.Response | None:
            """``call()``, its milliseconds added to ``into``; on a connection error: noted, a pause, None."""
            start = time.perf_counter()
            try:
                r = call()
            except requests.RequestException as exc:
                with lock:
                    errors.append(f"{what}: {exc}")
                time.sleep(1)
                return None
            with lock:
                into.append((time.perf_counter() - start) * 1000)
            return r

        def client(n: int) -> None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token_list[n % TENANTS]}"
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                options = {**OPTIONS, "seed": 0 if args.reuse else i}
                spec = json.dumps({"group": "C4", "shifts": [], "options": options})
                model = models[i % len(models)]
                job_id = None
                while job_id is None and time.monotonic() < deadline:
                    r = timed("POST", lambda: session.post(stack.url + "/audit", data={"spec": spec}, timeout=120,
                                                           files={"model": (model.name, model.read_bytes())}), post_ms)
                    if r is None:
                        continue
                    if r.status_code == 429:
                        with lock:
                            throttled[0] += 1
                        time.sleep(min(10.0, float(r.headers.get("Retry-After", "1"))))
                        continue
                    if r.status_code not in (200, 202):
                        with lock:
                            errors.append(f"POST {r.status_code}: {r.text[:200]}")
                        break
                    job_id = r.headers["Location"].rsplit("/", 1)[-1]
                    with lock:
                        accepted[job_id] = session.headers["Authorization"]
                while job_id is not None and time.monotonic() < deadline:
                    r = timed("GET", lambda: session.get(f"{stack.url}/audits/{job_id}", timeout=60), get_ms)
                    if r is None:
                        continue
                    status = r.json().get("status") if r.ok else f"http {r.status_code}"
                    if status in ("succeeded", "failed", "cancelled"):
                        with lock:
                            final[job_id] = status
                        break
                    time.sleep(1.0)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        # the ground truth: every accepted job, read back from the service
        lost = []
        for job_id, auth in accepted.items():
            r = requests.get(f"{stack.url}/audits/{job_id}", headers={"Authorization": auth}, timeout=60)
            if r.status_code != 200 or r.json()["status"] not in ("succeeded", "failed", "cancelled"):
                lost.append(job_id)
        listed = sum(requests.get(stack.url + "/audits", headers={"Authorization": f"Bearer {t}"},
                                  params={"limit": 1}, timeout=60).json()["total"] for t in tokens)
        health = requests.get(stack.url + "/healthz", timeout=10).status_code
        stack.stop()

    by_status: dict[str, int] = {}
    for status in final.values():
        by_status[status] = by_status.get(status, 0) + 1
    figures = {
        "submissions": args.submissions, "clients": args.clients, "workers": args.workers,
        "mode": "celery" if args.broker else "local", "reuse": args.reuse,
        "accepted": len(accepted), "finished": by_status, "jobs_lost": len(lost), "listed_total": listed,
        "throttled_429": throttled[0], "errors": len(errors), "wall_s": round(wall, 1),
        "jobs_per_s": round(len(final) / wall, 3) if wall else None,
        "api_calls_per_s": round((len(post_ms) + len(get_ms)) / wall, 1) if wall else None,
        "post_ms": {"n": len(post_ms), "p50": round(_pct(post_ms, 50), 1), "p99": round(_pct(post_ms, 99), 1)},
        "get_ms": {"n": len(get_ms), "p50": round(_pct(get_ms, 50), 1), "p99": round(_pct(get_ms, 99), 1),
                   "mean": round(statistics.fmean(get_ms), 1) if get_ms else None},
        "healthz_after": health,
    }
    print(json.dumps(figures, indent=2))
    for line in errors[:10]:
        print("error:", line, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if not lost and len(accepted) == args.submissions and listed == len(accepted) else 1


if __name__ == "__main__":
    sys.exit(main())
