"""``.pt2`` intake (torch.export.save): shape, classes and batch from the program, gradients through it,
and archives that torch.export.load would unpickle (or that carry native code) refused unread."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import pytest
import torch

from audit_service.errors import ModelError
from audit_service.runtime import load_model, sniff_format
from audit_service.runtime.pt2_runner import pickle_globals
from builders import IMAGE_SHAPE, MLP, PlainCNN, export_pt2


def batch(n, shape=IMAGE_SHAPE, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory):
    module = PlainCNN(n_classes=7).eval()
    return module, export_pt2(module, IMAGE_SHAPE, tmp_path_factory.mktemp("pt2") / "cnn.pt2")


def test_pt2_loads_with_shape_classes_and_dynamic_batch(cnn_pt2):
    module, path = cnn_pt2
    assert sniff_format(path) == "pt2"
    runner = load_model(path, device="cpu")
    assert runner.format == "pt2"
    assert runner.input_shape == IMAGE_SHAPE and runner.num_classes == 7 and runner.fixed_batch is None
    x = batch(5)
    with torch.no_grad():
        expected = module(x)
    for size in (1, 2, 5):  # Dim("batch") starts at 2: a batch of 1 is padded
        assert torch.allclose(runner.logits(x, batch_size=size), expected, atol=1e-5)


def test_pt2_gradients_equal_the_modules(cnn_pt2):
    module, path = cnn_pt2
    runner = load_model(path, device="cpu")
    twin = runner.torch_module()
    x = batch(3).requires_grad_(True)
    twin(x)[:, 2].sum().backward()
    y = batch(3).requires_grad_(True)
    module(y)[:, 2].sum().backward()
    assert x.grad.abs().max() > 1e-4
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    assert runner.gradient_path.startswith("torch.export")


def test_pt2_with_a_fixed_batch_and_feature_inputs(tmp_path):
    module = MLP(in_features=12, n_classes=4).eval()
    path = export_pt2(module, (12,), tmp_path / "mlp.pt2", dynamic_batch=False, batch=3)
    runner = load_model(path, device="cpu")
    assert runner.input_shape == (12,) and runner.fixed_batch == 3 and runner.num_classes == 4
    x = batch(7, (12,))
    with torch.no_grad():
        assert torch.allclose(runner.logits(x), module(x), atol=1e-5)
        assert torch.allclose(runner.torch_module()(x), module(x), atol=1e-5)


def _rewrite(path, out, replace=None, add=None, drop=()):
    """Copy a .pt2 zip, replacing / adding / dropping members (relative to the archive root)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for name in src.namelist():
            rel = name[len(root) + 1:]
            if rel in drop:
                continue
            dst.writestr(name, replace.get(rel, src.read(name)))
        for rel, data in add.items():
            dst.writestr(f"{root}/{rel}", data)
    return out


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/audit-pt2-pwned",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_globals_are_read_without_unpickling(protocol):
    blob = pickle.dumps(_Evil(), protocol=protocol)
    assert ("posix", "system") in pickle_globals(blob) or ("os", "system") in pickle_globals(blob)
    buffer = io.BytesIO()
    torch.save((torch.zeros(2),), buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as inner:
        data = inner.read(next(n for n in inner.namelist() if n.endswith(".pkl")))
    assert set(pickle_globals(data)) <= {("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
                                         ("collections", "OrderedDict")}


def test_sample_inputs_naming_arbitrary_globals_are_refused(cnn_pt2, tmp_path):
    _, path = cnn_pt2
    evil = _rewrite(path, tmp_path / "evil.pt2",
                    replace={"data/sample_inputs/model.pt": pickle.dumps(_Evil(), protocol=4)})
    with pytest.raises(ModelError, match="weights_only=False, which runs arbitrary code"):
        load_model(evil, device="cpu")
    assert not os.path.exists("/tmp/audit-pt2-pwned")


def test_pickled_weights_and_native_code_are_refused(cnn_pt2, tmp_path):
    _, path = cnn_pt2
    with zipfile.ZipFile(path) as src:
        root = src.namelist()[0].split("/", 1)[0]
        config = json.loads(src.read(f"{root}/data/weights/model_weights_config.json"))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    pickled = _rewrite(path, tmp_path / "pickled.pt2",
                       replace={"data/weights/model_weights_config.json": json.dumps(config).encode()})
    with pytest.raises(ModelError, match=f"'{first}' is stored as a pickle"):
        load_model(pickled, device="cpu")
    native = _rewrite(path, tmp_path / "aoti.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(ModelError, match="compiled native code"):
        load_model(native, device="cpu")
    legacy = _rewrite(path, tmp_path / "legacy.pt2", add={"data/weights/model.pt": b"\x80\x02."})
    with pytest.raises(ModelError, match="'data/weights/model.pt'"):
        load_model(legacy, device="cpu")


def test_custom_operator_targets_are_refused(cnn_pt2, tmp_path):
    _, path = cnn_pt2
    with zipfile.ZipFile(path) as src:
        root = src.namelist()[0].split("/", 1)[0]
        program = json.loads(src.read(f"{root}/models/model.json"))
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.evil.run.default"
    bad = _rewrite(path, tmp_path / "custom.pt2", replace={"models/model.json": json.dumps(program).encode()})
    with pytest.raises(ModelError, match="torch.ops.evil.run.default"):
        load_model(bad, device="cpu")


def test_cli_audits_a_pt2_program(cnn_pt2, tmp_path):
    import subprocess
    import sys

    import numpy as np

    _, path = cnn_pt2
    probes = tmp_path / "probes.npy"
    np.save(probes, batch(8).numpy())
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "audit_service.cli", "audit", str(path), "--group", "flip",
                        "--probes", str(probes), "--shift", "none", "--option", "n_probes=8",
                        "--option", "n_noise_probes=4", "--option", "ig_steps=2", "--option", "jacobian_probes=2",
                        "--output", str(out), "--require", "genuine,learned,not_invariant,trivial"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["model"]["format"] == "pt2" and report["model"]["num_classes"] == 7
    assert report["model"]["saliency_method"].startswith("integrated")
    assert report["model"]["gradient_path"].startswith("autograd: torch.export")
