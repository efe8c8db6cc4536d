"""A differentiable torch twin of an ONNX graph (onnx2torch), trusted only after it matches onnxruntime.

Gradient metrics (integrated-gradients saliency, Jacobian spectra) need autograd. onnx2torch covers
most classifier ops, but not all, and a conversion can be silently wrong (onnx2torch 1.5 indexes
Slice with a list of slices, which torch already warns it will reinterpret), so the twin is compared
with onnxruntime on a seeded batch and used only when it agrees. Otherwise
the runner returns None and a note that names the op or the mismatch, and the metrics fall back to
gradient-free estimates.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import onnx
import torch

from .chunks import GuardedModule, run_in_fixed_batches
from .validation import short_error

#: relative tolerance (to the logit scale) for the converted module against onnxruntime
MATCH_TOLERANCE = 1e-4
VERIFY_BATCH = 3
FALLBACK = "saliency uses a gradient-free occlusion estimate and sigma_max a finite-difference estimate"

ReferenceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conversion:
    """The outcome of converting an ONNX graph to a torch twin, for the runner and the report."""

    module: torch.nn.Module | None
    #: why there is no twin (the fallback is stated in it), else None
    note: str | None
    #: the graph rewrites made before conversion (Identity folding, constant folding, opset downgrade)
    steps: tuple[str, ...] = ()
    #: max |twin - onnxruntime| on the check batch, relative to max(1, logit scale); None without a twin
    max_error: float | None = None


def convert_checked(
    model: onnx.ModelProto,
    reference: ReferenceFn,
    input_shape: tuple[int, ...],
    device: torch.device,
    fixed_batch: int | None,
) -> Conversion:
    """A twin when the (normalized) conversion reproduces ``reference`` within ``MATCH_TOLERANCE``."""
    try:
        import onnx2torch
    except ImportError as exc:
        return Conversion(None, f"onnx2torch is not installed ({exc}); {FALLBACK}")
    from .onnx_graph import normalize_for_conversion
    from .onnx_ops import register_converters

    register_converters()
    model, steps = normalize_for_conversion(model)
    missing = unsupported_ops(model)
    if missing:
        downgraded = downgrade_opset(model)
        if downgraded is None:
            return Conversion(None, f"onnx2torch cannot convert {_ops(missing)}; {FALLBACK}", tuple(steps))
        model, target = downgraded
        steps.append(f"opset downgraded to {target}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_module = onnx2torch.convert(model)
    except Exception as exc:
        named = re.search(r"operation_type='([^']+)'", str(exc))
        op = named.group(1) if named else _failing_op(model)
        what = f"{_ops([op])} ({short_error(exc)})" if op else f"this graph ({short_error(exc)})"
        return Conversion(None, f"onnx2torch cannot convert {what}; {FALLBACK}", tuple(steps))
    module = GuardedModule(ConvertedOnnx(graph_module, fixed_batch)).to(device).eval()
    for param in module.parameters():
        param.requires_grad_(False)
    problem, error = _compare(module, reference, input_shape, device, fixed_batch)
    if problem:
        return Conversion(None, f"{problem}; {FALLBACK}", tuple(steps), error)
    return Conversion(module, None, tuple(steps), error)


class ConvertedOnnx(torch.nn.Module):
    """The onnx2torch graph, returning float32 logits; feeds a hard-coded batch size in padded pieces."""

    def __init__(self, graph_module: torch.nn.Module, fixed_batch: int | None) -> None:
        super().__init__()
        self.graph = graph_module
        self.fixed_batch = fixed_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.fixed_batch is None:
                return self.graph(x).float()
            return run_in_fixed_batches(lambda piece: self.graph(piece).float(), x, self.fixed_batch)


#: Opsets tried, newest first, when onnx2torch lacks a converter at the model's own opset (exporters
#: now default to opset 18-20, whose Reduce*/pooling versions onnx2torch 1.5 does not know).
DOWNGRADE_OPSETS = (17, 16, 13)


def downgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int] | None:
    """(the model at an older opset whose ops onnx2torch converts, that opset), or None.

    Only the torch twin uses the downgraded graph; logits stay onnxruntime's, and the twin is still
    checked against them, so a conversion that changed the function is caught.
    """
    from onnx import version_converter

    current = max((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), default=0)
    for target in DOWNGRADE_OPSETS:
        if target >= current:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = version_converter.convert_version(model, target)
        except Exception:  # noqa: BLE001 - the converter refuses many graphs; try the next opset
            continue
        if not unsupported_ops(converted):
            return converted, target
    return None


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the graph that onnx2torch has no converter for (at the model's opset)."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {entry.domain or "": entry.version for entry in model.opset_import}
    missing: list[str] = []
    for node in model.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = opsets.get(domain, opsets.get("ai.onnx", 1))
        try:
            get_converter(operation_type=node.op_type, version=version, domain=domain)
        except NotImplementedError:
            if node.op_type not in missing:
                missing.append(node.op_type)
    return missing


def _failing_op(model: onnx.ModelProto) -> str | None:
    """The op type of the first node whose onnx2torch converter raises (converters can refuse an
    attribute or a non-constant operand even when the op itself is supported), or None."""
    try:
        from onnx2torch.node_converters.registry import get_converter
        from onnx2torch.onnx_graph import OnnxGraph
        from onnx2torch.utils.safe_shape_inference import safe_shape_inference

        inferred = safe_shape_inference(model)
        graph = OnnxGraph(inferred.graph)
        opsets = {entry.domain or "": entry.version for entry in inferred.opset_import}
        for node in graph.nodes.values():
            try:
                converter = get_converter(
                    operation_type=node.operation_type, domain=node.domain, version=opsets.get(node.domain or "", 1)
                )
                converter(node, graph)
            except Exception:
                return node.operation_type
    except Exception:  # onnx2torch internals moved: the caller falls back to the raw message
        return None
    return None


def _ops(names: list[str]) -> str:
    quoted = ", ".join(f"'{name}'" for name in names)
    return f"op {quoted}" if len(names) == 1 else f"ops {quoted}"


def _mismatch(
    module: torch.nn.Module,
    reference: ReferenceFn,
    input_shape: tuple[int, ...],
    device: torch.device,
    fixed_batch: int | None,
) -> str | None:
    """Why the converted module cannot stand in for onnxruntime, or None when it matches."""
    return _compare(module, reference, input_shape, device, fixed_batch)[0]


def _compare(
    module: torch.nn.Module,
    reference: ReferenceFn,
    input_shape: tuple[int, ...],
    device: torch.device,
    fixed_batch: int | None,
) -> tuple[str | None, float | None]:
    """(why the twin cannot stand in for onnxruntime or None, its max relative difference)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((fixed_batch or VERIFY_BATCH, *input_shape), generator=generator).to(device)
    try:
        expected = reference(x)
    except Exception as exc:
        return f"onnxruntime failed on the check batch ({short_error(exc)})", None
    try:
        with torch.no_grad():
            got = module(x)
    except Exception as exc:
        return f"the onnx2torch conversion fails to run ({short_error(exc)})", None
    if tuple(got.shape) != tuple(expected.shape):
        return (
            f"the onnx2torch conversion returns shape {tuple(got.shape)}, onnxruntime {tuple(expected.shape)}"
        ), None
    if not torch.isfinite(expected).all():
        return "the model's logits are not finite, so the onnx2torch conversion cannot be checked", None
    scale = max(1.0, float(expected.abs().max()))
    error = float((got - expected).abs().max()) / scale
    if not error <= MATCH_TOLERANCE:  # also catches NaN
        return (
            f"the onnx2torch conversion does not reproduce onnxruntime's logits (max difference "
            f"{error:.2e} of the logit scale > {MATCH_TOLERANCE:g})"
        ), error
    return None, error
