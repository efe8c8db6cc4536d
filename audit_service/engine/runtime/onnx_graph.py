"""What an ONNX graph must look like before a session is built: self-contained, one input, (N, C) out.

These checks read only the protobuf; nothing is allocated from the graph's numbers until the
input size has been capped. External data is resolved before these checks, by ``external_data``
(plain file names in the model's own folder, read into the graph); a reference left in the graph
here is refused, because onnxruntime would read whatever file it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterator, Literal

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import ModelError
from .validation import check_input_shape, short_error

#: ONNX element types accepted for the input, with the numpy dtype fed to onnxruntime.
INPUT_DTYPES: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
}
_FLOAT_OUTPUTS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
#: per side of the graph: what its tensor must be, the element types accepted, and the refusal of another type
_SIDES: dict[str, tuple[str, Collection[int], str]] = {
    "input": ("a tensor", INPUT_DTYPES, "Expected a float32 (or float16/float64) input, but '{name}' is {got}"),
    "output": (
        "a logits tensor (N, C)",
        _FLOAT_OUTPUTS,
        "Expected floating-point logits, but the output '{name}' is {got}",
    ),
}


@dataclass(frozen=True)
class GraphSignature:
    """The single input and output a classifier graph exposes."""

    input_name: str
    input_dtype: type
    input_shape: tuple[int, ...]  # per sample, batch dim excluded
    fixed_batch: int | None  # the batch size when the graph hard-codes it (e.g. 1), else None
    output_name: str
    declared_classes: int | None  # C when the output's shape declares it


def check_graph(model: onnx.ModelProto) -> GraphSignature:
    """Refuse external data, run the ONNX checker, and read the classifier signature."""
    refuse_external_data(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(
            f"Expected a valid ONNX model, but the ONNX checker rejects it: {short_error(exc)}", field="model"
        ) from None
    return read_signature(model)


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    for tensor in graph.initializer:
        yield f"{where}initializer '{tensor.name}'", tensor
    for sparse in graph.sparse_initializer:
        yield f"{where}sparse initializer '{sparse.values.name}'", sparse.values
        yield f"{where}sparse initializer indices '{sparse.indices.name}'", sparse.indices
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: onnx.NodeProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    label = f"{where}attribute '{{attr}}' of node '{node.name or node.op_type}'"
    for attr in node.attribute:
        name = label.format(attr=attr.name)
        if attr.HasField("t"):
            yield f"{name} ('{attr.t.name}')", attr.t
        for tensor in attr.tensors:
            yield f"{name} ('{tensor.name}')", tensor
        if attr.HasField("sparse_tensor"):
            yield name, attr.sparse_tensor.values
            yield f"{name} (indices)", attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield name, sparse.values
            yield f"{name} (indices)", sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g, f"subgraph of node '{node.name or node.op_type}': ")
        for sub in attr.graphs:
            yield from _graph_tensors(sub, f"subgraph of node '{node.name or node.op_type}': ")


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor of the model with a label naming it: initializers, sparse initializers, node attributes,
    subgraphs and functions (the places a tensor, or a reference to external data, can hide)."""
    yield from _graph_tensors(model.graph, "")
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node, f"function '{function.name}': ")


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data) > 0


def refuse_external_data(model: onnx.ModelProto) -> None:
    """``ModelError`` naming the first tensor still stored outside the file (``external_data`` resolves
    references before this; one left here is never followed)."""
    for label, tensor in model_tensors(model):
        if is_external(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ModelError(
                f"Expected a self-contained ONNX file, but {label} stores its data externally (in "
                f"'{location}'); external data references are refused because they make the runtime read "
                f"other files. Re-save with onnx.save_model(model, path, save_as_external_data=False)",
                field="model",
            )


def read_signature(model: onnx.ModelProto) -> GraphSignature:
    """The one real input (initializers listed as inputs excluded) and the one (N, C) output."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(f"'{v.name}'" for v in inputs) or "none"
        raise ModelError(
            f"Expected a model with exactly one input tensor (a batch of samples), but got {len(inputs)}: {names}",
            field="model",
        )
    if len(graph.output) != 1:
        names = ", ".join(f"'{v.name}'" for v in graph.output)
        raise ModelError(
            f"Expected a model with exactly one output (the logits), but got {len(graph.output)}: "
            f"{names}; re-export returning only the logits",
            field="model",
        )
    (value,) = inputs
    input_dtype, input_shape, fixed_batch = _read_input(value)
    output = graph.output[0]
    return GraphSignature(value.name, input_dtype, input_shape, fixed_batch, output.name, _read_output(output))


def _float_tensor(value: onnx.ValueInfoProto, side: Literal["input", "output"]) -> onnx.TypeProto.Tensor:
    """The type of the graph's ``side`` tensor, after checking it is a tensor of an element type that side accepts."""
    what, accepted, wrong_type = _SIDES[side]
    if not value.type.HasField("tensor_type"):
        raise ModelError(
            f"Expected the {side} '{value.name}' to be {what}, but it is a {value.type.WhichOneof('value')}",
            field="model",
        )
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in accepted:
        got = TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelError(wrong_type.format(name=value.name, got=got), field="model")
    return tensor_type


def _read_input(value: onnx.ValueInfoProto) -> tuple[type, tuple[int, ...], int | None]:
    tensor_type = _float_tensor(value, "input")
    if not tensor_type.HasField("shape") or len(tensor_type.shape.dim) < 2:
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else "unknown"
        raise ModelError(
            f"Expected the input '{value.name}' to declare a shape (batch, ...) of rank >= 2, but its rank is {rank}",
            field="model",
        )
    batch, *rest = tensor_type.shape.dim
    fixed_batch = batch.dim_value if batch.HasField("dim_value") and batch.dim_value > 0 else None
    dims: list[object] = []
    for dim in rest:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    shape = check_input_shape(dims, f"the ONNX input '{value.name}'")
    return INPUT_DTYPES[tensor_type.elem_type], shape, fixed_batch


def _read_output(value: onnx.ValueInfoProto) -> int | None:
    tensor_type = _float_tensor(value, "output")
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if len(dims) != 2:
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        raise ModelError(
            f"Expected logits of shape (N, C), but the output '{value.name}' is declared as {shape} (rank {len(dims)})",
            field="model",
        )
    return int(dims[1].dim_value) if dims[1].HasField("dim_value") and dims[1].dim_value > 0 else None


# ----------------------------------------------------------------------------- normalization
def fold_identities(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy without ``Identity`` nodes (their consumers read the Identity's input directly), and how many.

    The legacy exporter shares one initializer between several uses through ``Identity`` nodes, and
    onnx2torch then sees a weight that is not an initializer (it refuses ``Conv``). An Identity whose
    output is a graph output is kept (the graph's output name must stay).
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if (
            node.op_type == "Identity"
            and node.domain in ("", "ai.onnx")
            and len(node.input) == 1
            and node.output[0] not in outputs
        ):
            source = node.input[0]
            rename[node.output[0]] = rename.get(source, source)
        else:
            keep.append(node)
    if not rename:
        return folded, 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return folded, len(rename)


def normalize_for_conversion(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The graph a torch converter can read: Identity on initializers folded, constants folded.

    Constant folding (``Shape -> Gather -> Concat`` chains on static axes, ``Constant`` /
    ``ConstantOfShape`` / ``Cast`` of constants) uses onnxslim when it is installed; a step that
    fails is skipped and named in the returned notes. Only the gradient twin uses the result: the
    logits stay onnxruntime's, and the twin is checked against them.
    """
    notes: list[str] = []
    model, n_identities = fold_identities(model)
    if n_identities:
        notes.append(f"folded {n_identities} Identity node{'s' if n_identities != 1 else ''}")
    try:
        import onnxslim
    except ImportError:
        notes.append("constant folding skipped (onnxslim is not installed)")
        return model, notes
    import contextlib
    import io
    import warnings

    before = len(model.graph.node)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            slimmed = onnxslim.slim(model)
    except Exception as exc:  # noqa: BLE001 - an optimizer bug must not cost the gradient path
        notes.append(f"constant folding skipped (onnxslim failed: {short_error(exc, 200)})")
        return model, notes
    if isinstance(slimmed, onnx.ModelProto) and len(slimmed.graph.node) > 0:
        if len(slimmed.graph.node) != before:
            notes.append(f"constant-folded with onnxslim ({before} -> {len(slimmed.graph.node)} nodes)")
        return slimmed, notes
    return model, notes
