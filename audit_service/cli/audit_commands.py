"""``audit-service audit``: run one audit locally and gate on its verdict."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..engine.errors import ModelError, ProbeError, SpecError
from ..adapters.mlflow_registry import is_registry_uri
from ..engine.spec import SHIFT_PARAMETERS, AuditSpec, parse_audit_spec, parse_group_arg, read_json_arg
from ..engine.names import Metric
from ..engine.schema import Report, parse_report

EXIT_OK, EXIT_GATE_FAILED = 0, 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="audit a model file locally",
        description="Audit an ONNX, TorchScript or torch.export (.pt2) classifier's invariance to a group. Exit status: 0 the "
                    "gate passed (PASS: the verdict is in --require, default genuine,learned, and with --strict not "
                    "borderline), 1 the gate failed (FAIL), 2 bad input.",
    )
    p.add_argument("model", help="ONNX (.onnx), TorchScript (torch.jit.save) or torch.export program (.pt2) file, "
                                 "or an MLflow registry URI: models:/NAME/VERSION, models:/NAME@ALIAS, "
                                 "runs:/RUN_ID/PATH (registry from MLFLOW_TRACKING_URI; the ONNX flavor or a .onnx "
                                 "/ .pt2 artifact is fetched)")
    add_spec_arguments(p)
    p.add_argument("--mlflow-write-back", action="store_true",
                   help="with a models:/ or runs:/ MODEL: tag the version (or run) with the verdict and headline "
                        "metrics and log the reports to a run (see docs/mlflow.md)")
    p.add_argument("--output", "-o", type=Path, help="write the JSON report here")
    p.add_argument("--html", type=Path, metavar="FILE", help="write the HTML report here")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of a summary")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but errors (no estimate, progress bar or summary; the exit status and "
                        "--output / --html / --json still say the result)")
    p.set_defaults(func=run_audit_command)

    d = sub.add_parser("demo", help="rebuild the demo models in models/demo (one per verdict)",
                       description="Train and export the demo models (plain CNN, its C4 orbit average, a constant "
                                   "model) and 256 MNIST probes.")
    d.add_argument("--out", type=Path, default=Path("models/demo"))
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_demo_command)

    s = sub.add_parser("symmetrize", help="write the orbit-averaged (genuinely invariant) model as ONNX",
                       description="Average MODEL's logits over the orbit of --group: the result is invariant "
                                   "for every input by construction and costs |G| forward passes of MODEL per "
                                   "sample. Written as ONNX with a dynamic batch axis.")
    s.add_argument("model", type=Path, help="ONNX, TorchScript or torch.export (.pt2) file")
    s.add_argument("--group", required=True, help="an exact group: C4, D4, flip, JSON or @file.json")
    s.add_argument("--input-shape", help="per-sample input shape when the file does not record it, e.g. 1,28,28")
    s.add_argument("--output", "-o", type=Path, required=True, help="where to write the ONNX file")
    s.set_defaults(func=run_symmetrize_command)


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that make an audit spec; ``audit`` and ``submit`` share them (see ``build_spec_dict``)."""
    p.add_argument("--group",
                   help='group name (C4, D4, flip), JSON (\'{"name": "translation", "order": 4, "step": 7}\') '
                        "or @file.json (required unless --spec has one)")
    p.add_argument("--probes", type=Path, help="in-distribution probes: .npy (N, C, H, W) float32, or .npz "
                                                "with x (and y)")
    p.add_argument("--labels", type=Path, help=".npy of integer labels, one per probe")
    p.add_argument("--second-probes", type=Path, help="second probe set for blend(second_probes) shifts")
    p.add_argument("--shift", action="append", default=None, metavar="NAME[@SEVERITY]",
                   help="input shift, repeatable: gaussian_noise@3, blur@5, contrast, brightness, occlusion, "
                        "blend@0.5 (toward noise), blend:second@0.3 (toward --second-probes), a JSON object; "
                        "'none' for no shifts. Default: gaussian_noise, blur, contrast at severities 1, 3, 5")
    p.add_argument("--spec", help="full audit spec (group, shifts, options, policy, require): JSON text, "
                                  "@file.json or a file path; the flags here override it")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="sweep option, repeatable: n_probes=256, ig_steps=32, device=cuda, seed=1, ...")
    p.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                   help="verdict threshold override, repeatable: genuine_si_min=0.95, ...")
    p.add_argument("--require", help="comma-separated verdict labels that pass the gate, e.g. genuine or "
                                     "genuine,learned (the default); exit 1 otherwise")
    p.add_argument("--strict", action="store_true",
                   help="strict gate (spec require_confident): a borderline verdict, where a deciding criterion's "
                        "95%% interval straddles its threshold, fails too; the report says how many probes would "
                        "settle it")


def run_audit_command(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    _check_paths_exist(args)  # before the engine's imports (torch: seconds), so a typo is told at once
    from ..engine.audit import AuditRequest, run_audit
    from ..engine.inputs import load_probe_file

    probes = labels = second = None
    if args.probes:
        probes, labels = load_probe_file(args.probes)
    if args.labels:
        labels, _ = load_probe_file(args.labels)
    if args.second_probes:
        second, _ = load_probe_file(args.second_probes)
    said: list[str] = []  # the estimate, told at the first progress step after the inputs are checked
    load = _estimating_loader(spec, args, probes, said)
    if is_registry_uri(args.model):
        from ..adapters.mlflow_registry import fetched_model

        with fetched_model(args.model) as (path, located, registry):
            with _progress_bar(disabled=args.quiet, said=said) as progress:
                try:
                    request = AuditRequest(path, spec, probes=probes, labels=labels, second_probes=second, load=load)
                    report = run_audit(request, progress=progress)
                except ModelError as exc:
                    if "external data" not in exc.message and "externally" not in exc.message:
                        raise
                    raise ModelError(f"{exc.message} (MLflow: mlflow.onnx.log_model saves the data files beside the "
                                     "model, where they are fetched from; or log it self-contained with "
                                     "save_as_external_data=False)", field=exc.field) from None
        typed = _attach_reference_profile(report)
        if args.mlflow_write_back:
            from ..engine.report.html import render_report_html

            registry.write_back(located, typed, render_report_html(typed))
    else:
        if args.mlflow_write_back:
            raise SpecError("Expected a models:/ or runs:/ MODEL with --mlflow-write-back, but got a file",
                            field="mlflow_write_back")
        with _progress_bar(disabled=args.quiet, said=said) as progress:
            request = AuditRequest(Path(args.model), spec, probes=probes, labels=labels, second_probes=second, load=load)
            report = run_audit(request, progress=progress)
        typed = _attach_reference_profile(report)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    if args.html:
        from ..engine.report.html import render_report_html

        args.html.write_text(render_report_html(typed), encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        print(format_summary(typed))
    verdict = typed.verdict
    # the exit status is the gate the summary prints (PASS / FAIL), the default gate (genuine,learned) included
    if not verdict.passed:
        if verdict.label in verdict.require:
            why = (f"verdict {verdict.label!r} is borderline ("
                   f"{', '.join(f'{c.condition} {c.criterion}' for c in verdict.borderline_criteria)}) "
                   "and --strict fails a borderline verdict")
        else:
            why = f"verdict {verdict.label!r} is not in {verdict.require}"
        print(f"audit-service: gate failed: {why}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return EXIT_OK


def _check_paths_exist(args: argparse.Namespace) -> None:
    """A missing model or probe file is bad input, said before anything heavy is imported."""
    named = [("model", args.model)] if not is_registry_uri(args.model) else []
    named += [(f, getattr(args, f)) for f in ("probes", "labels", "second_probes") if getattr(args, f)]
    for field, value in named:
        path = Path(value)
        if not path.is_file():
            why = "it is a directory" if path.is_dir() else "no such file"
            error = ModelError if field == "model" else ProbeError
            raise error(f"Expected a readable {field.replace('_', ' ')} file, but {path}: {why}", field=field)


def _estimating_loader(spec: AuditSpec, args: argparse.Namespace, probes: Any, said: list[str]
                       ) -> Callable[..., Any]:
    """``load_model`` that estimates, once the model is loaded, what the audit is about to spend
    (``jobs.estimate``) into ``said``; the progress bar prints it on stderr (stdout stays the summary or the
    JSON) once the inputs are checked, so bad input is still one line. Nothing with --quiet."""
    from ..engine.runtime import load_model

    if args.quiet:
        return load_model
    from ..jobs.estimate import estimating_loader

    return estimating_loader(load_model, spec, probes,
                             lambda found: said.append(f"audit-service: estimate: {found.describe()}"))


def _attach_reference_profile(report: dict) -> Report:
    """The closest reference run, for the summary and the HTML (the CLI serves the report to a person), set on
    the JSON dict (``--output``, ``--json``) and on its typed report, which is returned: the report is read by the
    models once here, and the HTML, the summary, the write-back and the gate share that reading."""
    from ..reference.catalog import closest_reference_profile

    typed = parse_report(report)
    profile = closest_reference_profile(typed)
    report["reference_profile"] = profile.to_json() if profile is not None else None
    typed.reference_profile = profile  # marked set, as a reading of the updated dict would be
    return typed


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import build_demo_models

    for name, path in build_demo_models(args.out, seed=args.seed).items():
        print(f"wrote {path}")
    return EXIT_OK


def run_symmetrize_command(args: argparse.Namespace) -> int:
    from ..engine.errors import ModelError
    from ..engine.groups import build_group
    from ..engine.runtime import load_model
    from ..engine.symmetrization import export_symmetrized_onnx

    hint = None
    if args.input_shape:
        try:
            hint = tuple(int(v) for v in args.input_shape.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise SpecError(f"Expected --input-shape like 1,28,28, but got {args.input_shape!r}",
                            field="input_shape") from None
    runner = load_model(args.model, device="cpu", input_shape=hint)
    module = runner.torch_module()
    if module is None:
        raise ModelError(f"Expected a model with a torch twin to wrap, but {runner.gradient_note}", field="model")
    group = build_group(parse_group_arg(args.group), runner.input_shape)
    export_symmetrized_onnx(module, group, runner.input_shape, args.output)
    print(f"wrote {args.output}: {args.model.name} averaged over {group.name} ({group.order} forward passes of "
          f"the original per sample)")
    return EXIT_OK


def build_spec(args: argparse.Namespace) -> AuditSpec:
    """The validated spec from the flags (``build_spec_dict``)."""
    return parse_audit_spec(build_spec_dict(args))


def build_spec_dict(args: argparse.Namespace) -> dict:
    """Merge --spec, --group, --shift, --option, --policy and --require into one spec dict (unvalidated)."""
    data: dict = _read_spec_arg(args.spec) if args.spec else {}
    if args.group:
        data["group"] = parse_group_arg(args.group)
    if "group" not in data:
        raise SpecError("Expected --group (or a --spec with a group), e.g. --group C4", field="group")
    if args.shift is not None:
        data["shifts"] = [] if args.shift == ["none"] else [parse_shift_arg(s) for s in args.shift]
    if args.option:
        data["options"] = {**data.get("options", {}), **_key_values(args.option, "option")}
    if args.policy:
        data["policy"] = {**data.get("policy", {}), **_key_values(args.policy, "policy")}
    if args.require is not None:
        data["require"] = [label.strip() for label in args.require.split(",") if label.strip()]
    if getattr(args, "strict", False):
        data["require_confident"] = True
    return data


def _read_spec_arg(text: str) -> dict:
    """--spec: JSON text, @file.json, or a path to a JSON file."""
    data = read_json_arg(text, "spec", bare_path=True)
    if not isinstance(data, dict):
        raise SpecError(f"Expected the spec to be a JSON object, but got {type(data).__name__}", field="spec")
    return data


def parse_shift_arg(text: str) -> dict:
    """``gaussian_noise@3`` / ``blur`` / ``blend@0.5`` / ``blend:second@0.3`` / JSON -> shift dict."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"Expected a shift such as blur@3 or a JSON object, but: {exc}", field="shift") from None
    name, _, level = text.partition("@")
    name, _, target = name.partition(":")
    shift: dict = {"name": name}
    if SHIFT_PARAMETERS.get(name) == "beta":  # blend: BETA and a target instead of a severity
        shift["target"] = "second_probes" if target.startswith("second") else "noise"
        try:
            shift["beta"] = float(level) if level else 0.5
        except ValueError:
            raise SpecError(f"Expected blend@BETA with BETA in [0, 1], but got {text!r}", field="shift") from None
    elif level:
        try:
            shift["severity"] = int(level)
        except ValueError:
            raise SpecError(f"Expected NAME@SEVERITY with SEVERITY 1-5, but got {text!r}", field="shift") from None
    return shift


def _key_values(items: list[str], field: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"Expected KEY=VALUE, but got {item!r}", field=field)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def format_summary(report: dict | Report) -> str:
    """A terminal summary: verdict first, then one row per condition (the typed report's fields)."""
    report = parse_report(report)
    v, g, model, timing = report.verdict, report.group, report.model, report.timing
    strict = ", strict" if v.require_confident else ""
    columns = ((Metric.DI, "DI", 11, ".3g"), (Metric.LI, "LI", 11, ".3g"), (Metric.LI_NORMALIZED, "LI_norm", 11, ".3g"),
               (Metric.SI, "SI", 8, ".3f"), (Metric.AGREEMENT, "agree", 8, ".3f"), (Metric.KAPPA, "kappa", 8, ".3f"),
               (Metric.ACCURACY, "acc", 8, ".3f"))
    lines = [
        f"verdict: {v.label}{' (borderline)' if v.borderline else ''}  "
        f"({'PASS' if v.passed else 'FAIL'} for require={','.join(v.require)}{strict})",
        *[f"  - {r}" for r in v.reasons],
        f"group: {g.name} (order {g.order}{'' if g.exact else ', sampled'})   "
        f"model: {model.format} {model.input_shape} -> {model.num_classes} classes on {model.device}",
        "",
        "metrics over g != e (the verdict's); the paper's identity-inclusive means are the report's paper_metrics",
        f"{'condition':<28}{'n':>6}" + "".join(f"{head:>{width}}" for _, head, width, _ in columns),
    ]

    def cell(value: float | None, width: int, fmt: str) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"

    for c in report.conditions:
        lines.append(f"{c.name:<28}{c.n_probes:>6}"
                     + "".join(cell(c.metrics.get(m), width, fmt) for m, _, width, fmt in columns))
    sigma = report.sensitivity.sigma_max
    if sigma is not None:
        lines.append(f"\nJacobian sigma_max: mean {sigma.mean:.4g} [p5 {sigma.p5:.4g}, p95 {sigma.p95:.4g}] "
                     f"({report.sensitivity.method})")
    if report.reference_profile is not None:
        lines.append(f"closest reference profile: {report.reference_profile.name}")
    lines.append(f"time: {timing.total_s:.2f} s on {timing.device}")
    return "\n".join(lines)


class _progress_bar:
    """tqdm on stderr (hidden when stderr is not a terminal or --quiet)."""

    def __init__(self, disabled: bool, said: list[str] | None = None) -> None:
        self.disabled = disabled
        self.bar = None
        self.said = said if said is not None else []

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, file=sys.stderr, disable=True if self.disabled else None,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", leave=False)

        def update(fraction: float, stage: str) -> None:
            while self.said:  # lines to say before the bar moves on (the estimate)
                self.bar.write(self.said.pop(0), file=sys.stderr)
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix_str(stage, refresh=False)
            self.bar.refresh()

        return update

    def __exit__(self, *exc) -> None:
        self.bar.close()
