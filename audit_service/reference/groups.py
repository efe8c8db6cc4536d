"""The paper's two groups on 36x36 images, defined by the core group module.

* ``R4``: C4, rotations by multiples of 90 degrees (spec ``{"name": "C4"}``).
* ``T3``: 3-fold cyclic translations by 12 pixels along x (spec ``{"name": "translation", "order": 3,
  "step": 12}``; 3 x 12 = 36, so the action closes on the padded image).

Both are the core's exact groups (``audit_service.engine.groups``): training, the weight-tied layer (through
the gather table, ``(g x).flatten()[p] == x.flatten()[table[g, p]]``) and the audit use exactly the group
the service audits against, with no second implementation of the action.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from ..engine.groups import ExactGroup, build_group
from .data import INPUT_SHAPE
from .names import GROUP_NAMES, GROUP_SPECS  # noqa: F401 - re-exported: the reference code's group names


def group_spec(name: str) -> dict:
    """The audit spec's ``group`` field for a reference group name (``R4`` or ``T3``)."""
    try:
        return dict(GROUP_SPECS[name])
    except KeyError:
        raise KeyError(f"Expected a reference group in {', '.join(GROUP_NAMES)}, but got {name!r}") from None


@cache
def reference_group(name: str) -> ExactGroup:
    """The core group for a reference group name, on the padded 36x36 digits (identity first)."""
    group = build_group(group_spec(name), INPUT_SHAPE)
    assert isinstance(group, ExactGroup)
    return group


def permutation_table(name: str) -> np.ndarray:
    """(G, 36*36) int64, read-only: flat source index of every output pixel, one row per group element
    (the core group's gather table; row 0 is the identity)."""
    table = reference_group(name).table.numpy()
    table.setflags(write=False)
    return table


def group_order(name: str) -> int:
    return reference_group(name).order


def orbit(name: str, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 36, 36) -> (G, N, 1, 36, 36), identity first: the core group's action."""
    return reference_group(name).orbit(x)
