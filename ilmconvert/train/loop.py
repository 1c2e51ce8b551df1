"""The training loop's parts: device, network, optimizer, scheduler, one epoch, evaluation.

SGD with momentum comes from timm's optimizer factory (``opt='momentum'``; biases and norm
parameters get no weight decay, as timm does), the learning-rate schedule from timm's scheduler
factory, stepped per update. On CUDA the network runs in channels-last memory format under bf16
autocast; on CPU in float32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import IlmconvertError
from .data import mix_seed, to_input
from .distributed import SINGLE, Distributed
from .recipes import ConversionSettings, DataSettings, ModelSettings, TrainSettings

DEVICES = ("auto", "cpu", "cuda")


class TrainError(IlmconvertError):
    """Training cannot start or go on as asked (no CUDA, diverged loss, ...)."""


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.

    Raises:
        TrainError: unknown name, or ``cuda`` on a machine without CUDA.
    """
    if name not in DEVICES:
        raise TrainError(f"--device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


@dataclass
class Precision:
    """How the network runs on ``device``: bf16 autocast and channels-last on CUDA only."""

    device: torch.device

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"

    def context(self) -> Any:
        """The autocast context (disabled on CPU)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (channels-last on CUDA); returns it."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


# ------------------------------------------------------------------------------------------ network
def build_network(
    model: ModelSettings, conversion: ConversionSettings, num_classes: int, seed: int = 0
) -> nn.Module:
    """Create the recipe's network for ``num_classes`` classes and convert it to ILM Norm.

    Uses :func:`ilmconvert.create_model` (``pretrained`` as the recipe says), applies the recipe's
    adaptations (recorded in ``model.ilm_source`` so that :func:`ilmconvert.load` re-applies them)
    and :func:`ilmconvert.convert`. ``seed`` seeds the fresh weights.

    Raises:
        ModelSourceError, ConversionError: bad network name, kwargs, adaptation or settings.
    """
    from ..convert import convert
    from ..models import adapt, create_model

    torch.manual_seed(seed)
    network = create_model(model.name, pretrained=model.pretrained, num_classes=num_classes, **model.kwargs)
    for name in model.adaptations:
        adapt(network, name)
    convert(network, **conversion.model_dump())
    return network


def fit_classifier(network: nn.Module, num_classes: int) -> bool:
    """Resize the classifier of a converted network to ``num_classes`` when it differs.

    Returns:
        True when the head was replaced (freshly initialized), False when it already fit.
    """
    from ..models import classifier_size, resize_classifier

    if classifier_size(network) == num_classes:
        return False
    resize_classifier(network, num_classes)
    return True


# ------------------------------------------------------------------------------------------ optimization
#: Parameters that are decayed although they are 1-d: Proxy Norm's proxy shift and scale (the
#: authors' optimizer decays them and no other PN parameter; docs/design.md §8).
DECAYED_1D = ("proxy_weight", "proxy_bias")


def parameter_groups(network: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's weight-decay groups (``timm.optim.param_groups_weight_decay``: no decay for biases,
    1-d parameters and the model's ``no_weight_decay()``), except that :data:`DECAYED_1D`
    parameters are decayed."""
    from timm.optim import param_groups_weight_decay

    skip = network.no_weight_decay() if hasattr(network, "no_weight_decay") else ()
    groups = param_groups_weight_decay(network, weight_decay, no_weight_decay_list=skip)
    decayed = {id(p) for name, p in network.named_parameters() if name.rsplit(".", 1)[-1] in DECAYED_1D}
    if not decayed or not weight_decay:
        return groups
    moved = [p for g in groups if not g["weight_decay"] for p in g["params"] if id(p) in decayed]
    for g in groups:
        if not g["weight_decay"]:
            g["params"] = [p for p in g["params"] if id(p) not in decayed]
    return [g for g in groups if g["params"]] + [{"params": moved, "weight_decay": weight_decay}]


def create_optimizer(network: nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    """SGD with momentum through ``timm.optim.create_optimizer_v2(opt='momentum')``, with the weight
    decay groups of :func:`parameter_groups`."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        network,
        opt="momentum",
        lr=train.lr,
        weight_decay=train.weight_decay,
        momentum=train.momentum,
        param_group_fn=lambda model: parameter_groups(model, train.weight_decay),
    )


def check_scheduler(train: TrainSettings) -> None:
    """Build the recipe's scheduler on a throwaway optimizer, so that a bad ``sched`` is reported
    before anything is written.

    Raises:
        TrainError: a scheduler name or setting timm does not accept.
    """
    create_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr), train, 1)


def create_scheduler(optimizer: torch.optim.Optimizer, train: TrainSettings, updates_per_epoch: int) -> Any:
    """A per-update timm scheduler (``timm.scheduler.create_scheduler_v2``); ``None`` for ``sched: none``.

    Raises:
        TrainError: a scheduler name timm does not know.
    """
    from timm.scheduler import create_scheduler_v2

    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=train.sched,
            num_epochs=train.epochs,
            warmup_epochs=train.warmup_epochs,
            warmup_lr=train.warmup_lr,
            min_lr=train.min_lr,
            decay_milestones=train.decay_milestones,
            decay_epochs=train.decay_milestones[0] if train.decay_milestones else 30,
            decay_rate=train.decay_rate,
            step_on_epochs=False,
            updates_per_epoch=max(1, updates_per_epoch),
        )
    except (AssertionError, ValueError, TypeError) as err:
        raise TrainError(f"timm cannot create the {train.sched!r} scheduler: {err}") from None
    return scheduler


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, per k (k capped at the class count).

    Args:
        logits: (B, classes) float; target: (B,) int64.

    Returns:
        One 0-d int64 tensor (a count, not a percentage) per k, on ``logits``' device.
    """
    maxk = min(max(topk), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(target[:, None])
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk]


@dataclass
class Batches:
    """Hooks that let a caller draw progress: ``start(total)``, ``advance(loss)``, ``stop()``."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[Optional[float]], None] = lambda loss: None
    stop: Callable[[], None] = lambda: None


def train_one_epoch(
    network: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train: TrainSettings,
    data: DataSettings,
    precision: Precision,
    num_updates: int,
    batches: Batches | None = None,
    processes: Distributed = SINGLE,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (this process's shard when ``processes`` is distributed).

    Returns:
        (``{"train_loss", "train_top1" (percent), "images", "seconds", "images_per_s"}``,
        the update count after the epoch). Loss, top-1 and images are over all processes;
        ``images_per_s`` is all processes' images over this process's seconds.

    Raises:
        TrainError: when the loss becomes NaN or infinite (lower the learning rate).
    """
    batches = batches or Batches()
    criterion = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    network.train()
    device = precision.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    batches.start(len(loader))
    start = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        x = to_input(images, data.mean, data.std, device, precision.channels_last)
        y = labels.to(device, non_blocking=True)
        with precision.context():
            logits = network(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        num_updates += 1
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        loss_sum += loss.detach().double() * y.shape[0]
        correct += accuracy_counts(logits.detach(), y, (1,))[0]
        seen += y.shape[0]
        shown = None
        if step % 10 == 0:
            shown = float(loss.detach())
            if not math.isfinite(shown):
                raise TrainError(f"the training loss became {shown} at update {num_updates}; lower --lr")
        batches.advance(shown)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    batches.stop()
    loss_sum, correct, seen = _summed(processes, loss_sum, correct, seen)
    mean_loss = loss_sum / max(1, seen)
    if not math.isfinite(mean_loss):
        raise TrainError(f"the training loss became {mean_loss} in this epoch; lower --lr")
    return {
        "train_loss": mean_loss,
        "train_top1": 100.0 * correct / max(1, seen),
        "images": int(seen),
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }, num_updates


def _summed(processes: Distributed, *values: torch.Tensor | int) -> list[float]:
    """Each value summed over the processes (float64: exact for counts below 2**53), computed on
    the device of the tensors among ``values`` (NCCL reduces CUDA tensors only)."""
    device = next(v.device for v in values if isinstance(v, torch.Tensor))
    total = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return [float(v) for v in processes.all_sum(total)]


@torch.no_grad()
def evaluate(
    network: nn.Module,
    loader: DataLoader,
    data: DataSettings,
    precision: Precision,
    batches: Batches | None = None,
    processes: Distributed = SINGLE,
) -> dict[str, float]:
    """Cross-entropy loss and top-1 / top-5 accuracy of ``network`` over ``loader``; when
    ``processes`` is distributed, over the union of every process's (disjoint) slice.

    Returns:
        ``{"loss" (mean, nats), "top1", "top5" (percent), "images" (count), "seconds"}``.
    """
    batches = batches or Batches()
    network.eval()
    device = precision.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    hits = torch.zeros(2, device=device, dtype=torch.int64)
    seen = 0
    batches.start(len(loader))
    start = time.perf_counter()
    for images, labels in loader:
        x = to_input(images, data.mean, data.std, device, precision.channels_last)
        y = labels.to(device, non_blocking=True)
        with precision.context():
            logits = network(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        hits += torch.stack(accuracy_counts(logits, y, (1, 5)))
        seen += y.shape[0]
        batches.advance(None)
    batches.stop()
    loss_sum, top1, top5, seen = _summed(processes, loss_sum, hits[0], hits[1], seen)
    n = max(1, seen)
    return {
        "loss": loss_sum / n,
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "images": int(seen),
        "seconds": time.perf_counter() - start,
    }


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch intra-op threads on CPU; restores the previous count."""
    previous = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make every random draw of ``epoch`` a pure function of (seed, epoch, rank).

    Seeds torch's global generator (dropout, drop-path and other randomness in the network: per
    process, so with ``rank``), the loader's generator (its workers' start-up seed) and the
    epoch of the loader's sampler (:class:`~ilmconvert.train.data.EpochSampler`: data order and
    each image's augmentation; the same for every rank). Nothing drawn before the epoch (network
    initialization, earlier epochs, loader workers' state) then changes it, so an epoch run after
    ``--resume`` replays the uninterrupted run's epoch exactly.
    """
    torch.manual_seed(mix_seed(seed, epoch, rank, 2))
    if loader.generator is not None:
        loader.generator.manual_seed(mix_seed(seed, epoch, rank, 3))
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
