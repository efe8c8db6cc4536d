"""Classic ML exports audit as exported: scikit-learn through skl2onnx (LogisticRegression, RandomForest, with and
without ZipMap) and LightGBM through onnxmltools, trained here on sklearn's 8x8 digits. Their label output is
left out and the probabilities audited (said in the report's providers), on the gradient-free fallback (stated);
the audit's LI is the one computed from the library's own ``predict_proba``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from audit_service import audit

pytest.importorskip("skl2onnx")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

#: mirror each 8-pixel row of the flattened digit: a horizontal flip as a permutation of the 64 features
MIRROR = [row * 8 + 7 - col for row in range(8) for col in range(8)]
GROUP = {"name": "permutation", "generators": [MIRROR], "axis": 0}
OPTS = {"n_probes": 32, "n_noise_probes": 8, "jacobian_probes": 2, "bootstrap": 20, "device": "cpu"}


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def _skl2onnx(model, x, zipmap: bool):
    from skl2onnx import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_onnx(model, x[:1], options={"zipmap": zipmap} if not zipmap else None)


def _lightgbm(x, y):
    lightgbm = pytest.importorskip("lightgbm")
    onnxmltools = pytest.importorskip("onnxmltools")
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = lightgbm.LGBMClassifier(n_estimators=20, num_leaves=8, verbose=-1, random_state=0).fit(x, y)
    return model, onnxmltools.convert_lightgbm(model, initial_types=[("input", FloatTensorType([None, 64]))],
                                               zipmap=True)


CASES = {
    "logistic regression (ZipMap)": lambda x, y: LogisticRegression(max_iter=300),
    "random forest (ZipMap)": lambda x, y: RandomForestClassifier(n_estimators=15, max_depth=8, random_state=0),
    "random forest (tensor)": lambda x, y: RandomForestClassifier(n_estimators=15, max_depth=8, random_state=0),
    "lightgbm (onnxmltools, ZipMap)": None,
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_classic_ml_export_audits_on_its_probabilities(case, digits, tmp_path):
    import onnx

    x, y = digits
    train, probes = slice(0, 1500), slice(1500, 1532)
    if CASES[case] is None:
        model, proto = _lightgbm(x[train], y[train])
    else:
        model = CASES[case](x, y).fit(x[train], y[train])
        proto = _skl2onnx(model, x, zipmap="ZipMap" in case)
    assert len(proto.graph.output) == 2  # label and probabilities, as the exporters write them
    path = tmp_path / "model.onnx"
    onnx.save_model(proto, str(path))

    result = audit(path, GROUP, x[probes], y[probes], shifts=[], **OPTS)
    report = result.to_json()
    note = next((p for p in report["model"]["providers"] if p.startswith("output: probabilities")), None)
    assert note is not None and "left out" in note and ("before ZipMap" in note) == ("ZipMap" in case), \
        report["model"]["providers"]
    assert report["model"]["output_kind"] == "probabilities"
    assert report["model"]["gradient_path"].startswith("fallback: gradient-free")
    assert "cannot convert" in report["model"]["gradient_note"]

    # the audit measures the library's own probabilities: LI over g != e on log p, as predict_proba gives it
    logp = np.log(np.clip(model.predict_proba(x[probes]).astype(np.float64), 1e-12, None))
    logp_mirrored = np.log(np.clip(model.predict_proba(x[probes][:, MIRROR]).astype(np.float64), 1e-12, None))
    expected = float((0.5 * ((logp - logp_mirrored) ** 2).sum(-1)).mean())
    clean = result.condition("clean")
    assert clean.metrics["LI"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    accuracy = float((model.predict_proba(x[probes]).argmax(-1) == y[probes]).mean())
    mirrored = float((model.predict_proba(x[probes][:, MIRROR]).argmax(-1) == y[probes]).mean())
    assert accuracy > 0.8  # a model that learned the task (digits are not mirror-symmetric: mirrored, it fails)
    assert clean.metrics["accuracy"] == pytest.approx((accuracy + mirrored) / 2)  # over the orbit, identity included
