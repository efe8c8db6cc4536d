"""The verdict rules on hand-built condition summaries (tests/test_verdict_models.py audits real models)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from pydantic import ValidationError

from audit_service.engine.metrics import ConditionAccumulator
from audit_service.engine.report.build import condition_report
from audit_service.engine.schema import Condition as ConditionReport, Verdict
from audit_service.engine.spec import AuditSpec, Policy
from audit_service.engine.sweep import Condition, ConditionResult
from audit_service.engine import verdict as rules
from audit_service.engine.verdict import DEFAULT_REQUIRE, gate, genuine_failures


def decide(conditions, policy, *args, **kwargs) -> Verdict:
    """``verdict.decide`` on conditions written as the report's JSON (the tests build them so), typed first."""
    typed = [c if isinstance(c, ConditionReport) else ConditionReport.model_validate(c) for c in conditions]
    return rules.decide(typed, policy, *args, **kwargs)


def cond(name, li_norm=0.0, di=0.0, si=1.0, agreement=1.0, variation=1.0, spread=0.5):
    """A condition report as ``report.build`` writes it (the keys the verdict reads), by hand."""
    return {"name": name, "shift": None, "n_probes": 32,
            "metrics": {"LI_normalized": li_norm, "DI": di, "SI": si, "agreement": agreement, "LI": 0.0,
                        "accuracy": None},
            "relative_variation": variation, "relative_spread": spread, "saliency_computed": True}


POLICY = Policy()


def chance(c, agreement_chance, kappa, classes=3, accuracy=None, accuracy_chance=None, n_probes=32):
    c["metrics"].update(agreement_chance=agreement_chance, kappa=kappa, accuracy=accuracy,
                        accuracy_chance=accuracy_chance,
                        accuracy_kappa=None if accuracy is None else (accuracy - accuracy_chance) / (1 - accuracy_chance))
    c["predictions"] = {"classes_predicted": classes, "majority_class": 4, "majority_fraction": 0.5}
    c["n_probes"] = n_probes
    return c


def labelled(c, accuracy=0.9, accuracy_chance=0.12):
    """A clean condition whose probes carry labels: the model classifies the orbit ``accuracy`` of the time."""
    agreement = c["metrics"]["agreement"]
    return chance(c, 0.12, (agreement - 0.12) / 0.88, accuracy=accuracy, accuracy_chance=accuracy_chance)


def with_spread(c, metric, lo, hi, n=16):
    mean = c["metrics"][metric]
    c.setdefault("spread", {})[metric] = {"mean": mean, "p5": lo, "p50": mean, "p95": hi, "se": 0.0, "n": n,
                                          "ci95": [lo, hi]}
    return c


def in_report(*conditions, verdict, group="flip"):
    """The hand-built conditions and their verdict as a complete report (what the consumers read)."""
    from test_report_html import minimal_report

    report = minimal_report(list(conditions), verdict.to_json())  # cond() sets shift and n_probes
    report["group"].update(name=group, order=2, elements=["e", "flip"])
    return report


# ----------------------------------------------------------------------------- labels
def test_genuine_needs_every_condition():
    assert decide([cond("clean"), cond("blur@3"), cond("noise")], POLICY).label == "genuine"
    v = decide([labelled(cond("clean")), cond("blur@3"), cond("noise", si=0.5)], POLICY)
    assert v.label == "learned"
    assert "SI misses genuine (>= 0.98) on 1 of 3 conditions: noise 0.5" in v.reasons


def test_learned_vs_not_invariant_on_clean_predictions():
    learned = decide([labelled(cond("clean", li_norm=0.2, di=0.1, si=0.4, agreement=0.95)), cond("noise", li_norm=1.0)],
                     POLICY)
    assert learned.label == "learned" and learned.passed
    plain = decide([labelled(cond("clean", li_norm=0.9, di=2.0, si=0.3, agreement=0.4)), cond("noise", li_norm=1.0)],
                   POLICY, require=["genuine"])
    assert plain.label == "not_invariant" and not plain.passed


def test_without_labels_learned_and_incidental_cannot_be_told_apart():
    """Untrained networks' invariance is also high on the data and degrades on noise: without labels it is
    `undecided`, which the default gate does not pass; a gate that accepts it says so in `require`."""
    clean = chance(cond("clean", li_norm=0.2, di=0.01, si=0.4, agreement=0.9), 0.3, (0.9 - 0.3) / 0.7)
    conditions = [clean, chance(cond("noise", li_norm=1.0, agreement=0.42), 0.3, 0.17)]
    v = decide(conditions, POLICY)
    assert v.label == "undecided" and not v.passed
    assert any("cannot tell learned invariance from incidental" in r and "pass --labels" in r for r in v.reasons)
    assert any("agreement on the clean probes 0.9 vs pure noise 0.42" in r and "degrades off the data" in r
               for r in v.reasons)
    assert decide(conditions, POLICY, require=["genuine", "learned", "undecided"]).passed


def test_invariance_of_a_network_that_did_not_learn_the_task_is_incidental():
    """Labels at chance (a random network): the prediction invariance is the architecture's, not learned."""
    clean = chance(cond("clean", li_norm=0.2, di=0.01, si=0.4, agreement=0.95), 0.3, (0.95 - 0.3) / 0.7,
                   accuracy=0.13, accuracy_chance=0.12)
    v = decide([clean, cond("noise", li_norm=1.0, agreement=0.9)], POLICY)
    assert v.label == "incidental" and not v.passed
    assert any("did not learn the task" in r and "incidental" in r for r in v.reasons)
    assert any("holds about equally off the data" in r for r in v.reasons)


def test_learned_with_labels_needs_orbit_accuracy_above_chance():
    """A barely trained network (orbit accuracy 0.32 on 9 balanced classes) is not `learned`."""
    kappa = (0.95 - 0.3) / 0.7
    barely = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), 0.3, kappa,
                    accuracy=0.32, accuracy_chance=0.12)
    v = decide([barely, cond("noise", li_norm=1.0)], POLICY)
    assert v.label == "incidental" and not v.passed
    assert v.criteria[-1].criterion == "accuracy_kappa" and not v.criteria[-1].passed
    trained = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), 0.3, kappa,
                     accuracy=0.8, accuracy_chance=0.12)
    assert decide([trained, cond("noise", li_norm=1.0)], POLICY).label == "learned"


def test_learned_needs_agreement_clearly_above_chance():
    # two classes, 90/10: chance agreement 0.82; agreement 0.9 is kappa 0.44 only
    weak = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.9), 0.82, (0.9 - 0.82) / 0.18, classes=2,
                  accuracy=0.9, accuracy_chance=0.5)
    v = decide([weak, cond("noise", li_norm=1.0)], POLICY)
    assert v.label == "not_invariant" and not v.passed
    assert any(r.startswith("learned needs kappa") for r in v.reasons)
    strong = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), 0.12, (0.95 - 0.12) / 0.88,
                    accuracy=0.9, accuracy_chance=0.12)
    assert decide([strong, cond("noise", li_norm=1.0)], POLICY).label == "learned"


def test_without_clean_probes_learned_cannot_be_told_apart():
    v = decide([cond("noise", li_norm=0.5)], POLICY)
    assert v.label == "not_genuine"
    assert any("cannot be separated" in r for r in v.reasons)
    assert decide([cond("noise")], POLICY).label == "genuine"


def test_policy_overrides_move_the_boundary():
    c = [labelled(cond("clean", si=0.96)), cond("noise", si=0.96)]
    assert decide(c, POLICY).label == "learned"
    loose = Policy(genuine_si_min=0.95)
    v = decide(c, loose)
    assert v.label == "genuine" and v.policy.genuine_si_min == 0.95


def test_policy_version_3_names_its_thresholds():
    assert POLICY.version == "3"
    assert POLICY.learned_kappa_min == 0.5 and POLICY.learned_accuracy_kappa_min == 0.5
    assert POLICY.trivial_relative_spread_max == 1e-6
    assert set(DEFAULT_REQUIRE) == {"genuine", "learned"}
    with pytest.raises(ValueError):
        Policy(trivial_variation_max=1e-6)  # version 2's field: replaced by trivial_relative_spread_max


# ----------------------------------------------------------------------------- trivial
def test_trivial_beats_genuine():
    v = decide([cond("clean", spread=0.0), cond("noise", spread=0.0)], POLICY)
    assert v.label == "trivial" and not v.passed
    v = decide([cond("clean", si=None), cond("noise", si=None)], POLICY)
    assert v.label == "trivial"


def test_trivial_is_spread_at_rounding_level_whatever_the_scale():
    """The spread across probes relative to the logits' own size decides, never their scale."""
    ties = [labelled(cond("clean", li_norm=0.4, agreement=0.9, spread=5e-8)), cond("noise", li_norm=1.0, spread=4e-8)]
    v = decide(ties, POLICY)
    assert v.label == "trivial"
    assert "floating-point noise" in v.reasons[0] and "whatever its scale" in v.reasons[0]
    # logits of 1e-10 that vary by a quarter of their size: an ordinary network, judged like any other
    tiny = [labelled(cond("clean", li_norm=0.2, di=0.1, si=0.4, agreement=0.95, variation=0.1, spread=0.25)),
            cond("noise", li_norm=1.0, spread=0.2)]
    assert decide(tiny, POLICY).label == "learned"
    # one anchor above rounding is enough to be judged
    assert decide([cond("clean", spread=5e-8), cond("noise", spread=0.3)], POLICY).label == "genuine"


def test_one_predicted_class_is_trivial_whatever_the_logits_do():
    """An untrained network: logits move (LI_normalized 0.45), one class everywhere, agreement 1 by chance."""
    clean = chance(cond("clean", li_norm=0.45, di=0.01, si=0.3, agreement=1.0), 1.0, None, classes=1)
    v = decide([clean, cond("noise", li_norm=0.8)], POLICY)
    assert v.label == "trivial" and not v.passed
    assert "predicted as class 4" in v.reasons[0] and "chance" in v.reasons[0]
    one_probe = chance(cond("clean", li_norm=0.45, di=0.01, si=0.3), 1.0, None, classes=1, n_probes=1)
    assert decide([one_probe, cond("noise", li_norm=0.8)], POLICY).label != "trivial"


def test_low_sensitivity_is_flagged_not_hidden():
    v = decide([cond("clean", variation=1e-4), cond("noise", variation=1e-4)], POLICY)
    assert v.label == "genuine" and v.flags == ["low_sensitivity"]
    assert any(r.startswith("warning: clean: logits vary little") for r in v.reasons)
    assert decide([cond("clean"), cond("noise")], POLICY).flags == []


# ----------------------------------------------------------------------------- borderline and the strict gate
def test_borderline_names_the_criterion_and_the_probes_that_settle_it():
    """Agreement 0.84 on 16 probes, interval [0.76, 0.92] around the 0.8 bound: `learned`, but borderline;
    at this estimate the interval's lower half (0.08) must shrink to the gap (0.04): 16 x 2^2 = 64 probes."""
    clean = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.84)), "agreement", 0.76, 0.92)
    conditions = [clean, cond("noise", li_norm=1.0, agreement=0.5)]
    v = decide(conditions, POLICY)
    assert v.label == "learned" and v.passed and v.borderline
    [b] = v.borderline_criteria
    assert (b.criterion, b.condition, b.threshold, b.interval) == ("agreement", "clean", 0.8, [0.76, 0.92])
    assert b.probes_to_settle == 64 and b.option == "n_probes" and b.straddles and b.passed
    assert any(r.startswith("borderline: the 95% interval straddles") and "about 64 probes (n_probes)" in r
               for r in v.reasons)
    strict = decide(conditions, POLICY, require_confident=True)
    assert strict.label == "learned" and not strict.passed and strict.require_confident
    assert any("require_confident" in r for r in strict.reasons)


def test_a_clear_failure_is_not_borderline_and_a_straddling_one_is():
    # agreement 0.78 [0.70, 0.86]: not_invariant, and more probes could make it invariant
    near = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.78)), "agreement", 0.70, 0.86)
    v = decide([near, cond("noise", li_norm=1.0)], POLICY)
    assert v.label == "not_invariant" and v.borderline
    assert [b.criterion for b in v.borderline_criteria] == ["agreement"]
    # agreement 0.5 [0.4, 0.6]: no number of probes brings it to 0.8
    far = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.5)), "agreement", 0.4, 0.6)
    v = decide([far, cond("noise", li_norm=1.0)], POLICY)
    assert v.label == "not_invariant" and not v.borderline and v.borderline_criteria == []
    # a failure that straddles beside one that does not cannot change the label
    both = with_spread(labelled(cond("clean", li_norm=0.3, di=2.0, si=0.4, agreement=0.78)), "agreement", 0.7, 0.86)
    assert not decide([both, cond("noise", li_norm=1.0)], POLICY).borderline


def test_borderline_genuine_and_borderline_task():
    # SI 0.985 [0.975, 0.995] on noise: genuine, borderline on the genuine bound 0.98
    noise = with_spread(cond("noise", si=0.985), "SI", 0.975, 0.995, n=32)
    v = decide([cond("clean"), noise], POLICY)
    assert v.label == "genuine" and v.borderline
    assert v.borderline_criteria[0].option == "n_noise_probes"
    # accuracy at the task bound: learned vs incidental is borderline; kappa's interval comes from the accuracy's
    clean = labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), accuracy=0.56)
    clean = with_spread(clean, "accuracy", 0.45, 0.67)
    v = decide([clean, cond("noise", li_norm=1.0)], POLICY)
    assert v.label == "learned" and v.borderline
    [b] = v.borderline_criteria
    assert b.criterion == "accuracy_kappa" and b.role == "learned_task"
    assert b.interval == pytest.approx([(0.45 - 0.12) / 0.88, (0.67 - 0.12) / 0.88])


# ----------------------------------------------------------------------------- typed conditions
def test_decide_reads_typed_conditions_and_a_condition_missing_a_key_fails_naming_it():
    """The typed conditions give the verdict the rules say; a condition report that misses a key the model
    requires fails when it is typed, naming it, before any rule runs."""
    clean = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.84, variation=1e-4)),
                        "agreement", 0.76, 0.92)
    conditions = [clean, cond("blur@3", si=0.7), cond("noise", li_norm=1.0)]
    typed = [ConditionReport.model_validate(c) for c in conditions]
    assert typed[0].spread.agreement.ci95 == [0.76, 0.92] and typed[0].predictions.majority_class == 4
    v = rules.decide(typed, POLICY, require_confident=True)
    assert (v.label, v.borderline, v.passed, v.flags) == ("learned", True, False, ["low_sensitivity"])
    assert [c["condition"] for c in v.criteria][:4] == ["clean"] * 4
    assert genuine_failures(typed[1], POLICY) == [("SI", 0.7, ">= 0.98")]
    incomplete = {k: v for k, v in cond("clean").items() if k != "n_probes"}
    with pytest.raises(ValidationError, match="n_probes"):
        ConditionReport.model_validate(incomplete)


def test_gate_is_one_rule():
    assert gate("learned") and not gate("undecided") and not gate("incidental") and gate(None) is None
    assert gate("learned", ["genuine", "learned"], borderline=True)
    assert not gate("learned", ["genuine", "learned"], borderline=True, require_confident=True)
    assert gate("learned", None, borderline=False, require_confident=True)
    assert AuditSpec.model_validate({"group": "C4", "require_confident": True}).require_confident
    assert not AuditSpec.model_validate({"group": "C4"}).require_confident


# ----------------------------------------------------------------------------- criteria over g != e
def _report(logits_gx: torch.Tensor, labels=None, bootstrap=0) -> dict:
    acc = ConditionAccumulator(num_classes=logits_gx.shape[-1])
    acc.update(logits_gx, labels)
    result = ConditionResult(Condition("clean"), acc)
    return condition_report(result, bootstrap, 0, saliency_computed=False)  # with the chance levels


def test_criteria_leave_the_identity_out_and_the_papers_means_keep_it():
    """flip, 4 probes, the flip changes the prediction of 2: agreement over g != e is 0.5, the paper's mean over
    {e, flip} 0.75 (an agreement bound of 0.8 would be 0.6 on the flip itself)."""
    x = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    flipped = torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0]])
    c = _report(torch.stack([x, flipped]), labels=torch.tensor([0, 1, 2, 0]))
    assert c["metrics"]["agreement"] == pytest.approx(0.5) and c["paper_metrics"]["agreement"] == pytest.approx(0.75)
    sq = (x - flipped).pow(2).sum(-1)
    assert c["metrics"]["LI"] == pytest.approx(0.5 * sq.mean().item())
    assert c["paper_metrics"]["LI"] == pytest.approx(0.25 * sq.mean().item())
    assert c["metrics"]["LI_normalized"] == pytest.approx(2 * c["paper_metrics"]["LI_normalized"])
    # accuracy is over the whole orbit, g = e included, in both
    assert c["metrics"]["accuracy"] == c["paper_metrics"]["accuracy"] == pytest.approx(6 / 8)
    # chance levels: at x (2/4, 1/4, 1/4); on the flip (3/4, 1/4, 0) -> 3/8 + 1/16; with the identity (5/8, 2/8, 1/8)
    assert c["metrics"]["agreement_chance"] == pytest.approx(3 / 8 + 1 / 16)
    assert c["paper_metrics"]["agreement_chance"] == pytest.approx(5 / 16 + 2 / 32 + 1 / 32)
    assert c["metrics"]["kappa"] == pytest.approx((0.5 - 7 / 16) / (1 - 7 / 16))
    assert set(c["spread"]["agreement"]) >= {"mean", "ci95", "se", "n"}


def test_same_threshold_means_the_same_for_every_group_order():
    """One disagreeing element per probe: over g != e agreement is (G-2)/(G-1) for every G; the paper's mean
    (G-1)/G moves with the group's order."""
    torch.manual_seed(0)
    for order in (2, 4, 16):
        x = torch.randn(8, 5)
        x[:, 0] += 10
        orbit = x.expand(order, 8, 5).clone()
        orbit[1, :, 0] -= 20  # element 1 changes the prediction of every probe
        c = _report(orbit)
        assert c["metrics"]["agreement"] == pytest.approx((order - 2) / (order - 1))
        assert c["paper_metrics"]["agreement"] == pytest.approx((order - 1) / order)


def test_relative_spread_is_scale_free_and_ignores_a_common_offset():
    torch.manual_seed(0)
    base = torch.randn(32, 10).expand(2, 32, 10).clone()
    spreads = [_report(base * s + o)["relative_spread"] for s, o in ((1, 0), (1e-12, 0), (1e6, 0))]
    assert spreads[1] == pytest.approx(spreads[0], rel=1e-6) and spreads[2] == pytest.approx(spreads[0], rel=1e-6)
    assert 0.1 < spreads[0] <= 1
    constant = torch.ones(2, 32, 10) * torch.arange(10.0)
    assert _report(constant)["relative_spread"] == 0.0
    # a common shift per probe (softmax ignores it) is no spread
    shifted = constant + torch.randn(1, 32, 1)
    assert _report(shifted)["relative_spread"] == pytest.approx(0.0, abs=1e-7)


def test_summaries_carry_a_standard_error_for_the_interval():
    from audit_service.engine.metrics import summarize

    s = summarize(np.array([0.0, 1.0, 1.0, 1.0]), n_bootstrap=0)
    assert s["ci95"] == [0.75, 0.75] and s["se"] == pytest.approx(0.5 / 2)
    # without a bootstrap interval the verdict uses mean +- 1.96 standard errors
    clean = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.75)), "agreement", 0.75, 0.75)
    assert not decide([clean, cond("noise", li_norm=1.0)], POLICY).borderline  # no spread known: no straddle
    clean["spread"]["agreement"]["se"] = 0.05
    v = decide([clean, cond("noise", li_norm=1.0)], POLICY)
    assert v.borderline and v.borderline_criteria[0].interval == pytest.approx([0.652, 0.848])


def test_mlflow_tags_carry_the_borderline_flag_and_the_strict_gate():
    from audit_service.adapters.mlflow_registry import verdict_tags

    clean = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.84)), "agreement", 0.76, 0.92)
    verdict = decide([clean, cond("noise", li_norm=1.0)], POLICY, require_confident=True)
    tags = verdict_tags(in_report(clean, verdict=verdict))
    assert tags["invariance.verdict"] == "learned" and tags["invariance.passed"] == "false"
    assert tags["invariance.borderline"] == "true" and tags["invariance.require_confident"] == "true"
    assert tags["invariance.borderline_criteria"] == "clean agreement" and tags["invariance.policy"].endswith("@3")
    plain = verdict_tags(in_report(verdict=decide([cond("clean"), cond("noise")], POLICY)))
    assert plain["invariance.borderline"] == "false" and "invariance.borderline_criteria" not in plain


@pytest.mark.parametrize("label", ["incidental", "undecided"])
def test_html_report_explains_the_new_labels_and_shows_the_borderline_criteria(label):
    from audit_service.engine.report.html import MEANING, render_report_html

    clean = with_spread(labelled(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.84)), "agreement", 0.76, 0.92)
    clean.update(n_probes=16, paper_metrics={**clean["metrics"], "agreement": 0.92})
    verdict = decide([clean, cond("noise", li_norm=1.0)], POLICY, require_confident=True)
    verdict.label = label
    html = render_report_html(in_report(clean, verdict=verdict))
    phrase = {"incidental": "has not learned the task", "undecided": "without labels the audit cannot tell"}[label]
    assert phrase in MEANING[label] and phrase in html and f'data-label="{label}"' in html
    assert 'id="borderline"' in html and "clean agreement" in html and "about 64 (n_probes; now 16)" in html
    assert "strict" in html and 'id="paper-metrics"' in html and "g ≠ e" in html
