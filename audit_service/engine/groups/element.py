"""Group elements as first-class values: index permutations of a flattened per-sample tensor.

An :class:`Element` ``g`` acting on a per-sample tensor ``x`` of ``size`` values is the gather
``(g . x).flatten() = x.flatten()[g.perm]``. Elements compose with ``@`` (``(a @ b) . x = a . (b . x)``,
so ``b`` acts first) and invert with ``~``; they are validated on construction, compare and hash by
their permutation, and carry a human-readable name for reports.

Building an element from a pure index rearrangement is one line: apply the rearrangement (``torch.rot90``,
``torch.roll``, ``index_select`` along an axis, ...) to ``arange(size).reshape(shape)`` and flatten; the
result is exactly the gather index of that rearrangement (see :func:`element_from_rearrangement`).
"""

from __future__ import annotations

from typing import Callable

import torch


class Element:
    """One exact group element: ``perm`` is a permutation of ``range(size)`` (1-D int64, CPU)."""

    __slots__ = ("perm", "name", "_key")

    def __init__(self, perm: torch.Tensor | list[int], name: str) -> None:
        perm = torch.as_tensor(perm, dtype=torch.long, device="cpu")
        if perm.ndim != 1:
            raise ValueError(f"Expected a 1-D permutation, but got a tensor of shape {tuple(perm.shape)}")
        if not is_permutation(perm):
            raise ValueError(
                f"Expected a permutation of range({perm.numel()}) for element {name!r}, but some "
                "indices are out of range, missing or repeated"
            )
        self._init(perm, name)

    def _init(self, perm: torch.Tensor, name: str) -> None:
        self.perm = perm
        self.name = name
        self._key: bytes | None = None

    @classmethod
    def _trusted(cls, perm: torch.Tensor, name: str) -> "Element":
        """Skip validation: for permutations already known valid (rows of a validated table, compositions)."""
        el = cls.__new__(cls)
        el._init(perm, name)
        return el

    @classmethod
    def identity(cls, size: int) -> "Element":
        return cls._trusted(torch.arange(size), "e")

    # -- group law --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.perm.numel()

    def __matmul__(self, other: "Element") -> "Element":
        """``self @ other``: first ``other``, then ``self``."""
        if not isinstance(other, Element):
            return NotImplemented
        if other.size != self.size:
            raise ValueError(f"Expected elements acting on the same size, but got {self.size} and {other.size}")
        return Element._trusted(other.perm[self.perm], _compose_names(self.name, other.name))

    def __invert__(self) -> "Element":
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.size)
        return Element._trusted(inv, _invert_name(self.name))

    def is_identity(self) -> bool:
        return bool(torch.equal(self.perm, torch.arange(self.size)))

    # -- action -------------------------------------------------------------------------------
    def act(self, x: torch.Tensor) -> torch.Tensor:
        """(N, *S) -> (N, *S): this element applied to every sample (a reference; groups batch all elements)."""
        n = x.shape[0]
        flat = x.reshape(n, -1)
        return flat[:, self.perm.to(x.device)].reshape(x.shape)

    # -- value semantics ----------------------------------------------------------------------
    def key(self) -> bytes:
        if self._key is None:
            self._key = self.perm.numpy().tobytes()
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Element) and self.size == other.size and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return f"Element({self.name!r}, size={self.size})"


def is_permutation(perm: torch.Tensor) -> bool:
    """Whether the last axis of ``perm`` holds permutations of ``range(n)`` in every row (O(size))."""
    n = perm.shape[-1]
    if n == 0:
        return True
    if int(perm.min()) < 0 or int(perm.max()) >= n:
        return False
    hit = torch.zeros(perm.shape, dtype=torch.bool)
    hit.scatter_(-1, perm, True)
    return bool(hit.all())


def element_from_rearrangement(
    shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor], name: str
) -> Element:
    """The element whose action on a per-sample tensor of ``shape`` is the pure rearrangement ``fn``.

    ``fn`` must only move values (rot90, flip, roll, index_select, transpose of square axes, ...).
    """
    size = 1
    for s in shape:
        size *= s
    idx = fn(torch.arange(size).reshape(shape))
    if tuple(idx.shape) != tuple(shape):
        raise ValueError(f"Expected the rearrangement to keep the shape {tuple(shape)}, but got {tuple(idx.shape)}")
    return Element(idx.reshape(-1).clone(), name)


def _compose_names(a: str, b: str) -> str:
    if a == "e":
        return b
    if b == "e":
        return a
    return f"{a} @ {b}"


def _invert_name(a: str) -> str:
    if a == "e":
        return "e"
    return f"~{a}" if " " not in a else f"~({a})"
