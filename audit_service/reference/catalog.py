"""The shipped reference runs, as the service sees them.

``audit_service/reference/runs/<group>_<model>_s<seed>/`` holds each run's ``card.json``, ``model.onnx`` and ``model.pt``
(written by ``audit-service reference reproduce``). The directory is found relative to the repository (or
set with the environment variable ``AUDIT_REFERENCE_DIR``).

* :func:`list_reference_runs`, :func:`get_reference_run`, :func:`reference_model_path`: ``GET /references``.
* :func:`closest_profile`: which reference profile (group x model, averaged over seeds) an audit report's
  scale-free metric vector is closest to; the engine adds it to every report.
* :func:`calibrated_policy_notes`: how the verdict thresholds sit relative to the reference runs' metrics.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field

from .export import CARD_FILE, ONNX_FILE, TORCHSCRIPT_FILE
from ..engine.names import METRICS, PROFILE_CONDITIONS, PROFILE_METRICS, ConditionName, Metric
from ..engine.schema import ConditionMetrics, ReferenceProfile, Report


ENV_DIR = "AUDIT_REFERENCE_DIR"
ENV_RUNS_DIR = "AUDIT_REFERENCE_RUNS_DIR"
MODEL_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}

#: Conditions and metrics of the profile vector (all scale-free, so models with different logit scales compare):
#: ``PROFILE_CONDITIONS`` and ``PROFILE_METRICS``, views of the one metric table (``engine.names``).
_LOG_FLOOR = 1e-4  # LI_normalized and DI enter as log10(v + floor) / 4: 0 -> -1, 1 -> ~0


# ----------------------------------------------------------------------------- where the runs live
def reference_dir() -> Path:
    """``$AUDIT_REFERENCE_DIR`` if set, else the runs shipped inside the package (``reference/runs``,
    package data: present in an installed wheel as in a checkout)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "runs"


def runs_dir() -> Path:
    """Where service-triggered retraining writes (never over the shipped runs): ``$AUDIT_REFERENCE_RUNS_DIR``
    or ``.audit-data/reference-runs`` in the working directory."""
    return Path(os.environ.get(ENV_RUNS_DIR, ".audit-data/reference-runs"))


def _card_paths(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"*/{CARD_FILE}"))


def _dir_key(root: Path) -> tuple:
    """Cache key: the card files and their mtimes (a re-run of ``reproduce`` invalidates the cache)."""
    return tuple((str(p), p.stat().st_mtime_ns) for p in _card_paths(root))


@lru_cache(maxsize=4)
def _load_cards(root: str, key: tuple) -> tuple[dict, ...]:
    cards = []
    for path_str, _ in key:
        path = Path(path_str)
        try:
            card = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        card["_dir"] = str(path.parent)
        cards.append(card)
    return tuple(cards)


def _cards() -> tuple[dict, ...]:
    root = reference_dir()
    return _load_cards(str(root), _dir_key(root))


# ----------------------------------------------------------------------------- listing
def _summary(card: dict) -> dict:
    return {
        "name": card["name"],
        "group": card["group"],
        "model": card["model"],
        "seed": card["seed"],
        "accuracy": card.get("accuracy"),
        "metrics": card.get("metrics"),
        "verdict": card.get("verdict"),
        "formats": sorted(fmt for fmt, f in MODEL_FILES.items() if (Path(card["_dir"]) / f).is_file()),
    }


def list_reference_runs() -> list[dict]:
    """Every shipped run: name, group, model, seed, accuracy, clean/noise metrics, verdict, formats."""
    return [_summary(c) for c in _cards()]


def get_reference_run(name: str) -> dict:
    """The run's full card (training settings, accuracy, audit metrics per condition, paper's numbers).

    Raises ``KeyError`` if no run has that name.
    """
    for card in _cards():
        if card["name"] == name:
            return {k: v for k, v in card.items() if not k.startswith("_")}
    known = ", ".join(c["name"] for c in _cards()) or "none shipped"
    raise KeyError(f"Expected a reference run name ({known}), but got {name!r}")


def reference_model_path(name: str, fmt: str = "onnx") -> Path:
    """Path of the run's model file, ``fmt`` ``"onnx"`` or ``"torchscript"``; KeyError if either is unknown."""
    if fmt not in MODEL_FILES:
        raise KeyError(f"Expected a model format in {', '.join(MODEL_FILES)}, but got {fmt!r}")
    for card in _cards():
        if card["name"] == name:
            path = Path(card["_dir"]) / MODEL_FILES[fmt]
            if not path.is_file():
                raise KeyError(f"Expected run {name!r} to ship {MODEL_FILES[fmt]}, but it is missing")
            return path
    get_reference_run(name)  # raises the KeyError naming the known runs
    raise KeyError(name)  # pragma: no cover


# ----------------------------------------------------------------------------- profiles
class _NamedMetrics(BaseModel):
    """What a profile reads of a condition: its name and metric means (a report's condition or a card's)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    metrics: ConditionMetrics = Field(default_factory=ConditionMetrics)


class _ProfileGroup(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    spec: Any = None


class _Profiled(BaseModel):
    """What a profile reads of a report: its group and its conditions (a full ``Report`` or a partial dict)."""

    model_config = ConfigDict(extra="ignore")

    group: _ProfileGroup | None = None
    conditions: list[_NamedMetrics] = Field(default_factory=list)


def _profiled(report: Report | dict) -> _Profiled:
    return _Profiled.model_validate(report.to_json() if isinstance(report, Report) else report)


def profile_vector(conditions: Iterable[Any]) -> dict[str, float | None]:
    """The scale-free metric vector {"clean.DI": ..., "noise.SI": ...} of a report's (or a card's) conditions."""
    by_name: dict[str, ConditionMetrics] = {}
    for c in conditions:
        named = c if isinstance(c, BaseModel) else _NamedMetrics.model_validate(c)
        by_name.setdefault(named.name, named.metrics)
    out: dict[str, float | None] = {}
    for cond in PROFILE_CONDITIONS:
        m = by_name.get(cond)
        for metric in PROFILE_METRICS:
            v = None if m is None else m.get(metric)
            out[f"{cond}.{metric}"] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return out


def _feature(key: str, value: float) -> float:
    """LI_normalized and DI (errors that span decades) enter on a log scale; SI and agreement as they are."""
    if key.rpartition(".")[2] in (Metric.LI_NORMALIZED, Metric.DI):
        return math.log10(max(value, 0.0) + _LOG_FLOOR) / 4.0
    return value


def _distance(a: dict[str, float | None], b: dict[str, float | None]) -> tuple[float, list[tuple[str, float]]]:
    diffs = [(k, _feature(k, a[k]) - _feature(k, b[k])) for k in a if a.get(k) is not None and b.get(k) is not None]
    if not diffs:
        return math.inf, []
    return math.sqrt(sum(d * d for _, d in diffs) / len(diffs)), diffs


def reference_profiles() -> list[dict]:
    """One profile per (group, model): the mean metric vector over the shipped seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for card in _cards():
        conditions = card.get("audit", {}).get("conditions")
        if conditions:
            groups.setdefault((card["group"], card["model"]), []).append(profile_vector(conditions))
    profiles = []
    for (group, model), vectors in sorted(groups.items()):
        mean: dict[str, float | None] = {}
        for key in vectors[0]:
            vals = [v[key] for v in vectors if v.get(key) is not None]
            mean[key] = sum(vals) / len(vals) if vals else None
        profiles.append({"name": f"{group}_{model}", "group": group, "model": model, "n_runs": len(vectors),
                         "vector": mean})
    return profiles


def _report_group(report: _Profiled) -> str | None:
    """The reference group name (R4 / T3) if the report audited the same group, else None."""
    from .groups import GROUP_SPECS

    section = report.group or _ProfileGroup()
    spec = section.spec if "spec" in section.model_fields_set else {"name": section.name}
    if not isinstance(spec, dict):
        return None
    for name, ref in GROUP_SPECS.items():
        if spec.get("name") != ref["name"]:
            continue
        if all(spec.get(k, v) == v for k, v in ref.items()) and spec.get("axis", -1) in (-1, 2, 3):
            return name
    return None


_MODEL_WORDS = {
    "WT": "weight-tied (genuinely invariant by construction)",
    "DA": "augmentation-only (learned invariance: predictions invariant, logits and saliency not)",
    "IR": "augmentation + invariance regularizer (learned invariance close to genuine)",
}


def closest_profile(report: Report | dict) -> dict | None:
    """The reference profile (WT / DA / IR of the audited group if it is R4 or T3, else of any group) whose
    clean + noise vector of LI_normalized, DI, SI, agreement is closest to the report's; None if no reference
    runs are shipped or the report has none of these metrics.

    Distance: root-mean-square difference over the metrics both sides have, with LI_normalized and DI on a
    log10 scale (divided by 4, floor 1e-4) and SI / agreement as they are; 0 is identical, ~0.5 is far.
    """
    profiled = _profiled(report)
    target = profile_vector(profiled.conditions)
    if all(v is None for v in target.values()):
        return None
    profiles = reference_profiles()
    group = _report_group(profiled)
    same_group = [p for p in profiles if p["group"] == group] if group else []
    candidates = same_group or profiles
    best = None
    for p in candidates:
        dist, diffs = _distance(target, p["vector"])
        if best is None or dist < best[0]:
            best = (dist, p, diffs)
    if best is None or not math.isfinite(best[0]):
        return None
    dist, p, diffs = best
    ranked = sorted(diffs, key=lambda kv: -abs(kv[1]))[:2]
    differ = ", ".join(f"{k} ({target[k]:.3g} vs {p['vector'][k]:.3g})" for k, _ in ranked if abs(_) > 0.05)
    scope = f"among the {group} reference runs" if same_group else "among all reference runs (other group)"
    explanation = (f"Closest {scope}: {p['name']}, the {_MODEL_WORDS[p['model']]}; RMS distance {dist:.3f} over "
                   f"{len(diffs)} scale-free metrics of the clean and noise conditions"
                   + (f"; largest differences: {differ}" if differ else "; no metric differs by more than 0.05")
                   + ".")
    return ReferenceProfile(name=p["name"], model=p["model"], group=p["group"], distance=round(dist, 4),
                            explanation=explanation, vector=target, reference_vector=p["vector"]).to_json()


def closest_reference_profile(report: Report) -> ReferenceProfile | None:
    """The closest shipped run with the runs of its group (for the report's chart), or None for a ``trivial``
    model (resembling a reference run would mean nothing) and when no runs ship. Called where reports are made
    for people (the job worker, the CLI), outside the sandbox and outside the core library, which never reads
    the reference runs."""
    try:
        found = closest_profile(report) if report.verdict.label != "trivial" else None
        if found is None:
            return None
        runs = [p for p in reference_profiles() if p["group"] == found["group"]]
        return ReferenceProfile.model_validate({**found, "runs": runs})
    except Exception:  # noqa: BLE001 - a courtesy, never a reason to fail an audit
        return None


def attach_reference_profile(report: dict) -> dict:
    """``closest_reference_profile`` set on a report dict (the CLI's and the tests' audits), in place."""
    profile = closest_reference_profile(Report.model_validate(report))
    report.update(reference_profile=profile.to_json() if profile is not None else None)
    return report


# ----------------------------------------------------------------------------- policy calibration
def _values(model: str, key: str) -> list[float]:
    out = []
    for card in _cards():
        if card["model"] != model:
            continue
        v = profile_vector(card.get("audit", {}).get("conditions") or []).get(key)
        if v is not None:
            out.append(v)
    return out


#: An exactly invariant model measures 0 in float32 on the CPU; other runtimes / devices may add rounding noise
#: of about this size, so suggested "max" thresholds are never put below it.
FLOAT_NOISE_FLOOR = 1e-7


def _geo_mid(lo: float, hi: float) -> float:
    lo, hi = max(lo, FLOAT_NOISE_FLOOR), max(hi, FLOAT_NOISE_FLOOR)
    return math.sqrt(lo * hi)


def calibrated_policy_notes() -> dict:
    """Where each verdict threshold sits between the genuine (WT) and learned (DA, IR) reference runs.

    For every ``Policy`` field: the metric's range per reference model on the clean and the noise condition,
    whether the current default lets every WT run pass and fails every DA / IR run on at least one of the two
    conditions, and a suggested value in the gap (geometric mid-point for error metrics, with the WT side
    floored at ``FLOAT_NOISE_FLOOR``; arithmetic mid-point for SI / agreement).
    """
    from audit_service.engine.spec import Policy

    policy = Policy()
    cards = _cards()
    if not cards:
        return {"policy": policy.model_dump(), "runs": [], "fields": {},
                "note": "no reference runs shipped; run `audit-service reference reproduce`"}

    def values(model: str, cond: str, metric: str) -> list[float]:
        return _values(model, f"{cond}.{metric}")

    fields: dict[str, dict] = {}
    clean, noise = ConditionName.CLEAN, ConditionName.NOISE
    for field_name, metric in (("genuine_li_normalized_max", Metric.LI_NORMALIZED), ("genuine_di_max", Metric.DI),
                               ("genuine_si_min", Metric.SI), ("genuine_agreement_min", Metric.AGREEMENT)):
        direction = METRICS[metric].kind
        current = getattr(policy, field_name)
        passes = (lambda v: v <= current) if direction == "max" else (lambda v: v >= current)
        entry: dict = {"current": current, "metric": str(metric)}
        for model in ("WT", "DA", "IR"):
            entry[model] = {cond: _range(values(model, cond, metric)) for cond in PROFILE_CONDITIONS}
        wt = values("WT", clean, metric) + values("WT", noise, metric)
        entry["WT_passes"] = bool(wt) and all(passes(v) for v in wt)
        for model in ("DA", "IR"):
            per_run = _per_run(model, metric)
            entry[f"{model}_fails"] = bool(per_run) and all(not all(passes(v) for v in vs) for vs in per_run)
        learned = values("DA", clean, metric) + values("DA", noise, metric)
        if wt and learned:
            if direction == "max":
                lo, hi = max(wt), min(learned)
                entry["suggested"] = _geo_mid(lo, hi) if lo < hi else None
            else:
                lo, hi = max(learned), min(wt)
                entry["suggested"] = (lo + hi) / 2 if lo < hi else None
        fields[field_name] = entry
    for field_name, metric in (("learned_agreement_min", Metric.AGREEMENT), ("learned_di_max", Metric.DI)):
        direction = METRICS[metric].kind
        current = getattr(policy, field_name)
        entry = {"current": current, "metric": f"{clean} {metric}",
                 **{m: _range(values(m, clean, metric)) for m in ("WT", "DA", "IR")}}
        learned_vals = values("DA", clean, metric) + values("IR", clean, metric)
        if learned_vals:
            entry["DA_IR_pass"] = (min(learned_vals) >= current if direction == "min"
                                   else max(learned_vals) <= current)
        fields[field_name] = entry
    runs = [{"name": c["name"], "verdict": c.get("verdict"), "accuracy": c.get("accuracy"),
             **profile_vector(c.get("audit", {}).get("conditions") or [])} for c in cards]
    return {
        "policy": {"name": policy.name, "version": policy.version},
        "fields": fields,
        "runs": runs,
        "method": ("A `genuine` threshold must be passed by every weight-tied (WT) run on clean probes and on pure "
                   "noise; every augmentation-only (DA) and regularized (IR) run must fail the genuine criteria "
                   "on at least one of the two conditions (IR fails on noise: its invariance is learned). The "
                   "suggestion is the mid-point of the WT-DA gap (geometric for error metrics, floored at float "
                   "rounding noise). `learned` thresholds must be passed by DA and IR on clean probes."),
    }


def _per_run(model: str, metric: str) -> list[list[float]]:
    out = []
    for card in _cards():
        if card["model"] == model:
            vec = profile_vector(card.get("audit", {}).get("conditions") or [])
            vs = [vec[f"{cond}.{metric}"] for cond in PROFILE_CONDITIONS if vec.get(f"{cond}.{metric}") is not None]
            if vs:
                out.append(vs)
    return out


def _range(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "max": max(values), "n": len(values)}
