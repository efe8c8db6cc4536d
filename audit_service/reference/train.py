"""Seeded, resumable training of one reference run (group x model x seed).

The paper's recipe: Adam, lr 8e-4, batch 512, model selection on validation accuracy (the best epoch's weights
are kept). ``DA`` and ``IR`` see the whole orbit of every training batch (all G transformed copies, so the
augmentation is exhaustive rather than sampled); ``IR`` adds ``nu * LI`` on that orbit. ``WT`` is exactly
invariant, so augmenting it would change nothing; it trains on the untransformed digits. Accuracies are
orbit accuracies: the mean over g of the accuracy on the transformed split (the paper's Transforming-MNIST).

Resumable: a run keeps its state in ``work_dir/<name>/`` (``state.npz``: weights, Adam moments and best
weights as plain arrays, read back with ``np.load(allow_pickle=False)``; ``state.json``: epoch, history,
config). Batches are shuffled by an RNG seeded with (seed, epoch), so a resumed run takes the same steps as an
uninterrupted one. A finished run has ``done.json``; training it again returns the stored result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import data_summary, load_digits
from .groups import GROUP_NAMES, group_order, orbit
from ..engine.metrics.training import orbit_logit_invariance
from .models import MODEL_KINDS, build_model, count_parameters
from .names import DEFAULT_EPOCHS
from ..engine.progress import ProgressFn


#: The IR weight per group (docs/reference.md, "Choosing nu"): tuned on validation SI as the paper does.
#: R4: the smallest of {1, 10, 30, 100} with validation SI >= 0.95 (10: SI 0.96). T3: none of
#: {3, 10, 30, 100} reached 0.95 (SI 0.91, 0.91, 0.91, 0.94); 100 came closest.
DEFAULT_NU = {"R4": 10.0, "T3": 100.0}
DEFAULT_PATIENCE = 60
LR = 8e-4
BATCH_SIZE = 512


@dataclass(frozen=True)
class TrainConfig:
    group: str
    model: str
    seed: int = 0
    epochs: int = DEFAULT_EPOCHS
    lr: float = LR
    batch_size: int = BATCH_SIZE
    nu: float = 0.0  # only IR uses it; 0 for WT/DA
    patience: int = 0  # stop after this many epochs without a better validation accuracy (0: never)

    def __post_init__(self) -> None:
        if self.group not in GROUP_NAMES:
            raise ValueError(f"Expected `group` in {', '.join(GROUP_NAMES)}, but got {self.group!r}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"Expected `model` in {', '.join(MODEL_KINDS)}, but got {self.model!r}")
        if self.epochs < 1:
            raise ValueError(f"Expected `epochs` >= 1, but got {self.epochs}")
        if self.model != "IR" and self.nu != 0.0:
            raise ValueError(f"Expected `nu` = 0 for {self.model} (only IR is regularized), but got {self.nu}")

    @classmethod
    def make(cls, group: str, model: str, seed: int = 0, epochs: int = DEFAULT_EPOCHS,
             nu: float | None = None, patience: int | None = None) -> "TrainConfig":
        if model == "IR":
            nu = DEFAULT_NU.get(group, 10.0) if nu is None else nu
        else:
            nu = 0.0
        patience = DEFAULT_PATIENCE if patience is None else patience
        return cls(group=group, model=model, seed=seed, epochs=epochs, nu=float(nu), patience=patience)

    @property
    def name(self) -> str:
        return run_name(self.group, self.model, self.seed)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def run_name(group: str, model: str, seed: int) -> str:
    return f"{group}_{model}_s{seed}"


def parse_run_name(name: str) -> tuple[str, str, int]:
    """``R4_WT_s0`` -> ("R4", "WT", 0); ValueError if it is not a reference run name."""
    parts = name.split("_")
    if len(parts) != 3 or parts[0] not in GROUP_NAMES or parts[1] not in MODEL_KINDS or not parts[2].startswith(
            "s") or not parts[2][1:].isdigit():
        raise ValueError(f"Expected a run name like R4_WT_s0 (group {'/'.join(GROUP_NAMES)}, model "
                         f"{'/'.join(MODEL_KINDS)}, seed), but got {name!r}")
    return parts[0], parts[1], int(parts[2][1:])


@dataclass
class TrainResult:
    config: TrainConfig
    model: torch.nn.Module  # best-epoch weights, eval mode
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    train_seconds: float
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """The card's ``training`` section."""
        return {
            **asdict(self.config),
            "digest": self.config.digest(),
            "optimizer": "Adam",
            "augmentation": ("none (exactly invariant by construction)" if self.config.model == "WT"
                             else f"full orbit of every batch ({group_order(self.config.group)} copies)"),
            "regularizer": ("nu * LI (paper eq. 2, logit invariance error on the batch orbit)"
                            if self.config.model == "IR" else None),
            "model_selection": "best validation orbit accuracy",
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "parameters": count_parameters(self.model),
            "train_seconds": round(self.train_seconds, 1),
            "torch": torch.__version__,
            "data": data_summary(),
        }


# ----------------------------------------------------------------------------- steps
def batch_loss(model: torch.nn.Module, config: TrainConfig, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, dict]:
    """The training objective on one batch: CE (over the orbit for DA/IR) + nu * LI for IR."""
    if config.model == "WT":
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return ce, {"ce": float(ce.detach())}
    xs = orbit(config.group, x)  # (G, B, 1, 36, 36), identity first
    g, b = xs.shape[:2]
    logits = model(xs.reshape(g * b, *x.shape[1:])).reshape(g, b, -1)
    ce = F.cross_entropy(logits.reshape(g * b, -1), y.repeat(g))
    if config.model == "DA":
        return ce, {"ce": float(ce.detach())}
    li = orbit_logit_invariance(logits)
    return ce + config.nu * li, {"ce": float(ce.detach()), "li": float(li.detach())}


@torch.no_grad()
def orbit_accuracy(model: torch.nn.Module, group: str, x: np.ndarray, y: np.ndarray,
                   batch_size: int = 1024) -> float:
    """Mean over g of the accuracy on g(x) (the Transforming-MNIST accuracy)."""
    model.eval()
    correct = 0
    total = 0
    for i in range(0, len(y), batch_size):
        xb = torch.tensor(x[i:i + batch_size])
        yb = torch.tensor(y[i:i + batch_size])
        xs = orbit(group, xb)
        g, b = xs.shape[:2]
        pred = model(xs.reshape(g * b, *xb.shape[1:])).argmax(-1).reshape(g, b)
        correct += int((pred == yb).sum())
        total += g * b
    return correct / total


# ----------------------------------------------------------------------------- state on disk
def _save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                best: dict[str, torch.Tensor], meta: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    for k, v in model.state_dict().items():
        arrays[f"model/{k}"] = v.detach().cpu().numpy()
    for k, v in best.items():
        arrays[f"best/{k}"] = v.detach().cpu().numpy()
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            arrays[f"opt/{idx}/{k}"] = torch.as_tensor(v).detach().cpu().numpy()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path / "state.npz")
    tmp_json = path / "state.tmp.json"
    tmp_json.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_json, path / "state.json")


def _load_arrays(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as z:
        return {k[len(prefix):]: torch.tensor(z[k]) for k in z.files if k.startswith(prefix)}


def _load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    npz = path / "state.npz"
    model.load_state_dict(_load_arrays(npz, "model/"))
    opt_arrays = _load_arrays(npz, "opt/")
    state: dict[int, dict] = {}
    for key, v in opt_arrays.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return _load_arrays(npz, "best/")


def load_weights(path: Path, model: torch.nn.Module, prefix: str = "best/") -> torch.nn.Module:
    """Load weights stored by this module (``state.npz`` or ``weights.npz``) into ``model``."""
    model.load_state_dict(_load_arrays(path, prefix))
    return model.eval()


# ----------------------------------------------------------------------------- the run
def train_run(config: TrainConfig, work_dir: str | Path, progress: ProgressFn | None = None,
              checkpoint_every: int = 10) -> TrainResult:
    """Train (or resume, or reload) one run; return the best-validation model and its accuracies."""
    data = load_digits()
    run_dir = Path(work_dir) / config.name
    done_file = run_dir / "done.json"
    state_file = run_dir / "state.json"
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.group, data.mean, data.std)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    report = progress or (lambda f, m: None)

    if done_file.is_file():
        meta = json.loads(done_file.read_text())
        if meta.get("digest") == config.digest():
            load_weights(run_dir / "state.npz", model)
            report(1.0, f"{config.name}: already trained (best epoch {meta['best_epoch']}), reusing")
            return TrainResult(config, model, meta["best_epoch"], meta["val_accuracy"], meta["test_accuracy"],
                               meta["train_seconds"], meta["history"])
        report(0.0, f"{config.name}: settings changed since the finished run, retraining")
        done_file.unlink()

    start_epoch, best_epoch, best_val, history, seconds = 0, -1, -1.0, [], 0.0
    best = {k: v.clone() for k, v in model.state_dict().items()}
    if state_file.is_file():
        meta = json.loads(state_file.read_text())
        if meta.get("digest") == config.digest():
            best = _load_state(run_dir, model, opt)
            start_epoch, best_epoch, best_val = meta["epoch"], meta["best_epoch"], meta["best_val"]
            history, seconds = meta["history"], meta["train_seconds"]
            report(start_epoch / config.epochs, f"{config.name}: resuming after epoch {start_epoch}")

    x_train = torch.tensor(np.array(data.train.x))
    y_train = torch.tensor(np.array(data.train.y))
    n = len(y_train)

    def meta(epoch: int) -> dict:
        return {"digest": config.digest(), "config": asdict(config), "epoch": epoch, "best_epoch": best_epoch,
                "best_val": best_val, "history": history, "train_seconds": seconds}

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.tensor(np.random.default_rng([config.seed, epoch]).permutation(n))
        sums: dict[str, float] = {}
        steps = 0
        for i in range(0, n, config.batch_size):
            idx = order[i:i + config.batch_size]
            loss, parts = batch_loss(model, config, x_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        val = orbit_accuracy(model, config.group, data.val.x, data.val.y)
        if val > best_val:
            best_val, best_epoch = val, epoch + 1
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "val_accuracy": round(val, 5),
                        **{k: round(v / steps, 6) for k, v in sums.items()}})
        msg = (f"{config.name}: epoch {epoch + 1}/{config.epochs} "
               + " ".join(f"{k}={v / steps:.4g}" for k, v in sums.items())
               + f" val_acc={val:.4f} (best {best_val:.4f} @ {best_epoch})")
        report((epoch + 1) / config.epochs, msg)
        stop = config.patience > 0 and epoch + 1 - best_epoch >= config.patience
        if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == config.epochs or stop:
            _save_state(run_dir, model, opt, best, meta(epoch + 1))
        if stop:
            report(1.0, f"{config.name}: no better validation accuracy for {config.patience} epochs, stopping")
            break

    model.load_state_dict(best)
    model.eval()
    test = orbit_accuracy(model, config.group, data.test.x, data.test.y)
    result = TrainResult(config, model, best_epoch, best_val, test, seconds, history)
    done = {**meta(len(history)), "val_accuracy": best_val, "test_accuracy": test}
    done_file.write_text(json.dumps(done, indent=1))
    return result
