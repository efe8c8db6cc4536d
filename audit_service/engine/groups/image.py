"""Symmetries of the square acting on the last two axes (H, W): C4, D4 and single flips.

Rotations are ``torch.rot90(x, k, dims=(-2, -1))`` (counter-clockwise as displayed, row 0 at the top);
the horizontal flip mirrors the last axis (W), the vertical flip the second to last (H).
"""

from __future__ import annotations

import torch

from ..spec import C4Spec, D4Spec, FlipSpec
from .base import ExactGroup, check_orbit_size, require_image, require_square_image
from .element import Element, element_from_rearrangement

ROTATION_NAMES = ("e", "r90", "r180", "r270")
FLIP_NAMES = {"horizontal": "flip_h", "vertical": "flip_v"}
_FLIP_DIMS = {"horizontal": (-1,), "vertical": (-2,)}


def rotation_element(shape: tuple[int, ...], k: int) -> Element:
    k = k % 4
    return element_from_rearrangement(shape, lambda t: torch.rot90(t, k, dims=(-2, -1)), ROTATION_NAMES[k])


def flip_element(shape: tuple[int, ...], axis: str = "horizontal") -> Element:
    dims = _FLIP_DIMS[axis]
    return element_from_rearrangement(shape, lambda t: torch.flip(t, dims), FLIP_NAMES[axis])


def build_c4(spec: C4Spec, input_shape: tuple[int, ...], field: str = "group") -> ExactGroup:
    require_square_image(input_shape, "C4 rotations", field)
    check_orbit_size(4, input_shape, field)
    elements = [rotation_element(input_shape, k) for k in range(4)]
    elements[0] = Element.identity(elements[0].size)
    return ExactGroup("C4", elements, input_shape, spec=spec, generators=[1])


def build_d4(spec: D4Spec, input_shape: tuple[int, ...], field: str = "group") -> ExactGroup:
    require_square_image(input_shape, "D4 rotations and flips", field)
    check_orbit_size(8, input_shape, field)
    rotations = [rotation_element(input_shape, k) for k in range(4)]
    rotations[0] = Element.identity(rotations[0].size)
    flip = flip_element(input_shape, "horizontal")
    elements = rotations + [r @ flip for r in rotations]
    return ExactGroup("D4", elements, input_shape, spec=spec, generators=[1, 4])


def build_flip(spec: FlipSpec, input_shape: tuple[int, ...], field: str = "group") -> ExactGroup:
    require_image(input_shape, f"a {spec.axis} flip", field)
    check_orbit_size(2, input_shape, field)
    flip = flip_element(input_shape, spec.axis)
    return ExactGroup(f"flip({spec.axis})", [Element.identity(flip.size), flip], input_shape, spec=spec, generators=[1])
