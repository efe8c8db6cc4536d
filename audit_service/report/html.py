"""The readable HTML report: verdict first, metrics per condition (table and metric-vs-severity plots),
saliency maps of x and g^-1 gx side by side for the worst probes, the Jacobian spectrum.

``render_report_html(report, job=None) -> str``: a single self-contained page (plots are inline
base64 PNGs rendered with matplotlib's Agg backend; no external assets).
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

METRICS = ("LI_normalized", "DI", "LI", "SI", "agreement", "accuracy")
#: which direction is good, for the table's hints
BETTER = {"LI_normalized": "low", "DI": "low", "LI": "low", "SI": "high", "agreement": "high", "accuracy": "high"}

_env = Environment(loader=PackageLoader("audit_service.report", "templates"),
                   autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def _num(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("mean", value.get("value"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def fmt(value: Any) -> str:
    v = _num(value)
    if v is None:
        return "—"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.2f}"


def _spread_text(spread: Any) -> str:
    if not isinstance(spread, dict):
        return ""
    ci = spread.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"95% CI [{fmt(ci[0])}, {fmt(ci[1])}]"
    if "p5" in spread and "p95" in spread:
        return f"p5–p95 [{fmt(spread['p5'])}, {fmt(spread['p95'])}]"
    return ""


def _conditions(report: dict) -> list[dict]:
    raw = report.get("conditions") or []
    if isinstance(raw, dict):
        raw = [{"name": k, **(v if isinstance(v, dict) else {})} for k, v in raw.items()]
    return [c for c in raw if isinstance(c, dict)]


def _severity(cond: dict) -> tuple[str, float] | None:
    """(shift family, severity on one axis) for plotting; clean is severity 0 of every family."""
    shift = cond.get("shift")
    if not isinstance(shift, dict):
        return None
    if shift.get("name") == "blend":
        return f"blend({shift.get('target', 'noise')}) β", float(shift.get("beta") or 0.0)
    return str(shift.get("name")), float(shift.get("severity") or 3)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def severity_plots(conditions: list[dict]) -> list[dict]:
    """One plot per metric: metric vs shift severity, a line per shift family, clean at severity 0."""
    families: dict[str, list[tuple[float, dict]]] = {}
    for cond in conditions:
        sev = _severity(cond)
        if sev is not None:
            families.setdefault(sev[0], []).append((sev[1], cond))
    if not families:
        return []
    clean = next((c for c in conditions if c.get("name") == "clean"), None)
    noise = next((c for c in conditions if c.get("name") == "noise"), None)
    plt = _pyplot()
    plots = []
    for metric in METRICS:
        if not any(_num((c.get("metrics") or {}).get(metric)) is not None for c in conditions):
            continue
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        for family, points in sorted(families.items()):
            pts = sorted(points, key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [_num((p[1].get("metrics") or {}).get(metric)) for p in pts]
            if clean is not None and not family.startswith("blend"):
                xs, ys = [0.0, *xs], [_num((clean.get("metrics") or {}).get(metric)), *ys]
            elif clean is not None:
                xs, ys = [0.0, *xs], [_num((clean.get("metrics") or {}).get(metric)), *ys]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=family)
        if noise is not None and _num((noise.get("metrics") or {}).get(metric)) is not None:
            ax.axhline(_num(noise["metrics"][metric]), color="grey", linestyle="--", linewidth=1, label="pure noise")
        ax.set_xlabel("shift severity (β for blend)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs shift severity ({BETTER[metric]} is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        plots.append({"metric": metric, "src": _png(fig)})
    return plots


def saliency_figures(examples: list[dict], limit: int = 6) -> list[dict]:
    """The worst probes (lowest similarity first): m(x) and g^-1 m(gx) side by side."""
    usable = [e for e in examples if isinstance(e, dict) and isinstance(e.get("map_x"), list)
              and isinstance(e.get("map_gx_aligned"), list)]
    usable.sort(key=lambda e: (_num(e.get("similarity")) if _num(e.get("similarity")) is not None else -2.0))
    if not usable:
        return []
    import numpy as np

    plt = _pyplot()
    figures = []
    for e in usable[:limit]:
        try:
            a = np.asarray(e["map_x"], dtype=float)
            b = np.asarray(e["map_gx_aligned"], dtype=float)
        except (TypeError, ValueError):
            continue
        if a.ndim != 2 or b.ndim != 2:
            continue
        vmax = max(float(np.nanmax(a)) if a.size else 0.0, float(np.nanmax(b)) if b.size else 0.0) or 1.0
        fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.3))
        for ax, img, title in ((axes[0], a, "m(x)"), (axes[1], b, "g⁻¹ m(gx)")):
            ax.imshow(img, cmap="inferno", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        figures.append({"condition": e.get("condition"), "probe": e.get("probe"), "element": e.get("element"),
                        "similarity": fmt(e.get("similarity")), "src": _png(fig)})
    return figures


def spectrum_plot(sensitivity: dict) -> str | None:
    spectrum = [v for v in (sensitivity.get("spectrum") or []) if _num(v) is not None]
    if not spectrum:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    ax.bar(range(1, len(spectrum) + 1), spectrum, color="#4a6fa5")
    if all(v > 0 for v in spectrum):
        ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("mean singular value")
    ax.set_title("Input-output Jacobian spectrum", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def render_report_html(report: dict, job: dict | None = None) -> str:
    conditions = _conditions(report)
    rows = []
    for cond in conditions:
        metrics = cond.get("metrics") or {}
        spread = cond.get("spread") or {}
        rows.append({"name": cond.get("name", "?"), "n_probes": cond.get("n_probes"),
                     "cells": [{"value": fmt(metrics.get(m)), "spread": _spread_text(spread.get(m))} for m in METRICS],
                     "notes": cond.get("notes") or []})
    verdict = report.get("verdict") or {}
    sensitivity = report.get("sensitivity") or {}
    sigma = sensitivity.get("sigma_max")
    template = _env.get_template("report.html")
    return template.render(
        report=report, job=job or {}, verdict=verdict, label=str(verdict.get("label", "unknown")),
        metrics=METRICS, better=BETTER, rows=rows, plots=severity_plots(conditions),
        saliency=saliency_figures(report.get("saliency_examples") or []),
        spectrum=spectrum_plot(sensitivity), sensitivity=sensitivity,
        sigma=sigma if isinstance(sigma, dict) else {"mean": sigma}, fmt=fmt,
        model=report.get("model") or {}, group=report.get("group") or {}, timing=report.get("timing") or {},
    )
