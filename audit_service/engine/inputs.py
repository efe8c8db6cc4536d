"""What an audit is asked (``AuditRequest``) and what of it holds up against the model (``CheckedInputs``).

``run_audit`` and ``precheck_audit`` take the same request; ``check_inputs`` loads the model and checks the
probes, labels, second probes, group and shifts against its input shape, each error naming the field. The
probe files' reader (``load_probe_file``) is here too: the CLI and the sandbox read probes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .errors import ProbeError
from .groups import Group, build_group
from .guard import guarded
from .runtime import ModelRunner, load_model
from .runtime.loader import Loader
from .runtime.outputs import LogProbabilityRunner, detect_output_kind
from .shifts import ProbeStats, applicable_default_shifts, uniform_noise, validate_shift
from .spec import AuditSpec, default_shifts

__all__ = ["AuditRequest", "CheckedInputs", "check_inputs", "load_probe_file", "check_probes", "check_labels"]


@dataclass(frozen=True, eq=False)
class AuditRequest:
    """One audit as asked: the model (a file, or a runner the caller built), the spec, the probes (N, *S), their
    labels (N,) and the blend shift's second probes, as numpy arrays or None. ``load`` (``load_model``'s
    signature) is where the model is loaded: the service passes the cage's, so that the model runs apart."""

    model: str | Path | ModelRunner
    spec: AuditSpec
    probes: np.ndarray | None = None
    labels: np.ndarray | None = None
    second_probes: np.ndarray | None = None
    load: Loader = field(default=load_model)


@dataclass(frozen=True, eq=False)
class CheckedInputs:
    """The request once checked against the model: the runner (outputs adapted), the probes, labels and second
    probes as host tensors, the group and the shifts; the probes' statistics on the model's device on first use."""

    runner: ModelRunner
    x: torch.Tensor | None
    y: torch.Tensor | None
    second: torch.Tensor | None
    group: Group
    shifts: list
    skipped_shifts: list
    output_kind: str
    seed: int

    def sample(self, count: int) -> torch.Tensor:
        """The first ``count`` probes on the model's device, or seeded uniform noise when there are none: what
        the checks before the sweep (layout, autocast, Jacobian) run on."""
        return _sample(self.x, self.runner, self.seed, count)

    @cached_property
    def stats(self) -> ProbeStats:
        """The probes' statistics on the model's device ([0, 1] defaults without probes); computed when first read,
        so the submission check (``read_outputs=False``, no sweep) never pays for them."""
        if self.x is None:
            return ProbeStats.default(self.runner.input_shape, self.runner.device)
        return ProbeStats.from_probes(self.x.to(self.runner.device))


def check_inputs(request: AuditRequest, device: str, read_outputs: bool = True) -> CheckedInputs:
    """Load the model on ``device`` and check everything the request brings against it.

    ``read_outputs=False`` (the submission check) runs no forward pass beyond the loader's zero batch; else the
    runner's outputs are adapted (log-probabilities where the model gives probabilities)."""
    options, probes = request.spec.options, request.probes
    hint = tuple(probes.shape[1:]) if isinstance(probes, np.ndarray) and probes.ndim >= 2 else None
    # a runner built by the caller (the Python API's in-memory module) is used as it is
    runner = (
        request.model
        if isinstance(request.model, ModelRunner)
        else request.load(request.model, device=device, input_shape=hint)
    )
    # only the probes the audit uses are checked and converted (a client may send far more)
    if isinstance(probes, np.ndarray) and probes.ndim:
        probes = probes[: options.n_probes]
    x = check_probes(probes, runner.input_shape, "probes") if probes is not None else None
    y = check_labels(request.labels, x, runner.num_classes) if request.labels is not None else None
    second = (
        check_probes(request.second_probes, runner.input_shape, "second_probes")
        if request.second_probes is not None
        else None
    )

    if read_outputs:  # on the probes, or seeded noise in [0, 1]
        runner, output_kind = _adapt_outputs(
            runner, _sample(x, runner, options.seed, 64 if x is not None else 16), options.batch_size
        )
    else:
        output_kind = "unread"
    spec = request.spec
    group = build_group(spec.group, runner.input_shape)
    if spec.shifts is None:
        shifts, skipped_shifts = applicable_default_shifts(default_shifts(), runner.input_shape)
    else:
        shifts, skipped_shifts = list(spec.shifts), []
    for i, shift in enumerate(shifts):
        validate_shift(shift, runner.input_shape, has_second_probes=second is not None, field=f"shifts[{i}]")
    return CheckedInputs(runner, x, y, second, group, shifts, skipped_shifts, output_kind, options.seed)


def load_probe_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read probes from .npy (array) or .npz (``x`` or ``probes``, optional ``y`` or ``labels``).

    Never unpickles: object arrays are refused.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ProbeError(f"Expected a readable .npy or .npz file, but {path} does not exist", field="probes") from None
    except ValueError as exc:
        raise ProbeError(
            f"Expected a numeric .npy or .npz array (object arrays are refused), but {path}: {exc}", field="probes"
        ) from None
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for corrupt files
        raise ProbeError(f"Expected a .npy or .npz file, but {path} could not be read: {exc}", field="probes") from None
    if isinstance(data, np.ndarray):
        return data, None
    with data:
        keys = set(data.files)
        x_key = next((k for k in ("x", "probes", "X") if k in keys), None)
        if x_key is None:
            raise ProbeError(
                f"Expected an .npz with an array named 'x' or 'probes', but found {sorted(keys)}", field="probes"
            )
        y_key = next((k for k in ("y", "labels") if k in keys), None)
        return data[x_key], (data[y_key] if y_key else None)


def check_probes(arr: np.ndarray, input_shape: tuple[int, ...], field: str) -> torch.Tensor:
    """Shape (N, *input_shape), a floating dtype, finite values -> float32 tensor on the host."""
    if not isinstance(arr, np.ndarray):
        raise ProbeError(f"Expected a numpy array, but got {type(arr).__name__}", field=field)
    expected = f"(N, {', '.join(map(str, input_shape))})"
    if arr.ndim != len(input_shape) + 1 or tuple(arr.shape[1:]) != tuple(input_shape):
        raise ProbeError(
            f"Expected an array shaped like the model's input batch {expected}, but got {tuple(arr.shape)}", field=field
        )
    if arr.shape[0] == 0:
        raise ProbeError(f"Expected at least one probe, but got an empty array {tuple(arr.shape)}", field=field)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ProbeError(
            f"Expected float32 values (preprocessed as the model expects), but got dtype {arr.dtype}; "
            "convert with arr.astype(np.float32) after normalising",
            field=field,
        )
    finite = np.isfinite(arr)
    if not finite.all():
        raise ProbeError(f"Expected finite values, but {int((~finite).sum())} entries are NaN or Inf", field=field)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def check_labels(arr: np.ndarray, probes: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """One integer class index in [0, num_classes) per probe -> int64 tensor on the host."""
    if probes is None:
        raise ProbeError("Expected probes to go with the labels, but got labels alone", field="labels")
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.shape[0] < probes.shape[0]:
        raise ProbeError(
            f"Expected labels of shape ({probes.shape[0]},), one per probe, but got {tuple(arr.shape)}", field="labels"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ProbeError(f"Expected integer class indices, but got dtype {arr.dtype}", field="labels")
    arr = arr[: probes.shape[0]]
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ProbeError(
            f"Expected class indices in [0, {num_classes - 1}], but got values in [{arr.min()}, {arr.max()}]",
            field="labels",
        )
    return torch.from_numpy(arr.astype(np.int64))


def _adapt_outputs(runner: ModelRunner, sample: torch.Tensor, batch_size: int) -> tuple[ModelRunner, str]:
    """Detect probability / log-probability outputs on ``sample``; see ``runtime.outputs``."""
    kind = guarded(lambda: detect_output_kind(runner.logits(sample, batch_size)), "reading its outputs")
    return (LogProbabilityRunner(runner) if kind == "probabilities" else runner), kind


def _sample(x: torch.Tensor | None, runner: ModelRunner, seed: int, count: int) -> torch.Tensor:
    """``x[:count]`` on the model's device, else seeded uniform noise there in the [0, 1] default range (the
    statistics ``CheckedInputs.stats`` has without probes): the probes used when the client gave none."""
    if x is not None:
        return x[:count].to(runner.device)
    gen = torch.Generator(device=runner.device)
    gen.manual_seed(seed)
    return uniform_noise(
        count, runner.input_shape, ProbeStats.default(runner.input_shape, runner.device), gen, runner.device
    )
