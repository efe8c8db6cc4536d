"""The report's saliency examples: the sweep's worst-similarity pairs (``sweep.keep_worst``) as small JSON.

Each example carries the thresholded, filtered maps SI compares, small copies of the probe and of g x and the raw
|integrated gradients|, bounded in size whatever the model's input (the HTML report draws them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sweep import ConditionResult

EXAMPLE_MAX_SIDE = 48
#: at most this many values per example map, whatever the input's rank or size (the report stays bounded)
EXAMPLE_MAX_VALUES = EXAMPLE_MAX_SIDE * EXAMPLE_MAX_SIDE


def saliency_examples(results: list[ConditionResult], element_names: list[str]) -> list[dict]:
    """Every condition's kept pairs, in report order (the report's ``saliency_examples``)."""
    return [_example(kept, r.condition.name, element_names) for r in results for kept in r.worst]


def _example(kept: dict, condition: str, element_names: list[str]) -> dict:
    """One kept pair as the report's JSON (a score of -2 marks an undefined similarity).

    Beside the thresholded, filtered maps in x's frame (``map_x``, ``map_gx_aligned``: what SI compares)
    it carries small copies of the probe and of g x (``image_x``, ``image_gx``, channels kept) and the raw
    |integrated gradients| of each in its own frame (``raw_x``, ``raw_gx``), for the HTML report.
    """
    out = {
        "condition": condition,
        "probe": kept["probe"],
        "element": element_names[kept["element"]],
        "similarity": None if kept["score"] == -2.0 else round(kept["score"], 6),
        "LI": round(kept.get("li", 0.0), 6),
        "map_x": _example_map(kept["map_x"]),
        "map_gx_aligned": _example_map(kept["map_gx_aligned"]),
    }
    for key in ("image_x", "image_gx"):
        if key in kept:
            out[key] = _example_image(kept[key])
    for key in ("raw_x", "raw_gx"):
        if key in kept:
            out[key] = _example_map(kept[key])
    return out


def _example_image(x: torch.Tensor) -> list:
    """A probe small enough for JSON: (C, H, W) with channels kept, at most 48 px a side; 1-D features
    as they are (at most 256); 3 decimals."""
    x = x.detach().float()
    if x.ndim >= 3:
        x = x.reshape(-1, *x.shape[-2:])
        if max(x.shape[-2:]) > EXAMPLE_MAX_SIDE:
            side = (min(x.shape[-2], EXAMPLE_MAX_SIDE), min(x.shape[-1], EXAMPLE_MAX_SIDE))
            x = F.adaptive_avg_pool2d(x[None], side)[0]
    elif x.ndim == 2 and max(x.shape) > EXAMPLE_MAX_SIDE:
        side = (min(x.shape[0], EXAMPLE_MAX_SIDE), min(x.shape[1], EXAMPLE_MAX_SIDE))
        x = F.adaptive_avg_pool2d(x[None, None], side)[0, 0]
    elif x.ndim == 1:
        x = x[:256]

    def rounded(v):
        return [rounded(u) for u in v] if isinstance(v, list) else round(v, 3)

    return rounded(x.cpu().tolist())


def _example_map(m: torch.Tensor) -> list:
    """A saliency map small enough for JSON, for any input rank: channels summed (rank >= 3), images
    average-pooled to at most 48 px a side, 1-D maps to at most ``EXAMPLE_MAX_VALUES`` values; 4 decimals.
    The size of the report therefore does not grow with the size of the model's input."""
    m = m.detach().float()
    if m.ndim >= 3:
        m = m.reshape(-1, *m.shape[-2:]).sum(0)
    if m.ndim == 0:
        m = m.reshape(1)
    if m.ndim == 2 and max(m.shape) > EXAMPLE_MAX_SIDE:
        side = (min(m.shape[0], EXAMPLE_MAX_SIDE), min(m.shape[1], EXAMPLE_MAX_SIDE))
        m = F.adaptive_avg_pool2d(m[None, None], side)[0, 0]
    if m.ndim == 1 and m.shape[0] > EXAMPLE_MAX_VALUES:
        m = F.adaptive_avg_pool1d(m[None, None], EXAMPLE_MAX_VALUES)[0, 0]
    return (
        [[round(v, 4) for v in row] for row in m.cpu().tolist()]
        if m.ndim == 2
        else [round(v, 4) for v in m.cpu().tolist()]
    )
