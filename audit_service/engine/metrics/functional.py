"""The paper's invariance metrics as pure functions over one orbit batch (torchmetrics style).

Shapes: ``logits_x`` is (N, C), the logits of the probes; ``logits_gx`` is (G, N, C), the logits
of every group element applied to every probe (element 0 is the identity). Every function
returns per-pair values (G, N) so callers can average over g and x uniformly, as the paper does
(Moskalev et al. 2023, eqs. 1-3), and keep per-probe values for the spread.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_orbit_shapes(logits_x: torch.Tensor, logits_gx: torch.Tensor) -> None:
    if logits_x.ndim != 2:
        raise ValueError(f"Expected `logits_x` of shape (N, C), but got {tuple(logits_x.shape)}")
    if logits_gx.ndim != 3 or logits_gx.shape[1:] != logits_x.shape:
        raise ValueError(
            f"Expected `logits_gx` of shape (G, {logits_x.shape[0]}, {logits_x.shape[1]}), "
            f"but got {tuple(logits_gx.shape)}"
        )


def distribution_invariance_error(logits_x: torch.Tensor, logits_gx: torch.Tensor) -> torch.Tensor:
    """DI per pair: KL( softmax f(x) || softmax f(gx) ), computed in log space for stability."""
    _check_orbit_shapes(logits_x, logits_gx)
    log_p = F.log_softmax(logits_x.double(), dim=-1).unsqueeze(0)
    log_q = F.log_softmax(logits_gx.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.clamp_min(0.0).to(logits_x.dtype)


def squared_logit_distance(logits_x: torch.Tensor, logits_gx: torch.Tensor) -> torch.Tensor:
    """||f(x) - f(gx)||^2 per pair (the numerator of LI_normalized)."""
    _check_orbit_shapes(logits_x, logits_gx)
    diff = logits_gx.double() - logits_x.double().unsqueeze(0)
    return diff.pow(2).sum(-1).to(logits_x.dtype)


def logit_invariance_error(logits_x: torch.Tensor, logits_gx: torch.Tensor) -> torch.Tensor:
    """LI per pair: 1/2 ||f(x) - f(gx)||^2."""
    return 0.5 * squared_logit_distance(logits_x, logits_gx)


def prediction_agreement(logits_x: torch.Tensor, logits_gx: torch.Tensor) -> torch.Tensor:
    """1.0 where argmax f(gx) == argmax f(x), else 0.0, per pair."""
    _check_orbit_shapes(logits_x, logits_gx)
    return (logits_gx.argmax(-1) == logits_x.argmax(-1).unsqueeze(0)).to(logits_x.dtype)


def orbit_accuracy(logits_gx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where argmax f(gx) == y, per pair: the accuracy on the whole orbit."""
    if labels.ndim != 1 or labels.shape[0] != logits_gx.shape[1]:
        raise ValueError(f"Expected `labels` of shape ({logits_gx.shape[1]},), but got {tuple(labels.shape)}")
    return (logits_gx.argmax(-1) == labels.unsqueeze(0)).to(logits_gx.dtype)


def chance_agreement(counts_x: torch.Tensor, counts_gx: torch.Tensor) -> float:
    """The agreement expected by chance: sum_k p_k q_k for the predicted-class frequencies p at x and q
    on the orbit (Cohen's p_e). 1 when one class is predicted everywhere, 1/C for uniform predictions."""
    if counts_x.ndim != 1 or counts_x.shape != counts_gx.shape:
        raise ValueError(
            f"Expected two class-count vectors of one shape (C,), but got {tuple(counts_x.shape)} "
            f"and {tuple(counts_gx.shape)}"
        )
    total_x, total_gx = float(counts_x.sum()), float(counts_gx.sum())
    if total_x <= 0 or total_gx <= 0:
        raise ValueError("Expected at least one prediction on each side, but got an empty count vector")
    return float((counts_x.double() / total_x * counts_gx.double() / total_gx).sum())


def chance_corrected(observed: float | None, chance: float | None) -> float | None:
    """Cohen's kappa (observed - chance) / (1 - chance); None when chance is 1 (a single predicted class:
    agreement cannot beat chance) or either input is unknown. Also used for orbit accuracy against the
    majority-label rate."""
    if observed is None or chance is None or chance >= 1.0 - 1e-12:
        return None
    return (observed - chance) / (1.0 - chance)


def saliency_similarity(map_x: torch.Tensor, maps_gx_aligned: torch.Tensor) -> torch.Tensor:
    """SI per pair: cosine( m(x), g^-1 m(gx) ). NaN where either map is all zero (undefined cosine).

    ``map_x`` is (N, *S); ``maps_gx_aligned`` is (G, N, *S), already mapped back by g^-1.
    """
    if maps_gx_aligned.shape[1:] != map_x.shape:
        raise ValueError(
            f"Expected `maps_gx_aligned` of shape (G, {', '.join(map(str, map_x.shape))}), "
            f"but got {tuple(maps_gx_aligned.shape)}"
        )
    a = map_x.reshape(1, map_x.shape[0], -1).double()
    b = maps_gx_aligned.reshape(maps_gx_aligned.shape[0], map_x.shape[0], -1).double()
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (norm_a * norm_b)
    undefined = (norm_a == 0) | (norm_b == 0)
    return cos.masked_fill(undefined, float("nan")).to(map_x.dtype)


def sample_variation(logits: torch.Tensor) -> torch.Tensor:
    """E_{x,x'} ||f(x) - f(x')||^2 over all ordered pairs of probes = 2 * sum_c Var_c (population).

    The denominator of LI_normalized: how much logits move when the *input* changes.
    """
    if logits.ndim != 2:
        raise ValueError(f"Expected `logits` of shape (N, C), but got {tuple(logits.shape)}")
    return 2.0 * logits.double().var(dim=0, unbiased=False).sum()
