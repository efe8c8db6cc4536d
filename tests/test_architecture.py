"""The layers hold: import-linter's contracts in pyproject.toml (the core library never imports the
service, the jobs, the reference runs or the CLI; the jobs and reference runs never import the web
layer), and the public Python API imports without Flask, SQLAlchemy or the reference runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    linter = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_python_api_loads_without_the_upper_layers():
    code = ("import sys, audit_service as a; a.audit; a.AuditResult; a.symmetrize; a.OrbitInvariance; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('flask', 'sqlalchemy', 'celery', 'gunicorn') "
            "or m.startswith(('audit_service.service', 'audit_service.jobs', 'audit_service.reference'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_wheel_carries_the_reference_runs(tmp_path):
    """An installed wheel has what the service attaches reference profiles from (no repository needed)."""
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ROOT), "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("audit_service-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    runs = ROOT / "audit_service" / "reference" / "runs"
    shipped = {str(p.relative_to(ROOT)) for p in runs.rglob("*") if p.is_file() and p.suffix in (".json", ".onnx", ".pt")}
    assert len(shipped) >= 12 * 3 and shipped <= names, sorted(shipped - names)[:5]
