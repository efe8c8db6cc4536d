"""The few facts a job list shows about a job's spec, computed once when the job is stored.

Why: a spec may be tens of KiB (a permutation group's generators; older rows up to MiBs), and a page of
100 jobs carried every one whole. ``GET /audits`` sends this summary instead (``JobStore.summaries``);
the whole spec stays at ``GET /audits/{id}``.
"""

from __future__ import annotations

from typing import Any

from ..engine.spec import default_shifts

#: the shifts of a spec that leaves ``shifts`` out (the default sweep)
_DEFAULT_SHIFTS = len(default_shifts())
#: orders of the groups whose order the spec states (a permutation group's is known once it is built)
_FIXED_ORDERS = {"C4": 4, "D4": 8, "flip": 2}


def group_order(group: Any) -> int | None:
    """The order the spec gives ``group`` (None where only building the group tells, e.g. permutations)."""
    if not isinstance(group, dict):
        return _FIXED_ORDERS.get(group) if isinstance(group, str) else None
    name = group.get("name")
    if name in _FIXED_ORDERS:
        return _FIXED_ORDERS[name]
    if name == "translation":
        return _int(group.get("order"))
    if name == "rotation":
        return _int(group.get("n_angles", 8))
    if name == "product":
        orders = [group_order(f) for f in group.get("factors") or []]
        if not orders or any(o is None for o in orders):
            return None
        total = 1
        for o in orders:
            total *= o  # type: ignore[operator]
        return total
    return None


def spec_summary(spec: Any, inputs: Any = None) -> dict[str, Any]:
    """``{group: {name, order}, shifts, conditions, n_probes, device, require}`` of a stored spec (JSON);
    ``conditions`` counts the noise condition, ``clean`` when probes were given, and each shift."""
    spec = spec if isinstance(spec, dict) else {}
    group = spec.get("group")
    name = group.get("name") if isinstance(group, dict) else group
    shifts = spec.get("shifts")
    n_shifts = _DEFAULT_SHIFTS if shifts is None else len(shifts) if isinstance(shifts, list) else 0
    has_probes = isinstance(inputs, dict) and "probes" in inputs
    options = spec.get("options") if isinstance(spec.get("options"), dict) else {}
    require = spec.get("require")
    return {
        "group": {"name": str(name)[:64] if name is not None else None, "order": group_order(group)},
        "shifts": n_shifts,
        "conditions": n_shifts + 1 + int(has_probes),
        "n_probes": _int(options.get("n_probes")),
        "device": str(options.get("device"))[:16] if options.get("device") is not None else None,
        "require": [str(r)[:32] for r in require[:8]] if isinstance(require, list) else None,
    }


def with_group_order(summary: dict[str, Any], order: int | None) -> dict[str, Any]:
    """The summary with the group order a finished report states (a permutation group's closure; None: as
    it was)."""
    if _int(order) is None:
        return summary
    return {**summary, "group": {**(summary.get("group") or {}), "order": order}}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
