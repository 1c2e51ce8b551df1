"""Linear probing before fine-tuning (``train.head_steps``): the classifier trained alone first.

LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022): a new head on a pretrained network is first trained with the
rest of the network frozen, so that fine-tuning starts from a head that fits the features instead
of a random one. The test error after this phase is the "step 0" error of a run: what the network's
features (as pretrained, or as a conversion kept them) are worth before any of them changes.

:func:`probe_head` runs the phase; :func:`head_row` turns its numbers and the test that follows
into the run's epoch-0 line of ``metrics.jsonl`` (``"head_steps"`` marks it).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .distributed import SINGLE, Distributed
from .loader import to_input
from .loop import (
    Batches,
    Precision,
    accuracy_counts,
    classifier_module,
    create_optimizer,
    seed_epoch,
    training_numbers,
)
from .recipes import DataSettings, TrainSettings
from .stopping import SIGNALS

#: The key that marks a ``metrics.jsonl`` line as the test after the head-only phase (epoch 0).
HEAD_STEPS_KEY = "head_steps"


def is_head_row(row: dict[str, Any]) -> bool:
    """Whether a ``metrics.jsonl`` line is the epoch-0 test after the head-only phase (no trained epoch)."""
    return row.get("epoch") == 0


def probe_head(
    network: nn.Module,
    loader: DataLoader,
    train: TrainSettings,
    data: DataSettings,
    precision: Precision,
    batches: Batches | None = None,
    processes: Distributed = SINGLE,
) -> dict[str, float]:
    """Train only the classifier of ``network`` for ``train.head_steps`` steps, in place.

    The network is in eval mode throughout (BatchNorm normalizes with its running statistics and
    does not update them; dropout and drop-path are off), every parameter but the classifier's
    (timm ``get_classifier()``, else the last ``nn.Linear``) is frozen, so all of them and every
    buffer stay bit-identical. Each step is one batch of ``loader`` and one update: the batches
    of epoch 0's seeded order with the recipe's augmentation (then epoch 1's, ... when the steps
    outrun an epoch), the recipe's optimizer (``train.opt``, ``momentum``, ``weight_decay``, eps /
    betas) at the constant learning rate ``train.lr`` (no warm-up, no schedule, no layer decay),
    cross-entropy with ``train.smoothing``; no Mixup, gradient accumulation, clipping or EMA. fp16
    autocast uses a gradient scaler. Under torchrun each process takes its shard and the head's
    gradients are averaged over the processes before each update (what DDP does), so every
    process ends with the same head. The ``requires_grad`` flags are restored afterwards.

    Args:
        network: the network on ``precision.device`` (not wrapped in DDP or compiled).
        loader: the run's training loader (an :class:`~ilmconvert.train.loader.EpochSampler` one).
        batches: progress hooks (one ``advance`` per step).

    Returns:
        ``{"train_loss" (mean over the steps' images, nats), "train_top1" (%), "images" (all
        processes'), "seconds", "images_per_s", "lr"}``.

    Raises:
        TrainError: the network has no classifier, or the loss became NaN / infinite.
        KeyboardInterrupt: a stop signal arrived (SIGINT / SIGTERM; nothing of the run is written yet).
    """
    steps = train.head_steps
    batches = batches or Batches()
    head = classifier_module(network, "train.head_steps", "set train.head_steps: 0")
    trainable = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in trainable:
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    device = precision.device
    try:
        optimizer = create_optimizer(network, train.model_copy(update={"layer_decay": None, "trainable": "all"}))
        fp16 = precision.autocast and precision.dtype == torch.float16
        scaler = torch.amp.GradScaler(device.type) if fp16 else None
        criterion = nn.CrossEntropyLoss(label_smoothing=train.smoothing)
        network.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss x images, correct, images
        batches.start(steps)
        begun = time.perf_counter()
        done, epoch = 0, 0
        while done < steps:
            seed_epoch(loader, train.seed, epoch, processes.rank)
            for images, labels in loader:
                x = to_input(images, data.mean, data.std, device, precision.channels_last)
                y = labels.to(device, non_blocking=True)
                with precision.context():
                    logits = network(x)
                    loss = criterion(logits, y)
                _update(loss, head, optimizer, scaler, processes)
                sums += torch.stack([loss.detach().double() * y.shape[0],
                                     accuracy_counts(logits.detach(), y, (1,))[0].double(),
                                     torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
                done += 1
                batches.advance(float(loss.detach()) if done % 10 == 1 else None)
                _check_stop(processes, device)
                if done == steps:
                    break
            epoch += 1
    finally:
        for p, flag in trainable:
            p.requires_grad_(flag)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - begun
    batches.stop()
    summed = [float(v) for v in processes.all_sum(sums)]
    return {**training_numbers(*summed, seconds, "in the head-only phase; lower train.lr"), "lr": train.lr}


def _update(loss: torch.Tensor, head: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
            processes: Distributed) -> None:
    """Backward, the head's gradients averaged over the processes, one optimizer step (through the
    fp16 ``scaler`` when there is one: a step with an infinite gradient on any process is skipped
    on all, since the average spreads it)."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if processes.enabled:
        for p in head.parameters():
            if p.grad is not None:
                processes.all_sum(p.grad).div_(processes.world_size)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _check_stop(processes: Distributed, device: torch.device) -> None:
    """Raise ``KeyboardInterrupt`` when any process got a stop signal (one agreement per step
    under torchrun, so that all processes stop at the same step)."""
    stop = SIGNALS.signum is not None
    if processes.enabled:
        stop = bool(processes.all_sum(torch.tensor([float(stop)], device=device)).item())
    if stop:
        raise KeyboardInterrupt


def head_row(trained: dict[str, float], tested: dict[str, float], steps: int) -> dict[str, Any]:
    """The epoch-0 line of ``metrics.jsonl``: the head-only phase's training numbers and the test
    after it, with the keys of every epoch's line (:data:`~ilmconvert.train.run_folder.METRIC_KEYS`)
    and ``head_steps``."""
    return {
        "epoch": 0,
        "train_loss": trained["train_loss"],
        "train_top1": trained["train_top1"],
        "test_loss": tested["loss"],
        "top1": tested["top1"],
        "top5": tested["top5"],
        "lr": trained["lr"],
        "images_per_s": trained["images_per_s"],
        "epoch_s": trained["seconds"] + tested["seconds"],
        HEAD_STEPS_KEY: steps,
    }
