"""``symmetrize(model, group)``: the orbit-averaged model, genuinely invariant by construction.

``f_G(x) = 1/|G| sum_g f(g x)``: for a finite group acting exactly, ``f_G(h x)`` averages the same
logits in another order, so ``f_G`` is invariant for every input, on or off the data (the paper's
genuine invariance, reached by weight-tying over the orbit instead of learning). It costs |G| forward
passes of the original model per sample and keeps its accuracy on inputs whose orbit it already
classifies consistently. The module is exportable to ONNX (one ``Gather`` over a fixed index table,
dynamic batch).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, List

import torch

from .errors import ModelError, SpecError, short_error
from .groups import ExactGroup, Group, GroupLike, resolve_group
from .runtime.chunks import GuardedModule

if TYPE_CHECKING:
    from .runtime import ModelRunner


class SymmetrizedModel(torch.nn.Module):
    """``model`` averaged over the orbit of an exact group acting on samples of ``group.input_shape``.

    Its forward is TorchScript-compatible, so a loaded TorchScript model is wrapped by scripting (tracing cannot
    enter a ScriptModule's parameters), and ``train()`` passes over a ``torch.export`` program's module, which
    has no train mode (it was exported in one)."""

    def __init__(self, model: torch.nn.Module, group: Group) -> None:
        super().__init__()
        if not isinstance(group, ExactGroup) or not group.exact:
            raise SpecError(
                f"Expected an exact finite group to average over, but {group.name} is "
                f"{'sampled' if not group.exact else type(group).__name__}: averaging over a sample "
                f"of a group is not invariant",
                field="group",
            )
        self.model = model
        self.input_shape = tuple(group.input_shape)
        self.sample_shape: List[int] = [int(s) for s in group.input_shape]
        self.size = int(math.prod(group.input_shape))
        self.order = int(group.order)
        self.group_name = group.name
        self.table: torch.Tensor
        self.register_buffer("table", group.table.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        orbit = x.reshape(n, self.size)[:, self.table]  # (N, G, D): one gather
        shape: List[int] = [n * self.order]
        shape.extend(self.sample_shape)
        logits = self.model(orbit.reshape(shape))
        return logits.reshape(n, self.order, -1).mean(dim=1)

    def train(self, mode: bool = True) -> "SymmetrizedModel":
        self.training = mode
        for child in self.children():
            try:
                child.train(mode)
            except NotImplementedError:  # a torch.export program's module: "Calling train() is not supported"
                pass
        return self


def symmetrize(
    model: torch.nn.Module | str | os.PathLike | bytes, group: GroupLike, input_shape: tuple[int, ...] | None = None
) -> SymmetrizedModel:
    """The orbit average of ``model`` over ``group``: a built ``Group``, or a spec (``"C4"``, a dict,
    ``C4Spec()``) with the per-sample ``input_shape`` (there is no batch here to read it from).

    ``model`` is an ``nn.Module``, or a model file (ONNX, TorchScript, ``.pt2``) or its bytes, loaded on the CPU
    and wrapped through its torch module; a file gives its own input shape where it records one."""
    if not isinstance(model, torch.nn.Module):
        from .runtime import load_model

        source = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else Path(os.fspath(model))
        runner = load_model(source, device="cpu", input_shape=input_shape)
        module = runner.torch_module()
        if module is None:
            raise ModelError(f"Expected a model with a torch module to wrap, but {runner.gradient_note}", field="model")
        model, input_shape = module, runner.input_shape
    return SymmetrizedModel(
        model, resolve_group(group, input_shape, how="pass input_shape=(C, H, W), the shape of one sample")
    )


def export_symmetrized_onnx(
    model: torch.nn.Module, group: GroupLike, input_shape: tuple[int, ...], path: str | Path, opset: int = 17
) -> Path:
    """Write ``symmetrize(model, group)`` as an ONNX file with a dynamic batch axis where the model allows one.

    The legacy exporter's tracer takes any ``nn.Module`` and an onnx2torch twin; a TorchScript module is traced
    first (the exporter's own trace cannot reach a ScriptModule's parameters); a ``torch.export`` program's module,
    which the tracer cannot enter, goes through the dynamo exporter, with a dynamic batch, else at a fixed batch (a
    batch-1 program run over batches by ``torch.vmap`` is specialized by ``torch.export``). Each file is checked
    against the module on a seeded batch before it is kept; ``ModelError`` says what each exporter did otherwise."""
    inner = model.inner if isinstance(model, GuardedModule) else model  # a runner's module, unwrapped
    sym = symmetrize(inner, group, input_shape).eval()
    path = Path(path)
    example = torch.zeros((2, *input_shape))

    def export(module: torch.nn.Module, **how: Any) -> None:
        torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["logits"], **how)

    def traced() -> None:
        exported = torch.jit.trace(sym, example) if isinstance(inner, torch.jit.ScriptModule) else sym
        dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
        export(exported, opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes)

    def dynamo(dynamic: tuple | None) -> None:
        """A batch-1 program one call per sample: the exporter miscompiles the runner's ``torch.vmap``."""
        vmapped = [m for m in sym.modules() if getattr(m, "vmapped", False)]  # pt2_runner._BatchSizes
        for module in vmapped:
            setattr(module, "vmapped", False)  # noqa: B010 (a flag of the runner's module, not a Module attribute)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                export(sym, dynamo=True, external_data=False, dynamic_shapes=dynamic)
        finally:
            for module in vmapped:
                setattr(module, "vmapped", True)  # noqa: B010

    attempts = (
        ("the tracer", traced),
        ("torch.export with a dynamic batch", lambda: dynamo(({0: torch.export.Dim.DYNAMIC},))),
        ("torch.export at a fixed batch", lambda: dynamo(None)),
    )
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for what, attempt in attempts:
            try:
                attempt()
                problem = _export_differs(path, sym, tuple(input_shape))
            except Exception as exc:  # noqa: BLE001 - an exporter's refusal: try the next one, say all
                problem = _summary(exc)
            if problem is None:
                return path
            problems.append(f"{what}: {problem}")
    path.unlink(missing_ok=True)
    raise ModelError(f"Expected the symmetrized model to export to ONNX, but {'; '.join(problems)}", field="model")


#: the exported file's logits must match the module's within this share of max(1, |logits|)
EXPORT_TOLERANCE = 1e-4


def _export_differs(path: Path, sym: SymmetrizedModel, input_shape: tuple[int, ...]) -> str | None:
    """Why the ONNX file at ``path`` cannot stand for ``sym`` (a failure on a batch of 3, or other logits), else
    None; a file with a fixed batch is checked at that batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0].shape[0]
    x = torch.rand(
        (declared if isinstance(declared, int) else 3, *input_shape), generator=torch.Generator().manual_seed(0)
    )
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = sym(x).float()
    if got.shape != expected.shape:
        return f"the file returns shape {tuple(got.shape)}, the module {tuple(expected.shape)}"
    error = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    return None if error <= EXPORT_TOLERANCE else f"its logits differ from the module's by {error:.1g}"


def _summary(exc: Exception) -> str:
    """One line of an exporter's or onnxruntime's failure (torch.export's last line only says to read the stack)."""
    text = str(exc)
    if "## Exception summary" in text:
        lines = text.split("## Exception summary", 1)[1].strip().splitlines()
        return (lines[0] if lines else type(exc).__name__)[:200]
    return short_error(exc, 200)


def symmetrized_summary(
    runner: "ModelRunner", group: Group, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int = 256
) -> dict:
    """What ``symmetrize`` would keep and cost, for the report of a model that is not genuine: its cost
    (|G| forward passes per sample) and, with labeled probes, its accuracy beside the original's."""
    out: dict = {
        "available": bool(group.exact),
        "forward_passes_per_sample": int(group.order),
        "accuracy": None,
        "accuracy_original": None,
        "how": "audit-service symmetrize MODEL --group ... -o fixed.onnx, or "
        "audit_service.symmetrize(model, group) in Python",
    }
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
