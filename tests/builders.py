"""Small real models and exporters shared by the whole test suite.

Every architecture seeds its own weights (``seed``), so a test that builds the same model twice gets
the same numbers. Images are small (1x12x12, 1x16x16, 3x16x16) to keep CPU tests fast.

Invariance by construction:
* ``OrbitAveragedCNN`` averages a base net's logits over the C4/D4 orbit: genuinely invariant.
* ``CircularCNN`` uses circular-padding convolutions and global average pooling: invariant to cyclic
  translations (exactly, up to float summation order).
* ``PlainCNN`` / ``MLP`` are not invariant; ``ConstantModel`` is trivially invariant (ignores its input).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from audit_service.cli.demo import rot90  # noqa: F401 - torch.rot90 from flips/transposes (ONNX-exportable)

Shape = Sequence[int]

IMAGE_SHAPE = (1, 12, 12)
IMAGE_SHAPE_16 = (1, 16, 16)
RGB_SHAPE = (3, 16, 16)


# ----------------------------------------------------------------------------- exporters
def _example(input_shape: Shape | Sequence[Shape], batch: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1234)
    shapes = input_shape if input_shape and isinstance(input_shape[0], (tuple, list)) else [input_shape]
    return tuple(torch.rand((batch, *shape), generator=generator) for shape in shapes)


def export_onnx(module: nn.Module, input_shape: Shape | Sequence[Shape], path: str | Path, *,
                opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Export ``module`` to ONNX with a dynamic batch axis (legacy exporter: no onnxscript needed).

    ``input_shape`` is the per-sample shape, or a list of them for a multi-input module.
    """
    path = Path(path)
    module = module.eval()
    example = _example(input_shape)
    input_names = ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "logits"]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=["logits"], dynamic_axes=dynamic_axes)
    return path


#: an op no converter handles (onnx2torch 1.5 lacks it, the runtime adds none): the gradient fallback case
UNCONVERTIBLE_OP = "ThresholdedRelu"


def export_unconvertible(module: nn.Module, input_shape: Shape, path: str | Path) -> Path:
    """Export ``module`` (which must use ReLU) to ONNX, then write each ``Relu`` as the equal
    ``ThresholdedRelu(alpha=0)``: onnxruntime runs it, no torch converter exists for it."""
    import onnx

    path = export_onnx(module, input_shape, path)
    model = onnx.load(str(path))
    count = 0
    for node in model.graph.node:
        if node.op_type == "Relu":
            node.op_type = UNCONVERTIBLE_OP
            node.attribute.append(onnx.helper.make_attribute("alpha", 0.0))
            count += 1
    assert count, "export_unconvertible needs a module with ReLU"
    onnx.save_model(model, str(path))
    return path


def export_pt2(module: nn.Module, input_shape: Shape, path: str | Path, *, dynamic_batch: bool = True,
               batch: int = 2) -> Path:
    """Save ``module`` with torch.export.export + torch.export.save (a dynamic batch axis unless told)."""
    path = Path(path)
    module = module.eval()
    example = (torch.rand((batch, *input_shape)),)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        torch.export.save(program, str(path))
    return path


def export_torchscript(module: nn.Module, input_shape: Shape, path: str | Path, *, script: bool = False,
                       record_shape: bool = True) -> Path:
    """Save ``module`` with torch.jit.save (traced unless ``script``), recording ``input_shape.json``."""
    path = Path(path)
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.jit.script(module) if script else torch.jit.trace(module, _example(input_shape))
        extra = {"input_shape.json": json.dumps(list(input_shape))} if record_shape else {}
        torch.jit.save(compiled, str(path), _extra_files=extra)
    return path


# ----------------------------------------------------------------------------- architectures
def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``: the models below take their variant by name."""
    if value not in allowed:
        raise ValueError(f"Expected {name} {' or '.join(map(repr, allowed))}, but got {value!r}")
    return value


class PlainCNN(nn.Module):
    """Two convolutions and a dense head on the flattened map: no symmetry at all."""

    def __init__(self, in_ch: int = 1, n_classes: int = 10, image_size: int = 12, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        )
        side = (image_size + 1) // 2
        self.head = nn.Linear(8 * side * side, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class OrbitAveragedCNN(nn.Module):
    """Mean of ``base``'s logits over the C4 (4 rotations) or D4 (plus flips) orbit of a square image."""

    def __init__(self, base: nn.Module, group: str = "C4") -> None:
        super().__init__()
        self.base = base
        self.group = _choice("group", group, ("C4", "D4"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [rot90(x, k) for k in range(4)]
        if self.group == "D4":
            views += [torch.flip(v, dims=(-1,)) for v in views]
        return torch.stack([self.base(v) for v in views]).mean(dim=0)


class CircularCNN(nn.Module):
    """Circular-padding convolutions + global average pooling: invariant to cyclic translations."""

    def __init__(self, in_ch: int = 1, n_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        )
        self.head = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


class GeluCNN(nn.Module):
    """A CNN with GELU activations. Exported at ``ONNX_OPSET`` (20) the graph holds the ONNX ``Gelu``
    op, which onnx2torch 1.5 lacks and the runtime adds (``runtime/onnx_ops.py``). (At opset 17 GELU
    is decomposed into Erf arithmetic.)"""

    ONNX_OPSET = 20

    def __init__(self, in_ch: int = 1, n_classes: int = 10, image_size: int = 12, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_ch, 4, 3, stride=2, padding=1)
        self.act = nn.GELU()
        side = (image_size + 1) // 2
        self.head = nn.Linear(4 * side * side, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


class NormalizedCNN(nn.Module):
    """A cosine-style head on L2-normalised features. ``F.normalize`` exports a ``Clip`` whose bound
    is a graph value, which onnx2torch's Clip converter refuses: another gradient fallback case."""

    def __init__(self, in_ch: int = 1, n_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_ch, 8, 3, padding=1)
        self.head = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).mean(dim=(-2, -1))
        return 5.0 * self.head(nn.functional.normalize(features, dim=1))


class ConstantModel(nn.Module):
    """Ignores its input: logits are a fixed bias. ``0 * x.sum()`` keeps the input in the ONNX graph."""

    def __init__(self, n_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bias = nn.Parameter(torch.randn(n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.0 * x.flatten(1).sum(dim=1, keepdim=True) + self.bias


class MLP(nn.Module):
    """Two dense layers on the flattened input (accepts (N, D) or images)."""

    def __init__(self, in_features: int = 144, n_classes: int = 10, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class NaNModel(nn.Module):
    """Returns NaN logits: for every input (``when="always"``) or for inputs with negative mean."""

    def __init__(self, in_features: int = 144, n_classes: int = 10, when: str = "always", seed: int = 0) -> None:
        super().__init__()
        self.when = _choice("when", when, ("always", "negative_mean"))
        torch.manual_seed(seed)
        self.fc = nn.Linear(in_features, n_classes)
        self.register_buffer("nan", torch.tensor(float("nan")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        if self.when == "always":
            return self.fc(flat) + self.nan
        return self.fc(flat) + torch.sqrt(flat.mean(dim=1, keepdim=True))  # sqrt(<0) = NaN


class OddOutputModel(nn.Module):
    """Not a classifier's signature: returns (N, C, 2) (``kind="3d"``) or (N,) (``kind="1d"``)."""

    def __init__(self, in_features: int = 144, n_classes: int = 10, kind: str = "3d", seed: int = 0) -> None:
        super().__init__()
        self.kind = _choice("kind", kind, ("3d", "1d"))
        torch.manual_seed(seed)
        self.fc = nn.Linear(in_features, n_classes * 2)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        if self.kind == "3d":
            return out.reshape(-1, self.n_classes, 2)
        return out.sum(dim=1)


class TwoInputModel(nn.Module):
    """Two input tensors (e.g. image and metadata): not auditable as f(x). Export with two shapes."""

    input_shapes = ((1, 12, 12), (4,))

    def __init__(self, n_classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Linear(144, n_classes)
        self.meta = nn.Linear(4, n_classes)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.image(image.flatten(1)) + self.meta(meta)


class Hostile(nn.Module):
    """A dense classifier on 1x12x12 images that behaves on batches of at most ``calm`` samples (the
    loader's check batch, the submission check's 16) and runs ``attack`` on larger ones (the audit's):
    the shape of every hostile model the sandbox tests upload. Subclasses override ``attack``; scriptable."""

    def __init__(self, calm: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(144, 10)
        self.calm = calm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        if x.shape[0] > self.calm:
            y = self.attack(x, y)
        return y

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y


def rank1_onnx(path: str | Path, features: int) -> Path:
    """A tiny (~200-byte) ONNX classifier on (N, features) inputs: logits [mean(x), -mean(x)]. Its size does not
    depend on ``features``, so it is the report-size bomb of issue 8 (a huge rank-1 input)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Neg", ["m"], ["n"]),
             helper.make_node("Concat", ["m", "n"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "rank1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    Path(path).write_bytes(model.SerializeToString())
    return Path(path)


def report_models(out: str | Path) -> tuple[Path, Path, Path]:
    """Three files whose audits cover every verdict path a report shows: a plain CNN as ONNX (not invariant), its
    C4 orbit average as TorchScript (genuine) and a constant ONNX model (trivial); the report tests and
    ``benchmarks/compare_reports.py`` audit them."""
    out = Path(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = export_onnx(PlainCNN(seed=0), IMAGE_SHAPE, out / "plain.onnx")
        genuine = export_torchscript(OrbitAveragedCNN(PlainCNN(seed=2), "C4"), IMAGE_SHAPE, out / "inv.pt")
        constant = export_onnx(ConstantModel(), IMAGE_SHAPE, out / "constant.onnx")
    return plain, genuine, constant
