"""Direct products of groups acting on the same sample: every combination ``g_1 @ g_2 @ ... @ g_k``.

Element ``(i_1, ..., i_k)`` is ``a_{i_1} @ b_{i_2} @ ...`` (the last factor acts first), listed in
row-major order of the indices, so element 0 is the identity; names are the factors' names joined with
`` @ ``. When every factor is exact the product is an :class:`ExactGroup` (one gather table); otherwise
the factors' actions are chained in a :class:`ProductGroup`.

The product is a group only when the factors' actions commute (e.g. flips and translations along
different axes; C4 and a translation along x do not). When the generators of different factors do not
commute, ``describe()["note"]`` says so: the metrics are still averages over the listed elements.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from ..errors import SpecError
from ..spec import MAX_GROUP_ORDER, ProductSpec
from .base import ExactGroup, Group, check_orbit_size


class ProductGroup(Group):
    """Chains the factors' actions; used when some factor is inexact (sampled rotation)."""

    def __init__(
        self, spec: ProductSpec, factors: Sequence[Group], input_shape: tuple[int, ...], note: str | None = None
    ) -> None:
        self.spec = spec
        self.factors = list(factors)
        self.input_shape = tuple(input_shape)
        self.order = math.prod(f.order for f in self.factors)
        self.exact = all(f.exact for f in self.factors)
        self.name = " x ".join(f.name for f in self.factors)
        self.element_names = [
            " @ ".join(parts) if any(p != "e" for p in parts) else "e"
            for parts in itertools.product(*(f.element_names for f in self.factors))
        ]
        self.note = note

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 1, "probes")
        n = x.shape[0]
        y = x
        inner = 1  # product of the orders of the factors applied so far (the later ones)
        for f in reversed(self.factors):
            y = f.orbit(y.reshape(inner * n, *self.input_shape))  # (|f|, inner*n, *S)
            inner *= f.order
        return y.reshape(self.order, n, *self.input_shape)

    def inverse_orbit(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input(y, 2, "orbit values")
        n = y.shape[1]
        orders = [f.order for f in self.factors]
        z = y.reshape(*orders, n, *self.input_shape)
        # g^{-1} = ~b @ ~a for g = a @ b: undo the first factor first
        for j, f in enumerate(self.factors):
            moved = z.movedim(j, 0)
            shape = moved.shape
            back = f.inverse_orbit(moved.reshape(f.order, -1, *self.input_shape))
            z = back.reshape(shape).movedim(0, j)
        return z.reshape(self.order, n, *self.input_shape)

    def interpolation_error(self, x: torch.Tensor) -> float | None:
        if self.exact:
            return None
        if self.order <= 1 or x.shape[0] == 0:
            return 0.0
        xf = x if x.is_floating_point() else x.float()
        back = self.inverse_orbit(self.orbit(xf))[1:]
        n = x.shape[0]
        err = (back - xf.unsqueeze(0)).reshape(self.order - 1, n, -1).norm(dim=2)
        ref = xf.reshape(n, -1).norm(dim=1)
        keep = ref > 0
        return float((err[:, keep] / ref[keep]).mean()) if bool(keep.any()) else 0.0


def build_product(
    spec: ProductSpec, input_shape: tuple[int, ...], build: Callable[..., Group], field: str = "group"
) -> Group:
    known = [f.known_order() for f in spec.factors]  # each kind says its order (None: after building)
    if math.prod(o for o in known if o is not None) > MAX_GROUP_ORDER:  # fail before building large factors
        raise SpecError(
            f"Expected a product of at most {MAX_GROUP_ORDER} elements, but the orders of the "
            f"factors multiply to more ({' x '.join('?' if o is None else str(o) for o in known)}); "
            "drop a factor or lower an order",
            field=f"{field}.factors",
        )
    order = 1
    factors: list[Group] = []
    for i, factor_spec in enumerate(spec.factors):
        factor = build(factor_spec, input_shape, field=f"{field}.factors[{i}]")
        order *= factor.order
        if order > MAX_GROUP_ORDER:
            raise SpecError(
                f"Expected a product of at most {MAX_GROUP_ORDER} elements, but the orders of the "
                f"factors multiply to {order} or more ({' x '.join(str(f.order) for f in factors)} "
                f"x {factor.order}...); drop a factor or lower an order",
                field=f"{field}.factors",
            )
        factors.append(factor)
    check_orbit_size(order, input_shape, f"{field}.factors")
    note = _commutation_note(factors)
    notes = [f"factor {f.name}: {f.note}" for f in factors if f.note] + ([note] if note else [])
    note = "; ".join(notes) or None
    exact = [f for f in factors if isinstance(f, ExactGroup)]
    if len(exact) == len(factors):
        names = [
            " @ ".join(parts) if any(p != "e" for p in parts) else "e"
            for parts in itertools.product(*(f.element_names for f in factors))
        ]
        return ExactGroup.from_table(
            " x ".join(f.name for f in factors),
            _product_table(exact),
            names,
            input_shape,
            spec=spec,
            generators=_product_generators(exact),
            note=note,
        )
    return ProductGroup(spec, factors, input_shape, note=note)


def _product_table(factors: Sequence[ExactGroup]) -> torch.Tensor:
    """Row-major table of ``a_i @ b_j @ ...``: with ``(a @ b)[d] = b[a[d]]``, one batched gather per factor."""
    table = factors[0].table
    for f in factors[1:]:
        t, g, d = table.shape[0], f.order, table.shape[1]
        table = torch.gather(f.table.unsqueeze(0).expand(t, g, d), 2, table.unsqueeze(1).expand(t, g, d)).reshape(
            t * g, d
        )
    return table


def _product_generators(factors: Sequence[ExactGroup]) -> list[int]:
    """Positions of (e, .., g, .., e) for each factor generator g, in row-major product order."""
    orders = [f.order for f in factors]
    positions: list[int] = []
    for j, f in enumerate(factors):
        stride = math.prod(orders[j + 1 :])
        positions.extend(gi * stride for gi in f.generators)
    return positions


def _commutation_note(factors: Sequence[Group]) -> str | None:
    exact = [f for f in factors if isinstance(f, ExactGroup)]
    if len(exact) != len(factors):
        inexact = [f.name for f in factors if not isinstance(f, ExactGroup)]
        if len(factors) > 1:
            return (
                f"commutation with the sampled factor(s) {', '.join(inexact)} is not checked; the listed "
                "elements need not close under composition"
            )
        return None
    for a, b in itertools.combinations(exact, 2):
        for ga in a.generator_elements():
            for gb in b.generator_elements():
                if ga @ gb != gb @ ga:
                    return (
                        f"the factors {a.name} and {b.name} do not commute ({ga.name} @ {gb.name} != "
                        f"{gb.name} @ {ga.name}), so the listed elements are not closed under composition "
                        "(not a group); the metrics average over the listed elements"
                    )
    return None
