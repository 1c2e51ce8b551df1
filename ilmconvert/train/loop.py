"""The training loop's parts: device, network, optimizer, scheduler, one epoch, evaluation.

The optimizer comes from timm's optimizer factory (any ``opt``, default ``momentum``: SGD with
momentum; biases and norm parameters get no weight decay, as timm does; optional layer-wise decay),
the learning-rate schedule from timm's scheduler factory, stepped per update. An update is timm's
``train.py`` step: gradient accumulation, clipping (``dispatch_clip_grad``), fp16 with timm's
``NativeScaler``, ``ModelEmaV3`` after each update, ``Mixup`` / ``SoftTargetCrossEntropy``. By
default the network runs in channels-last memory format under bf16 autocast on CUDA, and in
float32 on CPU (``train.amp_dtype``, ``train.channels_last``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import IlmconvertError, first_line
from .data import seeded_globals
from .distributed import SINGLE, Distributed
from .loader import mix_seed, to_input
from .recipes import ConversionSettings, DataSettings, ModelSettings, TrainSettings
from .stopping import EpochPosition

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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How the network runs on ``device``.

    Attributes:
        amp_dtype: ``auto`` (bf16 autocast on CUDA, none on CPU), ``bf16``, ``fp16`` (autocast on
            any device; fp16 trains with a gradient scaler, :meth:`scaler`) or ``none``.
        memory_format: ``True`` / ``False`` for channels-last or not; ``None``: on CUDA only.
    """

    device: torch.device
    amp_dtype: str = "auto"
    memory_format: Optional[bool] = None

    @classmethod
    def of(cls, device: torch.device, train: TrainSettings) -> Precision:
        """The precision a recipe's ``train`` settings ask for on ``device``."""
        return cls(device, train.amp_dtype, train.channels_last)

    @property
    def autocast(self) -> bool:
        return self.amp_dtype in AMP_DTYPES or (self.amp_dtype == "auto" and self.device.type == "cuda")

    @property
    def dtype(self) -> torch.dtype:
        return AMP_DTYPES.get(self.amp_dtype, torch.bfloat16)

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda" if self.memory_format is None else self.memory_format

    def context(self) -> Any:
        """The autocast context (disabled without autocast)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast)

    def scaler(self) -> Any:
        """timm's ``NativeScaler`` (a ``torch.amp.GradScaler`` on ``device``) for fp16 autocast, else ``None``."""
        if not (self.autocast and self.dtype == torch.float16):
            return None
        from timm.utils import NativeScaler

        return NativeScaler(device=self.device.type)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (channels-last when asked); returns it."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


# ------------------------------------------------------------------------------------------ network
def build_network(
    model: ModelSettings,
    conversion: ConversionSettings,
    num_classes: int,
    seed: int = 0,
    weights: str | Path | None = None,
) -> nn.Module:
    """Create the recipe's network for ``num_classes`` classes and convert it to ILM Norm.

    Uses :func:`ilmconvert.create_model` (``pretrained`` as the recipe says), applies the recipe's
    adaptations (recorded in ``model.ilm_source`` so that :func:`ilmconvert.load` re-applies them)
    and :func:`ilmconvert.convert`. ``seed`` seeds the fresh weights; ``weights`` is a local weights
    file (safetensors or a state dict) to start from instead of the library's pretrained ones.

    Raises:
        ModelSourceError, ConversionError: bad network name, kwargs, adaptation or settings.
    """
    from ..convert import convert
    from ..models import adapt, create_model

    torch.manual_seed(seed)
    network = create_model(
        model.name, pretrained=model.pretrained, weights=weights, num_classes=num_classes, **model.kwargs
    )
    for name in model.adaptations:
        adapt(network, name)
    convert(network, **conversion.model_dump())
    return network


def fit_classifier(network: nn.Module, num_classes: int, seed: int | None = None) -> bool:
    """Resize the classifier of a converted network to ``num_classes`` when it differs.

    With ``seed``, the new head is drawn from torch's CPU generator seeded with it (the global
    state is restored afterwards): networks whose heads have the same shape get the same head,
    whatever else they hold (e.g. a pretrained network and its conversions, docs/study.md §3).

    Returns:
        True when the head was replaced (freshly initialized), False when it already fit.
    """
    from ..models import classifier_size, resize_classifier

    if classifier_size(network) == num_classes:
        return False
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        resize_classifier(network, num_classes)
    return True


# ------------------------------------------------------------------------------------------ optimization
#: Parameters that are decayed although they are 1-d: Proxy Norm's proxy shift and scale (the
#: authors' optimizer decays them and no other PN parameter; docs/design.md §8).
DECAYED_1D = ("proxy_weight", "proxy_bias")


def parameter_groups(network: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """timm's weight-decay groups (``timm.optim.param_groups_weight_decay``, or with ``layer_decay``
    ``param_groups_layer_decay``, whose groups carry an ``lr_scale``): no decay for biases, 1-d
    parameters and the model's ``no_weight_decay()``, except that :data:`DECAYED_1D` parameters are
    decayed. Frozen parameters (``requires_grad=False``) are left out."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = network.no_weight_decay() if hasattr(network, "no_weight_decay") else ()
    if layer_decay is not None:
        groups = param_groups_layer_decay(network, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(network, weight_decay, no_weight_decay_list=skip)
    decayed = {id(p) for name, p in network.named_parameters() if name.rsplit(".", 1)[-1] in DECAYED_1D}
    if not decayed or not weight_decay:
        return groups
    kept, moved = [], []
    for g in groups:
        if g["weight_decay"] or not any(id(p) in decayed for p in g["params"]):
            kept.append(g)
            continue
        rest = [p for p in g["params"] if id(p) not in decayed]
        if rest:
            kept.append({**g, "params": rest})
        moved.append({**g, "params": [p for p in g["params"] if id(p) in decayed], "weight_decay": weight_decay})
    return kept + moved


def create_optimizer(network: nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2(opt=train.opt)`` over the groups of :func:`parameter_groups`
    (with ``train.layer_decay``: each group's ``lr`` is ``lr * lr_scale``, as timm's schedulers set it).

    Raises:
        TrainError: an optimizer name or setting timm does not accept, or no trainable parameter.
    """
    from timm.optim import create_optimizer_v2

    extra: dict[str, Any] = {}
    if train.opt_eps is not None:
        extra["eps"] = train.opt_eps
    if train.opt_betas is not None:
        extra["betas"] = tuple(train.opt_betas)
    groups = parameter_groups(network, train.weight_decay, train.layer_decay)
    if not any(g["params"] for g in groups):
        raise TrainError(f"train.trainable: {train.trainable} leaves no parameter to train; use trainable: all")
    try:
        optimizer = create_optimizer_v2(
            network,
            opt=train.opt,
            lr=train.lr,
            weight_decay=train.weight_decay,
            momentum=train.momentum,
            param_group_fn=lambda model: groups,
            **extra,
        )
    except (AssertionError, ValueError, TypeError, KeyError) as err:
        raise TrainError(
            f"timm cannot create the {train.opt!r} optimizer: {first_line(err)}; see timm.optim.list_optimizers()"
        ) from None
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] = train.lr * group["lr_scale"]
    return optimizer


def check_optimizer(train: TrainSettings) -> None:
    """Build the recipe's optimizer on a throwaway layer, so that a bad ``opt`` (or eps / betas it
    refuses) is reported before anything is written.

    Raises:
        TrainError: an optimizer name or setting timm does not accept.
    """
    create_optimizer(nn.Linear(2, 2), train.model_copy(update={"layer_decay": None, "trainable": "all"}))


def check_scheduler(train: TrainSettings) -> None:
    """Build the recipe's scheduler on a throwaway optimizer, so that a bad ``sched`` is reported
    before anything is written.

    Raises:
        TrainError: a scheduler name or setting timm does not accept.
    """
    create_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr), train, 1)


def updates_per_epoch(batches: int, grad_accum_steps: int) -> int:
    """Optimizer updates in an epoch of ``batches`` batches (a last, shorter window makes one too)."""
    return max(1, -(-batches // grad_accum_steps))


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


NORM_MODULES: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def set_trainable(network: nn.Module, trainable: str) -> int:
    """Freeze (``requires_grad=False``) every parameter but those ``trainable`` names.

    ``all`` changes nothing; ``norms`` keeps the parameters of the ILM / Proxy Norm layers (B_ω, B_β,
    W1-W3; proxy and output affines), or of the plain norms (GN / LN / BN / IN and timm's subclasses)
    in an unconverted network; ``norms+head`` also the classifier (timm ``get_classifier()``, else
    the last ``nn.Linear``). A frozen parameter gets no gradient and no update, so it stays bit-identical.

    Returns:
        The number of trainable parameter entries (elements).

    Raises:
        TrainError: ``norms`` on a network without norm parameters.
    """
    if trainable == "all":
        return sum(p.numel() for p in network.parameters() if p.requires_grad)
    from ..nn import ILMNorm, ProxyNormAct

    ours = [m for m in network.modules() if isinstance(m, (ILMNorm, ProxyNormAct))]
    norms = ours or [m for m in network.modules() if isinstance(m, NORM_MODULES)]
    keep = {id(p) for m in norms for p in m.parameters()}
    if not keep:
        raise TrainError(f"train.trainable: {trainable}: the network has no norm parameters; use trainable: all")
    if trainable == "norms+head":
        keep |= {id(p) for p in classifier_module(network).parameters()}
    for p in network.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def classifier_module(network: nn.Module, setting: str = "train.trainable: norms+head",
                      fix: str = "use trainable: norms") -> nn.Module:
    """The classifier: timm's ``get_classifier()``, else the last ``nn.Linear`` (torchvision).

    Raises:
        TrainError: the network has none (the message names ``setting``, the key that needs it, and ``fix``).
    """
    if hasattr(network, "get_classifier"):
        return network.get_classifier()
    from ..models import _classifier

    found = _classifier(network)
    if found is None:
        raise TrainError(f"{setting}: the network has no classifier layer; {fix}")
    return found[2]


@dataclass
class Batches:
    """Hooks that let a caller draw progress: ``start(total)``, ``advance(loss)``, ``stop()``."""

    start: Callable[[int], None] = lambda total: None
    advance: Callable[[Optional[float]], None] = lambda loss: None
    stop: Callable[[], None] = lambda: None


@dataclass
class Extras:
    """The optional parts of an update, built by :func:`create_extras`.

    Attributes:
        scaler: timm ``NativeScaler`` (fp16), or ``None``.
        ema: timm ``ModelEmaV3`` of the network, updated after every update, or ``None``.
        mixup: timm ``Mixup`` (``data.mixup`` / ``data.cutmix``), or ``None``.
        num_classes: the classifier's size (mixed targets are one-hot over it).
    """

    scaler: Any = None
    ema: Any = None
    mixup: Any = None
    num_classes: int = 0


def create_extras(network: nn.Module, train: TrainSettings, data: DataSettings, precision: Precision,
                  num_classes: int) -> Extras:
    """The grad scaler, EMA and Mixup the recipe asks for (each ``None`` when it does not)."""
    extras = Extras(scaler=precision.scaler(), num_classes=num_classes)
    if train.model_ema:
        from timm.utils import ModelEmaV3

        extras.ema = ModelEmaV3(network, decay=train.model_ema_decay)
    if data.mixing:
        from timm.data import Mixup

        extras.mixup = Mixup(
            mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
            switch_prob=data.mixup_switch_prob, mode=data.mixup_mode, label_smoothing=train.smoothing,
            num_classes=num_classes,
        )
    return extras


def criterion_for(train: TrainSettings, data: DataSettings) -> nn.Module:
    """timm's ``SoftTargetCrossEntropy`` on mixed targets, else cross-entropy with ``smoothing``."""
    if data.mixing:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=train.smoothing)


def _mixed(extras: Extras, x: torch.Tensor, y: torch.Tensor, smoothing: float, seed: int) -> tuple[Any, Any]:
    """timm ``Mixup`` of the batch, its random draws (Python's and NumPy's global generators) seeded
    with ``seed`` and their states restored; an odd batch, which ``Mixup`` refuses, gets smoothed
    one-hot targets."""
    if x.shape[0] % 2:
        from timm.data.mixup import mixup_target

        return x, mixup_target(y, extras.num_classes, 1.0, smoothing)
    return seeded_globals(lambda: extras.mixup(x, y), seed)


def _clipped_parameters(network: nn.Module, clip_mode: str) -> list[torch.nn.Parameter]:
    """The trainable parameters that clipping sees; ``agc`` leaves out the classifier, as timm does
    (``model_parameters(model, exclude_head=True)``: all but the last two parameters)."""
    params = list(network.parameters())
    if clip_mode == "agc":
        params = params[:-2]
    return [p for p in params if p.requires_grad]


def _backward(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, extras: Extras, train: TrainSettings,
    clipped: list[torch.nn.Parameter] | None, need_update: bool,
) -> None:
    """timm ``train.py``'s step: backward, and when ``need_update`` clip (``dispatch_clip_grad``)
    and step, through the fp16 scaler when there is one (which unscales before clipping)."""
    if extras.scaler is not None:
        extras.scaler(
            loss, optimizer, clip_grad=train.clip_grad, clip_mode=train.clip_mode, parameters=clipped,
            need_update=need_update,
        )
        return
    loss.backward()
    if need_update:
        if clipped is not None:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad(clipped, train.clip_grad, mode=train.clip_mode)
        optimizer.step()


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
    extras: Extras | None = None,
    start: EpochPosition | None = None,
    control: Any = None,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (this process's shard when ``processes`` is distributed).

    Every ``train.grad_accum_steps`` batches (and at the end of the epoch) make one update: the
    gradients of their mean losses (each loss divided by the window's length) are summed, clipped
    when ``train.clip_grad`` is set, and applied; then the EMA is updated and the scheduler stepped.
    The loss and top-1 are summed on the device and read once per epoch (and every 10th batch for
    the NaN check and the progress bar), so the loop adds no host sync per batch.

    Args:
        start: continue an epoch stopped at this position (the loader's sampler then leaves out
            the batches before it, see :func:`seed_epoch`); ``None``: from its first batch.
        control: a :class:`~ilmconvert.train.stopping.RunControl`, told after every update but the
            epoch's last (it writes a mid-epoch checkpoint, or stops the epoch).

    Returns:
        (``{"train_loss", "train_top1" (percent, against the unmixed labels), "images", "seconds",
        "images_per_s"}``, the update count after the epoch). Loss, top-1 and images are over all
        processes; ``images_per_s`` is all processes' images over this process's seconds.

    Raises:
        TrainError: when the loss becomes NaN or infinite (lower the learning rate).
        EpochStopped: ``control`` stopped the epoch (a signal arrived).
    """
    batches = batches or Batches()
    extras = extras or Extras()
    criterion = criterion_for(train, data)
    network.train()
    device = precision.device
    accum = train.grad_accum_steps
    first = start.step if start is not None else 0
    total = first + len(loader)
    partial_from = total - total % accum  # the batches of a last, shorter accumulation window
    clipped = _clipped_parameters(network, train.clip_mode) if train.clip_grad is not None else None
    unwrapped = getattr(network, "module", network)  # DDP / torch.compile wrap the network
    epoch = int(getattr(loader.sampler, "epoch", 0))
    sums = start.sums[processes.rank] if start is not None else torch.zeros(3, dtype=torch.float64)
    loss_sum = sums[0].to(device).clone()
    correct = sums[1].to(device, torch.int64)
    seen = int(sums[2])
    batches.start(total - first)
    optimizer.zero_grad(set_to_none=True)
    begun = time.perf_counter() - (start.seconds if start is not None else 0.0)
    iterator = iter(loader)
    if start is not None:  # after the iterator started (which may draw), as the uninterrupted run
        start.restore_rng(processes.rank, device)
    for step, (images, labels) in enumerate(iterator, start=first):
        x = to_input(images, data.mean, data.std, device, precision.channels_last)
        y = labels.to(device, non_blocking=True)
        target = y
        if extras.mixup is not None:
            x, target = _mixed(extras, x, y, train.smoothing, mix_seed(train.seed, epoch, step, processes.rank, 5))
        need_update = (step + 1) % accum == 0 or step + 1 == total
        window = accum if step < partial_from else total - partial_from
        no_sync = not need_update and hasattr(network, "no_sync")
        with network.no_sync() if no_sync else contextlib.nullcontext():
            with precision.context():
                logits = network(x)
                loss = criterion(logits, target)
            _backward(loss / window if window > 1 else loss, optimizer, extras, train, clipped, need_update)
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if extras.ema is not None:
                extras.ema.update(unwrapped, step=num_updates)
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
        if need_update and control is not None and step + 1 < total:
            control.update_done(step + 1, num_updates, (loss_sum, correct, seen), device, begun)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - begun
    batches.stop()
    summed = _summed(processes, loss_sum, correct, seen)
    return training_numbers(*summed, seconds, "in this epoch; lower --lr"), num_updates


def training_numbers(loss_sum: float, correct: float, seen: float, seconds: float, where: str) -> dict[str, float]:
    """``{"train_loss", "train_top1" (%), "images", "seconds", "images_per_s"}`` of a training pass
    from its summed loss (loss x images), top-1 count and image count (all processes').

    Raises:
        TrainError: the mean loss is NaN or infinite (``where``: in what, and what to lower).
    """
    mean_loss = loss_sum / max(1, seen)
    if not math.isfinite(mean_loss):
        raise TrainError(f"the training loss became {mean_loss} {where}")
    return {
        "train_loss": mean_loss,
        "train_top1": 100.0 * correct / max(1, seen),
        "images": int(seen),
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


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


def seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0, skip_batches: int = 0) -> None:
    """Make every random draw of ``epoch`` a pure function of (seed, epoch, rank); with
    ``skip_batches``, the loader leaves out the epoch's first batches (a run resumed in the middle
    of the epoch, whose generator states :meth:`EpochPosition.restore_rng` then puts back).

    Seeds torch's global generator (dropout, drop-path and other randomness in the network: per
    process, so with ``rank``), the loader's generator (its workers' start-up seed) and the
    epoch of the loader's sampler (:class:`~ilmconvert.train.loader.EpochSampler`: data order and
    each image's augmentation; the same for every rank). Nothing drawn before the epoch (network
    initialization, earlier epochs, loader workers' state) then changes it, so an epoch run after
    ``--resume`` replays the uninterrupted run's epoch exactly.
    """
    torch.manual_seed(mix_seed(seed, epoch, rank, 2))
    if loader.generator is not None:
        loader.generator.manual_seed(mix_seed(seed, epoch, rank, 3))
    if hasattr(loader.sampler, "set_epoch"):
        if skip_batches:
            loader.sampler.set_epoch(epoch, skip=skip_batches * loader.batch_size)
        else:
            loader.sampler.set_epoch(epoch)
