"""Calibration of the verdict (policy 3): the figures behind docs/audit.md, "How the thresholds were calibrated".

Audits, with the engine (``run_audit``) and the default policy and gate, and prints one table row each:

* ``reference``: the shipped reference runs (``audit_service/reference/runs/*_s0``), re-audited as ``audit-service
  reference reproduce`` does (256 test digits with labels, drift toward the image patches, default shifts);
  their labels must not change;
* ``untrained``: stock torchvision architectures with random weights at 3x32x32 (``tests/verdict_zoo.py``) under
  ``flip`` and C4, on natural-image patches, on uniform noise (no labels) and on digits with labels;
* ``trained``: a small global-pooling CNN trained on the 12x12 digits with flip / C4 augmentation and without;
* ``scale``: ResNet-18 x1e-12, x1e6 and +1e4 on every logit (same decision), and a model whose logits are
  rounding-error ties.

"before" is the label the previous rule (policy 2, identity-inclusive criteria, at git revision ``--before``)
gives on the same measurements; "after" is this checkout's. ``--json`` writes every row.

    .venv/bin/python benchmarks/calibrate_verdict.py [--sections reference,untrained,trained,scale]
        [--models resnet18,...] [--probes 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from audit_service.engine.audit import AuditRequest, run_audit  # noqa: E402
from audit_service.engine.runtime.module_runner import ModuleRunner  # noqa: E402
from audit_service.engine.spec import parse_audit_spec  # noqa: E402
import verdict_zoo as zoo  # noqa: E402

BEFORE = "7de1b62"  # the last revision with policy 2


def load_previous_rule(rev: str):
    """``decide`` and ``Policy`` of ``audit_service/engine/verdict.py`` / ``spec.py`` at git revision ``rev``, or None."""
    try:
        files = {name: subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:audit_service/{name}.py"],
                                      check=True, capture_output=True, text=True).stdout
                 for name in ("errors", "spec", "verdict")}
    except (OSError, subprocess.CalledProcessError):
        return None
    package = types.ModuleType("previous_rule")
    package.__path__ = []
    sys.modules["previous_rule"] = package
    modules = {}
    for name in ("errors", "spec", "verdict"):
        spec = importlib.util.spec_from_loader(f"previous_rule.{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "previous_rule"
        sys.modules[f"previous_rule.{name}"] = module
        exec(compile(files[name], f"{rev}:audit_service/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["verdict"].decide, modules["spec"].Policy


def previous_label(rule, report: dict) -> str | None:
    """The previous rule on this report's identity-inclusive means (what policy 2 read as ``metrics``)."""
    if rule is None:
        return None
    decide, policy = rule
    conditions = [{**c, "metrics": c["paper_metrics"]} for c in report["conditions"]]
    return decide(conditions, policy())["label"]


def audit_module(model: torch.nn.Module, group, probes, labels=None, second=None, shifts=(), **options) -> dict:
    spec = parse_audit_spec({"group": group, "shifts": list(shifts), "options": {"device": "cpu", **options}})
    runner = ModuleRunner(model.eval(), tuple(probes.shape[1:]), torch.device("cpu"))
    return run_audit(AuditRequest(runner, spec, probes=probes, labels=labels, second_probes=second))


def row(section: str, model: str, group: str, probes: str, report: dict, rule, seconds: float) -> dict:
    conds = {c["name"]: c for c in report["conditions"]}
    clean, noise = conds.get("clean"), conds.get("noise")
    m = clean["metrics"] if clean else {}
    v = report["verdict"]
    return {
        "section": section, "model": model, "group": group, "probes": probes,
        "n_probes": clean["n_probes"] if clean else 0,
        "agreement": m.get("agreement"), "agreement_paper": clean["paper_metrics"]["agreement"] if clean else None,
        "kappa": m.get("kappa"), "accuracy": m.get("accuracy"), "accuracy_kappa": m.get("accuracy_kappa"),
        "LI_normalized": m.get("LI_normalized"), "SI": m.get("SI"), "DI": m.get("DI"),
        "noise_agreement": noise["metrics"]["agreement"] if noise else None,
        "noise_kappa": noise["metrics"].get("kappa") if noise else None,
        "noise_LI_normalized": noise["metrics"]["LI_normalized"] if noise else None,
        "relative_spread": clean["relative_spread"] if clean else (noise or {}).get("relative_spread"),
        "before": previous_label(rule, report), "after": v["label"], "passed": v["passed"],
        "borderline": v["borderline"],
        "borderline_on": [f"{c['condition']} {c['criterion']}" for c in v["borderline_criteria"]],
        "seconds": round(seconds, 1),
    }


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


HEADER = ("| model | group | probes | n | agreement g!=e (paper) | kappa | acc_kappa | noise agreement | "
          "LI_norm | rel. spread | before | after | passes | borderline |\n|" + "---|" * 14)


def print_row(r: dict) -> None:
    print(f"| {r['model']} | {r['group']} | {r['probes']} | {r['n_probes']} | {_fmt(r['agreement'])} "
          f"({_fmt(r['agreement_paper'])}) | {_fmt(r['kappa'])} | {_fmt(r['accuracy_kappa'])} | "
          f"{_fmt(r['noise_agreement'])} | {_fmt(r['LI_normalized'])} | {_fmt(r['relative_spread'])} | "
          f"{_fmt(r['before'])} | {r['after']} | {_fmt(r['passed'])} | "
          f"{', '.join(r['borderline_on']) if r['borderline'] else 'no'} |", flush=True)


# --------------------------------------------------------------------------- sections
def section_reference(rule, args) -> list[dict]:
    from audit_service.reference import catalog
    from audit_service.reference.reproduce import audit_run, audit_spec

    rows = []
    for run in sorted(catalog.list_reference_runs(), key=lambda r: r["name"]):
        if run["seed"] != 0:
            continue
        start = time.perf_counter()
        spec = audit_spec(run["group"], options={"n_probes": args.reference_probes})
        report = audit_run(catalog.reference_model_path(run["name"], "onnx"), run["group"], spec=spec)
        r = row("reference", run["name"], run["group"], "test digits + labels", report, rule,
                time.perf_counter() - start)
        r["shipped"] = run["verdict"]
        rows.append(r)
        print_row(r)
    return rows


def _small_options(n: int) -> dict:
    return {"n_probes": n, "n_noise_probes": n, "ig_steps": 8, "jacobian_probes": 2, "bootstrap": 200}


def section_untrained(rule, args) -> list[dict]:
    n = args.probes
    kinds = {"patches": (zoo.natural_patches(n), None), "uniform noise": (zoo.uniform_noise(n), None),
             "digits + labels": zoo.rgb_digits(n)}
    rows = []
    for name in args.models:
        model = zoo.stock(name)
        for group in ("flip", "C4"):
            for kind, (x, y) in kinds.items():
                start = time.perf_counter()
                report = audit_module(model, group, x, y, **_small_options(n))
                r = row("untrained", name, group, kind, report, rule, time.perf_counter() - start)
                rows.append(r)
                print_row(r)
    return rows


def section_trained(rule, args) -> list[dict]:
    _, _, xte, yte = zoo.digits12()
    x, y = xte[:args.probes * 2], yte[:args.probes * 2]
    rows = []
    for augment in ("flip", "C4", None):
        start = time.perf_counter()
        model = zoo.train_cnn(augment, epochs=args.epochs)
        trained_s = time.perf_counter() - start
        for group in ("flip", "C4"):
            for with_labels in (True, False):
                start = time.perf_counter()
                report = audit_module(model, group, x, y if with_labels else None, **_small_options(len(x)))
                name = f"PooledCNN {args.epochs} ep, aug {augment or 'none'}"
                r = row("trained", name, group, "test digits" + (" + labels" if with_labels else ""), report, rule,
                        time.perf_counter() - start + trained_s)
                rows.append(r)
                print_row(r)
    untrained = zoo.PooledCNN()
    for group in ("flip", "C4"):
        start = time.perf_counter()
        report = audit_module(untrained, group, x, y, **_small_options(len(x)))
        r = row("trained", "PooledCNN untrained", group, "test digits + labels", report, rule,
                time.perf_counter() - start)
        rows.append(r)
        print_row(r)
    return rows


def section_scale(rule, args) -> list[dict]:
    n = args.probes
    x = zoo.natural_patches(n)
    rows = []
    variants = {"resnet18": zoo.Scaled(zoo.stock("resnet18")),
                "resnet18 x1e-12": zoo.Scaled(zoo.stock("resnet18"), scale=1e-12),
                "resnet18 x1e6": zoo.Scaled(zoo.stock("resnet18"), scale=1e6),
                "resnet18 +1e4": zoo.Scaled(zoo.stock("resnet18"), offset=1e4),
                "rounding-error ties": zoo.RoundingNoise()}
    for name, model in variants.items():
        start = time.perf_counter()
        report = audit_module(model, "flip", x, **_small_options(n))
        r = row("scale", name, "flip", "patches", report, rule, time.perf_counter() - start)
        rows.append(r)
        print_row(r)
    return rows


SECTIONS = {"reference": section_reference, "untrained": section_untrained, "trained": section_trained,
            "scale": section_scale}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="reference,untrained,trained,scale")
    p.add_argument("--models", default=",".join(zoo.STOCK), help="stock architectures (tests/verdict_zoo.py)")
    p.add_argument("--probes", type=int, default=32, help="probes per audit (noise probes too)")
    p.add_argument("--reference-probes", type=int, default=256)
    p.add_argument("--epochs", type=int, default=6, help="training epochs of the small CNNs")
    p.add_argument("--before", default=BEFORE, help="git revision of the previous rule ('' to skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write every row here")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    torch.set_num_threads(args.threads)
    rule = load_previous_rule(args.before) if args.before else None
    print(HEADER)
    rows = []
    for name in args.sections.split(","):
        rows += SECTIONS[name](rule, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
