"""The readable HTML report: the verdict and what it means first, then metrics per condition (table and
metric-vs-severity plots with the policy's bounds), saliency a person can read for the worst probes,
where the model sits among the reference runs, the Jacobian spectrum, and the paper's definitions.

``render_report_html(report, job=None, base_url=None) -> str``: a single self-contained page (plots are
inline base64 PNGs rendered with matplotlib's Agg backend; no external assets, no scripts).
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from typing import Any, Iterable

from jinja2 import Environment, PackageLoader, select_autoescape

from ..names import DISPLAY_ORDER, METRICS as METRIC_TABLE, ConditionName, Metric
from ..schema import (
    Condition,
    ReferenceProfile,
    Report,
    ReportPolicy,
    SaliencyExample,
    Sensitivity,
    Timing,
    Verdict,
    find_condition,
    parse_report,
)

#: the table's columns and the plots, in display order (``engine.names``)
METRICS = DISPLAY_ORDER
#: which direction is good, for the table's hints
BETTER = {m: METRIC_TABLE[m].better for m in METRICS}
#: metrics drawn on a log axis when they span decades (errors that are 0 for a genuine model)
LOG_METRICS = tuple(m for m in METRICS if METRIC_TABLE[m].better == "low")
#: below this a metric is floating-point round-off of 0
ROUND_OFF = 1e-9
#: how many of the worst (x, g) pairs the saliency section shows per condition
SALIENCY_PER_CONDITION = 3

_env = Environment(
    loader=PackageLoader("audit_service.engine.report", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

#: one plain paragraph per label: what it means, what to do
MEANING = {
    "genuine": (
        "The model's outputs and its saliency stay the same across the group on the probes, under every "
        "input shift and on pure noise: the invariance is built into the network (weight-tying, group "
        "pooling or orbit averaging), not learned from data. It is safe to rely on under distribution shift; "
        "nothing to do."
    ),
    "learned": (
        "The model's predictions are invariant on data like the probes, but its logits or its saliency "
        "change across the group, or the invariance degrades under shift: it was learned from data "
        "(augmentation) and holds only on data like the probes. Do not rely on it for shifted inputs. To make "
        "it genuine, wrap the model in orbit averaging (symmetrization: average the logits over the group, "
        "invariant by construction), use a weight-tied architecture, or train with an invariance regularizer "
        "(the paper's L + ν·LI) until SI ≥ 0.95."
    ),
    "incidental": (
        "The model's predictions are invariant on the probes, but the labels show it has not learned the "
        "task (its orbit accuracy is near the majority-label rate): the invariance comes from the "
        "architecture (global pooling makes random networks nearly flip-invariant), not from data. "
        "Nothing was learned; the gate does not pass it. Audit the trained weights, with labels."
    ),
    "undecided": (
        "The model's predictions are invariant on the probes, but without labels the audit cannot tell "
        "learned invariance from the incidental invariance of an untrained network (both hold on data "
        "and degrade off it). Submit labels with the probes to decide; the default gate does not pass "
        "an undecided verdict (add `undecided` to `require` to accept it knowingly)."
    ),
    "not_invariant": (
        "The model's predictions already change when the group acts on in-distribution probes: it "
        "is not invariant to this group. If it should be, train with augmentation and an invariance "
        "regularizer, or use orbit averaging (symmetrization) or a weight-tied architecture; if it "
        "should not be (e.g. 6 vs 9 under rotation), the group is the wrong one to require."
    ),
    "not_genuine": (
        "Genuine invariance fails, and without in-distribution probes the audit cannot tell learned "
        "invariance from none. Submit probes (and labels if you have them) to decide; the fixes are the "
        "same as for learned: orbit averaging, weight-tying or an invariance regularizer."
    ),
    "trivial": (
        "The model's output barely depends on its input (constant logits, all-zero saliency, or one class "
        "for everything). It is “invariant” only because it ignores the input, so it is useless as a "
        "classifier and fails every gate. Check that the right weights were exported and that the inputs "
        "are preprocessed as in training."
    ),
}

DEFINITIONS = [
    (
        "DI",
        "predictive-distribution invariance error",
        "DI = E<sub>x,g</sub> KL( softmax f(x) ‖ softmax f(gx) )",
        "0 is perfect.",
    ),
    (
        "LI",
        "logit invariance error",
        "LI = E<sub>x,g</sub> ½ ‖f(x) − f(gx)‖²",
        "0 is perfect; stricter than DI, and depends on the logits' scale.",
    ),
    (
        "SI",
        "saliency invariance similarity",
        "SI = E<sub>x,g</sub> cos( m(x), g<sup>−1</sup> m(gx) )",
        "1 is perfect. m is |integrated gradients| of the target logit, values below 0.9 × max set to 0, then a "
        "Gaussian filter (kernel 3, σ 1); g<sup>−1</sup> maps gx's saliency back onto x's frame. Undefined for an "
        "all-zero map.",
    ),
    (
        "LI_normalized",
        "scale-free logit error",
        "LI<sub>norm</sub> = E<sub>x,g</sub> ‖f(x) − f(gx)‖² / E<sub>x,x′</sub> ‖f(x) − f(x′)‖²",
        "≈0 invariant; ≈1 the group moves the logits as much as changing the input.",
    ),
    (
        "agreement",
        "prediction agreement",
        "agreement = P( argmax f(gx) = argmax f(x) )",
        "1 is perfect; compare with its chance level.",
    ),
    (
        "σ<sub>max</sub>",
        "sensitivity",
        "largest singular value of the input-output Jacobian ∂f/∂x",
        "small values mean the model reacts little to any input (spectral decay).",
    ),
]


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
    if v == 0 or abs(v) < ROUND_OFF:
        return "0" if v == 0 else "0 (< 1e-9)"
    if abs(v) < 1e-3 or abs(v) >= 1e4:
        return f"{v:.2e}"
    return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.2f}"


def _spread_text(spread: Any) -> str:
    if spread is None:
        return ""
    ci = spread.ci95
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"95% CI [{fmt(ci[0])}, {fmt(ci[1])}]"
    return f"p5–p95 [{fmt(spread.p5)}, {fmt(spread.p95)}]"


def _severity(cond: Condition) -> tuple[str, float] | None:
    """(shift family, severity on one axis) for plotting; clean is severity 0 of every family."""
    shift = cond.shift
    if shift is None:
        return None
    if shift.takes_beta:
        return f"{shift.name}({shift.target}) β", float(shift.beta or 0.0)
    return str(shift.name), float(shift.severity_or_default)


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


# --------------------------------------------------------------------------- verdict
#: the verdict's reason topics as the page groups them, in the page's order
REASON_GROUPS = {
    "label": "Why this label",
    "borderline": "Borderline",
    "require_confident": "Borderline",
    "genuine_failure": "Genuine criteria missed",
    "warning": "Warnings",
}


def _short(text: str, headline: str, detail: str | None) -> dict:
    """A long headline folds: its first words as the summary, the whole sentence as the detail."""
    if detail and len(headline) <= 90:
        return {"short": headline, "detail": detail}
    return (
        {"short": text, "detail": ""}
        if len(text) <= 110
        else {"short": text[:100].rsplit(" ", 1)[0] + " …", "detail": text}
    )


def grouped_reasons(verdict: Verdict) -> list[dict]:
    """The verdict's reasons as short groups ({title, entries: [{short, detail}]}) for folding, read from the
    structured reasons (``reason_details``); a report without them lists its sentences as they are."""
    groups: dict[str, list[dict]] = {}
    if verdict.reason_details is None:
        for text in verdict.reasons:
            groups.setdefault(REASON_GROUPS["label"], []).append(_short(text, text, None))
    for reason in verdict.reason_details or []:
        if reason.topic == "heading":
            continue
        if reason.topic == "genuine_failure":
            entry = {
                "short": f"{reason.criterion} outside {reason.requirement} on {len(reason.misses)} of "
                f"{reason.n_conditions} conditions",
                "detail": reason.detail or "",
            }
        elif reason.topic == "label":
            entry = _short(reason.text, reason.headline, reason.detail)
        else:
            entry = {"short": reason.headline, "detail": reason.detail or ""}
        groups.setdefault(REASON_GROUPS.get(reason.topic, REASON_GROUPS["label"]), []).append(entry)
    order = dict.fromkeys(REASON_GROUPS.values())
    return [{"title": t, "entries": groups[t]} for t in order if t in groups]


#: the policy's bounds drawn on each metric's plot: (label, threshold field)
_BOUNDS = {
    Metric.LI_NORMALIZED: [("genuine", "genuine_li_normalized_max")],
    Metric.DI: [("genuine", "genuine_di_max"), ("learned (clean)", "learned_di_max")],
    Metric.SI: [("genuine", "genuine_si_min")],
    Metric.AGREEMENT: [("genuine", "genuine_agreement_min"), ("learned (clean)", "learned_agreement_min")],
}


def _bands(metric: Metric, policy: ReportPolicy | None) -> list[tuple[str, str, float]]:
    """(kind, label, bound) lines to draw: kind 'max' (good below) or 'min' (good above), from the table."""
    if policy is None:
        return []
    out: list[tuple[str, str, float]] = []
    for label, key in _BOUNDS.get(metric, []):
        b = _num(getattr(policy, key, None))
        if b is not None:
            out.append((METRIC_TABLE[metric].kind, label, b))
    return out


# --------------------------------------------------------------------------- plots
def _use_log(values: list[float | None], bands: list[tuple[str, str, float]], metric: str) -> bool:
    if metric not in LOG_METRICS:
        return False
    pos = [v for v in values if v is not None and v > 0] + [b for k, _, b in bands if b > 0]
    if not pos:
        return False
    return max(pos) / max(min(pos), ROUND_OFF) >= 100 or any(v is not None and v < ROUND_OFF for v in values)


def severity_plots(conditions: list[Condition], policy: ReportPolicy | None = None) -> list[dict]:
    """One plot per metric: metric vs shift severity, a line per shift family, clean at severity 0, the pure
    noise condition as a dashed line and the policy's genuine / learned bounds as shaded bands."""
    families: dict[str, list[tuple[float, Condition]]] = {}
    for cond in conditions:
        sev = _severity(cond)
        if sev is not None:
            families.setdefault(sev[0], []).append((sev[1], cond))
    if not families:
        return []
    clean = find_condition(conditions, ConditionName.CLEAN)
    noise = find_condition(conditions, ConditionName.NOISE)
    plt = _pyplot()
    plots = []
    for metric in METRICS:

        def value(c: Condition | None) -> float | None:
            return None if c is None else _num(c.metric(metric))

        values = [value(c) for c in conditions]
        if all(v is None for v in values):
            continue
        bands = _bands(metric, policy)
        log = _use_log(values, bands, metric)

        def shown(v: float | None) -> float:
            if v is None:
                return float("nan")
            return max(v, ROUND_OFF) if log else v

        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        for family, points in sorted(families.items()):
            pts = sorted(points, key=lambda p: p[0])
            xs, ys = [p[0] for p in pts], [value(p[1]) for p in pts]
            if clean is not None:
                xs, ys = [0.0, *xs], [value(clean), *ys]
            ax.plot(xs, [shown(y) for y in ys], marker="o", label=family)
        if value(noise) is not None:
            ax.axhline(shown(value(noise)), color="grey", linestyle="--", linewidth=1, label="pure noise")
        if log:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Attempting to set identical")
                ax.set_yscale("log")
        finite = [shown(v) for v in values if v is not None]
        low, high = min(finite + [b for _, _, b in bands]), max(finite + [b for _, _, b in bands])
        if log:
            ax.set_ylim(ROUND_OFF / 3, max(high * 3, ROUND_OFF * 10))
            if min(finite) <= ROUND_OFF:
                ax.axhline(ROUND_OFF, color="#999", linewidth=0.6)
                ax.annotate(
                    "0 (< 1e-9)",
                    (0.01, ROUND_OFF),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="#555",
                    va="bottom",
                )
        elif METRIC_TABLE[metric].better == "high":  # rates and similarities in [0, 1]
            ax.set_ylim(min(0.0, low) - 0.05, 1.05)
        else:
            span = max(high - low, 1e-6 * max(abs(high), 1.0), 1e-9)
            ax.set_ylim(low - 0.1 * span, high + 0.1 * span)
        bottom, top = ax.get_ylim()
        colours = {"genuine": "#2e9d4a", "learned (clean)": "#d39b00"}
        for kind, label, b in bands:
            colour = colours.get(label, "#888")
            if kind == "max":
                ax.axhspan(bottom, max(min(b, top), bottom), color=colour, alpha=0.12)
            else:
                ax.axhspan(min(max(b, bottom), top), top, color=colour, alpha=0.12)
            if bottom <= b <= top:
                ax.axhline(b, color=colour, linewidth=1, linestyle=":", label=f"{label} bound ({b:g})")
        ax.set_ylim(bottom, top)
        ax.set_xlabel("shift severity (β for blend)")
        ax.set_ylabel(metric + (" (log)" if log else ""))
        ax.set_title(f"{metric} vs shift severity ({BETTER[metric]} is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        plots.append({"metric": metric, "src": _png(fig)})
    return plots


def _rank_key(e: SaliencyExample) -> tuple[float, float]:
    """Worst first: lowest similarity (undefined first), ties to the larger logit error LI."""
    sim = _num(e.similarity)
    li = _num(e.LI)
    return (-2.0 if sim is None else sim, -(li or 0.0))


def _as_image(arr: Any) -> Any:
    """(C, H, W) / (H, W) list -> a float array (H, W) or (H, W, 3) scaled to [0, 1] for display; None if 1-D."""
    import numpy as np

    try:
        a = np.asarray(arr, dtype=float)
    except (TypeError, ValueError):
        return None
    if a.ndim == 3:
        a = a.transpose(1, 2, 0) if a.shape[0] == 3 else a.mean(axis=0)
    if a.ndim not in (2, 3) or not a.size:
        return None
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)


def _heat_panel(ax: Any, plt: Any, image: Any, heat: Any, vmax: float, title: str, masked: bool) -> Any:
    import numpy as np

    if image is not None:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    data = np.ma.masked_less_equal(heat, 0) if masked else heat
    mappable = ax.imshow(
        data, cmap="inferno", vmin=0, vmax=vmax, alpha=0.6 if image is not None else 1.0, interpolation="nearest"
    )
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return mappable


def _saliency_image_figure(e: SaliencyExample, plt: Any) -> str | None:
    """2 x 2 panels: the probe and g x with raw |IG| over each; x with m(x) and with g^-1 m(gx) (the pair SI
    compares); one colour scale per row (share of the row's largest value)."""
    import numpy as np

    try:
        a = np.asarray(e.map_x, dtype=float)
        b = np.asarray(e.map_gx_aligned, dtype=float)
    except (TypeError, ValueError):
        return None
    if a.ndim != 2 or b.shape != a.shape:
        return None
    img_x, img_gx = _as_image(e.image_x), _as_image(e.image_gx)
    if img_x is not None and img_x.shape[:2] != a.shape:
        img_x = img_gx = None
    raw = None
    try:
        if e.raw_x is not None and e.raw_gx is not None:
            raw = (np.asarray(e.raw_x, dtype=float), np.asarray(e.raw_gx, dtype=float))
            if raw[0].shape != a.shape or raw[1].shape != a.shape:
                raw = None
    except (TypeError, ValueError):
        raw = None
    rows = [("thresholded", (img_x, a, "x + m(x)"), (img_x, b, "x + g⁻¹ m(gx)"))]
    if raw is not None:
        rows.insert(0, ("raw |IG|", (img_x, raw[0], "x + |IG(x)|"), (img_gx, raw[1], "g·x + |IG(g·x)|")))
    fig, axes = plt.subplots(len(rows), 2, figsize=(4.4, 2.2 * len(rows)), squeeze=False)
    for r, (label, left, right) in enumerate(rows):
        peak = max(float(np.nanmax(left[1])), float(np.nanmax(right[1])))
        vmax = peak if peak > 0 else 1.0
        masked = label == "thresholded"
        _heat_panel(axes[r, 0], plt, left[0], left[1] / vmax, 1.0, left[2], masked)
        m = _heat_panel(axes[r, 1], plt, right[0], right[1] / vmax, 1.0, right[2], masked)
        bar = fig.colorbar(m, ax=list(axes[r]), fraction=0.046, pad=0.04)
        bar.set_label(f"{label}\n(share of max {peak:.2g})", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    return _png(fig)


def _saliency_bar_figure(e: SaliencyExample, plt: Any) -> str | None:
    """Inputs without image axes: the features of x and g x, and their saliency, as bar charts."""
    import numpy as np

    try:
        a = np.asarray(e.map_x, dtype=float).ravel()
        b = np.asarray(e.map_gx_aligned, dtype=float).ravel()
    except (TypeError, ValueError):
        return None
    if a.shape != b.shape or not a.size:
        return None
    idx = np.arange(a.size)
    panels = []
    if e.image_x is not None and e.image_gx is not None:
        panels.append(
            ("features", np.asarray(e.image_x, float).ravel(), np.asarray(e.image_gx, float).ravel(), "x", "g·x")
        )
    if e.raw_x is not None and e.raw_gx is not None:
        panels.append(
            (
                "raw |IG|",
                np.asarray(e.raw_x, float).ravel(),
                np.asarray(e.raw_gx, float).ravel(),
                "|IG(x)|",
                "|IG(g·x)|",
            )
        )
    panels.append(("thresholded", a, b, "m(x)", "g⁻¹ m(gx)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(4.8, 1.6 * len(panels)), squeeze=False)
    for ax, (title, left, right, l_label, r_label) in zip(axes[:, 0], panels):
        n = min(left.size, right.size, idx.size)
        ax.bar(idx[:n] - 0.2, left[:n], width=0.4, label=l_label, color="#4a6fa5")
        ax.bar(idx[:n] + 0.2, right[:n], width=0.4, label=r_label, color="#d9743a")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("feature index", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def saliency_figures(
    examples: Iterable[SaliencyExample | dict], per_condition: int = SALIENCY_PER_CONDITION
) -> list[dict]:
    """The worst probes of each condition (lowest similarity first, ties to the larger LI), with the
    probe and g x under their heat maps (image inputs) or bar charts of the features (other inputs)."""
    usable = [SaliencyExample.model_validate(e) if isinstance(e, dict) else e for e in examples]
    usable.sort(key=_rank_key)
    if not usable:
        return []
    import numpy as np

    plt = _pyplot()
    figures: list = []
    counts: dict[str, int] = {}
    for e in usable:
        cond = e.condition
        if counts.get(cond, 0) >= per_condition:
            continue
        try:
            ndim = np.asarray(e.map_x, dtype=float).ndim
        except (TypeError, ValueError):
            continue
        src = _saliency_image_figure(e, plt) if ndim == 2 else _saliency_bar_figure(e, plt) if ndim == 1 else None
        if src is None:
            continue
        counts[cond] = counts.get(cond, 0) + 1
        sim = _num(e.similarity)
        figures.append(
            {
                "condition": cond,
                "probe": e.probe,
                "element": e.element,
                "similarity": "undefined (a zero map)" if sim is None else fmt(sim),
                "li": fmt(e.LI),
                "src": src,
            }
        )
    return figures


def spectrum_plot(sensitivity: Sensitivity) -> str | None:
    spectrum = [v for v in sensitivity.spectrum if _num(v) is not None]
    if not spectrum:
        return None
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    ax.bar(range(1, len(spectrum) + 1), spectrum, color="#4a6fa5")
    if all(v > 0 for v in spectrum) and max(spectrum) / min(spectrum) >= 100:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("singular value index (1 = σ_max)")
    ax.set_ylabel("mean singular value")
    ax.set_title("Input-output Jacobian spectrum", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


_RUN_COLOURS = {"WT": "#2e9d4a", "DA": "#d9743a", "IR": "#4a6fa5"}


def reference_plot(profile: ReferenceProfile) -> str | None:
    """This model's scale-free metrics among the reference runs of its group (WT / DA / IR), one row per
    metric; LI_normalized and DI on a log axis, SI and agreement on [0, 1]."""
    mine = profile.vector
    closest = f"{profile.name} (closest)"
    sources = [
        (p.vector, "s", _RUN_COLOURS.get(p.model, "#2c3e50"), closest if p.name == profile.name else p.name)
        for p in profile.runs
    ]
    if not sources:
        sources = [(profile.reference_vector, "s", "#2c3e50", closest)]
    sources.append((mine, "o", "#c0392b", "this model"))
    keys = [k for k in mine if any(_num(src.get(k)) is not None for src, *_ in sources)]
    if not keys:
        return None
    plt = _pyplot()
    log_keys = [k for k in keys if k.rpartition(".")[2] in LOG_METRICS]
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 0.35 * len(keys) + 1.0), sharey=True)
    for ax, log in ((axes[0], True), (axes[1], False)):
        for i, k in enumerate(keys):
            if (k in log_keys) != log:
                continue
            for source, marker, colour, name in sources:
                v = _num(source.get(k))
                if v is not None:
                    size = 8 if name == "this model" else 6
                    ax.plot(
                        max(v, ROUND_OFF) if log else v,
                        i,
                        marker,
                        color=colour,
                        label=name,
                        alpha=0.85,
                        markersize=size,
                        markerfacecolor="none" if name == closest else colour,
                    )
        if log:
            ax.set_xscale("log")
            ax.set_xlim(ROUND_OFF / 3, 10)
            ax.set_title("LI_normalized, DI (log; 0 drawn at 1e-9)", fontsize=8)
        else:
            ax.set_xlim(-0.05, 1.05)
            ax.set_title("SI, agreement", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels(keys, fontsize=7)
    axes[0].invert_yaxis()
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- page
def timing_text(timing: Timing | dict) -> str:
    """The report's timing as one readable line."""
    if isinstance(timing, dict):
        timing = Timing.model_validate(timing)

    def sec(v: Any) -> str:
        n = _num(v)
        return "—" if n is None else f"{n:.2f} s"

    given = timing.model_fields_set
    parts = []
    if "load_s" in given:
        parts.append(f"model load {sec(timing.load_s)}")
    if timing.conditions_s:
        parts.append("conditions " + ", ".join(f"{k} {sec(v)}" for k, v in timing.conditions_s.items()))
    if "sensitivity_s" in given:
        parts.append(f"Jacobian {sec(timing.sensitivity_s)}")
    if "total_s" in given:
        parts.append(f"total {sec(timing.total_s)}")
    if timing.device:
        parts.append(f"on {timing.device}")
    for k, v in (timing.model_extra or {}).items():  # stages a newer engine times
        if not isinstance(v, (dict, list)):
            parts.append(f"{k.removesuffix('_s').replace('_', ' ')} {sec(v) if k.endswith('_s') else v}")
    return " · ".join(parts)


def _borderline(verdict: Verdict) -> list[dict]:
    """The borderline criteria as table rows: which, its interval against its threshold, the probes that settle it."""
    out = []
    for c in verdict.borderline_criteria:
        interval: list[float | None] = list(c.interval) if c.interval else [None, None]
        needed = c.probes_to_settle
        out.append(
            {
                "where": f"{c.condition} {c.criterion}",
                "value": fmt(c.value),
                "interval": f"[{fmt(interval[0])}, {fmt(interval[1])}]",
                "bound": f"{'≥' if c.kind == 'min' else '≤'} {c.threshold} ({c.role})",
                "settle": (
                    f"about {needed} ({c.option}; now {c.n_probes})"
                    if needed
                    else "more probes cannot settle it at this estimate"
                ),
            }
        )
    return out


def _model_name(report: Report, job: dict) -> str | None:
    """The model's file name: from the report where a caller added one, else from the job's inputs."""
    extra = report.model.model_extra or {}
    for candidate in (
        extra.get("filename"),
        extra.get("name"),
        ((job.get("inputs") or {}).get("model") or {}).get("filename"),
    ):
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


def render_report_html(report: Report | dict, job: dict | None = None, base_url: str | None = None) -> str:
    """The page of a report (typed, or its JSON dict). ``base_url`` (e.g. ``http://host:8000/``) makes the JSON
    link absolute; without it the page (e.g. a file saved by ``submit --html``) has no link rather than a
    relative one that breaks. ``job``: the job's view, for its id, links and input file names."""
    report = parse_report(report)
    job = job or {}
    rows, paper_rows = [], []
    for cond in report.conditions:
        rows.append(
            {
                "name": cond.name,
                "n_probes": cond.n_probes,
                "cells": [{"value": fmt(cond.metric(m)), "spread": _spread_text(cond.spread.get(m))} for m in METRICS],
                "notes": cond.notes,
            }
        )
        if cond.paper_metrics is not None:
            paper_rows.append({"name": cond.name, "cells": [fmt(cond.paper_metrics.get(m)) for m in METRICS]})
    verdict = report.verdict
    label = verdict.label
    policy = verdict.policy
    sensitivity = report.sensitivity
    trivial = label == "trivial"
    profile = report.reference_profile if not trivial else None
    json_link = None
    report_path = (job.get("links") or {}).get("report")
    if base_url and report_path:
        json_link = base_url.rstrip("/") + "/" + str(report_path).lstrip("/")
    template = _env.get_template("report.html")
    return template.render(
        report=report,
        job=job,
        verdict=verdict,
        label=label,
        meaning=MEANING.get(label, ""),
        reason_groups=grouped_reasons(verdict),
        definitions=DEFINITIONS,
        policy=policy.model_dump(mode="json"),
        metrics=METRICS,
        better=BETTER,
        rows=rows,
        paper_rows=paper_rows,
        borderline=_borderline(verdict),
        plots=severity_plots(report.conditions, policy),
        saliency=saliency_figures(report.saliency_examples),
        spectrum=spectrum_plot(sensitivity),
        sensitivity=sensitivity,
        sigma=sensitivity.sigma_max.to_json() if sensitivity.sigma_max is not None else {"mean": None},
        fmt=fmt,
        model=report.model,
        model_name=_model_name(report, job),
        group=report.group,
        timing=timing_text(report.timing),
        profile=profile,
        profile_plot=reference_plot(profile) if profile else None,
        trivial_profile_hidden=trivial and report.reference_profile is not None,
        json_link=json_link,
    )
