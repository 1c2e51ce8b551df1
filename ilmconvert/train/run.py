"""A fine-tuning run directory and the two jobs that use it: ``finetune`` and ``eval``.

A run directory ``RUN`` holds::

    RUN/recipe.yaml     the resolved recipe (with command-line overrides), read by --resume
    RUN/metrics.jsonl   one JSON object per epoch (see :data:`METRIC_KEYS`)
    RUN/last/           checkpoint after the latest epoch, with trainer_state.pt for --resume
    RUN/best/           checkpoint with the best test top-1 so far

Checkpoints are written with :func:`ilmconvert.save` (atomic replace), so :func:`ilmconvert.load`
and ``ilmconvert eval`` read them. Everything that can be wrong with the arguments (recipe, data,
output folder, network) is checked in :func:`prepare_finetune`, before ``RUN`` is created.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import IlmconvertError
from .data import DataSource, ImageSet, check_same_classes, make_loader, open_split, resolve_data, train_transform
from .distributed import SINGLE, Distributed, init_process_group
from .loop import (
    Batches,
    Precision,
    TrainError,
    build_network,
    cpu_threads,
    create_optimizer,
    create_scheduler,
    evaluate,
    fit_classifier,
    seed_epoch,
    select_device,
    train_one_epoch,
)
from .recipes import DataSettings, Recipe, load_recipe, parse_recipe

METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
LAST, BEST = "last", "best"
#: Keys of each line of ``RUN/metrics.jsonl``: epoch (1-based), mean train loss, train top-1 (%,
#: on augmented images, while the weights change), test loss, test top-1 / top-5 (%), learning
#: rate at the end of the epoch, training images per second, and seconds for train + test.
METRIC_KEYS = ("epoch", "train_loss", "train_top1", "test_loss", "top1", "top5", "lr", "images_per_s", "epoch_s")


class RunError(IlmconvertError):
    """The run directory cannot be created, resumed or read."""


# ------------------------------------------------------------------------------------------ run folder
def check_new_run(run: Path) -> None:
    """``run`` must be absent or an empty folder, inside a writable folder.

    Raises:
        RunError: otherwise (the message says to pass --resume or choose another folder).
    """
    from ..io import existing_ancestor

    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise RunError(f"--out {run} exists and is not empty; pass --resume to continue that run, or choose a new directory")
    parent = existing_ancestor(run)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {run}: {parent} is not a writable directory; choose another --out")


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (``[]`` when there are none yet)."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep_metrics_until(run: Path, epoch: int) -> None:
    """Drop metric lines of epochs after ``epoch`` (written by a run stopped before its checkpoint)."""
    rows = [r for r in read_metrics(run) if r.get("epoch", 0) <= epoch]
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder's ``best/`` checkpoint.

    Raises:
        RunError: when ``path`` is neither.
    """
    from ..io import CONFIG_FILE, is_checkpoint, read_config

    path = Path(path)
    if is_checkpoint(path):
        return path
    if is_checkpoint(path / BEST):
        return path / BEST
    if not path.exists():
        raise RunError(f"{path} does not exist; pass a checkpoint folder (written by swap / finetune) or a run folder")
    for folder in (path, path / BEST):
        if (folder / CONFIG_FILE).exists():
            read_config(folder)  # raises CheckpointError saying what is wrong with it (not JSON, not ours, ...)
    raise RunError(f"{path} is neither a checkpoint (no ilmconvert config.json) nor a run folder with best/")


def check_checkpoint(path: str | Path) -> None:
    """Raise unless ``path`` is an ilmconvert checkpoint folder, saying what is wrong with it.

    Raises:
        RunError: no ``config.json``. CheckpointError: a ``config.json`` that is not valid JSON,
        not an ilmconvert config, or malformed.
    """
    from ..io import CONFIG_FILE, is_checkpoint, read_config

    if is_checkpoint(path):
        return
    if (Path(path) / CONFIG_FILE).exists():
        read_config(path)  # raises, naming the problem
    raise RunError(f"{path} is not an ilmconvert checkpoint (no config.json); write one with `ilmconvert swap`")


# ------------------------------------------------------------------------------------------ finetune
@dataclass
class FinetunePlan:
    """Everything a run needs, checked and built before anything is written.

    Attributes:
        recipe: the resolved recipe (overrides applied).
        run: the run folder.
        source: the data; ``train`` / ``test``: the two splits (uint8 images, see data.py).
        network: the converted network on CPU, classifier sized to the data's classes.
        device: where to train.
        start_epoch: epochs already done (0 for a new run).
        trainer_state: the saved optimizer / scheduler / counters when resuming, else ``None``.
        notes: one-line remarks for the user (head resized, recipe settings ignored, ...).
        processes: this process's rank among torchrun's processes (``SINGLE`` without torchrun).
    """

    recipe: Recipe
    run: Path
    source: DataSource
    train: ImageSet
    test: ImageSet
    network: nn.Module
    device: torch.device
    start_epoch: int = 0
    trainer_state: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)
    processes: Distributed = SINGLE


def _open_data(recipe: Recipe, data: str, data_root: str | Path | None) -> tuple[DataSource, ImageSet, ImageSet]:
    settings, seed = recipe.data, recipe.train.seed
    source = resolve_data(data, data_root)
    test = open_split(source, "test", settings, subset=settings.test_subset, seed=seed + 1)
    train = open_split(source, "train", settings, subset=settings.train_subset, seed=seed, transform=train_transform(settings))
    check_same_classes(train, test, source)
    return source, train, test


def prepare_finetune(
    *,
    data: str,
    run: str | Path,
    checkpoint: str | Path | None = None,
    recipe: str | Path | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    data_root: str | Path | None = None,
    resume: bool = False,
    default_recipe: str = "cifar10",
    processes: Distributed = SINGLE,
) -> FinetunePlan:
    """Check the arguments, read the data and build (or load) the network; writes nothing.

    Args:
        data: an ImageFolder root with ``train/`` and ``test/`` (or ``val/``), or ``cifar10`` /
            ``cifar100``.
        run: the run folder (must be new or empty unless ``resume``).
        checkpoint: a converted checkpoint (from ``ilmconvert swap``) to train instead of the
            recipe's network; the recipe's conversion settings are then not used.
        recipe: a bundled recipe name or a YAML file (``default_recipe`` when ``None``).
        epochs, batch_size, lr: override the recipe's training settings.
        device: ``auto``, ``cpu`` or ``cuda``.
        data_root: download folder for ``cifar10`` / ``cifar100``.
        resume: continue ``run`` from ``run/last`` with the recipe saved in ``run/recipe.yaml``
            (only ``epochs`` may change).
        processes: under torchrun, this process's rank (see :mod:`.distributed`): joins the
            process group and takes the device ``cuda:LOCAL_RANK``; rank 0 downloads data first.

    Raises:
        RecipeError, DataError, RunError, TrainError, ModelSourceError, CheckpointError: one-line
        messages for everything the user can fix.
    """
    from ..io import is_checkpoint, load, load_trainer_state

    run = Path(run).expanduser()
    torch_device = init_process_group(processes, select_device(device))
    notes: list[str] = []
    state = None
    if resume:
        if recipe is not None or batch_size is not None or lr is not None or checkpoint is not None:
            raise RunError("--resume continues RUN with its own recipe (RUN/recipe.yaml); only --epochs may change")
        if not is_checkpoint(run / LAST) or not (run / RECIPE_FILE).is_file():
            raise RunError(f"--resume: {run} is not a run folder with last/ and {RECIPE_FILE}; start a new run without --resume")
        resolved = parse_recipe((run / RECIPE_FILE).read_text(), str(run / RECIPE_FILE)).with_overrides(epochs=epochs)
        state = load_trainer_state(run / LAST)
        if not state or "epoch" not in state or "optimizer" not in state:
            raise RunError(f"--resume: {run / LAST} has no trainer state; start a new run without --resume")
        if state["epoch"] >= resolved.train.epochs:
            raise RunError(f"--resume: {run} already finished {state['epoch']} of {resolved.train.epochs} epochs; pass a larger --epochs to go on")
        if not os.access(run, os.W_OK):
            raise RunError(f"--out {run} is not writable")
    else:
        resolved = load_recipe(recipe or default_recipe).with_overrides(epochs=epochs, batch_size=batch_size, lr=lr)
        check_new_run(run)
        if checkpoint is not None:
            check_checkpoint(checkpoint)

    with processes.main_first():  # one download of cifar10 / cifar100
        source, train, test = _open_data(resolved, data, data_root)
    num_classes = len(train.classes)
    if resume:
        network = load(run / LAST)
        if fit_classifier(network, num_classes):
            raise RunError(f"--resume: {run} was trained on another number of classes than {data} has ({num_classes})")
    elif checkpoint is not None:
        network = load(checkpoint)
        notes.append(f"training the converted checkpoint {checkpoint}; the recipe's model and conversion settings are not used")
        if fit_classifier(network, num_classes):
            notes.append(f"classifier resized to {num_classes} classes (freshly initialized)")
        if resolved.train.batch_size > len(train):
            notes.append(f"batch size {resolved.train.batch_size} is larger than the {len(train)} training images")
    else:
        network = build_network(resolved.model, resolved.conversion, num_classes, seed=resolved.train.seed)
    if processes.enabled:
        notes.append(
            f"{processes.world_size} processes: batch {resolved.train.batch_size} per process, "
            f"{resolved.train.batch_size * processes.world_size} per update; the learning rate is not rescaled"
        )
    return FinetunePlan(resolved, run, source, train, test, network, torch_device, int(state["epoch"]) if state else 0, state, notes, processes)


@dataclass
class Progress:
    """Callbacks for a front-end: per-batch hooks and a per-epoch report."""

    train: Callable[[int], Batches] = lambda epoch: Batches()
    test: Callable[[int], Batches] = lambda epoch: Batches()
    epoch_done: Callable[[dict[str, Any], bool], None] = lambda metrics, best: None


def _metadata(plan: FinetunePlan, metrics: dict[str, Any], best_top1: float) -> dict[str, Any]:
    return {
        "recipe": plan.recipe.name,
        "epoch": metrics["epoch"],
        "epochs": plan.recipe.train.epochs,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "test_loss": metrics["test_loss"],
        "best_top1": best_top1,
        "data": {"name": str(plan.source.name), "classes": plan.train.classes, "settings": plan.recipe.data.model_dump(mode="json")},
        "train": plan.recipe.train.model_dump(mode="json"),
    }


def run_finetune(plan: FinetunePlan, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``plan.network`` for the recipe's epochs, writing ``RUN`` as it goes (see :func:`_fit`)."""
    with cpu_threads(plan.device, plan.recipe.train.cpu_threads):
        return _fit(plan, progress)


def _fit(plan: FinetunePlan, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``plan.network`` for the recipe's epochs, writing ``RUN`` as it goes.

    After each epoch: one line appended to ``RUN/metrics.jsonl``, ``RUN/last`` saved with the
    trainer state, and ``RUN/best`` when the test top-1 improved. Under torchrun every process
    trains a ``DistributedDataParallel`` copy on its shard and only rank 0 writes.

    Returns:
        ``{"epochs": done, "best_top1", "best_epoch", "last": metrics of the final epoch}``.

    Raises:
        TrainError: the loss diverged. CheckpointError: a checkpoint could not be written.
    """
    from ..io import save

    progress = progress or Progress()
    recipe, run, processes = plan.recipe, plan.run, plan.processes
    main = processes.is_main
    train_cfg, data_cfg = recipe.train, recipe.data
    precision = Precision(plan.device)
    network = precision.prepare(plan.network)
    trained_network = network
    if processes.enabled:
        # static_graph: a norm that the forward never reaches is no error for DDP's reduction
        device_ids = [plan.device.index] if plan.device.type == "cuda" else None
        trained_network = nn.parallel.DistributedDataParallel(network, device_ids=device_ids, static_graph=True)
        processes.barrier()  # every process has checked the run folder before rank 0 writes it
    pin = plan.device.type == "cuda"
    loaders = {"num_workers": data_cfg.num_workers, "pin_memory": pin, "processes": processes}
    train_loader = make_loader(plan.train, train_cfg.batch_size, train=True, seed=train_cfg.seed, **loaders)
    test_loader = make_loader(plan.test, data_cfg.eval_batch_size, train=False, **loaders)
    optimizer = create_optimizer(network, train_cfg)
    scheduler = create_scheduler(optimizer, train_cfg, len(train_loader))
    state = plan.trainer_state or {}
    num_updates = int(state.get("num_updates", 0))
    best_top1, best_epoch = float(state.get("best_top1", -1.0)), int(state.get("best_epoch", 0))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") and state.get("epochs") == train_cfg.epochs:
            scheduler.load_state_dict(state["scheduler"])
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        if main:
            _keep_metrics_until(run, plan.start_epoch)
    elif main:
        run.mkdir(parents=True, exist_ok=True)
        (run / RECIPE_FILE).write_text(recipe.to_yaml())
        (run / METRICS_FILE).touch()

    metrics: dict[str, Any] = {}
    for epoch in range(plan.start_epoch, train_cfg.epochs):
        seed_epoch(train_loader, train_cfg.seed, epoch, processes.rank)
        trained, num_updates = train_one_epoch(
            trained_network, train_loader, optimizer, scheduler, train_cfg, data_cfg, precision, num_updates, progress.train(epoch + 1), processes
        )
        tested = evaluate(network, test_loader, data_cfg, precision, progress.test(epoch + 1), processes)
        lr = float(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step(epoch + 1)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": trained["train_loss"],
            "train_top1": trained["train_top1"],
            "test_loss": tested["loss"],
            "top1": tested["top1"],
            "top5": tested["top5"],
            "lr": lr,
            "images_per_s": trained["images_per_s"],
            "epoch_s": trained["seconds"] + tested["seconds"],
        }
        improved = metrics["top1"] > best_top1
        if improved:
            best_top1, best_epoch = metrics["top1"], epoch + 1
        trainer_state = {
            "epoch": epoch + 1,
            "epochs": train_cfg.epochs,
            "num_updates": num_updates,
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
        }
        if main:
            metadata = _metadata(plan, metrics, best_top1)
            save(network, run / LAST, metadata=metadata, trainer_state=trainer_state)
            if improved:
                save(network, run / BEST, metadata=metadata)
            with open(run / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            progress.epoch_done(metrics, improved)
    processes.barrier()  # RUN is complete when any process returns
    return {"epochs": train_cfg.epochs, "best_top1": best_top1, "best_epoch": best_epoch, "last": metrics}


# ------------------------------------------------------------------------------------------ eval
def evaluate_checkpoint(
    path: str | Path,
    data: str,
    *,
    data_root: str | Path | None = None,
    device: str = "auto",
    subset: int | None = None,
    batch_size: int | None = None,
    batches: Batches | None = None,
) -> dict[str, Any]:
    """Test loss, top-1 and top-5 of a checkpoint (or a run's ``best/``) on DATA's test split.

    The input size and normalization are those recorded in the checkpoint by ``finetune``; for a
    checkpoint written by ``swap``, those its pretrained weights expect
    (:func:`ilmconvert.models.preprocessing`: timm's data config, torchvision's weights
    transforms), or the recipe defaults (CIFAR-10 statistics at 32 px) for a ``cifar_stem`` network.

    Returns:
        ``{"checkpoint", "loss", "top1", "top5" (percent), "images", "seconds", "classes"}``.

    Raises:
        RunError, CheckpointError, DataError, TrainError: one-line messages.
    """
    from ..io import load, read_config
    from ..models import classifier_size, preprocessing

    checkpoint = resolve_checkpoint(path)
    torch_device = select_device(device)
    meta = read_config(checkpoint).get("metadata", {}) or {}
    network = load(checkpoint)
    recorded = meta.get("data", {}).get("settings")
    settings = DataSettings.model_validate(recorded if recorded is not None else {"augment": "none", **(preprocessing(network) or {})})
    source = resolve_data(data, data_root)
    test = open_split(source, "test", settings, subset=subset, seed=1)
    classes = classifier_size(network)
    if classes != len(test.classes):
        raise RunError(f"{checkpoint} predicts {classes} classes but {data} has {len(test.classes)}; evaluate on the data it was trained for")
    trained_on = meta.get("data", {}).get("classes")
    if trained_on and list(trained_on) != test.classes:
        raise RunError(f"{checkpoint} was trained on classes {trained_on[:3]}... but {data} has {test.classes[:3]}...; evaluate on the data it was trained for")
    precision = Precision(torch_device)
    network = precision.prepare(network)
    loader = make_loader(test, batch_size or settings.eval_batch_size, train=False, pin_memory=torch_device.type == "cuda")
    with cpu_threads(torch_device, (meta.get("train") or {}).get("cpu_threads")):
        result = evaluate(network, loader, settings, precision, batches)
    return {"checkpoint": str(checkpoint), **result, "classes": len(test.classes)}
