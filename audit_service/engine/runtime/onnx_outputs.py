"""Classic ML exports: a label output beside a probability output, the probabilities picked for the audit.

skl2onnx and onnxmltools (LightGBM, XGBoost) always write two outputs: the predicted label (an integer or string
tensor (N,)) and the class probabilities, either a tensor (N, C) or, by default, a ``ZipMap`` sequence of
{class: probability} maps. Their users cannot "re-export returning only the logits", and skl2onnx's own output
selection leaves a graph the ONNX checker rejects. ``select_probability_output`` writes a copy whose one output is
the probability tensor (the ``ZipMap``'s input when there is one) and says so; the audit then measures the
probabilities as log p (``outputs``), and the gradient-free fallback states itself (no torch twin for ``ai.onnx.ml``).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

_LABEL_TYPES = (TensorProto.INT64, TensorProto.INT32, TensorProto.STRING)
_PROBABILITY_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)


def select_probability_output(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """(the model with only its probability output, a note for the report) for a model with exactly a label and a
    probability output; (the model unchanged, None) for any other."""
    graph = model.graph
    if len(graph.output) != 2:
        return model, None
    producers = {out: node for node in graph.node for out in node.output}
    labels = [o for o in graph.output if _is_label(o)]
    zipmaps = [o for o in graph.output if _zipmap_of(o, producers) is not None]
    tensors = [o for o in graph.output if _is_probability_tensor(o)]
    if len(labels) != 1 or len(zipmaps) + len(tensors) != 1:
        return model, None
    label = labels[0].name
    chosen = onnx.ModelProto()
    chosen.CopyFrom(model)
    graph = chosen.graph
    batch = _batch_dim(graph)
    if zipmaps:
        zipmap = _zipmap_of(zipmaps[0], {out: node for node in graph.node for out in node.output})
        assert zipmap is not None
        classes = _zipmap_classes(zipmap)
        source = zipmap.input[0]
        kept = helper.make_tensor_value_info(source, TensorProto.FLOAT, [batch, classes])
        how = f"probabilities '{_short(source)}' (before ZipMap)"
    else:
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(tensors[0])
        how = f"probabilities '{_short(kept.name)}'"
    del graph.output[:]
    graph.output.append(kept)
    _prune(graph)
    return chosen, f"output: {how} audited, label '{_short(label)}' left out"


def _is_label(value: onnx.ValueInfoProto) -> bool:
    if not value.type.HasField("tensor_type") or value.type.tensor_type.elem_type not in _LABEL_TYPES:
        return False
    shape = value.type.tensor_type.shape
    return (
        not value.type.tensor_type.HasField("shape")
        or len(shape.dim) == 1
        or (len(shape.dim) == 2 and shape.dim[1].dim_value == 1)
    )


def _is_probability_tensor(value: onnx.ValueInfoProto) -> bool:
    tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
    return (
        tensor_type is not None
        and tensor_type.elem_type in _PROBABILITY_TYPES
        and tensor_type.HasField("shape")
        and len(tensor_type.shape.dim) == 2
    )


def _zipmap_of(value: onnx.ValueInfoProto, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    node = producers.get(value.name)
    if (
        node is None
        or node.op_type != "ZipMap"
        or node.domain != "ai.onnx.ml"
        or not value.type.HasField("sequence_type")
    ):
        return None
    return node


def _zipmap_classes(node: onnx.NodeProto) -> int | str:
    for attr in node.attribute:
        if attr.name == "classlabels_int64s" and attr.ints:
            return len(attr.ints)
        if attr.name == "classlabels_strings" and attr.strings:
            return len(attr.strings)
    return "classes"


def _batch_dim(graph: onnx.GraphProto) -> int | str:
    """The input's batch dimension as declared (a size or a name), for the new output's shape."""
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if dims:
            return dims[0].dim_value if dims[0].HasField("dim_value") else (dims[0].dim_param or "N")
    return "N"


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes nothing needs any more (the ZipMap, the label's Cast), keeping the order; a graph with
    subgraphs (which read outer names implicitly) is left whole."""
    if any(attr.HasField("g") or attr.graphs for node in graph.node for attr in node.attribute):
        return
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)


def _short(name: str, limit: int = 16) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."
