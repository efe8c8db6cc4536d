"""Spread of a metric: per-probe percentiles and a bootstrap 95% interval of the mean."""

from __future__ import annotations

import numpy as np


def summarize(values: np.ndarray, n_bootstrap: int = 200, seed: int = 0) -> dict | None:
    """{mean, p5, p50, p95, ci95: [lo, hi], se, n} over the finite per-probe values; None if there are none.

    ``ci95`` is the bootstrap interval of the mean (``n_bootstrap`` resamples; without them, [mean, mean]);
    ``se`` the standard error of the mean (sample std / sqrt(n)), for the normal interval and for how many
    probes would narrow an interval to a given width (``verdict.borderline``)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    mean = float(values.mean())
    out: dict[str, float | int | list[float]] = {
        "mean": mean,
        "p5": float(p5),
        "p50": float(p50),
        "p95": float(p95),
        "se": se,
        "n": int(values.size),
    }
    if n_bootstrap > 0 and values.size > 1:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, values.size, size=(n_bootstrap, values.size))
        means = values[idx].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out["ci95"] = [float(lo), float(hi)]
    else:
        out["ci95"] = [mean, mean]
    return out
