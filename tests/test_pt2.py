"""``.pt2`` intake (torch.export.save): shape, classes and batch from the program, gradients through it,
and archives that torch.export.load would unpickle (or that carry native code) refused unread."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from audit_service.engine.errors import ModelError
from audit_service.engine.runtime import load_model, sniff_format
from audit_service.engine.runtime.pt2_runner import check_pt2_archive, pickle_globals
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


def test_a_program_whose_batch_starts_above_two_loads_and_pads_small_batches(tmp_path):
    """``Dim("batch", min=4)``: the load-time probe goes through the same padding as the audit's batches (it ran
    the bare program on a batch of 2 and refused the model)."""
    module = PlainCNN(n_classes=5).eval()
    example = (batch(4),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch", min=4)},))
        torch.export.save(program, str(tmp_path / "min4.pt2"))
    runner = load_model(tmp_path / "min4.pt2", device="cpu")
    assert runner.num_classes == 5 and runner.fixed_batch is None
    x = batch(5, seed=1)
    with torch.no_grad():
        expected = module(x)
    for size in (1, 3, 5):
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


def _program(path):
    with zipfile.ZipFile(path) as src:
        root = src.namelist()[0].split("/", 1)[0]
        return json.loads(src.read(f"{root}/models/model.json"))


def _with_program(path, out, program):
    return _rewrite(path, out, replace={"models/model.json": json.dumps(program).encode()})


def _saved(program) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(program, buffer)
    return buffer.getvalue()


def _export(module, shape=IMAGE_SHAPE):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(module.eval(), (batch(2, shape),), dynamic_shapes=({0: torch.export.Dim("batch")},))


class _ManyOps(nn.Module):
    """The layers and functions of typical hand-written CNNs and MLPs, in one graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn, self.ln, self.gn = nn.BatchNorm2d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4)
        self.drop, self.fc = nn.Dropout(0.2), nn.Linear(4, 3)

    def forward(self, x):
        y = self.gn(self.bn(self.conv(x)))
        y = torch.cat([F.gelu(y), F.silu(y), F.hardswish(y), torch.sigmoid(y), torch.tanh(y), F.relu(y)], 1)
        y = F.max_pool2d(y, 2) + F.avg_pool2d(y, 2) * 0.5 - F.adaptive_avg_pool2d(y, 3).mean() / 2
        y = self.ln(y.view(y.shape[0], 6, 4, -1).permute(0, 2, 3, 1).reshape(y.shape[0], -1, 4))
        y = self.fc(self.drop(y).transpose(1, 2).mean(2).unsqueeze(1).squeeze(1).flatten(1).clone())
        y = y.expand(-1, 3)[:, 1:].select(1, 0).unsqueeze(1) + y.t().t().to(torch.float32) + y.sum(1, keepdim=True)
        return F.softmax(y, 1) + F.log_softmax(y, 1)


CLASSIFIERS = {
    "many_ops": (_ManyOps, IMAGE_SHAPE),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 32, 32)),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=10), (3, 32, 32)),
    "squeezenet1_0": (lambda: torchvision.models.squeezenet1_0(num_classes=10), (3, 32, 32)),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 32, 32)),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in ("many_ops", "resnet18") else
                                               [pytest.mark.slow]) for name in CLASSIFIERS])
def test_stock_classifiers_pass_the_operator_allow_list(name):
    build, shape = CLASSIFIERS[name]
    torch.manual_seed(0)
    program = _export(build(), shape)
    check_pt2_archive(_saved(program))  # training IR: conv2d, batch_norm, relu_ on computed tensors, ...
    check_pt2_archive(_saved(program.run_decompositions()))  # core ATen: convolution, addmm, view, ...


class _FileWriter(nn.Module):
    """What the attacker exports first: ``zeros`` + ``copy_``; ``aten.from_file`` has no fake kernel, so
    torch.export refuses to trace it and the attacker names it in the graph JSON instead."""

    def forward(self, x):
        buffer = torch.zeros(16, dtype=torch.uint8)
        buffer.copy_(torch.full((16,), 65, dtype=torch.uint8))
        return x.flatten(1) * 2 + buffer[:1].float()


def test_a_graph_that_maps_a_file_and_copies_into_it_is_refused(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"0123456789abcdef")
    plain = tmp_path / "writer.pt2"
    plain.write_bytes(_saved(_export(_FileWriter())))
    program = _program(plain)
    node = program["graph_module"]["graph"]["nodes"][0]
    assert node["target"] == "torch.ops.aten.zeros.default"
    node["target"] = "torch.ops.aten.from_file.default"
    node["inputs"] = [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                      {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                      {"name": "size", "arg": {"as_int": 16}, "kind": 1}, *node["inputs"][1:]]
    evil = _with_program(plain, tmp_path / "evil.pt2", program)
    with warnings.catch_warnings():  # the attack is real: torch.export.load runs it
        warnings.simplefilter("ignore")
        torch.export.load(str(evil)).module()(batch(2))
    assert victim.read_bytes() == b"A" * 16
    victim.write_bytes(b"0123456789abcdef")
    with pytest.raises(ModelError, match=r"the graph calls 'aten\.from_file\.default' \(reads or writes files\)"):
        load_model(evil, device="cpu")
    with pytest.raises(ModelError, match=r"'aten\.copy_\.default' \(writes into an existing tensor\)"):
        load_model(plain, device="cpu")
    assert victim.read_bytes() == b"0123456789abcdef"


class _AddsToItsInput(nn.Module):
    def forward(self, x):
        x.add_(1)
        return x.flatten(1)


class _ClampsAViewOfItsInput(nn.Module):
    def forward(self, x):
        x[:, 0].relu_()
        return x.flatten(1)


class _DecaysItsBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        self.scale.mul_(0.5)
        return x.flatten(1) * self.scale


@pytest.mark.parametrize("module, op, target", [(_AddsToItsInput, "aten.add_.Tensor", "x"),
                                                (_ClampsAViewOfItsInput, "aten.relu_.default", "select"),
                                                (_DecaysItsBuffer, "aten.mul_.Tensor", "b_scale")])
def test_in_place_writes_into_inputs_or_weights_are_refused(module, op, target):
    program = _export(module())
    with pytest.raises(ModelError, match=rf"'{re.escape(op)}' \(writes in place into '{target}', an input, weight"):
        check_pt2_archive(_saved(program))
    functional = program.run_decompositions()  # the write moves into the signature
    with pytest.raises(ModelError, match=r"its signature has a '(user_input|buffer)_mutation' output"):
        check_pt2_archive(_saved(functional))


def test_batch_norm_updating_its_running_statistics_is_refused(tmp_path):
    path = tmp_path / "bn.pt2"
    path.write_bytes(_saved(_export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten()))))
    load_model(path, device="cpu")
    program = _program(path)
    (node,) = [n for n in program["graph_module"]["graph"]["nodes"] if n["target"].endswith("batch_norm.default")]
    (flag,) = [i for i in node["inputs"] if i["name"] == "training"]
    flag["arg"] = {"as_bool": True}
    with pytest.raises(ModelError, match=r"'aten\.batch_norm\.default' \(writes in place into 'b_1_running_mean'"):
        load_model(_with_program(path, tmp_path / "training.pt2", program), device="cpu")


@pytest.mark.parametrize("target, shown, why", [
    ("torch.ops.evil.run.default", "evil.run.default", "not on the allow-list"),
    ("torch.ops.aten.not_an_operator.default", "aten.not_an_operator.default", "not on the allow-list"),
    ("torch.ops.aten.nonzero.default", "aten.nonzero.default", "not on the allow-list"),
    ("torch.ops.aten.index_put_.default", "aten.index_put_.default", "writes into an existing tensor"),
    ("torch.ops.aten.add.out", "aten.add.out", "writes into its argument 'out'"),
    ("torch.ops.aten.empty_strided.default", "aten.empty_strided.default", "returns uninitialized memory"),
    ("torch.ops.aten.set_.source_Storage", "aten.set_.source_Storage", "repoints, resizes or aliases"),
    ("_operator.call", "_operator.call", "not on the allow-list"),
    ("torch.sym_float.__globals__", "torch.sym_float.__globals__", "not on the allow-list"),
])
def test_operators_off_the_allow_list_are_refused_by_name(cnn_pt2, tmp_path, target, shown, why):
    _, path = cnn_pt2
    program = _program(path)
    program["graph_module"]["graph"]["nodes"][0]["target"] = target
    bad = _with_program(path, tmp_path / "custom.pt2", program)
    with pytest.raises(ModelError, match=rf"the graph calls '{re.escape(shown)}' \({why}"):
        load_model(bad, device="cpu")


def test_the_allow_list_names_operators_of_this_torch():
    from audit_service.engine.runtime.pt2_runner import _INPLACE_OPS, _PURE_OPS, _REFUSED_OPS, _VIEW_OPS

    allowed = _PURE_OPS | _VIEW_OPS | _INPLACE_OPS
    assert not allowed & set(_REFUSED_OPS)
    missing = [op for op in sorted(allowed | set(_REFUSED_OPS)) if not hasattr(torch.ops.aten, op.split(".")[1])]
    assert not missing, missing


def test_shape_expressions_and_guards_that_are_python_are_refused(cnn_pt2, tmp_path):
    _, path = cnn_pt2
    marker = tmp_path / "pwned"
    text = json.dumps(_program(path))
    assert "\"expr_str\": \"Symbol('s" in text  # the dynamic batch, as sympy.srepr
    payload = f"__import__('os').system('touch {marker}')"
    evil = json.loads(re.sub(r'"expr_str": "[^"]*"', lambda _: json.dumps({"expr_str": payload})[1:-1], text, count=1))
    with pytest.raises(ModelError, match="is not plain size arithmetic"):
        load_model(_with_program(path, tmp_path / "expr.pt2", evil), device="cpu")
    guarded = {**_program(path), "guards_code": [payload]}
    with pytest.raises(ModelError, match="carries guard code"):
        load_model(_with_program(path, tmp_path / "guards.pt2", guarded), device="cpu")
    assert not marker.exists()


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


@pytest.mark.parametrize("kind", ["pt2", "torchscript"])
def test_zip_bombs_are_refused_before_anything_is_inflated(cnn_pt2, tmp_path, kind):
    """Issue 19: a member that deflates 160 MiB of zeros into a few hundred KiB (a legitimate-looking extra
    file) is refused from the archive's own declarations: nothing near its size is ever allocated."""
    import tracemalloc

    from builders import PlainCNN, export_torchscript

    source = cnn_pt2[1] if kind == "pt2" else export_torchscript(PlainCNN(), IMAGE_SHAPE, tmp_path / "m.pt")
    bomb = tmp_path / f"bomb.{kind}"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(bomb, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        dst.writestr(f"{root}/extra/padding", b"\0" * (160 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="zip bomb"):
            load_model(bomb, device="cpu", max_bytes=4 << 20)  # the file is read into a buffer of the cap
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak  # refused from the headers: the 160 MiB entry was never inflated


def test_a_batch_1_program_runs_whole_batches_through_vmap(tmp_path):
    """Issue 23: torch.export's default (no dynamic shapes) fixes the batch at the example's, often 1. The runner
    runs such a program over whole batches with torch.vmap, checked against one call per sample, and says so;
    logits and gradients equal the eager module's."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
        path = tmp_path / "batch1.pt2"
        torch.export.save(program, str(path))
    runner = load_model(path, device="cpu")
    assert runner.fixed_batch == 1
    assert any("torch.vmap" in p and "whole batches" in p for p in runner.providers), runner.providers
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(runner.logits(x, 8), expected, atol=1e-4)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(runner.torch_module()(xa)[:, 3].sum(), xa)
    (gb,) = torch.autograd.grad(model(xb)[:, 3].sum(), xb)
    assert torch.allclose(ga, gb, atol=1e-5)
