"""A fixed-batch ONNX graph run over whole batches: its batch dimension relaxed where the graph allows it.

``torch.onnx.export`` without dynamic shapes (the dynamo exporter's default, the legacy exporter without
``dynamic_axes``) writes a graph whose input and output say batch 1; the runner then feeds it one sample at a
time (ResNet-18 at 3x32x32: ~30x slower than one batched run). Most such graphs do not depend on the batch: only
the declared shapes and a flattening ``Reshape`` to ``[1, features]`` name it. ``relax_batch`` writes a copy with
a symbolic batch, the stored intermediate shapes dropped and those ``Reshape`` targets given ``-1`` for the batch;
the runner uses it only when it reproduces the original graph's outputs (``OnnxRunner``), else it keeps one run
per batch and says why.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

#: the symbolic batch dimension written into the relaxed graph
BATCH_DIM = "batch"
#: relaxed outputs must match the fixed-batch runs within this share of their largest magnitude (as ``.pt2``'s vmap)
RELAX_TOLERANCE = 1e-4


def relax_batch(model: onnx.ModelProto, fixed_batch: int) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with a symbolic batch on its input and output, how many ``Reshape`` targets were
    rewritten). Not checked here: the caller compares its outputs with the original's."""
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    graph = relaxed.graph
    for value in list(graph.input) + list(graph.output):
        if (
            value.type.HasField("tensor_type")
            and value.type.tensor_type.HasField("shape")
            and len(value.type.tensor_type.shape.dim) > 0
        ):
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = BATCH_DIM
    del graph.value_info[:]  # shapes inferred for batch 1 would contradict a larger batch
    return relaxed, _relax_reshapes(graph, fixed_batch)


def _relax_reshapes(graph: onnx.GraphProto, fixed_batch: int) -> int:
    """Give ``-1`` (or ``0``, copy, when a ``-1`` is taken) for the batch in constant ``Reshape`` targets that start
    with ``fixed_batch`` and feed one Reshape; returns how many were rewritten."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    initializers = {t.name: t for t in graph.initializer}
    constants = {
        node.output[0]: node
        for node in graph.node
        if node.op_type == "Constant"
        and node.domain in ("", "ai.onnx")
        and node.attribute
        and node.attribute[0].name == "value"
    }
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        name = node.input[1]
        tensor = initializers.get(name)
        if tensor is None and name in constants:
            tensor = constants[name].attribute[0].t
        if tensor is None or uses.get(name, 0) != 1:
            continue
        target = numpy_helper.to_array(tensor)
        if target.ndim != 1 or target.size < 2 or int(target[0]) != fixed_batch:
            continue
        target = target.astype(np.int64).copy()
        if not (target[1:] == -1).any():
            target[0] = -1  # the batch is whatever the other sizes leave
        elif not any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            target[0] = 0  # a -1 is taken: 0 copies the input's first size (the batch)
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(target, tensor.name))
        rewritten += 1
    return rewritten
