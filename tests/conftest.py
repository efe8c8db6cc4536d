"""Shared fixtures: a real ``audit-service serve`` (gunicorn + local workers) on a free loopback port,
small real models, and an OpenAPI checker that validates every response against ``openapi.yaml``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from polling import wait_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: tiny audits: the whole suite shares 2 cores
TINY_OPTIONS = {"n_probes": 8, "n_noise_probes": 8, "ig_steps": 4, "jacobian_probes": 4, "bootstrap": 20}


def tiny_spec(group: object = "C4", **extra: object) -> dict:
    return {"group": group, "shifts": [], "options": dict(TINY_OPTIONS), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``audit-service serve`` as a child process; ``stop()`` sends SIGTERM like an operator would."""

    def __init__(self, data_dir: Path, workers: int = 1, web_workers: int = 2, new_session: bool = False,
                 **env: str) -> None:
        self.data_dir, self.workers, self.web_workers = Path(data_dir), workers, web_workers
        self.new_session = new_session  # its own process group, so a test can kill -9 all of it
        self.env = {k: str(v) for k, v in env.items()}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir.parent / f"service-{self.port}.log"

    def start(self, timeout: float = 90.0) -> "Service":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "AUDIT_DATA_DIR": str(self.data_dir), "PYTHONPATH": str(ROOT), **self.env}
        self.log = self.data_dir.parent / f"service-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "audit_service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers), "--web-workers", str(self.web_workers)],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=str(ROOT),
            start_new_session=self.new_session)
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}:\n{self.log.read_text()[-3000:]}")
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200

        try:
            wait_for(healthy, timeout, 0.2, f"the service at {self.url} to answer /healthz",
                     ignore=(requests.RequestException,))
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"service did not come up ({exc}):\n{self.log.read_text()[-3000:]}") from None
        return self

    def kill_all(self) -> None:
        """kill -9 the whole service (serve, gunicorn, workers) at once, like a power cut."""
        assert self.proc is not None and self.new_session
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory):
    """The shared running service: 1 audit worker, small upload caps (to test 413 cheaply)."""
    data = tmp_path_factory.mktemp("service") / "data"
    svc = Service(data, workers=1, AUDIT_MAX_PROBES_MB=1, AUDIT_MAX_UPLOAD_MB=8, AUDIT_MAX_MODEL_MB=4,
                  AUDIT_JOB_MEMORY_MB=6144, AUDIT_JOB_TIMEOUT_S=300, AUDIT_MAX_WAIT_S=120).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real models and probe files, built once."""
    import torch
    from builders import IMAGE_SHAPE, Hostile, OrbitAveragedCNN, PlainCNN, export_onnx, export_torchscript

    out = tmp_path_factory.mktemp("models")
    paths = {
        "plain": export_onnx(PlainCNN(seed=0), IMAGE_SHAPE, out / "plain.onnx"),
        "plain2": export_onnx(PlainCNN(seed=1), IMAGE_SHAPE, out / "plain2.onnx"),
        "invariant": export_onnx(OrbitAveragedCNN(PlainCNN(seed=2), "C4"), IMAGE_SHAPE, out / "invariant.onnx"),
    }

    class Hang(Hostile):
        """Fine on the loader's probe batch; spins forever on an audit batch."""

        def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            s = torch.zeros(1)
            for i in range(2_000_000_000):
                s = s + 1.0
            return y + s

    class Hog(Hostile):
        """Fine on the loader's probe batch; asks for ~40 GB on an audit batch."""

        def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            big = torch.ones(10_000_000_000)
            return y + big[:1]

    paths["hang"] = export_torchscript(Hang(), IMAGE_SHAPE, out / "hang.pt", script=True)
    paths["hog"] = export_torchscript(Hog(), IMAGE_SHAPE, out / "hog.pt", script=True)
    rng = np.random.default_rng(0)
    probes = rng.random((8, *IMAGE_SHAPE), dtype=np.float32)
    np.save(out / "probes.npy", probes)
    np.savez(out / "probes_labels.npz", x=probes, y=rng.integers(0, 10, 8))
    np.save(out / "big_probes.npy", rng.random((300_000,), dtype=np.float64))  # 2.4 MB > 1 MiB cap
    (out / "garbage.onnx").write_bytes(b"this is not a model" * 10)
    (out / "spec.json").write_text(json.dumps(tiny_spec()))
    paths.update({k: out / n for k, n in [("probes", "probes.npy"), ("probes_labels", "probes_labels.npz"),
                                            ("big_probes", "big_probes.npy"), ("garbage", "garbage.onnx"),
                                            ("spec", "spec.json")]})
    return paths


class ContractChecker:
    """Validates responses against ``openapi.yaml`` with openapi-core; records what it checked."""

    def __init__(self) -> None:
        from openapi_core import Config, OpenAPI

        config = Config(extra_media_type_deserializers={"application/problem+json": json.loads})
        self.openapi = OpenAPI.from_file_path(str(ROOT / "openapi.yaml"), config=config)
        self.checked = 0

    def __call__(self, response: requests.Response) -> requests.Response:
        from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse

        request = response.request
        # multipart bodies are not re-validated here (the server validates them); the response is
        # (the contract's server is 127.0.0.1:8000; tests run on a free port, so the URL is mapped onto it)
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(request.url)
        url = urlunsplit(("http", "127.0.0.1:8000", parts.path, parts.query, ""))
        request_view = requests.Request(request.method, url, headers={}).prepare()
        self.openapi.validate_response(RequestsOpenAPIRequest(request_view), RequestsOpenAPIResponse(response))
        self.checked += 1
        return response


@pytest.fixture(scope="session")
def contract() -> ContractChecker:
    return ContractChecker()


@pytest.fixture
def api(service: Service, contract: ContractChecker):
    """``api("GET", "/audits")`` -> response, validated against the contract."""

    def call(method: str, path: str, **kwargs: object) -> requests.Response:
        kwargs.setdefault("timeout", 150)
        return contract(requests.request(method, service.url + path, **kwargs))

    return call


TERMINAL = ("succeeded", "failed", "cancelled")


def settle(url: str, ids: list[str], timeout: float = 300.0, headers: dict | None = None) -> dict[str, dict]:
    """Poll the service until every job in ``ids`` is final; {id: job}."""
    jobs: dict[str, dict] = {}

    def final() -> dict[str, dict] | None:
        jobs.update({i: requests.get(f"{url}/audits/{i}", timeout=30, headers=headers).json() for i in ids})
        return dict(jobs) if all(j["status"] in TERMINAL for j in jobs.values()) else None

    return wait_for(final, timeout, 0.5, lambda: "jobs to finish: " + str(
        {i: (j["status"], j["stage"]) for i, j in jobs.items()}))


def wait_for_job(api_call, job_id: str, timeout: float = 180.0, states=TERMINAL) -> dict:
    """Poll ``GET /audits/{job_id}`` through ``api_call`` until the job is in one of ``states``; the job."""
    seen: dict = {}

    def reached() -> dict | None:
        seen.update(api_call("GET", f"/audits/{job_id}").json())
        return dict(seen) if seen["status"] in states else None

    return wait_for(reached, timeout, 0.3, lambda: f"job {job_id} to be {'/'.join(states)} (it is {seen})")


@pytest.fixture(scope="session")
def postgres():
    """A private throwaway PostgreSQL server on a free loopback port (``tests/pg.py``); the tests that
    use it skip when the server binaries are not installed."""
    from pg import serve_postgres

    yield from serve_postgres()


@pytest.fixture
def postgres_url(postgres):
    """The SQLAlchemy URL of a fresh, empty database on that server, dropped afterwards."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of this tree (the checkout's ``build/`` stays untouched); the
    copy stays beside it, at ``wheel.parents[1] / "src"``."""
    import shutil

    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "openapi.yaml"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "audit_service", src / "audit_service", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(root / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    [built] = (root / "dist").glob("audit_service-*.whl")
    return built


# ----------------------------------------------------------------------------- CPU time per test
# `TEST_CPU_REPORT=30 pytest ...` lists the 30 tests that took the most CPU seconds (this process and the
# children it waited for): on a shared machine wall-clock durations say more about the neighbours than the test.
# `TEST_CPU_LOG=file` appends "cpu_s wall_s nodeid" as each test ends.
_CPU_SECONDS: dict[str, tuple[float, float]] = {}


def _cpu_now() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu_now(), time.monotonic()
    yield
    _CPU_SECONDS[item.nodeid] = (_cpu_now() - cpu, time.monotonic() - wall)
    if os.environ.get("TEST_CPU_LOG"):  # one line a test as it ends, for a run one cannot wait for
        with open(os.environ["TEST_CPU_LOG"], "a") as log:
            log.write(f"{_CPU_SECONDS[item.nodeid][0]:.1f} {_CPU_SECONDS[item.nodeid][1]:.1f} {item.nodeid}\n")


def pytest_terminal_summary(terminalreporter):
    top = int(os.environ.get("TEST_CPU_REPORT", "0") or 0)
    if not top or not _CPU_SECONDS:
        return
    terminalreporter.section(f"the {top} tests with the most CPU seconds (cpu s / wall s)")
    ranked = sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1][0])[:top]
    for nodeid, (cpu, wall) in ranked:
        terminalreporter.write_line(f"{cpu:8.1f} {wall:8.1f}  {nodeid}")
    total_cpu = sum(c for c, _ in _CPU_SECONDS.values())
    total_wall = sum(w for _, w in _CPU_SECONDS.values())
    terminalreporter.write_line(f"{total_cpu:8.1f} {total_wall:8.1f}  all {len(_CPU_SECONDS)} tests")
