"""The typed ``Report`` mirrors the JSON the engine writes, key for key.

Real audits (ONNX, TorchScript and an in-memory module; with and without labels, shifts, second probes,
saliency, a sampled group, early stopping, a trivial model) and the shipped reference runs' reports are read
into the models with unmodelled keys refused, and dumped back: the same JSON, so no client breaks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from audit_service import audit
from audit_service.engine.audit import AuditRequest, run_audit
from audit_service.engine.names import (
    DISPLAY_ORDER, HEADLINE_METRICS, METRICS, PROFILE_METRICS, SPREAD_METRICS, ConditionName, Metric)
from audit_service.engine.schema import Report, Sensitivity, Verdict, parse_report
from audit_service.engine.spec import parse_audit_spec
from audit_service.engine.verdict import decide
from audit_service.reference.catalog import attach_reference_profile, reference_dir
from builders import IMAGE_SHAPE, PlainCNN, report_models
from conftest import TINY_OPTIONS

RNG = np.random.default_rng(0)
X = RNG.random((8, *IMAGE_SHAPE), dtype=np.float32)
Y = RNG.integers(0, 10, 8)
SECOND = RNG.random((8, *IMAGE_SHAPE), dtype=np.float32)


def _spec(group: object = "C4", shifts: list | None = None, **options: object) -> object:
    return parse_audit_spec({"group": group, "shifts": shifts or [], "options": {**TINY_OPTIONS, **options}})


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Real reports, as the worker stores them (reference profile attached)."""
    onnx, torchscript, constant = report_models(tmp_path_factory.mktemp("report-model"))
    shifts = [{"name": "gaussian_noise", "severity": 3}, {"name": "blend", "beta": 0.3, "target": "second_probes"}]
    runs = {
        "onnx, labels, shifts, second probes, SI everywhere": dict(
            model=onnx, spec=_spec("C4", shifts, saliency_scope="all"), probes=X, labels=Y, second_probes=SECOND),
        "torchscript, no labels (genuine)": dict(model=torchscript, spec=_spec("C4"), probes=X),
        "onnx, no probes, no saliency": dict(model=onnx, spec=_spec("flip", saliency=False)),
        "sampled permutation group, early stop": dict(
            model=onnx, spec=_spec({"name": "permutation", "generators": [[*range(1, 12), 0]], "max_order": 4,
                                         "sample": 6}, [{"name": "blur", "severity": 1}], early_stop=True),
            probes=X, labels=Y),
        "constant model (trivial)": dict(model=constant, spec=_spec("C4"), probes=X),
    }
    made = {name: attach_reference_profile(run_audit(AuditRequest(**kwargs))) for name, kwargs in runs.items()}
    result = audit(PlainCNN(seed=3), "flip", torch.from_numpy(X), torch.from_numpy(Y), shifts=[],
                   saliency=False, **TINY_OPTIONS)
    made["in-memory module through audit()"] = result.to_json()
    return json.loads(json.dumps(made))  # as stored: JSON types only


def test_every_real_report_round_trips_key_for_key(reports):
    labels = set()
    for name, report in reports.items():
        typed = parse_report(report, strict=True)  # an unmodelled key anywhere fails here
        assert typed.to_json() == report, name
        assert json.dumps(typed.to_json()) == json.dumps(report), f"{name}: same bytes, same key order"
        labels.add(typed.verdict.label)
    assert {"genuine", "not_invariant", "not_genuine", "trivial"} <= labels, labels


def test_the_reports_cover_what_the_models_declare(reports):
    """The audits above exercise the optional sections, so the round trip checks them too."""
    typed = {name: parse_report(r, strict=True) for name, r in reports.items()}
    full = typed["onnx, labels, shifts, second probes, SI everywhere"]
    assert [c.name for c in full.conditions] == ["clean", "gaussian_noise@3", "blend(second_probes)@0.3", "noise"]
    assert full.condition("blend(second_probes)@0.3").shift.target == "second_probes"
    assert full.clean.metrics.accuracy_kappa is not None and full.clean.predictions.classes_predicted >= 1
    assert full.saliency_examples and full.saliency_examples[0].map_x and full.symmetrized.available
    assert full.reference_profile is not None and full.reference_profile.runs
    sampled = typed["sampled permutation group, early stop"]
    assert sampled.group.sampled.size == 6 and sampled.clean.group_sample_ci["DI"].n_elements >= 2
    assert sampled.early_stop.enabled
    no_probes = typed["onnx, no probes, no saliency"]
    assert [c.name for c in no_probes.conditions] == [ConditionName.NOISE]
    assert no_probes.noise.saliency_computed is False and no_probes.noise.metrics.SI is None
    assert typed["constant model (trivial)"].reference_profile is None


def test_structured_reasons_say_what_the_sentences_say(reports):
    for name, report in reports.items():
        verdict = parse_report(report, strict=True).verdict
        assert [r.text for r in verdict.reason_details] == verdict.reasons, name
        for reason in verdict.reason_details:
            assert reason.text.endswith(reason.detail or reason.headline)
            if reason.topic == "genuine_failure":
                assert reason.criterion in reason.headline and reason.requirement in reason.headline
                assert 1 <= len(reason.misses) <= reason.n_conditions
                assert all(m.condition in [c.name for c in parse_report(report).conditions] for m in reason.misses)
    not_genuine = parse_report(reports["onnx, no probes, no saliency"]).verdict
    failures = {r.criterion: r for r in not_genuine.reason_details if r.topic == "genuine_failure"}
    assert failures["LI_normalized"].threshold == not_genuine.policy.genuine_li_normalized_max
    assert failures["LI_normalized"].misses[0].condition == "noise"
    trivial = parse_report(reports["constant model (trivial)"]).verdict
    assert trivial.label == "trivial" and trivial.reason_details[0].topic == "label"


def test_the_verdict_survives_the_reports_json(reports):
    """Everything the verdict reads survives the report's JSON: ``decide`` on the conditions and the policy read
    back from a stored report gives that report's verdict again, byte for byte (a field the models lose, round or
    default differently fails here). Whether today's verdicts equal those of the engine before the typed models:
    ``benchmarks/compare_reports.py``."""
    for name, report in reports.items():
        typed = parse_report(report, strict=True)
        v = typed.verdict
        again = decide(typed.conditions, v.policy, v.require, v.require_confident)
        assert json.dumps(again.to_json()) == json.dumps(report["verdict"]), name


def test_the_shipped_reference_runs_read_as_reports():
    """Reports (and the cards' verdict and sensitivity) written by an older engine (schema 1.0 before paper_metrics, criteria and the
    version-3 policy) still read, and dump back to the same JSON."""
    cards = sorted(reference_dir().glob("*/card.json"))
    assert len(cards) >= 12
    for path in cards:
        report = json.loads((path.parent / "report.json").read_text())
        assert parse_report(report, strict=True).to_json() == report, path
        card = json.loads(path.read_text())["audit"]  # its conditions are a condensed summary, not the report's
        assert Sensitivity.model_validate(card["sensitivity"]).to_json() == card["sensitivity"]
        assert Verdict.model_validate(card["verdict"]).to_json() == card["verdict"]


def test_an_unmodelled_key_fails_strictly_and_survives_leniently(reports):
    report = json.loads(json.dumps(reports["torchscript, no labels (genuine)"]))
    report["conditions"][0]["brand_new"] = {"x": 1}
    with pytest.raises(ValidationError, match=r"Condition does not model the key\(s\) \['brand_new'\]"):
        parse_report(report, strict=True)
    assert parse_report(report).to_json() == report  # a newer engine's key reaches the client unchanged
    del report["verdict"]
    with pytest.raises(ValidationError, match="verdict"):
        parse_report(report)


def test_the_metric_table_is_the_one_list_of_names(reports):
    clean = parse_report(reports["onnx, labels, shifts, second probes, SI everywhere"]).clean
    assert list(clean.to_json()["metrics"]) == list(METRICS)  # the report's order is the table's
    assert list(clean.to_json()["spread"]) == list(SPREAD_METRICS)
    assert DISPLAY_ORDER[0] == Metric.LI_NORMALIZED and set(HEADLINE_METRICS) < set(DISPLAY_ORDER)
    assert PROFILE_METRICS == ("LI_normalized", "DI", "SI", "agreement")
    assert {METRICS[m].kind for m in (Metric.DI, Metric.LI_NORMALIZED)} == {"max"}
    assert {METRICS[m].kind for m in (Metric.SI, Metric.AGREEMENT, Metric.KAPPA)} == {"min"}
    assert clean.metrics["DI"] == clean.metrics.DI == clean.metric(Metric.DI)
    with pytest.raises(KeyError, match="no metric 'nope'"):
        clean.metrics["nope"]


def test_report_json_schema_names_the_required_sections():
    schema = Report.model_json_schema()
    assert set(schema["required"]) == set(Report.REQUIRED)  # spec.REPORT_KEYS, nothing more
    assert "saliency_sampling" in schema["$defs"]["Condition"]["properties"]


# ----------------------------------------------------------------------------- the OpenAPI Report component
def _openapi() -> dict:
    import yaml

    from conftest import ROOT

    return yaml.safe_load((ROOT / "openapi.yaml").read_text())


def test_the_openapi_report_schemas_are_generated_from_the_models():
    from audit_service.service.openapi_report import BEGIN, END, generated_block, openapi_files, out_of_step

    assert out_of_step() == [], "run: python -m audit_service.service.openapi_report --write"
    for path in openapi_files():
        text = path.read_text()
        assert text.count(BEGIN) == 1 and text.count(END) == 1 and generated_block() in text
    schemas = _openapi()["components"]["schemas"]
    assert {"Report", "AuditReport", "Condition", "Verdict", "Criterion", "Reason", "SaliencySampling"} <= set(schemas)
    generated = [line.strip().rstrip(":") for line in generated_block().splitlines() if line.startswith("    ") and
                 not line.startswith("     ") and line.rstrip().endswith(":")]
    outside = text.replace(generated_block(), "")
    clashes = [name for name in generated if f"\n    {name}:\n" in outside]
    assert not clashes, f"hand-written components with a generated name: {clashes}"


def test_a_stale_block_is_found_and_rewritten(tmp_path):
    from audit_service.service.openapi_report import BEGIN, END, out_of_step, with_block, write

    copy = tmp_path / "openapi.yaml"
    from conftest import ROOT

    text = (ROOT / "openapi.yaml").read_text()
    copy.write_text(with_block(text, f"{BEGIN}\n    Report: {{type: object}}\n{END}"))
    assert out_of_step([copy]) == [copy]
    assert write([copy]) == [copy] and copy.read_text() == text and out_of_step([copy]) == []
    copy.write_text("openapi: 3.1.0\n")
    with pytest.raises(ValueError, match="marker lines"):
        out_of_step([copy])


def test_real_reports_meet_the_openapi_report_schema(reports):
    from openapi_core import OpenAPI
    from openapi_schema_validator import OAS31Validator

    from conftest import ROOT

    OpenAPI.from_file_path(str(ROOT / "openapi.yaml"))  # the served contract stays a valid OpenAPI document
    spec = _openapi()
    validator = OAS31Validator({"$ref": "#/components/schemas/Report", "components": spec["components"]})
    for name, report in reports.items():
        errors = [e.message for e in validator.iter_errors(report)]
        assert not errors, (name, errors[:3])
    broken = json.loads(json.dumps(reports["torchscript, no labels (genuine)"]))
    broken["verdict"]["label"] = "excellent"
    assert not validator.is_valid(broken)
    del broken["verdict"]
    assert not validator.is_valid(broken)


def test_structured_reasons_are_read_strictly_too(reports):
    report = json.loads(json.dumps(reports["onnx, no probes, no saliency"]))
    report["verdict"]["reason_details"][0]["misses"][0]["extra"] = 1
    with pytest.raises(ValidationError, match=r"Miss does not model the key\(s\) \['extra'\]"):
        parse_report(report, strict=True)
