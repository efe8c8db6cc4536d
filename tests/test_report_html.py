"""The HTML report from hand-made reports (no audit runs): what a person reads is there and readable."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from audit_service.engine.report.html import fmt, grouped_reasons, render_report_html, saliency_figures, timing_text
from audit_service.engine.schema import Condition, parse_report
from audit_service.engine.report.summary import report_summary
from audit_service.engine.spec import Policy
from audit_service.engine.sweep import keep_worst
from audit_service.engine.verdict import decide


def _cond(name, shift=None, **metrics):
    base = {"LI_normalized": 0.3, "DI": 0.2, "LI": 5.0, "SI": 0.5, "agreement": 0.9, "accuracy": None}
    base.update(metrics)
    return {"name": name, "shift": shift, "n_probes": 8, "metrics": base, "spread": {}, "notes": []}


def _example(probe, similarity, li, channels=1, side=8, condition="clean"):
    rng = np.random.default_rng(probe)
    image = rng.random((channels, side, side)).round(3).tolist() if channels else rng.random(side).tolist()
    heat = rng.random((side, side)) if channels else rng.random(side)
    return {"condition": condition, "probe": probe, "element": "r90", "similarity": similarity, "LI": li,
            "map_x": heat.tolist(), "map_gx_aligned": heat[::-1].tolist(), "image_x": image, "image_gx": image,
            "raw_x": heat.tolist(), "raw_gx": heat.tolist()}


def minimal_report(conditions: list[dict], verdict: dict, **sections) -> dict:
    """A complete report (every required section) around hand-made conditions and a verdict."""
    return {
        "schema_version": "1.0",
        "model": {"format": "onnx", "sha256": "ab" * 32, "input_shape": [1, 8, 8], "num_classes": 3, "device": "cpu"},
        "group": {"name": "C4", "order": 4, "exact": True, "elements": ["e", "r90", "r180", "r270"]},
        "conditions": conditions,
        "sensitivity": {"sigma_max": {"mean": 2.0, "p5": 1.0, "p95": 3.0}, "spectrum": [3.0, 2.0, 1.0],
                        "n_probes": 4, "probes": "clean", "method": "autograd"},
        "verdict": verdict,
        "timing": {"load_s": 0.1, "conditions_s": {"clean": 1.0, "noise": 0.5}, "total_s": 2.0, "device": "cpu"},
        **sections,
    }


def _report(label="learned", examples=(), profile=True):
    conditions = [_cond("clean"), _cond("blur@2", {"name": "blur", "severity": 2}, DI=1e-14),
                  _cond("noise", DI=3e-15)]
    conditions[0]["relative_variation"] = 1e-4  # the low-sensitivity warning
    verdict = decide([Condition.model_validate(c) for c in conditions], Policy(), require=["genuine"]).to_json()  # undecided
    verdict["label"] = label
    report = minimal_report(conditions, verdict, saliency_examples=list(examples))
    if profile:
        report["reference_profile"] = {"name": "R4_DA", "model": "DA", "group": "R4", "distance": 0.1,
                                       "explanation": "Closest among the R4 reference runs: R4_DA.",
                                       "vector": {"clean.DI": 0.2, "clean.SI": 0.5},
                                       "reference_vector": {"clean.DI": 0.1, "clean.SI": 0.2}}
    return report


def test_worst_probes_ties_go_to_the_larger_logit_error_not_the_index():
    figures = saliency_figures([_example(0, 0.0, 1.0), _example(1, 0.0, 9.0), _example(2, -0.5, 0.0),
                                _example(3, 0.0, 5.0)])
    assert [f["probe"] for f in figures] == [2, 1, 3]      # 3 per condition, worst first


def test_sweep_keeps_ties_by_larger_li():
    si = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.2, 0.2, 0.2, 0.9]])    # (G=2, n=4): identity row, one element
    logits = torch.zeros(2, 4, 3)
    logits[1, 2] = 5.0
    logits[1, 1] = 1.0
    maps = torch.rand(2, 4, 4, 4)
    kept = keep_worst([], si, maps, 0, logits, {"orbit": maps, "raw": maps})
    assert [k["probe"] for k in kept] == [2, 1, 0] and "image_x" in kept[0] and "raw_gx" in kept[0]
    assert [k["li"] for k in kept] == [0.5 * 3 * 5.0 ** 2, 0.5 * 3 * 1.0 ** 2, 0.0]   # LI = 1/2 ||f(x) - f(gx)||^2


@pytest.mark.parametrize("channels", [1, 3, 0])
def test_saliency_renders_for_1_and_3_channels_and_feature_vectors(channels):
    figures = saliency_figures([_example(0, 0.1, 1.0, channels=channels)])
    assert len(figures) == 1 and figures[0]["src"].startswith("data:image/png;base64,")
    assert figures[0]["element"] == "r90" and figures[0]["similarity"] == "0.1"


def test_page_explains_the_verdict_folds_reasons_and_defines_the_metrics():
    job = {"links": {"report": "/audits/x/report"}, "inputs": {"model": {"filename": "net.onnx"}}}
    html = render_report_html(_report(examples=[_example(0, 0.1, 1.0)]), job=job)
    assert "orbit averaging" in html and "invariance regularizer" in html
    assert "<details><summary>SI outside &gt;= 0.98 on 3 of 3 conditions</summary>" in html
    for name in ("DI", "LI", "SI", "LI_normalized"):
        assert f"<dt>{name} — " in html
    assert "net.onnx" in html and "R4_DA" in html
    assert "0 (&lt; 1e-9)" in html
    assert "{'" not in html and "conditions clean 1.00 s, noise 0.50 s" in html
    assert "/audits/x/report" not in html                 # no base URL: no link that breaks in a saved file
    assert not re.search(r'(src|href)="https?://', html)


def test_json_link_is_absolute_with_a_base_url():
    html = render_report_html(_report(), job={"links": {"report": "/audits/x/report"}}, base_url="http://h:1/")
    assert 'href="http://h:1/audits/x/report"' in html


def test_trivial_model_gets_no_closest_profile():
    html = render_report_html(_report(label="trivial"))
    assert "R4_DA" not in html and "Not shown: a trivial model" in html
    assert report_summary(_report(label="trivial"), "j")["reference_profile"] is None


@pytest.mark.parametrize("label", ["genuine", "learned", "not_invariant", "not_genuine", "trivial"])
def test_every_verdict_box_has_a_colour(label):
    html = render_report_html(_report(label=label, profile=False))
    assert re.search(rf"\.{label} {{ background: #[0-9a-f]{{6}}", html)


def test_helpers():
    assert fmt(3e-15) == "0 (< 1e-9)" and fmt(0) == "0" and fmt(0.25) == "0.25" and fmt(None) == "—"
    assert timing_text({"load_s": 1, "device": "cuda:0"}) == "model load 1.00 s · on cuda:0"
    groups = grouped_reasons(parse_report(_report()).verdict)
    assert [g["title"] for g in groups] == ["Why this label", "Genuine criteria missed", "Warnings"]
    summary = report_summary(_report(), "abc")
    assert list(summary)[:4] == ["id", "status", "verdict", "passed"]
    assert summary["conditions"]["clean"]["SI"] == 0.5 and summary["links"]["report"] == "/audits/abc/report"


def test_reasons_are_grouped_from_their_data_not_their_wording():
    """Rewording a reason's sentence leaves the page's grouping alone (it reads ``reason_details``)."""
    verdict = parse_report(_report()).verdict
    reworded = verdict.model_copy(update={"reason_details": [r.model_copy(update={"text": f"reworded {i}"})
                                                             for i, r in enumerate(verdict.reason_details)]})
    def titles(groups):
        return [(g["title"], len(g["entries"])) for g in groups]

    def missed(groups):
        return next(g for g in groups if g["title"] == "Genuine criteria missed")["entries"]

    assert titles(grouped_reasons(reworded)) == titles(grouped_reasons(verdict))
    assert missed(grouped_reasons(reworded)) == missed(grouped_reasons(verdict))
    entries = missed(grouped_reasons(verdict))
    assert {"short": "SI outside >= 0.98 on 3 of 3 conditions", "detail": "clean 0.5, blur@2 0.5, noise 0.5"} in entries


def test_a_report_without_structured_reasons_lists_its_sentences():
    """Reports stored before ``reason_details`` existed still show every reason, unparsed."""
    report = _report()
    del report["verdict"]["reason_details"]
    groups = grouped_reasons(parse_report(report).verdict)
    assert [g["title"] for g in groups] == ["Why this label"]
    assert len(groups[0]["entries"]) == len(report["verdict"]["reasons"])
    assert "SI misses genuine (&gt;= 0.98)" in render_report_html(report)
