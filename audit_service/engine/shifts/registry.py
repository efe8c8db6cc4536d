"""Input shifts by name and severity (the CIFAR-10-C convention), scaled to the probes' own statistics.

Strengths are relative to the clean probes' per-channel ``std`` or range ``high - low``
(:class:`~audit_service.engine.shifts.stats.ProbeStats`), so a model fed [0, 1] pixels and one fed normalized
inputs are shifted by the same relative amount. Severity defaults to 3.

============== ======================================== ===== ===== ===== ===== =====
shift          parameter                                  1     2     3     4     5
============== ======================================== ===== ===== ===== ===== =====
gaussian_noise sigma / std                              0.1   0.2   0.35  0.5   0.8
blur           Gaussian sigma (pixels) on (H, W)        0.5   0.75  1.0   1.5   2.0
contrast       factor c in m + (x - m) c                0.75  0.6   0.45  0.3   0.15
brightness     offset / (high - low)                    0.05  0.1   0.15  0.2   0.3
occlusion      square side / min(H, W)                  0.1   0.15  0.2   0.25  0.3
============== ======================================== ===== ===== ===== ===== =====

* ``blur``: kernel size ``2 ceil(2 sigma) + 1`` (3, 5, 5, 7, 9), reflect padding; shrunk on images smaller
  than the kernel.
* ``contrast``: ``m`` is each sample's mean (per channel for (C, H, W)-like inputs).
* ``occlusion``: one square per sample at a uniformly random position, set to the channel's ``low``
  (the darkest probe value, i.e. "black" in the model's own scale).
* ``blend``: the paper's D_{1->2}(beta) = (1 - beta) x + beta x2 with ``beta`` in [0, 1] instead of a
  severity; x2 is uniform noise in [low, high] (``target="noise"``) or the client's second probe set
  (``target="second_probes"``; paired row by row when the counts agree, else a seeded random
  permutation of it, cycled).
* Nothing is clipped: normalized inputs have no fixed valid range, and clipping to the probe range would
  add a saturation shift on top of the named one. Brightness and contrast results stay as computed.
* ``uniform_noise``: pure out-of-distribution inputs, uniform in [low, high] per channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from ..errors import ProbeError, SpecError
from ..spec import DEFAULT_SEVERITY, SHIFT_PARAMETERS, ShiftSpec, register_shift_name, shift_names
from . import functional as Fn
from .stats import ProbeStats

#: (x, the spec, the probes' statistics on x's device and dtype, generator, the second probes or None) -> shifted x
Apply = Callable[[torch.Tensor, ShiftSpec, ProbeStats, torch.Generator, "torch.Tensor | None"], torch.Tensor]

_SEVERITY_PARAMETER = {
    "type": "integer",
    "minimum": 1,
    "maximum": 5,
    "default": DEFAULT_SEVERITY,
    "required": False,
    "meaning": "strength, CIFAR-10-C style (1 mild .. 5 strong)",
}


@dataclass(frozen=True)
class ShiftKind:
    """Everything the service knows about one shift, in one place: its name, what it does, how it acts, its
    severity table (the strength at severities 1..5, ``None`` for a shift that takes ``beta``) and what a
    value of the table means, which inputs it fits, and whether it needs image axes.

    ``apply_shift``, ``validate_shift``, the default sweep's fit check, ``SEVERITIES`` and ``GET /shifts``
    read only this record; ``register_shift`` adds one.
    """

    name: str
    description: str
    apply: Apply
    severities: tuple[float, float, float, float, float] | None
    severity_meaning: str  # format of one table value, e.g. "sigma = {v} px"; "" for a beta shift
    fits: str
    spatial: bool = False  # acts on the (H, W) planes: needs rank >= 2, joins the defaults only on (C, H, W)
    parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: {"severity": dict(_SEVERITY_PARAMETER)})
    example: dict[str, Any] | None = None  # None: {"name": name, "severity": 3}

    @property
    def takes(self) -> Literal["severity", "beta"]:
        return "severity" if self.severities is not None else "beta"

    def parameter(self, shift: ShiftSpec) -> float:
        """The table's value at the spec's severity (default 3)."""
        if self.severities is None:
            raise ValueError(f"Expected a shift with a severity table, but {self.name} takes beta")
        return self.severities[shift.severity_or_default - 1]

    def catalogue_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {k: dict(v) for k, v in self.parameters.items()},
            "severities": None
            if self.severities is None
            else {str(s + 1): self.severity_meaning.format(v=v) for s, v in enumerate(self.severities)},
            "fits": self.fits,
            "example": dict(self.example) if self.example else {"name": self.name, "severity": DEFAULT_SEVERITY},
        }


def _gaussian_noise(x, shift, st, generator, second):
    return Fn.gaussian_noise(x, SHIFTS["gaussian_noise"].parameter(shift) * st.std, generator)


def _blur(x, shift, st, generator, second):
    return Fn.gaussian_blur(x, SHIFTS["blur"].parameter(shift))


def _contrast(x, shift, st, generator, second):
    return Fn.contrast(x, SHIFTS["contrast"].parameter(shift))


def _brightness(x, shift, st, generator, second):
    return Fn.brightness(x, SHIFTS["brightness"].parameter(shift) * st.range)


def _occlusion(x, shift, st, generator, second):
    side = occlusion_side(SHIFTS["occlusion"].parameter(shift), x.shape[-2], x.shape[-1])
    return Fn.occlude(x, side, st.low, generator)


def _blend(x, shift, st, generator, second):
    assert shift.beta is not None
    input_shape = tuple(x.shape[1:])
    if shift.target == "noise":
        x2 = Fn.uniform(x.shape[0], input_shape, st.low, st.high, generator, x.device, x.dtype)
    else:
        assert second is not None
        if tuple(second.shape[1:]) != input_shape or second.shape[0] == 0:
            raise ProbeError(
                f"Expected second probes of shape (M, {', '.join(map(str, input_shape))}) with "
                f"M >= 1, but got {tuple(second.shape)}",
                field="second_probes",
            )
        x2 = Fn.match_rows(second.to(device=x.device, dtype=x.dtype), x.shape[0], generator)
    return Fn.blend(x, x2, shift.beta)


_IMAGES = "inputs of rank >= 2 (the last two axes are H, W)"
# a table reads best a row per entry
# fmt: off
_BUILT_IN = (
    ShiftKind("gaussian_noise", "Additive Gaussian noise, sigma relative to the probes' per-channel std",
              _gaussian_noise, (0.1, 0.2, 0.35, 0.5, 0.8), "sigma = {v} x std", "any input"),
    ShiftKind("blur", "Gaussian blur of the (H, W) planes (torchvision gaussian_blur, reflect padding)",
              _blur, (0.5, 0.75, 1.0, 1.5, 2.0), "sigma = {v} px", _IMAGES, spatial=True),
    ShiftKind("contrast", "Contrast reduction toward each sample's (per-channel) mean",
              _contrast, (0.75, 0.6, 0.45, 0.3, 0.15), "x -> m + (x - m) x {v}", "any input"),
    ShiftKind("brightness", "Brightness offset relative to the probes' per-channel range",
              _brightness, (0.05, 0.1, 0.15, 0.2, 0.3), "x -> x + {v} x (high - low)", "any input"),
    ShiftKind("occlusion", "One square per sample at a random position, set to the channel's minimum",
              _occlusion, (0.1, 0.15, 0.2, 0.25, 0.3), "side = {v} x min(H, W)", _IMAGES, spatial=True),
    ShiftKind(
        "blend", "The paper's D_{1->2}(beta) = (1 - beta) x + beta x2: drift toward uniform noise "
                 "or toward the client's second probe set",
        _blend, None, "", "any input; target 'second_probes' needs a second probe set of the same shape",
        parameters={
            "beta": {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": None, "required": True,
                     "meaning": "mixing weight; 0 = the probes, 1 = the target"},
            "target": {"type": "one of 'noise', 'second_probes'", "default": "noise", "required": False,
                       "meaning": "x2: uniform noise in the probes' range, or rows of the second probe set"},
        },
        example={"name": "blend", "beta": 0.5, "target": "noise"}),
)
# fmt: on
#: name -> record, for every shift kind (the built-in ones, then any added with ``register_shift``)
SHIFTS: dict[str, ShiftKind] = {kind.name: kind for kind in _BUILT_IN}


def register_shift(kind: ShiftKind) -> ShiftKind:
    """Add (or replace) a shift kind: specs accept its name, ``apply_shift`` runs it and ``GET /shifts``
    lists it. The one call a new shift needs."""
    register_shift_name(kind.name, kind.takes)
    SHIFTS[kind.name] = kind
    SEVERITIES.pop(kind.name, None)
    if kind.severities is not None:
        SEVERITIES[kind.name] = kind.severities
    return kind


def unregister_shift(name: str) -> None:
    """Undo ``register_shift`` (e.g. a test's toy shift)."""
    SHIFTS.pop(name, None)
    SEVERITIES.pop(name, None)
    SHIFT_PARAMETERS.pop(name, None)


def _check_registry() -> None:
    """Every record's name is one the spec accepts (spec.py lists the built-in ones so that specs parse without
    torch; a record it does not list is added here), and every name the spec accepts has a record."""
    for kind in _BUILT_IN:
        if SHIFT_PARAMETERS.get(kind.name) != kind.takes:
            register_shift_name(kind.name, kind.takes)
    for name, takes in SHIFT_PARAMETERS.items():
        if name not in SHIFTS or SHIFTS[name].takes != takes:
            raise TypeError(
                f"Expected a ShiftKind taking {takes} for the spec's shift {name!r}; add it with register_shift"
            )


_check_registry()


#: name -> severity table (strengths at severities 1..5) of every shift that has one; kept by ``register_shift``
SEVERITIES: dict[str, tuple[float, ...]] = {n: k.severities for n, k in SHIFTS.items() if k.severities is not None}


def severity_parameter(shift: ShiftSpec) -> float:
    """The table's value for ``shift.name`` at its severity (default 3)."""
    return SHIFTS[shift.name].parameter(shift)


def occlusion_side(fraction: float, h: int, w: int) -> int:
    return max(1, int(round(fraction * min(h, w))))


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _kind(shift: ShiftSpec, field: str) -> ShiftKind:
    kind = SHIFTS.get(shift.name)
    if kind is None:
        raise SpecError(
            f"Expected a shift name in {', '.join(shift_names())}, but got {shift.name!r}", field=f"{field}.name"
        )
    return kind


def validate_shift(
    shift: ShiftSpec, input_shape: tuple[int, ...], has_second_probes: bool, field: str = "shifts"
) -> None:
    """Raise ``SpecError`` when ``shift`` cannot act on inputs of ``input_shape``.

    ``field`` is the spec path to name in the error (the sweep passes e.g. ``shifts[2]``).
    """
    if _kind(shift, field).spatial and len(input_shape) < 2:
        raise SpecError(
            f"Expected an input with spatial (H, W) axes (rank >= 2) for the {shift.name} shift, but "
            f"the model's input is {_shape_str(input_shape)}",
            field=f"{field}.name",
        )
    if shift.takes_beta and shift.target == "second_probes" and not has_second_probes:
        raise SpecError(
            f"Expected a second probe set for {shift.name} toward second_probes, but none was "
            "supplied; upload second probes or use target='noise'",
            field=f"{field}.target",
        )


#: rank of the per-sample shape from which inputs are taken as images (C, H, W): spatial shifts join the defaults
IMAGE_RANK = 3


def applicable_default_shifts(
    defaults: list[ShiftSpec], input_shape: tuple[int, ...]
) -> tuple[list[ShiftSpec], list[dict]]:
    """(the default shifts that act on ``input_shape``, [{shift, reason}] for those skipped).

    Spatial shifts (blur, occlusion) need image axes: in the defaults they run only on (C, H, W)-like
    inputs. A feature vector (F,) or a sequence (S, F) keeps the others, so a default spec never fails
    on the input's shape. (Asked for explicitly, a spatial shift still runs on any rank >= 2 input.)
    """
    kept, skipped = [], []
    for shift in defaults:
        if _kind(shift, "shifts").spatial and len(input_shape) < IMAGE_RANK:
            kind = "a feature vector (F,)" if len(input_shape) == 1 else f"{_shape_str(input_shape)} without image axes"
            skipped.append(
                {
                    "shift": shift.label,
                    "reason": f"{shift.name} needs image axes (C, H, W); the model's input is {kind}",
                }
            )
        else:
            kept.append(shift)
    return kept, skipped


def uniform_noise(
    n: int, input_shape: tuple[int, ...], stats: ProbeStats, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """(n, *input_shape) float32 uniform in [low, high] per channel: the pure out-of-distribution condition."""
    return Fn.uniform(n, tuple(input_shape), stats.low, stats.high, generator, device)


def apply_shift(
    x: torch.Tensor, shift: ShiftSpec, stats: ProbeStats, generator: torch.Generator, second: torch.Tensor | None = None
) -> torch.Tensor:
    """``shift`` applied to probes x (N, *S) -> (N, *S), on x's device, deterministic given ``generator``."""
    if not x.is_floating_point():
        x = x.float()
    validate_shift(shift, tuple(x.shape[1:]), second is not None)
    return SHIFTS[shift.name].apply(x, shift, stats.to(x.device, x.dtype), generator, second)


def shift_catalogue() -> list[dict[str, Any]]:
    """What ``GET /shifts`` lists: name, description, parameters, what each severity means, fitting inputs."""
    return [kind.catalogue_entry() for kind in SHIFTS.values()]
