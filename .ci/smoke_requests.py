"""The requests of the container smoke test (``.ci/container-smoke``), standard library only: /healthz, then one
ONNX and one TorchScript audit through ``POST /audit?wait=``, each answered 200 with a verdict."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"group": "C4", "shifts": [], "options": {"n_probes": 16, "n_noise_probes": 16, "ig_steps": 4,
                                                  "jacobian_probes": 4, "bootstrap": 20}}
MODELS = {  # (file, the verdict it must get): the demo's C4 average is genuine whatever the probes
    "onnx": (ROOT / "models" / "demo" / "c4_averaged_cnn.onnx", "genuine"),
    "torchscript": (ROOT / "audit_service" / "reference" / "runs" / "R4_WT_s0" / "model.pt", "genuine"),
}


def multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def main(url: str, token: str) -> int:
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                assert json.load(r) == {"status": "ok"}
                break
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise SystemExit("the container's /healthz never answered") from None
            time.sleep(1)
    print("healthz: ok", file=sys.stderr)
    for fmt, (path, expected) in MODELS.items():
        body, ctype = multipart({"spec": json.dumps(SPEC)}, {"model": path})
        request = urllib.request.Request(url + "/audit?wait=300", data=body, method="POST",
                                         headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=330) as r:
                status, answer = r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{fmt}: HTTP {exc.code}: {exc.read()[:2000].decode(errors='replace')}") from None
        if status != 200 or answer.get("verdict") != expected:
            raise SystemExit(f"{fmt}: expected 200 with verdict {expected!r}, got {status}: {json.dumps(answer)[:2000]}")
        print(f"{fmt} audit: {answer['verdict']} ({path.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
