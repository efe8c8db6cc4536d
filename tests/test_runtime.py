"""The model runtime layer: safe loading, format sniffing, logits, and the differentiable twin.

Every model here is a real network from ``builders`` (or a real ONNX graph built with onnx.helper),
exported the way a client would export it; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from audit_service.engine.errors import ModelError, ModelRuntimeError, ProbeError, SpecError
from audit_service.engine.runtime import ModelRunner, load_model, resolve_device, sniff_format
from builders import (
    UNCONVERTIBLE_OP,
    IMAGE_SHAPE,
    MLP,
    RGB_SHAPE,
    CircularCNN,
    ConstantModel,
    GeluCNN,
    NaNModel,
    NormalizedCNN,
    OddOutputModel,
    OrbitAveragedCNN,
    PlainCNN,
    TwoInputModel,
    export_onnx,
    export_torchscript,
    export_unconvertible,
    rot90,
)

# torch.jit.script/save announce their deprecation on every call; the archives they write are still
# what clients send.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")

FALLBACK = "saliency uses a gradient-free occlusion estimate and sigma_max a finite-difference estimate"


def batch(n: int, shape=IMAGE_SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def both(module: nn.Module, shape, tmp_path, name: str = "m") -> tuple[ModelRunner, ModelRunner]:
    onnx_path = export_onnx(module, shape, tmp_path / f"{name}.onnx")
    ts_path = export_torchscript(module, shape, tmp_path / f"{name}.pt")
    return load_model(onnx_path, device="cpu"), load_model(ts_path, device="cpu")


class WritesMarker:
    """A pickle payload: unpickling it calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------- sniffing
def test_format_is_sniffed_from_content_not_extension(tmp_path):
    model = PlainCNN()
    onnx_path = export_onnx(model, IMAGE_SHAPE, tmp_path / "model.pt")        # ONNX with a torch name
    ts_path = export_torchscript(model, IMAGE_SHAPE, tmp_path / "model.onnx")  # TorchScript with an ONNX name
    assert sniff_format(onnx_path) == "onnx"
    assert sniff_format(ts_path) == "torchscript"
    assert sniff_format(onnx_path.read_bytes()) == "onnx"
    assert load_model(onnx_path).format == "onnx"
    assert load_model(ts_path).format == "torchscript"


def test_runner_attributes(tmp_path):
    onnx_runner, ts_runner = both(CircularCNN(in_ch=3, n_classes=5), RGB_SHAPE, tmp_path)
    for runner, path in ((onnx_runner, tmp_path / "m.onnx"), (ts_runner, tmp_path / "m.pt")):
        assert isinstance(runner, ModelRunner)
        assert runner.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert runner.input_shape == RGB_SHAPE
        assert runner.num_classes == 5
        assert runner.device == torch.device("cpu")
        assert runner.gradient_note is None
    assert onnx_runner.providers == ["CPUExecutionProvider"]
    assert ts_runner.providers == ["torch.jit (cpu)"]


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("make, shape", [
    (lambda: PlainCNN(), IMAGE_SHAPE),
    (lambda: CircularCNN(in_ch=3, n_classes=5), RGB_SHAPE),
    (lambda: OrbitAveragedCNN(PlainCNN(image_size=16), group="D4"), (1, 16, 16)),
    (lambda: MLP(in_features=144), IMAGE_SHAPE),
    (lambda: ConstantModel(n_classes=4), IMAGE_SHAPE),
])
def test_onnx_and_torchscript_logits_agree(tmp_path, make, shape):
    module = make().eval()
    onnx_runner, ts_runner = both(module, shape, tmp_path)
    x = batch(7, shape)
    got_onnx = onnx_runner.logits(x, batch_size=3)
    got_ts = ts_runner.logits(x, batch_size=3)
    with torch.no_grad():
        expected = module(x)
    assert got_onnx.shape == got_ts.shape == expected.shape
    assert got_onnx.dtype == got_ts.dtype == torch.float32
    assert torch.allclose(got_onnx, got_ts, atol=1e-5, rtol=0)
    assert torch.allclose(got_onnx, expected, atol=1e-5, rtol=0)
    # chunking does not change the numbers
    assert torch.allclose(onnx_runner.logits(x, batch_size=1024), got_onnx, atol=1e-6, rtol=0)


def test_builders_are_invariant_by_construction(tmp_path):
    x = batch(4, (1, 16, 16))
    orbit = OrbitAveragedCNN(PlainCNN(image_size=16), group="D4").eval()
    circular = CircularCNN().eval()
    with torch.no_grad():
        for k in range(4):
            assert torch.equal(rot90(x, k), torch.rot90(x, k, dims=(-2, -1)))
            assert torch.allclose(orbit(torch.rot90(x, k, dims=(-2, -1))), orbit(x), atol=1e-5)
        assert torch.allclose(orbit(x.flip(-1)), orbit(x), atol=1e-5)
        assert torch.allclose(circular(torch.roll(x, shifts=(3, 5), dims=(-2, -1))), circular(x), atol=1e-5)
        plain = PlainCNN(image_size=16).eval()
        assert (plain(torch.rot90(x, 1, dims=(-2, -1))) - plain(x)).abs().max() > 1e-3


def test_onnx_with_fixed_batch_runs_any_number_of_inputs(tmp_path):
    """A graph exported at batch 2 that does not depend on its batch is run over whole batches (its batch
    relaxed, checked at load against the fixed-batch runs, said in the providers)."""
    module = PlainCNN().eval()
    path = export_onnx(module, IMAGE_SHAPE, tmp_path / "fixed.onnx", dynamic_batch=False)  # batch fixed at 2
    runner = load_model(path)
    assert runner.fixed_batch is None
    assert runner.providers[-1].startswith("batch-2 graph run over whole batches, its batch relaxed (checked:")
    x = batch(5)
    with torch.no_grad():
        expected = module(x)
    assert torch.allclose(runner.logits(x, batch_size=1024), expected, atol=1e-5)
    twin = runner.torch_module()
    assert twin is not None
    assert torch.allclose(twin(x), expected, atol=1e-5)


class BatchMixing(nn.Module):
    """Logits that read the whole batch (a batch mean): at batch 1 a per-sample function, relaxed a different one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x.mean(dim=0).sum()


def test_a_fixed_batch_graph_that_reads_its_batch_keeps_one_run_per_sample(tmp_path):
    module = BatchMixing().eval()
    path = export_onnx(module, (12,), tmp_path / "mixing.onnx", dynamic_batch=False)
    graph = onnx.load(str(path))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # exported at batch 1, as the default does
    graph.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    path.write_bytes(graph.SerializeToString())
    runner = load_model(path, device="cpu")
    assert runner.fixed_batch == 1
    assert runner.providers[-1].startswith("batch-1 graph: 1 sample per run (relaxed, it differed by"), \
        runner.providers
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.cat([module(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(runner.logits(x), expected, rtol=1e-5, atol=1e-5)


def test_a_fixed_batch_graph_gets_its_last_piece_zero_padded(tmp_path):
    """A batch-2 graph kept at batch 2 runs 5 inputs as (x0, x1), (x2, x3), (x4, 0): the padding path every fixed-batch
    runner shares (``chunks.run_in_fixed_batches``), its rows dropped; a batch-mixing model shows the zero row."""
    module = BatchMixing().eval()
    runner = load_model(export_onnx(module, (12,), tmp_path / "mixing2.onnx", dynamic_batch=False), device="cpu")
    assert runner.fixed_batch == 2
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    pieces = [x[0:2], x[2:4], torch.cat([x[4:5], torch.zeros(1, 12)])]
    with torch.no_grad():
        expected = torch.cat([module(piece) for piece in pieces])[:5]
    torch.testing.assert_close(runner.logits(x, batch_size=1024), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.logits(x, batch_size=3), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "legacy"])
def test_a_resnet18_exported_at_batch_1_runs_whole_batches(exporter, tmp_path):
    """torchvision's ResNet-18 exported with no dynamic shapes (the dynamo exporter's default; the legacy one without
    dynamic_axes) at 3x32x32: its batch relaxed (the dynamo graph flattens with Reshape [1, 512]), the logits and
    the gradient twin those of the module, on batches of any size."""
    import warnings

    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / f"resnet18_{exporter}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(1, *RGB_SHAPE),), str(path), dynamo=exporter == "dynamo")
    graph = onnx.load(str(path), load_external_data=False)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    runner = load_model(path, device="cpu")
    assert runner.fixed_batch is None
    assert runner.providers[-1].startswith("batch-1 graph run over whole batches, its batch relaxed"), runner.providers
    x = torch.rand(7, *RGB_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(runner.logits(x, batch_size=4), expected, rtol=1e-4, atol=1e-4)
    twin = runner.torch_module()
    assert twin is not None and twin.inner.fixed_batch is None  # the twin is converted from the relaxed graph
    torch.testing.assert_close(twin(x), expected, rtol=1e-4, atol=1e-4)


def test_probes_of_the_wrong_shape_are_a_probe_error(tmp_path):
    runner, _ = both(PlainCNN(), IMAGE_SHAPE, tmp_path)
    with pytest.raises(ProbeError, match=r"Expected inputs of shape \(N, 1, 12, 12\).*\(3, 1, 16, 16\)"):
        runner.logits(batch(3, (1, 16, 16)))
    with pytest.raises(ProbeError, match=r"model's shape \(1, 12, 12\).*\(1, 16, 16\)"):
        load_model(tmp_path / "m.onnx", input_shape=(1, 16, 16))
    assert runner.logits(batch(0)).shape == (0, 10)


# ----------------------------------------------------------------------------- refusals
def test_truncated_onnx_is_refused(tmp_path):
    data = export_onnx(PlainCNN(), IMAGE_SHAPE, tmp_path / "m.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="could not be parsed as ONNX") as info:
        load_model(truncated)
    assert info.value.field == "model"


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="could not be parsed as ONNX"):
        sniff_format(path)
    with pytest.raises(ModelError, match="could not be parsed as ONNX"):
        load_model(path)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_is_refused_without_unpickling(tmp_path, protocol):
    # control: the payload is live, unpickling it really creates its marker
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(WritesMarker(str(control)), protocol=protocol))
    assert control.exists()

    marker = tmp_path / "unpickled"
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps(WritesMarker(str(marker)), protocol=protocol))
    with pytest.raises(ModelError, match="got a Python pickle; pickles are never loaded"):
        load_model(path)
    with pytest.raises(ModelError, match="Python pickle"):
        sniff_format(path)
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_torch_save_checkpoint_is_refused_without_unpickling(tmp_path, zipped):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    torch.save({"state": WritesMarker(str(marker))}, path, _use_new_zipfile_serialization=zipped)
    expected = "torch.save checkpoint" if zipped else "Python pickle"
    with pytest.raises(ModelError, match=expected):
        load_model(path)
    assert not marker.exists()


def test_zip_without_torchscript_code_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/readme.txt", "not a model")
    with pytest.raises(ModelError, match="zip archive with neither TorchScript code"):
        load_model(path)


def test_onnx_external_data_is_read_from_the_model_folder_only(tmp_path):
    """Issue 18: data beside the model is read into the graph (tests/test_external_data.py has the rest);
    the same graph moved away from its data file is refused, naming the tensor and the location."""
    path = export_onnx(PlainCNN(), IMAGE_SHAPE, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    external = tmp_path / "external.onnx"
    onnx.save_model(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    runner = load_model(external)
    assert runner.external_data == ("weights.bin",)
    x = torch.rand(3, *IMAGE_SHAPE)
    assert torch.equal(runner.logits(x), load_model(path).logits(x))
    (tmp_path / "away").mkdir()
    moved = external.rename(tmp_path / "away" / "external.onnx")
    with pytest.raises(ModelError, match=r"external data file 'weights.bin' of initializer '.+' beside the model"):
        load_model(moved)
    with pytest.raises(ModelError, match=r"initializer '.+' stores its data externally \(in 'weights.bin'\)"):
        load_model(moved.read_bytes())  # bytes have no folder: nothing is followed


def test_oversize_file_is_refused(tmp_path, monkeypatch):
    path = export_onnx(PlainCNN(), IMAGE_SHAPE, tmp_path / "m.onnx")
    size = path.stat().st_size
    with pytest.raises(ModelError, match=rf"at most 1000 bytes.*but got {size} bytes"):
        load_model(path, max_bytes=1000)
    monkeypatch.setenv("AUDIT_MAX_MODEL_BYTES", "2000")
    with pytest.raises(ModelError, match=rf"at most 2000 bytes.*but got {size} bytes"):
        load_model(path)
    monkeypatch.setenv("AUDIT_MAX_MODEL_BYTES", str(size))
    assert load_model(path).num_classes == 10


def test_two_input_model_is_refused(tmp_path):
    path = export_onnx(TwoInputModel(), list(TwoInputModel.input_shapes), tmp_path / "two.onnx")
    with pytest.raises(ModelError, match=r"exactly one input tensor.*got 2: 'input_0', 'input_1'"):
        load_model(path)


@pytest.mark.parametrize("kind, shape_text", [("3d", r"\(2, 10, 2\)"), ("1d", r"\(2,\)")])
def test_output_that_is_not_n_by_c_is_refused(tmp_path, kind, shape_text):
    module = OddOutputModel(kind=kind)
    with pytest.raises(ModelError, match=r"Expected logits of shape \(N, C\)"):
        load_model(export_onnx(module, IMAGE_SHAPE, tmp_path / "odd.onnx"))
    with pytest.raises(ModelError, match=rf"Expected logits of shape \(N, C\).*returned shape {shape_text}"):
        load_model(export_torchscript(module, IMAGE_SHAPE, tmp_path / "odd.pt"))


class GrowsOutput(nn.Module):
    """(N, C) on small batches, (N, C + 1) on batches above 2: caught per chunk at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(144, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        if x.shape[0] > 2:
            out = torch.cat([out, out[:, :1]], dim=1)
        return out


class FailsOnLargeInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(144, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.max() > 10.0):
            raise RuntimeError("input out of the calibrated range")
        return self.fc(x.flatten(1))


def test_wrong_shape_at_run_time_is_a_runtime_error(tmp_path):
    path = tmp_path / "grows.pt"
    torch.jit.save(torch.jit.script(GrowsOutput().eval()), str(path))
    runner = load_model(path, input_shape=IMAGE_SHAPE)
    assert runner.logits(batch(2)).shape == (2, 4)
    with pytest.raises(ModelRuntimeError, match=r"Expected logits of shape \(3, 4\).*returned \(3, 5\)"):
        runner.logits(batch(3))


def test_model_exception_becomes_runtime_error_without_traceback(tmp_path):
    path = tmp_path / "fails.pt"
    torch.jit.save(torch.jit.script(FailsOnLargeInputs().eval()), str(path))
    runner = load_model(path, input_shape=IMAGE_SHAPE)
    with pytest.raises(ModelRuntimeError) as info:
        runner.logits(batch(2) * 100)
    assert "input out of the calibrated range" in info.value.message
    assert "Traceback" not in info.value.message


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_nan_logits_are_a_runtime_error(tmp_path, fmt):
    export = export_onnx if fmt == "onnx" else export_torchscript
    always = load_model(export(NaNModel(), IMAGE_SHAPE, tmp_path / "nan.m"))
    with pytest.raises(ModelRuntimeError, match=r"NaN/Inf logits for 6 of 6 inputs \(first at index 0\)"):
        always.logits(batch(6), batch_size=4)
    some = load_model(export(NaNModel(when="negative_mean"), IMAGE_SHAPE, tmp_path / "some.m"))
    x = batch(6)
    x[[1, 4]] -= 2.0  # negative mean -> sqrt(<0) = NaN for these two
    with pytest.raises(ModelRuntimeError, match=r"NaN/Inf logits for 2 of 6 inputs \(first at index 1\)"):
        some.logits(x, batch_size=4)
    assert torch.isfinite(some.logits(batch(6))).all()


def _graph_model(nodes, inputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                  ["N", 3])],
                              initializer=list(initializers))
    # IR version 8 (ONNX 1.13 era): what current exporters write and every onnxruntime reads
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def test_input_shape_limits_are_checked_before_allocating(tmp_path):
    huge = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 10_000, 10_000])
    path = tmp_path / "huge.onnx"
    onnx.save_model(_graph_model([helper.make_node("Flatten", ["x"], ["logits"])], [huge]), str(path))
    with pytest.raises(ModelError, match="at most 50000000 input elements"):
        load_model(path)
    symbolic = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "H", 3])
    onnx.save_model(_graph_model([helper.make_node("Flatten", ["x"], ["logits"])], [symbolic]), str(path))
    with pytest.raises(ModelError, match="positive integer input sizes.*'H'"):
        load_model(path)


def test_onnx_checker_failure_is_a_model_error(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    path = tmp_path / "bad.onnx"
    onnx.save_model(_graph_model([helper.make_node("Add", ["x", "undefined"], ["logits"])], [x]), str(path))
    with pytest.raises(ModelError, match="ONNX checker rejects it"):
        load_model(path)


# ----------------------------------------------------------------------------- TorchScript input shape
def test_torchscript_input_shape_sources(tmp_path):
    module = PlainCNN().eval()
    bare = export_torchscript(module, IMAGE_SHAPE, tmp_path / "bare.pt", record_shape=False)
    with pytest.raises(ModelError, match=r"TorchScript does not record it; pass probes or the shape \(the CLI's "
                                         r"--input-shape 1,28,28, input_shape= in Python\), or save with "
                                         r"_extra_files=\{'input_shape.json': '\[1, 28, 28\]'\}"):
        load_model(bare)
    assert load_model(bare, input_shape=IMAGE_SHAPE).input_shape == IMAGE_SHAPE
    assert load_model(export_torchscript(module, IMAGE_SHAPE, tmp_path / "rec.pt")).input_shape == IMAGE_SHAPE

    class WithAttribute(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_shape = [1, 12, 12]
            self.inner = MLP(in_features=144, n_classes=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    scripted = tmp_path / "attr.pt"
    torch.jit.save(torch.jit.script(WithAttribute().eval()), str(scripted))
    runner = load_model(scripted)
    assert runner.input_shape == (1, 12, 12)
    assert runner.num_classes == 3


# ----------------------------------------------------------------------------- gradients
def _input_gradient(module: nn.Module, x: torch.Tensor, target: int = 3) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    module(x)[:, target].sum().backward()
    return x.grad


@pytest.mark.parametrize("make, shape", [
    (lambda: PlainCNN(), IMAGE_SHAPE),
    (lambda: CircularCNN(in_ch=3, n_classes=5), RGB_SHAPE),  # circular padding: Slice + Concat
    (lambda: OrbitAveragedCNN(PlainCNN(), group="C4"), IMAGE_SHAPE),
])
def test_converted_onnx_gradient_equals_torchscript_gradient(tmp_path, make, shape):
    onnx_runner, ts_runner = both(make(), shape, tmp_path)
    twin = onnx_runner.torch_module()
    assert twin is not None, onnx_runner.gradient_note
    assert onnx_runner.torch_module() is twin  # converted once, cached
    assert not twin.training
    assert all(not p.requires_grad for p in twin.parameters())
    x = batch(4, shape)
    grad_onnx = _input_gradient(twin, x)
    grad_ts = _input_gradient(ts_runner.torch_module(), x)
    assert grad_onnx.abs().max() > 1e-4  # a real, non-zero gradient
    assert torch.allclose(grad_onnx, grad_ts, atol=1e-5, rtol=1e-4)


def test_unsupported_op_falls_back_with_a_note(tmp_path):
    module = PlainCNN().eval()
    path = export_unconvertible(module, IMAGE_SHAPE, tmp_path / "unconvertible.onnx")
    assert UNCONVERTIBLE_OP in {node.op_type for node in onnx.load(str(path)).graph.node}
    runner = load_model(path)
    assert runner.gradient_note is None  # decided lazily
    assert runner.torch_module() is None
    assert runner.gradient_note == f"onnx2torch cannot convert op '{UNCONVERTIBLE_OP}'; {FALLBACK}"
    assert runner.gradient_path is None
    x = batch(5)
    with torch.no_grad():
        assert torch.allclose(runner.logits(x), module(x), atol=1e-5)


def test_opset20_gelu_gets_a_twin(tmp_path):
    """onnx2torch 1.5 has no Gelu-20 converter; the runtime's own (runtime/onnx_ops.py) fills the gap."""
    module = GeluCNN().eval()
    path = export_onnx(module, IMAGE_SHAPE, tmp_path / "gelu.onnx", opset=GeluCNN.ONNX_OPSET)
    assert "Gelu" in {node.op_type for node in onnx.load(str(path)).graph.node}
    runner = load_model(path)
    twin = runner.torch_module()
    assert twin is not None, runner.gradient_note
    assert runner.twin_error is not None and runner.twin_error <= 1e-4
    assert runner.gradient_path.startswith("onnx2torch twin")
    x = batch(4)
    assert torch.allclose(_input_gradient(twin, x), _input_gradient(module, x), atol=1e-5, rtol=1e-4)


def test_legacy_export_with_shared_initializers_gets_a_twin(tmp_path):
    """The legacy exporter folds BatchNorm into Conv and shares equal folded biases (here two zero
    vectors, as in every untrained ResNet) through Identity nodes; onnx2torch refuses a Conv whose bias
    is not an initializer, so the graph is normalized (Identity folded) first."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * IMAGE_SHAPE[1] * IMAGE_SHAPE[2], 4)).eval()
    path = export_onnx(module, IMAGE_SHAPE, tmp_path / "shared.onnx")
    assert "Identity" in {node.op_type for node in onnx.load(str(path)).graph.node}
    runner = load_model(path)
    twin = runner.torch_module()
    assert twin is not None, runner.gradient_note
    assert "Identity" in runner.gradient_path
    x = batch(3)
    assert torch.allclose(_input_gradient(twin, x), _input_gradient(module, x), atol=1e-5, rtol=1e-4)


def test_new_opset_is_downgraded_for_the_torch_twin(tmp_path):
    """Opset 20 AveragePool has no onnx2torch converter; onnx's version converter brings it to one that has."""
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                           nn.Linear(4 * 6 * 6, 10)).eval()
    path = export_onnx(module, IMAGE_SHAPE, tmp_path / "pool20.onnx", opset=20)
    graph = onnx.load(str(path))
    assert "AveragePool" in {node.op_type for node in graph.graph.node} and graph.opset_import[0].version == 20
    runner = load_model(path)
    twin = runner.torch_module()
    assert twin is not None and runner.gradient_note is None
    x = batch(4)
    expected = _input_gradient(module, x)
    assert expected.abs().max() > 1e-4
    assert torch.allclose(_input_gradient(twin, x), expected, atol=1e-5, rtol=1e-4)


def test_converter_refusal_names_the_op(tmp_path):
    module = NormalizedCNN().eval()
    runner = load_model(export_onnx(module, IMAGE_SHAPE, tmp_path / "norm.onnx"))
    assert runner.torch_module() is None
    assert runner.gradient_note.startswith("onnx2torch cannot convert op 'Clip'")
    assert runner.gradient_note.endswith(FALLBACK)
    x = batch(3)
    with torch.no_grad():
        assert torch.allclose(runner.logits(x), module(x), atol=1e-5)


def test_handwritten_graph_with_unconvertible_op(tmp_path):
    """Conv -> GlobalMaxPool -> Flatten -> Gemm built with onnx.helper; onnx2torch lacks GlobalMaxPool."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    dense = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalMaxPool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "d"], ["logits"]),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    model = _graph_model(nodes, [x_info], [numpy_helper.from_array(weight, "w"),
                                           numpy_helper.from_array(dense, "d")])
    path = tmp_path / "gmp.onnx"
    onnx.save_model(model, str(path))
    runner = load_model(path)
    assert runner.torch_module() is None
    assert "'GlobalMaxPool'" in runner.gradient_note
    x = batch(4, (1, 8, 8))
    conv = torch.nn.functional.conv2d(x, torch.from_numpy(weight), padding=1)
    expected = conv.amax(dim=(-2, -1)) @ torch.from_numpy(dense)
    assert torch.allclose(runner.logits(x), expected, atol=1e-5)


# ----------------------------------------------------------------------------- devices
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(SpecError, match="Expected device 'auto', 'cpu' or 'cuda'") as info:
        resolve_device("tpu")
    assert info.value.field == "options.device"
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="no CUDA GPU is available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_io_binding_keeps_logits_on_the_gpu(tmp_path):
    module = CircularCNN(in_ch=3, n_classes=5).eval()
    path = export_onnx(module, RGB_SHAPE, tmp_path / "m.onnx")
    runner = load_model(path, device="cuda")
    assert runner.providers[0] == "CUDAExecutionProvider"
    x = batch(9, RGB_SHAPE).cuda()
    got = runner.logits(x, batch_size=4)
    assert got.device.type == "cuda"
    with torch.no_grad():
        assert torch.allclose(got.cpu(), module(x.cpu()), atol=1e-4)


def test_twin_that_disagrees_with_onnxruntime_is_not_trusted(tmp_path):
    from audit_service.engine.runtime.onnx_convert import _mismatch

    runner = load_model(export_onnx(PlainCNN(seed=0), IMAGE_SHAPE, tmp_path / "m.onnx"))
    same, other = PlainCNN(seed=0).eval(), PlainCNN(seed=1).eval()
    assert _mismatch(same, runner.logits, IMAGE_SHAPE, runner.device, None) is None
    problem = _mismatch(other, runner.logits, IMAGE_SHAPE, runner.device, None)
    assert problem.startswith("the onnx2torch conversion does not reproduce onnxruntime's logits")


def test_io_binding_path_matches_the_numpy_path(tmp_path):
    """The IO-binding code used on CUDA, exercised on CPU memory (same binding calls, device 'cpu')."""
    runner = load_model(export_onnx(CircularCNN(in_ch=3, n_classes=5), RGB_SHAPE, tmp_path / "m.onnx"))
    x = batch(6, RGB_SHAPE)
    bound = runner._run_bound(x)
    assert bound.dtype == torch.float32 and bound.shape == (6, 5)
    assert torch.equal(bound, runner._run_cpu(x))


def test_gradient_module_errors_are_runtime_errors(tmp_path):
    path = tmp_path / "fails.pt"
    torch.jit.save(torch.jit.script(FailsOnLargeInputs().eval()), str(path))
    module = load_model(path, input_shape=IMAGE_SHAPE).torch_module()
    assert module(batch(2)).shape == (2, 4)
    with pytest.raises(ModelRuntimeError, match="input out of the calibrated range"):
        module(batch(2) * 100)
