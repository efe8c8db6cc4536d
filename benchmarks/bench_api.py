"""API benchmark on loopback: requests/s of GET /audits/{id} under 50 concurrent clients, and the time
from POST /audit to the job running (and to its report).

    .venv/bin/python benchmarks/bench_api.py                 # starts its own service in a temp dir
    .venv/bin/python benchmarks/bench_api.py --url http://127.0.0.1:8000   # against a running one

Bounded: a fixed number of requests per client, threads only, 127.0.0.1 only; stops by itself.
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
from datetime import datetime
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"group": "C4", "shifts": [], "options": {"n_probes": 8, "n_noise_probes": 8, "ig_steps": 4,
                                                   "jacobian_probes": 4, "bootstrap": 20}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import IMAGE_SHAPE, PlainCNN, export_onnx

    return export_onnx(PlainCNN(seed=0), IMAGE_SHAPE, path)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def start_service(data: Path, web_workers: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AUDIT_DATA_DIR": str(data), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "audit_service.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--web-workers", str(web_workers)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if requests.get(url + "/healthz", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("service did not start")


def bench_get(url: str, job_id: str, clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        nonlocal errors
        session = requests.Session()
        local, bad = [], 0
        barrier.wait()
        for _ in range(per_client):
            t = time.perf_counter()
            r = session.get(f"{url}/audits/{job_id}", timeout=30)
            local.append(time.perf_counter() - t)
            bad += r.status_code != 200
        with lock:
            latencies.extend(local)
            errors += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(1000 * lat[len(lat) // 2], 1),
            "p99_ms": round(1000 * lat[int(len(lat) * 0.99) - 1], 1)}


def bench_submit(url: str, model: Path, probes: Path, n: int) -> dict:
    to_running, to_done, post_ms = [], [], []
    for i in range(n):
        spec = {**SPEC, "options": {**SPEC["options"], "seed": i}}
        t = time.perf_counter()
        r = requests.post(url + "/audit", files={"model": open(model, "rb"), "probes": open(probes, "rb")},
                          data={"spec": json.dumps(spec)}, timeout=60)
        post_ms.append(1000 * (time.perf_counter() - t))
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            job = requests.get(f"{url}/audits/{job_id}", timeout=10).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        created = _ts(job["timings"]["created_at"])
        to_running.append(_ts(job["timings"]["started_at"]) - created)
        to_done.append(_ts(job["timings"]["finished_at"]) - created)
    return {"jobs": n, "post_ms_median": round(statistics.median(post_ms), 1),
            "post_to_running_s_median": round(statistics.median(to_running), 3),
            "post_to_running_s_max": round(max(to_running), 3),
            "post_to_report_s_median": round(statistics.median(to_done), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service (default: start one in a temp dir)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-client", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--web-workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = _model(tmp / "plain.onnx")
        np.save(tmp / "probes.npy", np.random.default_rng(0).random((8, 1, 12, 12), dtype=np.float32))
        proc = None
        url = args.url
        if url is None:
            proc, url = start_service(tmp / "data", args.web_workers)
        try:
            submit = bench_submit(url, model, tmp / "probes.npy", args.jobs)
            job_id = requests.get(url + "/audits?limit=1", timeout=10).json()["items"][0]["id"]
            get = bench_get(url, job_id, args.clients, args.per_client)
            print(json.dumps({"get_audit": get, "submit": submit, "web_workers": args.web_workers,
                              "cpus": os.cpu_count()}, indent=2))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)


if __name__ == "__main__":
    main()
