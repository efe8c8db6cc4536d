"""``resolve_group``: the one group argument of the Python API, whatever form the caller holds.

``audit``, ``symmetrize``, ``logit_invariance_loss`` and ``OrbitInvariance`` all take a spec string (``"C4"``),
a spec dict, a spec object (``C4Spec(...)``) or a built :class:`Group`. A spec needs the per-sample shape to
become a group: taken from ``input_shape`` when given, else from the batch in hand (``x.shape[1:]``); with
neither, a ``SpecError`` says what to pass. A built group is checked against the shape it will act on.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Sequence, Union

from pydantic import BaseModel

from ..errors import SpecError
from .base import Group, shape_str
from .build import build_group

#: What the API accepts as a group: a name, a spec dict, a spec object or a built group.
GroupLike = Union[str, dict, BaseModel, Group]

#: groups built from specs, by (spec, shape): a training loop resolves the same spec every step
_CACHE: "OrderedDict[tuple[str, tuple[int, ...]], Group]" = OrderedDict()
_CACHE_LOCK = threading.Lock()  # DataLoader workers and training threads share the cache
_CACHE_SIZE = 16


def resolve_group(
    group: GroupLike,
    input_shape: Sequence[int] | None = None,
    *,
    field: str = "group",
    how: str = "pass input_shape=(C, H, W)",
) -> Group:
    """``group`` as a built :class:`Group` acting on samples of ``input_shape`` (batch excluded).

    ``input_shape`` may be None only for a built group. ``how`` says, in the error, how this caller's user
    gives the shape (e.g. "pass input_shape=..." or "pass probes"). Raises ``SpecError`` naming ``field``.
    """
    shape = _shape(input_shape)
    if isinstance(group, Group):
        if shape is not None and tuple(group.input_shape) != shape:
            raise SpecError(
                f"Expected a group built for samples of shape {shape_str(shape)}, but {group.name} was "
                f"built for {shape_str(group.input_shape)}; build it with build_group(spec, "
                f"{shape}) or pass the spec itself",
                field=field,
            )
        return group
    key = spec_key(group, field)
    if shape is None:
        raise SpecError(
            f"Expected the per-sample input shape to build the group {key} from its spec, but there is "
            f"no tensor to read it from; {how}, or pass a built group "
            f"(build_group({key}, (3, 32, 32)))",
            field="input_shape",
        )
    with _CACHE_LOCK:
        cached = _CACHE.get((key, shape))
        if cached is not None:
            _CACHE.move_to_end((key, shape))
            return cached
    cached = build_group(group, shape, field)
    with _CACHE_LOCK:
        _CACHE[(key, shape)] = cached
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return cached


def group_spec_of(group: GroupLike, field: str = "group") -> Any:
    """What a spec dict's ``group`` field takes: the spec as JSON data (a built group gives its own spec)."""
    if isinstance(group, Group):
        if group.spec is None:
            raise SpecError(
                f"Expected a group built from a spec (build_group), but {group.name} has none; pass "
                f'its spec (e.g. "C4") instead',
                field=field,
            )
        return group.spec.model_dump(mode="json")
    if isinstance(group, BaseModel):
        return group.model_dump(mode="json")
    if isinstance(group, (str, dict)):
        return group
    raise SpecError(
        f'Expected a group as a name ("C4"), a spec dict, a spec object (C4Spec(...)) or a built '
        f"Group, but got {type(group).__name__}",
        field=field,
    )


def spec_key(group: str | dict | BaseModel, field: str = "group") -> str:
    """A short, stable text of a spec: the name for a bare string, canonical JSON otherwise."""
    data = group_spec_of(group, field)
    if isinstance(data, str):
        return repr(data)
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        raise SpecError(f"Expected a JSON-like group spec, but got {data!r}", field=field) from None


def _shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    try:
        return tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise SpecError(
            f"Expected input_shape as a sequence of ints (per sample, batch excluded), but got {input_shape!r}",
            field="input_shape",
        ) from None
