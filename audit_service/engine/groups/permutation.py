"""Finite groups given by generator permutations of one input axis, enumerated by closure (BFS).

A generator ``p`` (a permutation of ``range(n)``, ``n`` the axis length) acts by
``out[..., j, ...] = x[..., p[j], ...]`` (``index_select`` along the axis). In a finite group every
inverse is a power, so the closure of the generators under composition is the generated group.
"""

from __future__ import annotations

import functools
import math
from collections import deque

import torch

from ..errors import SpecError
from ..spec import MAX_GROUP_ORDER, PermutationSpec
from .base import ExactGroup, check_orbit_size, normalize_axis, shape_str
from .element import Element, element_from_rearrangement

Perm = tuple[int, ...]


def cycle_name(p: Perm) -> str:
    """Cycle notation of ``j -> p[j]`` without fixed points, e.g. ``(0 1 2)(3 4)``; the identity is ``e``."""
    seen = [False] * len(p)
    cycles = []
    for start in range(len(p)):
        if seen[start] or p[start] == start:
            seen[start] = True
            continue
        cycle, j = [], start
        while not seen[j]:
            seen[j] = True
            cycle.append(j)
            j = p[j]
        cycles.append("(" + " ".join(map(str, cycle)) + ")")
    return "".join(cycles) or "e"


def compose(a: Perm, b: Perm) -> Perm:
    """``a @ b`` (``b`` acts first) for gather-style permutations: ``(a @ b)[j] = b[a[j]]``."""
    return tuple(b[i] for i in a)


class TooLarge(Exception):
    """The closure passed ``max_order`` (the caller samples or refuses)."""


def closure(generators: list[Perm], max_order: int, field: str, refuse: bool = True) -> list[Perm]:
    """All products of the generators, identity first, in BFS order; SpecError past ``max_order``
    (``TooLarge`` instead when not ``refuse``)."""
    n = len(generators[0])
    identity = tuple(range(n))
    elements = [identity]
    seen = {identity}
    queue = deque([identity])
    while queue:
        h = queue.popleft()
        for s in generators:
            g = compose(s, h)
            if g not in seen:
                seen.add(g)
                elements.append(g)
                queue.append(g)
                if len(elements) > max_order:
                    if not refuse:
                        raise TooLarge
                    fix = (
                        "use fewer or smaller generators"
                        if max_order >= MAX_GROUP_ORDER
                        else f"use fewer or smaller generators, or raise `max_order` (up to {MAX_GROUP_ORDER})"
                    )
                    raise SpecError(
                        f"Expected the generated group to have at most max_order = {max_order} "
                        f"elements, but it has more than {max_order}; {fix}",
                        field=f"{field}.max_order" if max_order < MAX_GROUP_ORDER else f"{field}.generators",
                    )
    return elements


def build_permutation(spec: PermutationSpec, input_shape: tuple[int, ...], field: str = "group") -> ExactGroup:
    axis = normalize_axis(spec.axis, input_shape, f"{field}.axis")
    n = input_shape[axis]
    generators: list[Perm] = []
    for i, gen in enumerate(spec.generators):
        if len(gen) != n or sorted(gen) != list(range(n)):
            shown = gen if len(gen) <= 20 else f"{gen[:20]}... (length {len(gen)})"
            raise SpecError(
                f"Expected a permutation of 0..{n - 1} (axis {spec.axis} has length {n} in the "
                f"model's input {shape_str(input_shape)}; each index exactly once), but got {shown}",
                field=f"{field}.generators[{i}]",
            )
        generators.append(tuple(gen))
    sampled: dict | None = None
    try:
        perms = closure(generators, spec.max_order, field, refuse=spec.sample == 0)
    except TooLarge:
        perms, sampled = sample_elements(generators, spec.sample, spec.seed)
    check_orbit_size(len(perms), input_shape, f"{field}.generators")
    elements = [Element.identity(math.prod(input_shape))]
    for p in perms[1:]:
        index = torch.tensor(p, dtype=torch.long)
        elements.append(
            element_from_rearrangement(
                input_shape, functools.partial(torch.index_select, dim=axis, index=index), cycle_name(p)
            )
        )
    if sampled is not None:
        name = f"permutation(sampled {len(perms)} of {sampled['group_order']}, axis={spec.axis})"
        note = (
            f"the group has {sampled['group_order']} elements, more than max_order = {spec.max_order}: audited "
            f"on the identity and {len(perms) - 1} elements drawn uniformly at random (seed {spec.seed}; "
            f"{sampled['method']}); metrics are estimates, see conditions[].group_sample_ci"
        )
        group = ExactGroup(name, elements, input_shape, spec=spec, generators=[], note=note)
        group.sampled = sampled
        return group
    gen_positions = sorted({perms.index(g) for g in generators if g != perms[0]})
    name = f"permutation(order={len(perms)}, axis={spec.axis})"
    return ExactGroup(name, elements, input_shape, spec=spec, generators=gen_positions)


def sample_elements(generators: list[Perm], size: int, seed: int) -> tuple[list[Perm], dict]:
    """(identity + ``size - 1`` distinct elements drawn uniformly from the generated group, a description).

    The group's order and a base with strong generating set come from Schreier-Sims (sympy). The full
    symmetric group is sampled as uniform random permutations; any other group by uniform ranks
    unranked through its stabilizer chain (``coset_unrank``), which is exactly uniform, unlike random
    products of generators.
    """
    import random

    from sympy.combinatorics import Permutation, PermutationGroup

    n = len(generators[0])
    group = PermutationGroup([Permutation(list(g)) for g in generators])
    order = int(group.order())
    rng = random.Random(seed)
    identity = tuple(range(n))
    want = min(size, order)
    chosen: list[Perm] = [identity]
    seen = {identity}
    symmetric = order == math.factorial(n)
    attempts = 0
    while len(chosen) < want and attempts < 50 * want:
        attempts += 1
        if symmetric:
            p = list(range(n))
            rng.shuffle(p)
            perm = tuple(p)
        else:
            perm = tuple(int(v) for v in group.coset_unrank(rng.randrange(order)).array_form)
        if perm not in seen:  # without replacement: each drawn element is uniform over those not yet drawn
            seen.add(perm)
            chosen.append(perm)
    method = (
        "uniform random permutations (the generators generate the full symmetric group)"
        if symmetric
        else "uniform ranks in the group's Schreier-Sims stabilizer chain"
    )
    return chosen, {
        "size": len(chosen),
        "group_order": order,
        "method": method,
        "seed": seed,
        "with_replacement": False,
    }
