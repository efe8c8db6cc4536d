"""The verdict rules on hand-built condition summaries (the engine tests cover real models)."""

from __future__ import annotations

from audit_service.spec import Policy
from audit_service.verdict import decide


def cond(name, li_norm=0.0, di=0.0, si=1.0, agreement=1.0, variation=1.0):
    return {"name": name, "metrics": {"LI_normalized": li_norm, "DI": di, "SI": si, "agreement": agreement,
                                      "LI": 0.0, "accuracy": None},
            "relative_variation": variation, "saliency_computed": True}


POLICY = Policy()


def test_genuine_needs_every_condition():
    assert decide([cond("clean"), cond("blur@3"), cond("noise")], POLICY)["label"] == "genuine"
    v = decide([cond("clean"), cond("blur@3"), cond("noise", si=0.5)], POLICY)
    assert v["label"] == "learned"
    assert "SI misses genuine (>= 0.98) on 1 of 3 conditions: noise 0.5" in v["reasons"]


def test_learned_vs_not_invariant_on_clean_predictions():
    learned = decide([cond("clean", li_norm=0.2, di=0.1, si=0.4, agreement=0.95), cond("noise", li_norm=1.0)],
                     POLICY)
    assert learned["label"] == "learned" and learned["passed"]
    plain = decide([cond("clean", li_norm=0.9, di=2.0, si=0.3, agreement=0.4), cond("noise", li_norm=1.0)],
                   POLICY, require=["genuine"])
    assert plain["label"] == "not_invariant" and not plain["passed"]


def test_trivial_beats_genuine():
    v = decide([cond("clean", variation=0.0), cond("noise", variation=0.0)], POLICY)
    assert v["label"] == "trivial" and not v["passed"]
    v = decide([cond("clean", si=None), cond("noise", si=None)], POLICY)
    assert v["label"] == "trivial"


def test_without_clean_probes_learned_cannot_be_told_apart():
    v = decide([cond("noise", li_norm=0.5)], POLICY)
    assert v["label"] == "not_genuine"
    assert any("cannot be separated" in r for r in v["reasons"])
    assert decide([cond("noise")], POLICY)["label"] == "genuine"


def test_policy_overrides_move_the_boundary():
    c = [cond("clean", si=0.96), cond("noise", si=0.96)]
    assert decide(c, POLICY)["label"] == "learned"
    loose = Policy(genuine_si_min=0.95)
    v = decide(c, loose)
    assert v["label"] == "genuine" and v["policy"]["genuine_si_min"] == 0.95


def test_low_sensitivity_is_flagged_not_hidden():
    v = decide([cond("clean", variation=1e-4), cond("noise", variation=1e-4)], POLICY)
    assert v["label"] == "genuine" and v["flags"] == ["low_sensitivity"]
    assert any(r.startswith("warning: clean: logits vary little") for r in v["reasons"])
    assert decide([cond("clean"), cond("noise")], POLICY)["flags"] == []
