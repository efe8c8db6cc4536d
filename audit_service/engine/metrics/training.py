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

from ..groups import Group, GroupLike, resolve_group
from .functional import distribution_invariance_error, logit_invariance_error, prediction_agreement

#: how a caller of the training faces gives the per-sample shape when its group is a spec
_SHAPE_HINT = "pass a batch x (its shape[1:] is the sample shape) or input_shape="


def orbit_logits(model: torch.nn.Module, x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """(N, *S) -> (G, N, C): the model on every element of the group applied to every sample, in one
    batch of G x N (gradients flow to the model's parameters and to ``x``). ``group`` is a built group or
    a spec (``"C4"``, a dict, ``C4Spec()``), built for ``x.shape[1:]``."""
    orbit = resolve_group(group, tuple(x.shape[1:]), how=_SHAPE_HINT).orbit(x)
    g, n = orbit.shape[0], orbit.shape[1]
    out = model(orbit.reshape(g * n, *orbit.shape[2:]))
    return out.reshape(g, n, -1)


def orbit_logit_invariance(logits: torch.Tensor) -> torch.Tensor:
    """LI of an orbit batch (G, N, C) whose row 0 is the identity, averaged over g and x (identity
    included), differentiable: ``functional.logit_invariance_error``, for callers holding the orbit's logits."""
    return logit_invariance_error(logits[0], logits).mean()


def logit_invariance_loss(model: torch.nn.Module, x: torch.Tensor, group: GroupLike) -> torch.Tensor:
    """Mean over samples and group elements of 1/2 ||f(x) - f(gx)||^2: a scalar to add to the loss.

    ``group``: ``"C4"``, a spec dict, a spec object or a built group (a spec is built for ``x.shape[1:]``)."""
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

    def __init__(self, group: GroupLike, input_shape: tuple[int, ...] | None = None) -> None:
        """``group``: a built group, or a spec (``"C4"``, a dict, ``C4Spec()``) built for ``input_shape`` when
        given, else for the first batch's ``x.shape[1:]``."""
        self._spec = group
        self.group: Group | None = (
            resolve_group(group, input_shape, how=_SHAPE_HINT)
            if isinstance(group, Group) or input_shape is not None
            else None
        )
        self.reset()

    def reset(self) -> None:
        self._sums: torch.Tensor | None = None  #: (LI, DI, agreement) summed over the pairs seen
        self._pairs = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        group = self._spec if self.group is None else self.group
        self.group = resolve_group(group, tuple(x.shape[1:]), how=_SHAPE_HINT)
        logits = orbit_logits(model, x, self.group)
        sums = torch.stack(
            [
                logit_invariance_error(logits[0], logits).double().sum(),
                distribution_invariance_error(logits[0], logits).double().sum(),
                prediction_agreement(logits[0], logits).double().sum(),
            ]
        )
        self._sums = sums if self._sums is None else self._sums + sums
        self._pairs += logits.shape[0] * logits.shape[1]

    def compute(self) -> OrbitInvarianceValue:
        if self._sums is None or not self._pairs:
            raise ValueError("Expected at least one update() before compute(), but got none")
        n = self._pairs
        li, di, agreement = self._sums.tolist()
        return OrbitInvarianceValue(LI=li / n, DI=di / n, agreement=agreement / n, n_pairs=n)
