"""The metrics in a training loop: the paper's invariance regularizer and a streaming metric.

``logit_invariance_loss(model, x, group)`` is the paper's ``I_f(D, G)`` with the logit error LI
(Moskalev et al. 2023, eq. 2 and section 4): differentiable, averaged over the probes and uniformly
over every group element, identity included, so ``loss + nu * logit_invariance_loss(...)`` is the IR
objective. ``OrbitInvariance`` accumulates LI, DI and agreement over batches with ``update`` /
``compute`` / ``reset``, like a torchmetrics metric, without depending on torchmetrics.

Both are the paper's identity-inclusive means: a report's ``paper_metrics``. The audit's verdict reads its
``metrics``, over g != e, which for a group of order |G| are |G| / (|G| - 1) times these for LI and DI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..groups import Group
from .functional import distribution_invariance_error, logit_invariance_error, prediction_agreement


def orbit_logits(model: torch.nn.Module, x: torch.Tensor, group: Group) -> torch.Tensor:
    """(N, *S) -> (G, N, C): the model on every element of the group applied to every sample, in one
    batch of G x N (gradients flow to the model's parameters and to ``x``)."""
    orbit = group.orbit(x)
    g, n = orbit.shape[0], orbit.shape[1]
    out = model(orbit.reshape(g * n, *orbit.shape[2:]))
    return out.reshape(g, n, -1)


def orbit_logit_invariance(logits: torch.Tensor) -> torch.Tensor:
    """LI of an orbit batch (G, N, C) whose row 0 is the identity: the mean over g and x of
    1/2 ||f(x) - f(gx)||^2, differentiable (for callers that have the orbit's logits already)."""
    diff = logits - logits[:1]
    return 0.5 * diff.pow(2).sum(-1).mean()


def logit_invariance_loss(model: torch.nn.Module, x: torch.Tensor, group: Group) -> torch.Tensor:
    """Mean over samples and group elements of 1/2 ||f(x) - f(gx)||^2: a scalar to add to the loss."""
    return orbit_logit_invariance(orbit_logits(model, x, group))


@dataclass(frozen=True)
class OrbitInvarianceValue:
    """What ``OrbitInvariance.compute`` returns: means over every (sample, element) pair seen."""

    LI: float
    DI: float
    agreement: float
    n_pairs: int


class OrbitInvariance:
    """Streaming LI / DI / agreement over batches: ``update(model, x)`` per batch, ``compute()`` at the
    end of an epoch, ``reset()`` before the next. Runs without gradients; sums are kept in float64 on
    the batches' device until ``compute`` (one host sync per epoch)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.reset()

    def reset(self) -> None:
        self._li = self._di = self._agree = None
        self._pairs = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        logits = orbit_logits(model, x, self.group)
        parts = (logit_invariance_error(logits[0], logits).double().sum(),
                 distribution_invariance_error(logits[0], logits).double().sum(),
                 prediction_agreement(logits[0], logits).double().sum())
        if self._li is None:
            self._li, self._di, self._agree = parts
        else:
            self._li, self._di, self._agree = self._li + parts[0], self._di + parts[1], self._agree + parts[2]
        self._pairs += logits.shape[0] * logits.shape[1]

    def compute(self) -> OrbitInvarianceValue:
        if not self._pairs:
            raise ValueError("Expected at least one update() before compute(), but got none")
        n = self._pairs
        return OrbitInvarianceValue(LI=float(self._li) / n, DI=float(self._di) / n,  # type: ignore[arg-type]
                                    agreement=float(self._agree) / n, n_pairs=n)  # type: ignore[arg-type]
