"""onnx2torch converters for what current exporters emit and onnx2torch 1.5 lacks.

``torch.onnx.export`` writes opset 18-20 graphs (the dynamo exporter always, the legacy exporter on
request). onnx2torch 1.5 stops at opset 17 for many ops, so this module adds, once per process:

* version aliases: newer op versions that only widen the accepted element types (``Shape-19/21``,
  ``Squeeze-21``, ``Conv-22``, ...) reuse onnx2torch's converter for the newest version it knows;
* ``Reshape`` with ``allowzero=1`` (the dynamo exporter sets it on every Reshape): a 0 in the
  target shape then means an empty axis, which is exactly ``torch.reshape``;
* ``Reduce*-18`` (axes moved from an attribute to a constant input);
* ``Gelu-20`` (exact or tanh approximation).

Every converted graph is still checked against onnxruntime before it is used (``onnx_convert``),
so an alias that changed the function is caught there, not trusted.
"""

from __future__ import annotations

import threading

import torch
from onnx import defs
from torch import nn

_LOCK = threading.Lock()
_REGISTERED = False

#: op -> newer versions whose changes are element-type extensions only (same function on floats/ints)
TYPE_ONLY_VERSIONS: dict[str, tuple[int, ...]] = {
    "Shape": (19, 21, 23, 24, 25),
    "Squeeze": (21, 23, 24, 25),
    "Unsqueeze": (21, 23, 24, 25),
    "Flatten": (21, 23, 24, 25),
    "Identity": (19, 21, 23, 24, 25),
    "Constant": (19, 21, 23, 24, 25),
    "Transpose": (21, 23, 24, 25),
    "ConstantOfShape": (20, 21, 23, 24, 25),
    "Cast": (19, 21, 23, 24, 25),
    "Equal": (19,),
    "Conv": (22,),
    "HardSwish": (22,),
    "HardSigmoid": (22,),
    "MaxPool": (22,),
    "GlobalAveragePool": (22,),
    "Relu": (14,),
    "Sigmoid": (13,),
    "Dropout": (22,),
}
_REDUCE_OPS = (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)
_RESHAPE_VERSIONS = (5, 13, 14, 19, 21, 23, 24, 25)


class Reshape(nn.Module):
    """ONNX Reshape: ``allowzero=0`` copies the input's size where the shape says 0; ``allowzero=1`` does not."""

    def __init__(self, allowzero: int = 0) -> None:
        super().__init__()
        self.allowzero = int(allowzero)

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [int(d) for d in shape]
        if not self.allowzero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return torch.reshape(x, dims)


class Gelu(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)


class Reduce(nn.Module):
    """ONNX Reduce* with static axes (None: all axes)."""

    _FUNCTIONS = {
        "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
        "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
        "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
        "ReduceProd": lambda x, d, k: _prod(x, d, k),
        "ReduceL1": lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k),
        "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
        "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
        "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
        "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
    }

    def __init__(self, op: str, axes: list[int] | None, keepdims: int, noop: int) -> None:
        super().__init__()
        self.op = op
        self.axes = None if axes is None else [int(a) for a in axes]
        self.keepdims = bool(keepdims)
        self.noop = bool(noop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            if self.noop:
                return x
            axes = list(range(x.dim()))
        else:
            axes = self.axes
        return self._FUNCTIONS[self.op](x, axes, self.keepdims)


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


def register_converters() -> None:
    """Add the converters above to onnx2torch's registry (idempotent, thread-safe)."""
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        from onnx2torch.node_converters import registry
        from onnx2torch.utils.common import (
            OnnxMapping,
            OperationConverterResult,
            get_const_value,
            onnx_mapping_from_node,
        )

        table = registry._CONVERTER_REGISTRY  # noqa: SLF001 - onnx2torch has no public override
        domain = defs.ONNX_DOMAIN

        def key(op: str, version: int):
            return registry.OperationDescription(domain=domain, operation_type=op, version=version)

        for op, versions in TYPE_ONLY_VERSIONS.items():
            known = sorted(d.version for d in table if d.operation_type == op and d.domain == domain)
            for version in versions:
                older = [v for v in known if v < version]
                if older and key(op, version) not in table:
                    table[key(op, version)] = table[key(op, older[-1])]

        def reshape(node, graph):
            return OperationConverterResult(
                torch_module=Reshape(node.attributes.get("allowzero", 0)),
                onnx_mapping=onnx_mapping_from_node(node=node),
            )

        for version in _RESHAPE_VERSIONS:  # replaces onnx2torch's, which refuses allowzero=1
            table[key("Reshape", version)] = reshape

        def gelu(node, graph):
            return OperationConverterResult(
                torch_module=Gelu(node.attributes.get("approximate", "none")),
                onnx_mapping=onnx_mapping_from_node(node=node),
            )

        table.setdefault(key("Gelu", 20), gelu)

        def reduce18(node, graph):
            axes = None
            if len(node.input_values) > 1 and node.input_values[1]:
                # a non-constant axes input raises KeyError here: the caller reports the op as unconvertible
                axes = get_const_value(node.input_values[1], graph).tolist()
            module = Reduce(
                node.operation_type,
                axes,
                node.attributes.get("keepdims", 1),
                node.attributes.get("noop_with_empty_axes", 0),
            )
            return OperationConverterResult(
                torch_module=module,
                onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
            )

        for op in _REDUCE_OPS:
            table.setdefault(key(op, 18), reduce18)
        table.setdefault(key("ReduceMax", 20), reduce18)
        table.setdefault(key("ReduceMin", 20), reduce18)
        _REGISTERED = True
