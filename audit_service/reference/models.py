"""The paper's three 5-layer ReLU MLPs (hidden 128) on flattened 36x36 images.

* ``WT`` weight-tied: the first layer sees every transformed copy of the input through the same weights,
  ``h = max_g relu(W (g x) + b)`` (a lifting layer with group-tied weights followed by group max-pooling).
  The set {g x : g in G} is the same for x and any g'x, and ``max`` does not depend on the order of that set,
  so the network is exactly invariant: every later layer only sees ``h``.
* ``DA``: the plain MLP, trained on the orbits of the training digits (data augmentation).
* ``IR``: the same MLP and augmentation, plus ``nu * LI`` with LI the paper's logit invariance error
  (``metrics.training.orbit_logit_invariance``, the same LI the audit measures).

Every model starts with a fixed ``Normalize`` layer (train-split pixel mean / std), so it takes [0, 1] pixels
of shape (N, 1, 36, 36) and returns (N, 9) logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import INPUT_SHAPE, NUM_CLASSES
from .groups import permutation_table
from .names import MODEL_KINDS  # noqa: F401 - re-exported beside the architectures

HIDDEN = 128
DEPTH = 5  # linear layers


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _head(in_features: int, hidden: int, depth: int, num_classes: int) -> list[nn.Module]:
    """The layers after the first: (depth - 2) hidden ReLU layers and the classifier."""
    layers: list[nn.Module] = []
    for _ in range(depth - 2):
        layers += [nn.Linear(in_features if not layers else hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, num_classes))
    return layers


class MLP(nn.Module):
    """Plain 5-layer ReLU MLP (``DA`` and ``IR``)."""

    def __init__(self, mean: float, std: float, hidden: int = HIDDEN, depth: int = DEPTH,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        d = int(np.prod(INPUT_SHAPE))
        self.normalize = Normalize(mean, std)
        self.first = nn.Linear(d, hidden)
        self.head = nn.Sequential(*_head(hidden, hidden, depth, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalize(x.reshape(x.shape[0], -1))
        return self.head(torch.relu(self.first(z)))


class WeightTiedMLP(nn.Module):
    """``WT``: first layer ``max_g relu(W (g x) + b)`` over the group's permutation table, then the plain head."""

    def __init__(self, group: str, mean: float, std: float, hidden: int = HIDDEN, depth: int = DEPTH,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        table = np.array(permutation_table(group))
        d = table.shape[1]
        self.group_order = table.shape[0]
        self.normalize = Normalize(mean, std)
        # flat gather index: row g of the (G, D) table, concatenated; a buffer so ONNX/TorchScript carry it
        self.register_buffer("orbit_index", torch.tensor(table.reshape(-1), dtype=torch.int64))
        self.first = nn.Linear(d, hidden)
        self.head = nn.Sequential(*_head(hidden, hidden, depth, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        z = self.normalize(x.reshape(n, -1))
        d = z.shape[1]
        orbit = torch.index_select(z, 1, self.orbit_index).reshape(n, self.group_order, d)  # (N, G, D)
        h = torch.relu(self.first(orbit)).amax(dim=1)  # group max-pooling: order-free, so exact
        return self.head(h)


def build_model(kind: str, group: str, mean: float, std: float) -> nn.Module:
    """A fresh model of ``kind`` (WT / DA / IR) for ``group`` (R4 / T3); seed torch before calling."""
    if kind == "WT":
        return WeightTiedMLP(group, mean, std)
    if kind in ("DA", "IR"):
        return MLP(mean, std)
    raise KeyError(f"Expected a reference model in {', '.join(MODEL_KINDS)}, but got {kind!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
