"""Continuous rotations, sampled: ``n_angles`` evenly spaced angles in [0, 360), interpolated (inexact).

Element k rotates the (H, W) plane (last two axes) counter-clockwise by ``360 k / n_angles`` degrees about
the image centre, exactly as ``torchvision.transforms.v2.functional.rotate(x, angle, interpolation)``
does (same sampling grid, ``align_corners=False``, zero fill outside the image), but for all angles in
one batched ``grid_sample``. The inverse of element k rotates by ``-angle``. Because pixels are
re-sampled and corners leave the frame, ``g^{-1}(g x) != x``: :meth:`interpolation_error` measures how
far off the round trip is on the caller's probes so the report can put the invariance errors in scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..spec import RotationSpec
from .base import Group, check_orbit_size, require_square_image


class SampledRotationGroup(Group):
    exact = False

    def __init__(self, spec: RotationSpec, input_shape: tuple[int, ...]) -> None:
        self.spec = spec
        self.input_shape = tuple(input_shape)
        self.order = spec.n_angles
        self.angles = [360.0 * k / spec.n_angles for k in range(spec.n_angles)]
        self.element_names = ["e"] + [f"rot{a:g}" for a in self.angles[1:]]
        self.interpolation = spec.interpolation
        self.name = f"rotation(n_angles={spec.n_angles}, {spec.interpolation})"
        self.note = None
        self._grids: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _grid_pair(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._grids:
            h, w = self.input_shape[-2:]
            rad = torch.tensor([math.radians(a) for a in self.angles], dtype=torch.float64)
            grids = []
            for sign in (1.0, -1.0):
                c, s = torch.cos(sign * rad), torch.sin(sign * rad)
                zero = torch.zeros_like(c)
                theta = torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1)], -2)
                grid = F.affine_grid(theta, [self.order, 1, h, w], align_corners=False)
                grids.append(grid.to(device=device, dtype=dtype))
            self._grids[key] = (grids[0], grids[1])
        return self._grids[key]

    def _sample(self, planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        # planes: (G, B, H, W) -> (G, B, H, W), plane b of row g sampled with grid g
        mode = "bilinear" if self.interpolation == "bilinear" else "nearest"
        return F.grid_sample(planes, grid, mode=mode, padding_mode="zeros", align_corners=False)

    @staticmethod
    def _floating(x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.float()

    def orbit(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 1, "probes")
        x = self._floating(x)
        n = x.shape[0]
        h, w = self.input_shape[-2:]
        grid, _ = self._grid_pair(x.device, x.dtype)
        planes = x.reshape(1, -1, h, w).expand(self.order, -1, h, w)
        out = self._sample(planes, grid)
        out[0] = x.reshape(-1, h, w)  # the identity is exact
        return out.reshape(self.order, n, *self.input_shape)

    def inverse_orbit(self, y: torch.Tensor) -> torch.Tensor:
        self._check_input(y, 2, "orbit values")
        y = self._floating(y)
        h, w = self.input_shape[-2:]
        _, inverse = self._grid_pair(y.device, y.dtype)
        planes = y.reshape(self.order, -1, h, w)
        out = self._sample(planes, inverse)
        out[0] = planes[0]
        return out.reshape(y.shape)

    def interpolation_error(self, x: torch.Tensor) -> float | None:
        """Mean over probes and non-identity angles of ``||g^{-1}(g x) - x|| / ||x||`` (probes with x = 0 skipped).

        Includes what rotating the corners out of the frame loses, so it is the whole inexactness of the action.
        """
        if self.order <= 1 or x.shape[0] == 0:
            return 0.0
        x = self._floating(x)
        back = self.inverse_orbit(self.orbit(x))[1:]
        n = x.shape[0]
        err = (back - x.unsqueeze(0)).reshape(self.order - 1, n, -1).norm(dim=2)
        ref = x.reshape(n, -1).norm(dim=1)
        keep = ref > 0
        if not bool(keep.any()):
            return 0.0
        return float((err[:, keep] / ref[keep]).mean())


def build_rotation(spec: RotationSpec, input_shape: tuple[int, ...], field: str = "group") -> SampledRotationGroup:
    require_square_image(input_shape, "rotations", field)
    check_orbit_size(spec.n_angles, input_shape, f"{field}.n_angles")
    return SampledRotationGroup(spec, input_shape)
