"""Spectral sensitivity: singular values of the input-output Jacobian (C x D) per probe.

A network that is "invariant" because it barely reacts to anything has a tiny sigma_max; the
paper's invariance regularizer works partly through this spectral decay.
"""

from __future__ import annotations

from typing import Callable

import torch


#: samples per Jacobian pass (probes x classes of one block)
JACOBIAN_BATCH = 256


def jacobian(module: torch.nn.Module, x: torch.Tensor, max_batch: int = JACOBIAN_BATCH) -> torch.Tensor:
    """(P, *S) -> (P, C, D) by reverse mode. The probes are repeated once per class of a block (at most
    ``max_batch`` samples a pass) and copy c is differentiated for class c: every graph is differentiated
    once, without ``retain_graph``, so a module that runs in another process (``jobs.cage``) frees each graph
    as it is used and holds one at a time."""
    p = x.shape[0]
    x = x.detach()
    with torch.no_grad():
        n_classes = module(x[:1]).shape[1]
    per_pass = max(1, max_batch // max(p, 1))
    blocks = []
    for first in range(0, n_classes, per_pass):
        k = min(per_pass, n_classes - first)
        rep = x.repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)  # (k*P, *S), class-major
        with torch.enable_grad():
            out = module(rep)
            pick = torch.zeros_like(out)
            pick.view(k, p, n_classes)[torch.arange(k), :, first + torch.arange(k)] = 1.0
            (g,) = torch.autograd.grad(out, rep, grad_outputs=pick)
        blocks.append(g.reshape(k, p, -1))
    return torch.cat(blocks).transpose(0, 1).detach()


def finite_difference_jacobian_sketch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_directions: int = 64,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gradient-free estimate: J @ Q for k random orthonormal directions Q (D x k), by central
    differences, scaled by sqrt(D/k) so its singular values estimate J's. Returns (P, C, k)."""
    p = x.shape[0]
    d = x[0].numel()
    k = min(n_directions, d)
    q, _ = torch.linalg.qr(torch.randn(d, k, device=x.device, dtype=torch.float64, generator=generator))
    q = q.to(x.dtype)
    dirs = q.T.reshape(k, *x.shape[1:])  # (k, *S)
    step = eps * x.reshape(p, -1).abs().amax(dim=1).clamp_min(1.0)  # (P,)
    shaped = step.view(p, 1, *([1] * (x.ndim - 1)))
    plus = (x.unsqueeze(1) + shaped * dirs.unsqueeze(0)).reshape(p * k, *x.shape[1:])
    minus = (x.unsqueeze(1) - shaped * dirs.unsqueeze(0)).reshape(p * k, *x.shape[1:])
    diff = (forward(plus) - forward(minus)).reshape(p, k, -1) / (2 * step.view(p, 1, 1))
    return diff.transpose(1, 2) * (d / k) ** 0.5


def singular_values(jac: torch.Tensor) -> torch.Tensor:
    """(P, C, D) -> (P, min(C, D)) in descending order (float64 for small singular values)."""
    return torch.linalg.svdvals(jac.double())
