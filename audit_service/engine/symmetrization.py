"""``symmetrize(model, group)``: the orbit-averaged model, genuinely invariant by construction.

``f_G(x) = 1/|G| sum_g f(g x)``: for a finite group acting exactly, ``f_G(h x)`` averages the same
logits in another order, so ``f_G`` is invariant for every input, on or off the data (the paper's
genuine invariance, reached by weight-tying over the orbit instead of learning). It costs |G| forward
passes of the original model per sample and keeps its accuracy on inputs whose orbit it already
classifies consistently. The module is exportable to ONNX (one ``Gather`` over a fixed index table,
dynamic batch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import SpecError
from .groups import ExactGroup, Group, GroupLike, resolve_group

if TYPE_CHECKING:
    from .runtime import ModelRunner


class SymmetrizedModel(torch.nn.Module):
    """``model`` averaged over the orbit of an exact group acting on samples of ``group.input_shape``."""

    def __init__(self, model: torch.nn.Module, group: Group) -> None:
        super().__init__()
        if not isinstance(group, ExactGroup) or not group.exact:
            raise SpecError(f"Expected an exact finite group to average over, but {group.name} is "
                            f"{'sampled' if not group.exact else type(group).__name__}: averaging over a sample "
                            f"of a group is not invariant", field="group")
        self.model = model
        self.input_shape = tuple(group.input_shape)
        self.order = group.order
        self.group_name = group.name
        self.register_buffer("table", group.table.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = math.prod(self.input_shape)
        orbit = x.reshape(n, size)[:, self.table]  # (N, G, D): one gather
        logits = self.model(orbit.reshape(n * self.order, *self.input_shape))
        return logits.reshape(n, self.order, -1).mean(dim=1)


def symmetrize(model: torch.nn.Module, group: GroupLike, input_shape: tuple[int, ...] | None = None
               ) -> SymmetrizedModel:
    """The orbit average of ``model`` over ``group``: a built ``Group``, or a spec (``"C4"``, a dict,
    ``C4Spec()``) with the per-sample ``input_shape`` (there is no batch here to read it from)."""
    return SymmetrizedModel(model, resolve_group(group, input_shape, how="pass input_shape=(C, H, W), the shape "
                                                 "of one sample"))


def export_symmetrized_onnx(model: torch.nn.Module, group: GroupLike, input_shape: tuple[int, ...],
                            path: str | Path, opset: int = 17) -> Path:
    """Write ``symmetrize(model, group)`` as an ONNX file with a dynamic batch axis."""
    sym = symmetrize(model, group, input_shape).eval()
    path = Path(path)
    example = torch.zeros((2, *input_shape))
    torch.onnx.export(sym, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    return path


def symmetrized_summary(runner: "ModelRunner", group: Group, x: torch.Tensor | None, y: torch.Tensor | None,
                        batch_size: int = 256) -> dict:
    """What ``symmetrize`` would keep and cost, for the report of a model that is not genuine: its cost
    (|G| forward passes per sample) and, with labeled probes, its accuracy beside the original's."""
    out: dict = {"available": bool(group.exact), "forward_passes_per_sample": int(group.order),
                 "accuracy": None, "accuracy_original": None,
                 "how": "audit-service symmetrize MODEL --group ... -o fixed.onnx, or "
                        "audit_service.symmetrize(model, group) in Python"}
    if not group.exact:
        out["note"] = "the group is sampled or interpolated: an average over it would not be invariant"
        return out
    if x is None or y is None:
        out["note"] = "give labeled probes to see the symmetrized model's accuracy"
        return out
    with torch.inference_mode():
        xs = x.to(runner.device)
        orbit = group.orbit(xs)  # (G, N, *S)
        logits = runner.logits(orbit.reshape(-1, *orbit.shape[2:]), batch_size).reshape(group.order, xs.shape[0], -1)
        labels = y.to(logits.device)
        out["accuracy"] = float((logits.mean(0).argmax(-1) == labels).float().mean())
        out["accuracy_original"] = float((logits[0].argmax(-1) == labels).float().mean())
    return out
