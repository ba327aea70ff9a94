"""Training: one loop, pluggable methods.

Methods (``TrainConfig.method``):

* ``standard``: cross-entropy on clean inputs;
* ``gaussian``: cross-entropy on ``x + N(0, σ²I)`` (Cohen et al. 2019: the base classifier of
  randomized smoothing is trained under the noise it will be smoothed with);
* later methods (GloRo, IBP / CROWN-IBP) register themselves in :data:`METHODS` (or lazily in
  :data:`LAZY_METHODS`) with the same :class:`Method` interface.

Everything random goes through one seeded ``torch.Generator``: the same seed on the same device
gives the same model.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from certaudit.errors import InputError
from certaudit.validate import positive


@dataclass
class TrainConfig:
    method: str = "standard"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | constant | step
    warmup_epochs: float = 0.0  # linear LR warm-up
    sigma: float | None = None  # gaussian
    eps: float | None = None  # certified training radius (gloro: l2, ibp: linf)
    eps_warmup: float = 0.3  # fraction of training over which eps ramps up from 0 (certified methods)
    augment: str = "none"  # none | flipcrop (CIFAR)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific options


@dataclass
class StepInfo:
    """What a method may need at each step."""

    epoch: int
    step: int
    total_steps: int
    generator: torch.Generator

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


class Method(Protocol):
    name: str
    needs: tuple[str, ...]

    def setup(self, model: nn.Module, config: TrainConfig) -> None: ...

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
             info: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Scalar loss and the logits used for the running training accuracy."""

    def meta(self, config: TrainConfig) -> dict[str, Any]:
        """Fields for :class:`certaudit.models.ModelMeta` (sigma / eps / norm)."""


class StandardMethod:
    name = "standard"
    needs: tuple[str, ...] = ()

    def setup(self, model: nn.Module, config: TrainConfig) -> None:
        return None

    def loss(self, model, x, y, config, info):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def meta(self, config: TrainConfig) -> dict[str, Any]:
        return {}


class GaussianMethod(StandardMethod):
    """Cross-entropy under Gaussian noise N(0, σ²I), the base classifier of randomized smoothing."""

    name = "gaussian"
    needs = ("sigma",)

    def loss(self, model, x, y, config, info):
        noise = torch.randn(x.shape, generator=info.generator, device=x.device, dtype=x.dtype)
        logits = model(x + config.sigma * noise)
        return F.cross_entropy(logits, y), logits

    def meta(self, config: TrainConfig) -> dict[str, Any]:
        return {"sigma": config.sigma, "norm": "l2"}


METHODS: dict[str, Method] = {"standard": StandardMethod(), "gaussian": GaussianMethod()}
# name -> "module:attribute" of a Method instance, imported on first use (certified methods).
LAZY_METHODS: dict[str, str] = {
    "crown-ibp": "certaudit.defenses.interval:CROWN_IBP", "ibp": "certaudit.defenses.interval:IBP",
    "gloro": "certaudit.defenses.lipschitz:GLORO_METHOD",
}


def get_method(name: str) -> Method:
    key = str(name).lower()
    if key in METHODS:
        return METHODS[key]
    if key in LAZY_METHODS:
        module, attr = LAZY_METHODS[key].split(":")
        METHODS[key] = getattr(importlib.import_module(module), attr)
        return METHODS[key]
    raise InputError(f"unknown training method {name!r}; choose one of: {', '.join(available_methods())}")


def available_methods() -> list[str]:
    return list(dict.fromkeys([*METHODS, *LAZY_METHODS]))


def check_config(config: TrainConfig) -> Method:
    method = get_method(config.method)
    if int(config.epochs) < 1:
        raise InputError(f"epochs must be >= 1, got {config.epochs}")
    if int(config.batch_size) < 1:
        raise InputError(f"batch size must be >= 1, got {config.batch_size}")
    positive(config.lr, "learning rate")
    if config.weight_decay < 0 or not math.isfinite(config.weight_decay):
        raise InputError(f"weight decay must be >= 0, got {config.weight_decay}")
    if config.optimizer not in ("adamw", "sgd"):
        raise InputError(f"unknown optimizer {config.optimizer!r}; choose adamw or sgd")
    if config.schedule not in ("cosine", "constant", "step"):
        raise InputError(f"unknown schedule {config.schedule!r}; choose cosine, constant or step")
    if config.augment not in ("none", "flipcrop"):
        raise InputError(f"unknown augmentation {config.augment!r}; choose none or flipcrop")
    for need in method.needs:
        value = getattr(config, need)
        if value is None:
            raise InputError(f"training method {method.name!r} needs --{need}")
        positive(value, need)
    if not 0.0 <= config.eps_warmup <= 1.0:
        raise InputError(f"eps warm-up must be a fraction in [0, 1], got {config.eps_warmup}")
    return method


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    test_accuracy: float | None
    seconds: float
    config: dict[str, Any]


def _lr_factor(config: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = config.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":  # /10 at 50% and 75% of training
        frac = step / max(1, total)
        return 0.01 if frac >= 0.75 else 0.1 if frac >= 0.5 else 1.0
    frac = (step - warm) / max(1.0, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind != "flipcrop":
        return x
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h))  # (B, H)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w))  # (B, W)
    idx_b = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             device: torch.device | None = None) -> float:
    """Clean accuracy, batched; data moved to the model's device chunk by chunk."""
    if len(y) == 0:
        raise InputError("cannot evaluate on an empty data set")
    dev = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dev)
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].to(dev, non_blocking=True)
        yb = y[i:i + batch_size].to(dev, non_blocking=True)
        correct += (model(xb).argmax(1) == yb).sum()
    model.train(was_training)
    return float(correct) / len(y)


def train(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, config: TrainConfig,
          x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
          device: torch.device | str = "cpu", progress: bool = True,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` in place with ``config``; evaluate clean test accuracy at each epoch end."""
    method = check_config(config)
    if x_train.dim() != 4 or x_train.shape[0] != y_train.shape[0] or x_train.shape[0] == 0:
        raise InputError(f"training data must be (N, C, H, W) with N labels, got {tuple(x_train.shape)} / {tuple(y_train.shape)}")
    dev = torch.device(device)
    model.to(dev)
    torch.manual_seed(config.seed)  # parameter init of layers created later by methods, if any
    gen = torch.Generator(device=dev)
    gen.manual_seed(config.seed)
    shuffle_gen = torch.Generator()
    shuffle_gen.manual_seed(config.seed)
    method.setup(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
    n = x_train.shape[0]
    bs = int(config.batch_size)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * int(config.epochs)
    x_dev = x_train.to(dev)
    y_dev = y_train.to(dev)
    k = int(y_train.max()) + 1  # classes scored for the running accuracy (methods may add a ⊥ logit)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    bar = _progress(progress)
    with bar:
        task = bar.add_task(f"train {method.name}", total=total)
        for epoch in range(int(config.epochs)):
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=shuffle_gen).to(dev)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), dtype=torch.long, device=dev)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                xb = _augment(x_dev[idx], config.augment, gen)
                yb = y_dev[idx]
                for g in opt.param_groups:
                    g["lr"] = config.lr * _lr_factor(config, step, total, steps_per_epoch)
                info = StepInfo(epoch=epoch, step=step, total_steps=total, generator=gen)
                loss, logits = method.loss(model, xb, yb, config, info)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach()[:, :k].argmax(1) == yb).sum()
                step += 1
                bar.advance(task)
            row = {"epoch": epoch + 1, "loss": float(loss_sum) / n, "train_accuracy": float(correct) / n,
                   "seconds": time.perf_counter() - t0}
            if x_test is not None and y_test is not None:
                row["test_accuracy"] = accuracy(model, x_test, y_test, device=dev)
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    model.eval()
    test_acc = history[-1].get("test_accuracy") if history else None
    return TrainResult(history=history, test_accuracy=test_acc, seconds=time.perf_counter() - start,
                       config=asdict(config))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)
