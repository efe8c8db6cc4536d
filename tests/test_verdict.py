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


def chance(c, agreement_chance, kappa, classes=3, accuracy=None, accuracy_chance=None, n_probes=32):
    c["metrics"].update(agreement_chance=agreement_chance, kappa=kappa, accuracy=accuracy,
                        accuracy_chance=accuracy_chance,
                        accuracy_kappa=None if accuracy is None else (accuracy - accuracy_chance) / (1 - accuracy_chance))
    c["predictions"] = {"classes_predicted": classes, "majority_class": 4, "majority_fraction": 0.5}
    c["n_probes"] = n_probes
    return c


def test_policy_version_2_names_the_chance_thresholds():
    assert POLICY.version == "2"
    assert POLICY.learned_kappa_min == 0.5 and POLICY.learned_accuracy_kappa_min == 0.3


def test_one_predicted_class_is_trivial_whatever_the_logits_do():
    """An untrained network: logits move (LI_normalized 0.45), one class everywhere, agreement 1 by chance."""
    clean = chance(cond("clean", li_norm=0.45, di=0.01, si=0.3, agreement=1.0), 1.0, None, classes=1)
    v = decide([clean, cond("noise", li_norm=0.8)], POLICY)
    assert v["label"] == "trivial" and not v["passed"]
    assert "predicted as class 4" in v["reasons"][0] and "chance" in v["reasons"][0]
    one_probe = chance(cond("clean", li_norm=0.45, di=0.01, si=0.3), 1.0, None, classes=1, n_probes=1)
    assert decide([one_probe, cond("noise", li_norm=0.8)], POLICY)["label"] != "trivial"


def test_learned_needs_agreement_clearly_above_chance():
    # two classes, 90/10: chance agreement 0.82; agreement 0.9 is kappa 0.44 only
    weak = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.9), 0.82, (0.9 - 0.82) / 0.18, classes=2)
    v = decide([weak, cond("noise", li_norm=1.0)], POLICY)
    assert v["label"] == "not_invariant" and not v["passed"]
    assert any(r.startswith("learned needs kappa") for r in v["reasons"])
    strong = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), 0.12, (0.95 - 0.12) / 0.88)
    assert decide([strong, cond("noise", li_norm=1.0)], POLICY)["label"] == "learned"


def test_learned_with_labels_needs_orbit_accuracy_above_chance():
    """A barely trained network (orbit accuracy 0.32 on 9 balanced classes) is not `learned`."""
    kappa = (0.95 - 0.3) / 0.7
    barely = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), 0.3, kappa,
                    accuracy=0.32, accuracy_chance=0.12)
    v = decide([barely, cond("noise", li_norm=1.0)], POLICY)
    assert v["label"] == "not_invariant"
    assert any(r.startswith("learned needs accuracy_kappa") for r in v["reasons"])
    trained = chance(cond("clean", li_norm=0.3, di=0.1, si=0.4, agreement=0.95), 0.3, kappa,
                     accuracy=0.8, accuracy_chance=0.12)
    assert decide([trained, cond("noise", li_norm=1.0)], POLICY)["label"] == "learned"
