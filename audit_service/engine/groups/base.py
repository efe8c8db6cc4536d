"""The group interface the orbit sweep uses, and the exact (index-permutation) implementation.

A :class:`Group` is a finite, ordered list of elements (element 0 is the identity) together with its
action on batches: ``orbit`` maps ``(N, *S)`` to ``(G, N, *S)`` with ``out[i] = g_i . x`` and
``inverse_orbit`` maps ``(G, N, *S)`` to ``(G, N, *S)`` with ``out[i] = g_i^{-1} . y[i]`` (used to bring
saliency maps of ``g x`` back onto ``x``'s frame).

:class:`ExactGroup` is every group whose action is an index permutation of the flattened sample:
its elements are :class:`~audit_service.engine.groups.element.Element` values, stacked into one ``(G, D)``
gather table (and its inverse), so an orbit is one batched ``torch.gather`` on the input's device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from pydantic import BaseModel

from ..errors import SpecError
from ..spec import MAX_GROUP_ORDER
from .element import Element, is_permutation

#: Largest ``order x prod(input_shape)`` an exact group may index: the gather table is int64 (8 bytes per
#: entry, twice with its inverse) and one probe's orbit holds that many values.
MAX_ORBIT_VALUES = 2**27


class Group(ABC):
    """A finite group (or sampled subset of a continuous one) acting on per-sample tensors."""

    name: str
    order: int
    exact: bool
    element_names: list[str]
    spec: BaseModel | None
    input_shape: tuple[int, ...]
    #: Why the listed elements are not a group (not closed, or repeated elements), else None.
    note: str | None = None
    #: For a group too large to enumerate: {size, group_order, method, seed} of the element sample, else None.
    sampled: dict | None = None

    @abstractmethod
    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *S) -> (G, N, *S) on x's device; ``out[i] = g_i . x``."""

    @abstractmethod
    def inverse_orbit(self, y: torch.Tensor) -> torch.Tensor:
        """(G, N, *S) -> (G, N, *S) on y's device; ``out[i] = g_i^{-1} . y[i]``."""

    def interpolation_error(self, x: torch.Tensor) -> float | None:
        """None for exact groups; for inexact ones the identity round trip's mean relative L2 error."""
        return None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "order": self.order,
            "exact": self.exact,
            "elements": list(self.element_names),
            "spec": self.spec.model_dump(mode="json") if self.spec is not None else None,
        }
        if self.note:
            out["note"] = self.note
        if self.sampled is not None:
            out["sampled"] = dict(self.sampled)
        return out

    def __len__(self) -> int:
        return self.order

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} order={self.order} exact={self.exact}>"

    # -- shared checks ----------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, leading: int, what: str) -> None:
        expected = tuple(self.input_shape)
        if tuple(x.shape[leading:]) != expected or x.ndim != leading + len(expected):
            lead = "(G, N, *S)" if leading == 2 else "(N, *S)"
            raise ValueError(f"Expected {what} of shape {lead} with S = {expected}, but got {tuple(x.shape)}")
        if leading == 2 and x.shape[0] != self.order:
            raise ValueError(f"Expected {what} with G = {self.order} rows, but got {x.shape[0]}")


class ExactGroup(Group):
    """A group acting by index permutations of the flattened sample; elements are :class:`Element`.

    Validated on construction: the first element is the identity, every row is a permutation of
    ``range(D)``. ``generators`` (indices into the elements) are kept to check commutation in products.
    """

    exact = True

    def __init__(
        self,
        name: str,
        elements: Sequence[Element],
        input_shape: tuple[int, ...],
        spec: BaseModel | None = None,
        generators: Sequence[int] = (),
        note: str | None = None,
    ) -> None:
        if not elements:
            raise ValueError("Expected at least one element (the identity), but got none")
        size = math.prod(input_shape)
        for el in elements:
            if el.size != size:
                raise ValueError(
                    f"Expected elements acting on {size} values (shape {input_shape}), but "
                    f"{el.name!r} acts on {el.size}"
                )
        table = torch.stack([el.perm for el in elements])
        self._setup(name, table, [el.name for el in elements], input_shape, spec, generators, note)

    @classmethod
    def from_table(
        cls,
        name: str,
        table: torch.Tensor,
        element_names: Sequence[str],
        input_shape: tuple[int, ...],
        spec: BaseModel | None = None,
        generators: Sequence[int] = (),
        note: str | None = None,
    ) -> "ExactGroup":
        """Build from a (G, D) int64 gather table directly (validated the same way; no per-element copies)."""
        group = cls.__new__(cls)
        group._setup(name, table, list(element_names), input_shape, spec, generators, note)
        return group

    def _setup(
        self,
        name: str,
        table: torch.Tensor,
        names: list[str],
        input_shape: tuple[int, ...],
        spec: BaseModel | None,
        generators: Sequence[int],
        note: str | None,
    ) -> None:
        size = math.prod(input_shape)
        table = table.to(device="cpu", dtype=torch.long).contiguous()
        if table.ndim != 2 or table.shape[1] != size or table.shape[0] != len(names) or not names:
            raise ValueError(
                f"Expected a (G, {size}) table with one name per row, but got {tuple(table.shape)} "
                f"and {len(names)} names"
            )
        if not torch.equal(table[0], torch.arange(size)):
            raise ValueError(f"Expected element 0 to be the identity, but got {names[0]!r}")
        if not is_permutation(table):
            bad = [nm for nm, row in zip(names, table) if not is_permutation(row)]
            raise ValueError(f"Expected every element to be a permutation of range({size}), but got {bad}")
        inverse = torch.empty_like(table)
        inverse.scatter_(1, table, torch.arange(size).expand_as(table))

        self.name = name
        self.spec = spec
        self.input_shape = tuple(input_shape)
        self.order = table.shape[0]
        self.size = size
        self.elements = [Element._trusted(table[i], nm) for i, nm in enumerate(names)]
        self.element_names = list(names)
        self.generators = list(generators)
        self.note = note
        self._table = table
        self._inverse = inverse
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._index: dict[bytes, int] | None = None

    @property
    def table(self) -> torch.Tensor:
        """The (G, D) gather table on the CPU: ``orbit(x)[i].flatten() == x.flatten()[table[i]]`` per sample."""
        return self._table

    # -- the action (hot path) --------------------------------------------------------------
    def index_tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (G, D) gather table and its inverse on ``device`` (cached per device)."""
        device = torch.device(device)
        cached = self._on_device.get(device)
        if cached is None:
            cached = (self._table.to(device), self._inverse.to(device))
            self._on_device[device] = cached
        return cached

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 1, "probes")
        n = x.shape[0]
        table, _ = self.index_tables(x.device)
        flat = x.reshape(n, self.size)
        g = self.order
        out = torch.gather(flat.unsqueeze(0).expand(g, n, self.size), 2, table.unsqueeze(1).expand(g, n, self.size))
        return out.reshape(g, n, *self.input_shape)

    def inverse_orbit(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input(y, 2, "orbit values")
        g, n = y.shape[0], y.shape[1]
        _, inverse = self.index_tables(y.device)
        flat = y.reshape(g, n, self.size)
        out = torch.gather(flat, 2, inverse.unsqueeze(1).expand(g, n, self.size))
        return out.reshape(g, n, *self.input_shape)

    # -- group structure --------------------------------------------------------------------
    def index_of(self, element: Element) -> int | None:
        """Position of ``element`` in this group (by action, not name), or None if it is not an element."""
        if self._index is None:
            self._index = {}
            for i, el in enumerate(self.elements):
                self._index.setdefault(el.key(), i)
        return self._index.get(element.key()) if element.size == self.size else None

    def __contains__(self, element: object) -> bool:
        return isinstance(element, Element) and self.index_of(element) is not None

    def __getitem__(self, i: int) -> Element:
        return self.elements[i]

    def __iter__(self):
        return iter(self.elements)

    def is_closed(self) -> bool:
        """Whether every composition of two elements is an element (O(G^2 D): for tests and small groups)."""
        return all(self.index_of(a @ b) is not None for a in self.elements for b in self.elements)

    def generator_elements(self) -> list[Element]:
        return [self.elements[i] for i in self.generators]


# ----------------------------------------------------------------------------- fit helpers
def shape_str(shape: Sequence[int]) -> str:
    """``(1, 28, 32)`` -> ``"1x28x32"`` (the form used in error messages)."""
    return "x".join(str(int(s)) for s in shape) if len(shape) else "a scalar"


def require_square_image(input_shape: tuple[int, ...], what: str, field: str) -> None:
    require_image(input_shape, what, field)
    h, w = input_shape[-2], input_shape[-1]
    if h != w:
        raise SpecError(
            f"Expected a square image for {what}, but the model's input is {shape_str(input_shape)} (H = {h}, W = {w})",
            field=field,
        )


def require_image(input_shape: tuple[int, ...], what: str, field: str) -> None:
    if len(input_shape) < 2:
        raise SpecError(
            f"Expected an image input with (H, W) as the last two axes for {what}, but the model's "
            f"input is {shape_str(input_shape)}",
            field=field,
        )


def normalize_axis(axis: int, input_shape: tuple[int, ...], field: str) -> int:
    rank = len(input_shape)
    if not -rank <= axis < rank:
        raise SpecError(
            f"Expected `axis` in [{-rank}, {rank - 1}] for the model's input "
            f"{shape_str(input_shape)} (per-sample axes, batch excluded), but got {axis}",
            field=field,
        )
    return axis % rank


def check_orbit_size(order: int, input_shape: tuple[int, ...], field: str) -> None:
    if order > MAX_GROUP_ORDER:
        raise SpecError(
            f"Expected a group of at most {MAX_GROUP_ORDER} elements, but this one has {order}", field=field
        )
    values = order * math.prod(input_shape)
    if values > MAX_ORBIT_VALUES:
        raise SpecError(
            f"Expected order x input size <= {MAX_ORBIT_VALUES} (one probe's orbit), but got "
            f"{order} x {shape_str(input_shape)} = {values}; use a smaller group",
            field=field,
        )
