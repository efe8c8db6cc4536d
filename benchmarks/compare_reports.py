"""Do two trees of this repository write the same reports? (issue 20: "reports byte-compatible with today's schema")

Builds a few models once (ONNX and TorchScript; not invariant, genuine, trivial; with labels, shifts, a second probe
set, a sampled permutation group, early stop), then audits every one with each tree's engine, each in its own
process (``PYTHONPATH=<tree>``), and compares the report JSON key for key, in order. Fields that differ by nature
(``created_at``, ``service_version``, ``timing``) are left out; floats must agree to ``--rtol``. An older tree
whose entry takes the six arguments (before ``AuditRequest``) is called that way.

    git worktree add /tmp/before 8fa8053
    .venv/bin/python benchmarks/compare_reports.py --before /tmp/before --after .
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNSTABLE = ("created_at", "service_version", "timing")  # and each condition's ``seconds``
OPTIONS = {"device": "cpu", "ig_steps": 2, "bootstrap": 50, "seed": 0}


def build_cases(out: Path) -> list[dict]:
    """The models and the audits of each (files under ``out``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import IMAGE_SHAPE, report_models

    rng = np.random.default_rng(0)
    np.save(out / "x.npy", rng.random((8, *IMAGE_SHAPE), dtype=np.float32))
    np.save(out / "y.npy", rng.integers(0, 10, 8))
    np.save(out / "second.npy", rng.random((8, *IMAGE_SHAPE), dtype=np.float32))
    plain, genuine, constant = report_models(out)
    shifts = [{"name": "gaussian_noise", "severity": 3}, {"name": "blend", "beta": 0.3, "target": "second_probes"}]
    permutation = {"name": "permutation", "generators": [[*range(1, 12), 0]], "max_order": 4, "sample": 6}
    return [
        dict(name="onnx, labels, shifts, second probes, SI everywhere", model=str(plain), group="C4", shifts=shifts,
             options={"saliency_scope": "all"}, probes=True, labels=True, second=True),
        dict(name="torchscript genuine, no labels", model=str(genuine), group="C4", probes=True),
        dict(name="onnx, no probes, no saliency", model=str(plain), group="flip", options={"saliency": False}),
        dict(name="sampled permutation group, early stop", model=str(plain), group=permutation,
             shifts=[{"name": "blur", "severity": 1}], options={"early_stop": True}, probes=True, labels=True),
        dict(name="constant model (trivial)", model=str(constant), group="C4", probes=True),
        dict(name="torchscript genuine, D4, decisive SI", model=str(genuine), group="D4", probes=True, labels=True),
    ]


def produce(cases_file: Path, out_file: Path) -> None:
    """In the tree on ``PYTHONPATH``: audit every case, write the reports."""
    from audit_service.engine.spec import parse_audit_spec

    try:
        from audit_service.engine.inputs import AuditRequest
        from audit_service.engine.audit import run_audit

        def audit(model, spec, probes, labels, second):  # noqa: ANN001, ANN202
            return run_audit(AuditRequest(model, spec, probes=probes, labels=labels, second_probes=second))
    except ImportError:  # the entry before AuditRequest took the six values
        from audit_service.engine.audit import run_audit as audit  # type: ignore[no-redef]

    data = cases_file.parent
    reports = {}
    for case in json.loads(cases_file.read_text()):
        spec = parse_audit_spec({"group": case["group"], "shifts": case.get("shifts", []),
                                 "options": {**OPTIONS, **case.get("options", {})}})
        load = (lambda key, name: np.load(data / name) if case.get(key) else None)  # noqa: E731
        reports[case["name"]] = audit(case["model"], spec, load("probes", "x.npy"), load("labels", "y.npy"),
                                      load("second", "second.npy"))
    out_file.write_text(json.dumps(reports))


def differences(a: object, b: object, rtol: float, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ: keys (in order), types, values (floats to ``rtol``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], rtol, f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, rtol, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        same = a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)
        return [] if same else [f"{where}: {a!r} != {b!r}"]
    return [] if (type(a) is type(b) and a == b) else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="the older tree (a git worktree); required")
    parser.add_argument("--after", type=Path, default=ROOT, help="the newer tree (default: this one)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance on floats (default 1e-5)")
    parser.add_argument("--produce", nargs=2, type=Path, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        produce(*args.produce)
        return
    if args.before is None:
        parser.error("--before is required: the older tree (git worktree add /tmp/before REV)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = work / "cases.json"
        cases.write_text(json.dumps(build_cases(work)))
        made = {}
        for side, tree in (("before", args.before), ("after", args.after)):
            out = work / f"{side}.json"
            env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
            subprocess.run([sys.executable, __file__, "--produce", str(cases), str(out)], env=env, check=True,
                           cwd=tree)
            made[side] = json.loads(out.read_text())
    failed = 0
    for name, before in made["before"].items():
        after = made["after"][name]
        for report in (before, after):
            for key in UNSTABLE:
                report.pop(key, None)
            for condition in report["conditions"]:
                condition.pop("seconds", None)
        found = differences(before, after, args.rtol)
        exact = json.dumps(before) == json.dumps(after)
        print(f"{name}: {'identical' if exact else 'equal to rtol' if not found else f'{len(found)} differences'}")
        sections: dict[str, list[str]] = {}
        for line in found:
            sections.setdefault(line[1:].split(".")[0].split("[")[0].split(":")[0], []).append(line)
        for section, lines in sections.items():
            print(f"    {section}: {len(lines)}, first {lines[0]}")
        failed += bool(found)
    print(f"{len(made['before']) - failed} of {len(made['before'])} reports agree")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
