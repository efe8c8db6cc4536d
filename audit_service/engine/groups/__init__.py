"""Groups acting on model inputs: exact index-permutation groups (C4, D4, flip, translation,
permutation, their products) and the sampled, interpolated continuous rotation group.

Elements are first-class values (:class:`Element`: compose with ``@``, invert with ``~``); how a group
acts on a batch is :meth:`Group.orbit` / :meth:`Group.inverse_orbit`.
"""

from .base import MAX_ORBIT_VALUES, ExactGroup, Group
from .build import build_group, group_catalogue
from .element import Element
from .product import ProductGroup
from .resolve import GroupLike as GroupLike, group_spec_of as group_spec_of, resolve_group as resolve_group
from .rotation import SampledRotationGroup

__all__ = [
    "Element",
    "ExactGroup",
    "Group",
    "MAX_ORBIT_VALUES",
    "ProductGroup",
    "SampledRotationGroup",
    "build_group",
    "group_catalogue",
]
