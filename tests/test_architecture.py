"""The layers hold: import-linter's contracts in pyproject.toml (the core library never imports the
service, the jobs, the reference runs or the CLI; the jobs and reference runs never import the web
layer), and the public Python API imports without Flask, SQLAlchemy or the reference runs; ruff and mypy
pass with the configuration in pyproject.toml; the failure guard around model code is written once."""

from __future__ import annotations

import re
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


def test_the_wheel_carries_the_reference_runs(wheel):
    """An installed wheel has what the service attaches reference profiles from (no repository needed)."""
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    runs = ROOT / "audit_service" / "reference" / "runs"
    shipped = {str(p.relative_to(ROOT)) for p in runs.rglob("*") if p.is_file() and p.suffix in (".json", ".onnx", ".pt")}
    assert len(shipped) >= 12 * 3 and shipped <= names, sorted(shipped - names)[:5]


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"Expected {name} in the environment; install the test extras: pip install -e '.[test]'"
    return str(path)


def test_ruff_finds_nothing():
    """The lint rules in pyproject.toml ([tool.ruff]) hold over the package, the tests and the benchmarks."""
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "audit_service", "tests", "benchmarks"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_engine_is_formatted():
    """The engine keeps ruff's format (``ruff format audit_service/engine`` mends it; [tool.ruff] sets the width)."""
    out = subprocess.run([_tool("ruff"), "format", "--check", "--no-cache", "audit_service/engine"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_passes_on_the_engine():
    """The engine type-checks under pyproject.toml's [tool.mypy]: every body checked (check_untyped_defs), None
    told apart (strict optional, no implicit Optional), no unused ``type: ignore``; imports of untyped libraries
    are not followed."""
    out = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Success" in out.stdout


def test_the_failure_guard_is_written_once():
    """Model code runs inside ``errors.model_failures``: no other engine or cage module re-raises our errors and
    wraps the rest by hand, or words the model's failure itself. (Loading a ``.pt2`` archive keeps its own
    guard: a file that does not load is a ModelError, not a failure of the model's code.)"""
    guard = re.compile(r"except AuditError:\s*raise\s*except (?:Exception|BaseException)")
    sources = [*(ROOT / "audit_service" / "engine").rglob("*.py"), ROOT / "audit_service" / "jobs" / "cage.py"]
    hand_written = {str(p.relative_to(ROOT)) for p in sources if guard.search(p.read_text())}
    assert hand_written <= {"audit_service/engine/errors.py", "audit_service/engine/runtime/pt2_runner.py"}, \
        hand_written
    worded = {str(p.relative_to(ROOT)) for p in sources if "The model failed {" in p.read_text()
              or re.search(r"f\"The model failed (on|while)", p.read_text())}
    assert worded == {"audit_service/engine/errors.py"}, worded
