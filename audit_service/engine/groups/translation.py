"""Cyclic translations: element k rolls the sample by ``k * step`` along one axis (``torch.roll``).

The listed elements form a group only when ``order * step`` is a multiple of the axis length
(the paper's T3 on 36 px with step 12 is one). Otherwise they are still a meaningful set of shifts
to average over, and ``describe()["note"]`` says that they do not close under composition.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import SpecError
from ..spec import TranslationSpec
from .base import ExactGroup, check_orbit_size, normalize_axis, shape_str
from .element import Element, element_from_rearrangement


def build_translation(spec: TranslationSpec, input_shape: tuple[int, ...], field: str = "group") -> ExactGroup:
    axis = normalize_axis(spec.axis, input_shape, f"{field}.axis")
    size = input_shape[axis]
    if spec.step >= size:
        raise SpecError(
            f"Expected `step` smaller than the length of axis {spec.axis} ({size} in the model's "
            f"input {shape_str(input_shape)}), but got {spec.step}",
            field=f"{field}.step",
        )
    check_orbit_size(spec.order, input_shape, f"{field}.order")
    elements = [Element.identity(math.prod(input_shape))]
    for k in range(1, spec.order):
        shift = k * spec.step
        elements.append(
            element_from_rearrangement(input_shape, functools.partial(torch.roll, shifts=shift, dims=axis), f"t{shift}")
        )

    notes = []
    if (spec.order * spec.step) % size:
        notes.append(
            f"order x step = {spec.order * spec.step} is not a multiple of the axis length {size}, so "
            "these shifts do not close under composition (they are not a group); the metrics average "
            "over the listed shifts"
        )
    distinct = len({(k * spec.step) % size for k in range(spec.order)})
    if distinct < spec.order:
        notes.append(
            f"only {distinct} of the {spec.order} shifts are distinct modulo the axis length {size}; "
            "repeated shifts weigh more in the averages"
        )
    name = f"translation(order={spec.order}, step={spec.step}, axis={spec.axis})"
    return ExactGroup(
        name, elements, input_shape, spec=spec, generators=[1] if spec.order > 1 else [], note="; ".join(notes) or None
    )
