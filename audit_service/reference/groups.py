"""The paper's two groups on 36x36 images, defined by the core group module.

* ``R4``: C4, rotations by multiples of 90 degrees (spec ``{"name": "C4"}``).
* ``T3``: 3-fold cyclic translations by 12 pixels along x (spec ``{"name": "translation", "order": 3,
  "step": 12}``; 3 x 12 = 36, so the action closes on the padded image).

Both act by index permutation, so the reference code uses them as permutation tables: ``perm[g]`` is the flat
pixel index that pixel ``p`` of ``g x`` is read from, i.e. ``(g x).flatten()[p] == x.flatten()[perm[g, p]]``.
The tables are computed by letting the core group act on an image of pixel indices, so training, the
weight-tied layer and the audit all use exactly the group the service audits against.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .data import INPUT_SHAPE
from .names import GROUP_NAMES, GROUP_SPECS  # noqa: F401 - re-exported: the reference code's group names


def group_spec(name: str) -> dict:
    """The audit spec's ``group`` field for a reference group name (``R4`` or ``T3``)."""
    try:
        return dict(GROUP_SPECS[name])
    except KeyError:
        raise KeyError(f"Expected a reference group in {', '.join(GROUP_NAMES)}, but got {name!r}") from None


def _core_orbit(name: str, x: torch.Tensor) -> torch.Tensor:
    """(N, *S) -> (G, N, *S) through ``audit_service.groups.build_group``."""
    from audit_service.groups import build_group

    group = build_group(group_spec(name), INPUT_SHAPE)
    return group.orbit(x)


@lru_cache(maxsize=None)
def permutation_table(name: str) -> np.ndarray:
    """(G, 36*36) int64: flat source index of every output pixel, one row per group element.

    Row 0 is the identity (the core module lists the identity first; checked here).
    """
    d = int(np.prod(INPUT_SHAPE))
    index_image = torch.arange(d, dtype=torch.float64).reshape(1, *INPUT_SHAPE)
    orbit = _core_orbit(name, index_image)  # (G, 1, 1, 36, 36); float64 holds indices exactly
    table = orbit.reshape(orbit.shape[0], d).round().to(torch.int64).numpy()
    if not (np.sort(table, axis=1) == np.arange(d)).all():
        raise RuntimeError(f"group {name}: the core action is not a pixel permutation")
    identity = np.flatnonzero((table == np.arange(d)).all(axis=1))
    if len(identity) != 1:
        raise RuntimeError(f"group {name}: expected exactly one identity element, found {len(identity)}")
    if identity[0] != 0:  # keep the identity first; the order of the rest does not matter for uniform g
        order = [int(identity[0])] + [i for i in range(len(table)) if i != identity[0]]
        table = table[order]
    table = np.ascontiguousarray(table)
    table.setflags(write=False)
    return table


@lru_cache(maxsize=None)
def _table_tensor(name: str) -> torch.Tensor:
    return torch.tensor(np.array(permutation_table(name)))


def group_order(name: str) -> int:
    return permutation_table(name).shape[0]


def orbit(name: str, x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 36, 36) -> (G, N, 1, 36, 36), identity first, by the group's permutation table."""
    table = _table_tensor(name).to(x.device)
    flat = x.reshape(x.shape[0], -1)
    return flat[:, table].permute(1, 0, 2).reshape(table.shape[0], *x.shape)
