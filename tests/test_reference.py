"""Reference runs: data, groups, models, training, export, catalog (fast unit tests).

The CI-sized reproduction that trains and audits all six runs is in ``test_reference_reproduce.py``.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audit_service.reference import catalog
from audit_service.reference.data import INPUT_SHAPE, NUM_CLASSES, load_digits, load_patches
from audit_service.reference.groups import GROUP_NAMES, group_order, orbit, permutation_table
from audit_service.engine.metrics.training import orbit_logit_invariance as logit_invariance
from audit_service.reference.models import MLP, WeightTiedMLP, build_model, count_parameters
from audit_service.reference.train import TrainConfig, batch_loss, parse_run_name, train_run


def _independent_orbit(group: str, x: torch.Tensor) -> list[torch.Tensor]:
    """The paper's groups written directly with torch ops (not through the core group module)."""
    if group == "R4":
        return [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return [torch.roll(x, 12 * k, dims=-1) for k in range(3)]


# ----------------------------------------------------------------------------- data
def test_digits_splits_are_fixed_disjoint_and_padded():
    d = load_digits()
    assert (len(d.train), len(d.val), len(d.test)) == (2700, 900, 900)
    for split in (d.train, d.val, d.test):
        assert split.x.shape[1:] == INPUT_SHAPE and split.x.dtype == np.float32
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
        assert set(np.unique(split.y)) == set(range(NUM_CLASSES))  # digit 9 dropped
        # zero padding: a 4-pixel frame around every 28x28 digit
        assert not split.x[:, :, :4].any() and not split.x[:, :, -4:].any()
        assert not split.x[..., :4].any() and not split.x[..., -4:].any()
    rows = {s.x[i].tobytes() for s in (d.train, d.val, d.test) for i in range(len(s))}
    assert len(rows) > 4400  # no digit in two splits (a handful of MNIST duplicates may exist)
    assert 0.05 < d.mean < 0.15 and 0.2 < d.std < 0.35


def test_patches_are_seeded_grayscale_images():
    p = load_patches(64)
    assert p.shape == (64, *INPUT_SHAPE) and p.dtype == np.float32
    assert p.min() >= 0.0 and p.max() <= 1.0 and p.std() > 0.05
    assert np.array_equal(p, load_patches(64))


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("group", GROUP_NAMES)
def test_core_group_module_defines_the_paper_groups(group):
    table = permutation_table(group)
    assert table.shape == (group_order(group), 36 * 36)
    assert (table[0] == np.arange(36 * 36)).all()  # identity first
    x = torch.randn(5, *INPUT_SHAPE)
    ours = orbit(group, x)
    expected = _independent_orbit(group, x)
    for element in expected:  # same set of transformed images (order aside from the identity)
        assert any(torch.equal(element, o) for o in ours)
    assert torch.equal(ours[0], x)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("group", GROUP_NAMES)
def test_weight_tied_model_is_exactly_invariant_on_random_inputs(group):
    torch.manual_seed(0)
    model = build_model("WT", group, mean=0.08, std=0.25).eval()
    for x in (torch.rand(64, *INPUT_SHAPE), torch.randn(64, *INPUT_SHAPE) * 3):
        with torch.no_grad():
            logits = [model(gx) for gx in _independent_orbit(group, x)]
        for other in logits[1:]:
            assert torch.allclose(other, logits[0], atol=1e-6, rtol=0)  # in fact bit-identical
        assert logits[0].std(0).max() > 1e-3  # and not trivially constant


def test_plain_mlp_is_not_invariant_and_sizes_match():
    torch.manual_seed(0)
    da = build_model("DA", "R4", 0.08, 0.25).eval()
    wt = build_model("WT", "R4", 0.08, 0.25)
    x = torch.rand(16, *INPUT_SHAPE)
    with torch.no_grad():
        assert (da(x) - da(torch.rot90(x, 1, dims=(-2, -1)))).abs().max() > 1e-3
    assert isinstance(da, MLP) and isinstance(wt, WeightTiedMLP)
    assert count_parameters(da) == count_parameters(wt) == 216_713  # 5 layers, hidden 128
    assert da(x).shape == (16, NUM_CLASSES)


@pytest.mark.parametrize("group", GROUP_NAMES)
def test_ir_loss_is_cross_entropy_plus_nu_times_the_papers_li(group):
    torch.manual_seed(1)
    model = build_model("IR", group, 0.08, 0.25)
    x = torch.rand(12, *INPUT_SHAPE)
    y = torch.randint(0, NUM_CLASSES, (12,))
    nu = 3.5
    cfg = TrainConfig.make(group, "IR", nu=nu)
    loss, parts = batch_loss(model, cfg, x, y)

    # paper eq. (LI): mean over x and uniform g (identity included) of 1/2 ||f(x) - f(gx)||^2, written out
    with torch.no_grad():
        fx = model(x)
        per_g = [0.5 * ((fx - model(gx)) ** 2).sum(dim=1).mean() for gx in _independent_orbit(group, x)]
        li = sum(per_g) / len(per_g)
        ce = sum(F.cross_entropy(model(gx), y) for gx in _independent_orbit(group, x)) / len(per_g)
    assert math.isclose(parts["li"], float(li), rel_tol=1e-5)
    assert math.isclose(float(loss.detach()), float(ce + nu * li), rel_tol=1e-5)
    # the helper on an orbit batch is the same number
    orbit_logits = torch.stack([model(gx) for gx in _independent_orbit(group, x)]).detach()
    assert math.isclose(float(logit_invariance(orbit_logits)), float(li), rel_tol=1e-6)


def test_da_loss_has_no_regularizer():
    model = build_model("DA", "T3", 0.08, 0.25)
    loss, parts = batch_loss(model, TrainConfig.make("T3", "DA"), torch.rand(4, *INPUT_SHAPE),
                             torch.zeros(4, dtype=torch.int64))
    assert set(parts) == {"ce"} and math.isclose(float(loss.detach()), parts["ce"], rel_tol=1e-6)


def test_config_validation_and_names():
    with pytest.raises(ValueError, match="group"):
        TrainConfig(group="R8", model="WT")
    with pytest.raises(ValueError, match="nu"):
        TrainConfig(group="R4", model="DA", nu=1.0)
    assert parse_run_name("T3_IR_s2") == ("T3", "IR", 2)
    with pytest.raises(ValueError, match="R4_WT_s0"):
        parse_run_name("R4-WT")


# ----------------------------------------------------------------------------- training, resume, export
@pytest.mark.slow
def test_training_resumes_to_the_same_weights(tmp_path):
    cfg = TrainConfig.make("T3", "DA", seed=3, epochs=4, patience=0)
    straight = train_run(cfg, tmp_path / "a", checkpoint_every=2)

    class Stop(Exception):
        pass

    def interrupt(fraction, message):
        if "epoch 3/" in message:
            raise Stop

    with pytest.raises(Stop):
        train_run(cfg, tmp_path / "b", progress=interrupt, checkpoint_every=2)
    assert json.loads((tmp_path / "b" / cfg.name / "state.json").read_text())["epoch"] == 2
    resumed = train_run(cfg, tmp_path / "b", checkpoint_every=2)
    for (k, v), (_, w) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert resumed.best_epoch == straight.best_epoch
    # a finished run is reused, not retrained
    messages = []
    again = train_run(cfg, tmp_path / "b", progress=lambda f, m: messages.append(m))
    assert any("already trained" in m for m in messages) and again.test_accuracy == straight.test_accuracy


def test_export_onnx_and_torchscript_match_and_take_any_batch(tmp_path):
    import onnx
    import onnxruntime as ort

    from audit_service.reference.export import check_export, export_model

    torch.manual_seed(0)
    model = build_model("WT", "R4", 0.08, 0.25).eval()
    files = export_model(model, tmp_path)
    assert check_export(model, tmp_path)["onnx"] < 1e-4
    proto = onnx.load(str(tmp_path / files["onnx"]))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    sess = ort.InferenceSession(str(tmp_path / files["onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        assert sess.run(None, {"input": np.random.rand(n, *INPUT_SHAPE).astype(np.float32)})[0].shape == (n, 9)
    extra = {"input_shape.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the service still reads it
        torch.jit.load(str(tmp_path / files["torchscript"]), _extra_files=extra)
    assert json.loads(extra["input_shape.json"]) == [1, 36, 36]


# ----------------------------------------------------------------------------- catalog
def _fake_card(root, name, group, model, clean, noise, verdict):
    run = root / name
    run.mkdir(parents=True)
    (run / "model.onnx").write_bytes(b"onnx")
    conds = [{"name": "clean", "metrics": clean}, {"name": "noise", "metrics": noise}]
    card = {"name": name, "group": group, "model": model, "seed": 0, "accuracy": 0.9,
            "metrics": {"clean": clean, "noise": noise}, "verdict": verdict,
            "files": {"onnx": "model.onnx", "torchscript": "model.pt"}, "audit": {"conditions": conds}}
    (run / "card.json").write_text(json.dumps(card))


def _metrics(li_n, di, si, agreement):
    return {"LI_normalized": li_n, "DI": di, "SI": si, "agreement": agreement, "LI": li_n * 100, "accuracy": None}


@pytest.fixture
def fake_refs(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.ENV_DIR, str(tmp_path))
    _fake_card(tmp_path, "R4_WT_s0", "R4", "WT", _metrics(0, 0, 1, 1), _metrics(0, 0, 1, 1), "genuine")
    _fake_card(tmp_path, "R4_DA_s0", "R4", "DA", _metrics(0.2, 0.2, 0.6, 0.95), _metrics(0.8, 1.0, 0.3, 0.4),
               "learned")
    _fake_card(tmp_path, "R4_IR_s0", "R4", "IR", _metrics(0.005, 0.002, 0.93, 0.99),
               _metrics(0.05, 0.01, 0.8, 0.9), "learned")
    _fake_card(tmp_path, "T3_DA_s0", "T3", "DA", _metrics(0.1, 0.1, 0.7, 0.97), _metrics(0.5, 0.5, 0.5, 0.6),
               "learned")
    return tmp_path


def test_catalog_lists_cards_paths_and_unknown_names(fake_refs):
    runs = catalog.list_reference_runs()
    assert [r["name"] for r in runs] == ["R4_DA_s0", "R4_IR_s0", "R4_WT_s0", "T3_DA_s0"]
    assert runs[0]["formats"] == ["onnx"] and runs[2]["verdict"] == "genuine"
    assert catalog.get_reference_run("R4_WT_s0")["model"] == "WT"
    assert catalog.reference_model_path("R4_WT_s0", "onnx") == fake_refs / "R4_WT_s0" / "model.onnx"
    with pytest.raises(KeyError, match="R4_WT_s0"):
        catalog.get_reference_run("R4_XX_s0")
    with pytest.raises(KeyError, match="torchscript|model.pt"):
        catalog.reference_model_path("R4_WT_s0", "torchscript")
    with pytest.raises(KeyError, match="format"):
        catalog.reference_model_path("R4_WT_s0", "pickle")


def test_closest_profile_picks_the_matching_model(fake_refs):
    def report(clean, noise, group=None):
        return {"group": group or {"name": "C4"},
                "conditions": [{"name": "clean", "metrics": clean}, {"name": "noise", "metrics": noise}]}

    hit = catalog.closest_profile(report(_metrics(0, 0, 1, 1), _metrics(0, 0, 1, 1)))
    assert hit["name"] == "R4_WT" and hit["model"] == "WT" and hit["distance"] == 0
    hit = catalog.closest_profile(report(_metrics(0.3, 0.15, 0.55, 0.93), _metrics(0.9, 0.8, 0.2, 0.5)))
    assert hit["model"] == "DA" and hit["group"] == "R4" and "R4_DA" in hit["explanation"]
    hit = catalog.closest_profile(report(_metrics(0.004, 0.001, 0.95, 1.0), _metrics(0.04, 0.02, 0.85, 0.92)))
    assert hit["model"] == "IR"
    # another group: compared against every profile
    other = catalog.closest_profile(report(_metrics(0.1, 0.1, 0.7, 0.97), _metrics(0.5, 0.5, 0.5, 0.6),
                                           group={"name": "D4"}))
    assert other["name"] == "T3_DA" and "all reference runs" in other["explanation"]
    assert catalog.closest_profile({"conditions": []}) is None


def test_closest_profile_without_references_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.ENV_DIR, str(tmp_path / "missing"))
    assert catalog.list_reference_runs() == []
    assert catalog.closest_profile({"conditions": [{"name": "clean", "metrics": _metrics(0, 0, 1, 1)}]}) is None
    assert catalog.calibrated_policy_notes()["runs"] == []


def test_policy_notes_compare_thresholds_with_the_runs(fake_refs):
    notes = catalog.calibrated_policy_notes()
    li = notes["fields"]["genuine_li_normalized_max"]
    assert li["WT"]["clean"]["max"] == 0 and li["DA"]["clean"]["min"] == 0.1 and li["DA"]["noise"]["max"] == 0.8
    assert li["WT_passes"] and li["DA_fails"] and li["IR_fails"]
    assert 1e-7 < li["suggested"] < 0.1
    assert {r["name"] for r in notes["runs"]} == {"R4_WT_s0", "R4_DA_s0", "R4_IR_s0", "T3_DA_s0"}


def test_train_reference_run_rejects_unknown_names():
    from audit_service.reference.reproduce import train_reference_run

    with pytest.raises(KeyError, match="R4_WT_s0"):
        train_reference_run("R5_WT")


# ----------------------------------------------------------------------------- CLI
def test_cli_reference_errors_exit_2(capsys):
    from audit_service.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reference", "train", "--group", "R8", "--model", "WT"])
    assert exc.value.code == 2
    assert main(["reference", "train", "--group", "R4", "--model", "WT", "--nu", "3"]) == 2
    assert "--nu only with --model IR" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shipped runs
def _shipped() -> list[dict]:
    import os

    if os.environ.get(catalog.ENV_DIR):
        return []
    return [r for r in catalog.list_reference_runs() if r["seed"] == 0]


SHIPPED = _shipped()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="no reference runs shipped in audit_service/reference/runs")


def _card(group, model):
    return catalog.get_reference_run(f"{group}_{model}_s0")


def _cond(card, name):
    return next(c["metrics"] for c in card["audit"]["conditions"] if c["name"] == name)


@needs_shipped
def test_shipped_runs_are_complete_and_load_in_both_formats():
    from audit_service.engine.runtime import load_model

    assert {(r["group"], r["model"]) for r in SHIPPED} == {(g, m) for g in GROUP_NAMES for m in ("WT", "DA", "IR")}
    x = torch.tensor(np.array(load_digits().test.x[:8]))
    for run in SHIPPED:
        for fmt in ("onnx", "torchscript"):
            runner = load_model(catalog.reference_model_path(run["name"], fmt), device="cpu")
            assert tuple(runner.input_shape) == INPUT_SHAPE
            assert runner.logits(x).shape == (8, NUM_CLASSES)


@needs_shipped
@pytest.mark.parametrize("group", GROUP_NAMES)
def test_shipped_runs_show_the_papers_findings(group):
    """The orderings of the paper on the full-size shipped runs (metrics measured by run_audit at reproduce time)."""
    wt, da, ir = (_card(group, m) for m in ("WT", "DA", "IR"))
    assert wt["verdict"] == "genuine" and da["verdict"] == "learned"
    for cond in ("clean", "noise"):
        m = _cond(wt, cond)
        assert m["LI"] < 1e-6 and m["DI"] < 1e-6 and m["SI"] > 0.999 and m["agreement"] == 1.0
    assert _cond(da, "clean")["LI"] > 100 * _cond(ir, "clean")["LI"]
    assert _cond(ir, "clean")["SI"] > _cond(da, "clean")["SI"]
    assert _cond(da, "clean")["agreement"] > 0.9  # DA's predictions are (mostly) invariant: learned
    assert ir["sigma_max"] < da["sigma_max"]
    # drift toward the image patches: DA's DI grows, WT's stays exactly 0, IR's stays far below DA's
    da_half = _cond(da, "blend(second_probes)@0.5")["DI"]
    assert da_half > _cond(da, "clean")["DI"]
    for b in ("0.1", "0.2", "0.3", "0.4", "0.5"):
        assert _cond(wt, f"blend(second_probes)@{b}")["DI"] < 1e-6
    assert _cond(ir, "blend(second_probes)@0.5")["DI"] < 0.1 * da_half


@needs_shipped
def test_engine_still_audits_a_shipped_run_as_its_card_says():
    from audit_service.reference.reproduce import audit_run, audit_spec

    card = _card("T3", "WT")
    spec = audit_spec("T3", betas=(0.5,), default_shifts=False,
                      options={"n_probes": 16, "n_noise_probes": 8, "ig_steps": 4, "jacobian_probes": 4,
                               "bootstrap": 0})
    report = audit_run(catalog.reference_model_path(card["name"], "onnx"), "T3", spec=spec)
    assert report["verdict"]["label"] == "genuine"
    assert report["reference_profile"] is None  # the core never reads the reference runs ...
    catalog.attach_reference_profile(report)  # ... the worker and the CLI attach the closest one
    assert report["reference_profile"]["name"] == "T3_WT"
    assert {r["model"] for r in report["reference_profile"]["runs"]} == {"WT", "DA", "IR"}
