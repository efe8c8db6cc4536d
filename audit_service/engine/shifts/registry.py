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

from typing import Any

import torch

from ..errors import ProbeError, SpecError
from ..spec import SHIFT_NAMES, ShiftSpec
from . import functional as Fn
from .stats import ProbeStats

SEVERITIES: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.1, 0.2, 0.35, 0.5, 0.8),
    "blur": (0.5, 0.75, 1.0, 1.5, 2.0),
    "contrast": (0.75, 0.6, 0.45, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "occlusion": (0.1, 0.15, 0.2, 0.25, 0.3),
}

_SPATIAL = ("blur", "occlusion")


def severity_parameter(shift: ShiftSpec) -> float:
    """The table's value for ``shift.name`` at its severity (default 3)."""
    return SEVERITIES[shift.name][shift.severity_or_default - 1]


def occlusion_side(fraction: float, h: int, w: int) -> int:
    return max(1, int(round(fraction * min(h, w))))


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def validate_shift(shift: ShiftSpec, input_shape: tuple[int, ...], has_second_probes: bool,
                   field: str = "shifts") -> None:
    """Raise ``SpecError`` when ``shift`` cannot act on inputs of ``input_shape``.

    ``field`` is the spec path to name in the error (the sweep passes e.g. ``shifts[2]``).
    """
    if shift.name in _SPATIAL and len(input_shape) < 2:
        raise SpecError(f"Expected an input with spatial (H, W) axes (rank >= 2) for the {shift.name} shift, but "
                        f"the model's input is {_shape_str(input_shape)}", field=f"{field}.name")
    if shift.name == "blend" and shift.target == "second_probes" and not has_second_probes:
        raise SpecError("Expected a second probe set for blend toward second_probes, but none was supplied; "
                        "upload second probes or use target='noise'", field=f"{field}.target")


#: rank of the per-sample shape from which inputs are taken as images (C, H, W): spatial shifts join the defaults
IMAGE_RANK = 3


def applicable_default_shifts(defaults: list[ShiftSpec], input_shape: tuple[int, ...]
                              ) -> tuple[list[ShiftSpec], list[dict]]:
    """(the default shifts that act on ``input_shape``, [{shift, reason}] for those skipped).

    Spatial shifts (blur, occlusion) need image axes: in the defaults they run only on (C, H, W)-like
    inputs. A feature vector (F,) or a sequence (S, F) keeps the others, so a default spec never fails
    on the input's shape. (Asked for explicitly, a spatial shift still runs on any rank >= 2 input.)
    """
    kept, skipped = [], []
    for shift in defaults:
        if shift.name in _SPATIAL and len(input_shape) < IMAGE_RANK:
            kind = "a feature vector (F,)" if len(input_shape) == 1 else f"{_shape_str(input_shape)} without image axes"
            skipped.append({"shift": shift.label, "reason": f"{shift.name} needs image axes (C, H, W); the model's "
                                                            f"input is {kind}"})
        else:
            kept.append(shift)
    return kept, skipped


def uniform_noise(n: int, input_shape: tuple[int, ...], stats: ProbeStats, generator: torch.Generator,
                  device: torch.device | str) -> torch.Tensor:
    """(n, *input_shape) float32 uniform in [low, high] per channel: the pure out-of-distribution condition."""
    return Fn.uniform(n, tuple(input_shape), stats.low, stats.high, generator, device)


def apply_shift(x: torch.Tensor, shift: ShiftSpec, stats: ProbeStats, generator: torch.Generator,
                second: torch.Tensor | None = None) -> torch.Tensor:
    """``shift`` applied to probes x (N, *S) -> (N, *S), on x's device, deterministic given ``generator``."""
    if not x.is_floating_point():
        x = x.float()
    input_shape = tuple(x.shape[1:])
    validate_shift(shift, input_shape, second is not None)
    st = stats.to(x.device, x.dtype)
    name = shift.name
    if name == "gaussian_noise":
        return Fn.gaussian_noise(x, severity_parameter(shift) * st.std, generator)
    if name == "blur":
        return Fn.gaussian_blur(x, severity_parameter(shift))
    if name == "contrast":
        return Fn.contrast(x, severity_parameter(shift))
    if name == "brightness":
        return Fn.brightness(x, severity_parameter(shift) * st.range)
    if name == "occlusion":
        side = occlusion_side(severity_parameter(shift), x.shape[-2], x.shape[-1])
        return Fn.occlude(x, side, st.low, generator)
    if name == "blend":
        assert shift.beta is not None
        if shift.target == "noise":
            x2 = Fn.uniform(x.shape[0], input_shape, st.low, st.high, generator, x.device, x.dtype)
        else:
            assert second is not None
            if tuple(second.shape[1:]) != input_shape or second.shape[0] == 0:
                raise ProbeError(f"Expected second probes of shape (M, {', '.join(map(str, input_shape))}) with "
                                 f"M >= 1, but got {tuple(second.shape)}", field="second_probes")
            x2 = Fn.match_rows(second.to(device=x.device, dtype=x.dtype), x.shape[0], generator)
        return Fn.blend(x, x2, shift.beta)
    raise SpecError(f"Expected a shift name in {', '.join(SHIFT_NAMES)}, but got {name!r}", field="shifts.name")


# ----------------------------------------------------------------------------- catalogue
_DESCRIPTIONS = {
    "gaussian_noise": ("Additive Gaussian noise, sigma relative to the probes' per-channel std",
                       "sigma = {v} x std", "any input"),
    "blur": ("Gaussian blur of the (H, W) planes (torchvision gaussian_blur, reflect padding)",
             "sigma = {v} px", "inputs of rank >= 2 (the last two axes are H, W)"),
    "contrast": ("Contrast reduction toward each sample's (per-channel) mean",
                 "x -> m + (x - m) x {v}", "any input"),
    "brightness": ("Brightness offset relative to the probes' per-channel range",
                   "x -> x + {v} x (high - low)", "any input"),
    "occlusion": ("One square per sample at a random position, set to the channel's minimum",
                  "side = {v} x min(H, W)", "inputs of rank >= 2 (the last two axes are H, W)"),
}


def shift_catalogue() -> list[dict[str, Any]]:
    """What ``GET /shifts`` lists: name, description, parameters, what each severity means, fitting inputs."""
    severity_param = {"type": "integer", "minimum": 1, "maximum": 5, "default": 3, "required": False,
                      "meaning": "strength, CIFAR-10-C style (1 mild .. 5 strong)"}
    out: list[dict[str, Any]] = []
    for name in SHIFT_NAMES:
        if name == "blend":
            out.append({
                "name": "blend",
                "description": "The paper's D_{1->2}(beta) = (1 - beta) x + beta x2: drift toward uniform noise "
                               "or toward the client's second probe set",
                "parameters": {
                    "beta": {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": None, "required": True,
                             "meaning": "mixing weight; 0 = the probes, 1 = the target"},
                    "target": {"type": "one of 'noise', 'second_probes'", "default": "noise", "required": False,
                               "meaning": "x2: uniform noise in the probes' range, or rows of the second probe set"},
                },
                "severities": None,
                "fits": "any input; target 'second_probes' needs a second probe set of the same shape",
                "example": {"name": "blend", "beta": 0.5, "target": "noise"},
            })
            continue
        desc, fmt, fits = _DESCRIPTIONS[name]
        out.append({
            "name": name,
            "description": desc,
            "parameters": {"severity": dict(severity_param)},
            "severities": {str(s + 1): fmt.format(v=v) for s, v in enumerate(SEVERITIES[name])},
            "fits": fits,
            "example": {"name": name, "severity": 3},
        })
    return out
