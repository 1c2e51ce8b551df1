"""Preparing a fine-tuning run: check the arguments, read the data, build or load the network.

:func:`prepare_finetune` returns a :class:`FinetunePlan` (everything the training needs, checked
before anything but the run folder's lock is written); ``--resume`` reads the run's saved recipe
and trainer state here (:func:`_resumed_recipe`), refusing changes outside :data:`RESUMABLE`.
:func:`ilmconvert.train.run.run_finetune` then trains the plan.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..io import (
    CONFIG_FILE,
    CheckpointError,
    is_checkpoint,
    load,
    load_trainer_state,
    read_config,
    recover_checkpoint,
)
from ..models import resolve_preprocessing
from ..nn import ProxyGroupNormAct, cpu_kernel, cpu_op
from ..preprocessing import Preprocessing
from .data import (
    DataSource,
    ImageSet,
    check_same_classes,
    list_classes,
    open_split,
    resolve_data,
    resolve_pipeline,
    test_transform,
    train_transform,
)
from .distributed import SINGLE, Distributed, init_process_group
from .logs import check_log
from .loop import build_network, check_optimizer, check_scheduler, fit_classifier, select_device
from .recipes import DataSettings, Recipe, load_recipe, parse_recipe
from .run_folder import LAST, RECIPE_FILE, RunError, RunInterrupted, RunLock, check_new_run, resolve_checkpoint

#: Recipe keys that ``--resume`` may change: they do not change any number the run computes.
RESUMABLE = ("train.epochs", "data.num_workers", "train.checkpoint_hist", "train.checkpoint_interval")


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
        lock: the run folder's lock while this plan holds it (rank 0; ``None`` where none was taken).
        resume_command: the command line that continues this run with ``--resume``.
        input_note: which input size and normalization the run uses and where they came from.
        log: extra loggers (``("tensorboard",)``); ``RUN/summary.csv`` is always written.
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
    lock: Optional[RunLock] = None
    resume_command: str = ""
    log: tuple[str, ...] = ()
    input_note: str = ""

    def release(self) -> None:
        """Give up the run folder's lock (:func:`run_finetune` does when it returns or raises)."""
        if self.lock is not None:
            self.lock.release()


#: ``steps(step, done, total)``: progress of a long start-up step, for a front-end to show
StepReport = Callable[[str, int, int], None]


def _no_report(step: str, done: int, total: int) -> None:
    pass


def _open_splits(recipe: Recipe, source: DataSource, steps: StepReport = _no_report) -> tuple[ImageSet, ImageSet]:
    settings, seed = recipe.data, recipe.train.seed

    def reading(split: str) -> Callable[[int, int], None]:
        return lambda done, total: steps(f"reading {total:,} {split} images", done, total)

    test = open_split(
        source, "test", settings, subset=settings.test_subset, seed=seed + 1, transform=test_transform(settings),
        progress=reading("test"),
    )  # fmt: skip
    transform = train_transform(settings)
    train = open_split(
        source, "train", settings, subset=settings.train_subset, seed=seed, transform=transform,
        progress=reading("train"),
    )  # fmt: skip
    check_same_classes(train, test, source)
    return train, test


def _resume_command(run: Path, data: str, data_root: str | Path | None, device: str, processes: Distributed) -> str:
    """The command line that continues ``run`` (printed when the run is interrupted)."""
    launcher = f"torchrun --nproc_per_node {processes.world_size} -m ilmconvert" if processes.enabled else "ilmconvert"
    words = [launcher, "finetune", "--out", shlex.quote(str(run)), "--resume", "--data", shlex.quote(str(data))]
    if data_root is not None:
        words += ["--data-root", shlex.quote(str(data_root))]
    if device != "auto":
        words += ["--device", shlex.quote(device)]
    return " ".join(words)


def prepare_finetune(
    *,
    data: str,
    run: str | Path,
    checkpoint: str | Path | None = None,
    recipe: str | Path | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    method: str | None = None,
    device: str = "auto",
    data_root: str | Path | None = None,
    resume: bool = False,
    default_recipe: str = "cifar10",
    processes: Distributed = SINGLE,
    overrides: Mapping[str, Any] | None = None,
    settings: Sequence[str] = (),
    weights: str | Path | None = None,
    log: Sequence[str] = (),
    steps: StepReport | None = None,
) -> FinetunePlan:
    """Check the arguments, read the data and build (or load) the network; writes nothing but the lock.

    The first thing it does is take the run folder's lock (:class:`RunLock`, rank 0 only; the
    folder is created for it when absent). It holds in the returned plan until
    :func:`run_finetune` returns (or :meth:`FinetunePlan.release`); when this function raises,
    the lock file and any folder created for it are removed again.

    Args:
        data: an ImageFolder root with ``train/`` and ``test/`` (or ``val/``), or ``cifar10`` /
            ``cifar100``.
        run: the run folder (must be new or empty unless ``resume``).
        checkpoint: a converted checkpoint (from ``ilmconvert swap``) to train instead of the
            recipe's network; the recipe's conversion settings are then not used.
        recipe: a bundled recipe name or a YAML file (``default_recipe`` when ``None``).
        epochs, batch_size, lr: override the recipe's training settings.
        method: override the recipe's conversion method (``ilm``, ``proxy``, ``none``: train the
            network unconverted, the baseline).
        device: ``auto``, ``cpu`` or ``cuda``.
        data_root: download folder for ``cifar10`` / ``cifar100``.
        resume: continue ``run`` from ``run/last`` with the recipe saved in ``run/recipe.yaml``;
            only the keys in :data:`RESUMABLE` may change (any other change is refused, naming it).
        overrides: dotted recipe keys mapped to values (``None`` skipped), e.g. ``{"train.opt": "adamw"}``.
        settings: ``KEY=VALUE`` strings (``--set``), see :meth:`Recipe.with_overrides`.
        weights: a local weights file for the recipe's network (instead of its pretrained weights).
        log: extra loggers: ``tensorboard`` (needs the ``tensorboard`` package).
        steps: called as ``steps(step, done, total)`` during the long start-up steps, e.g.
            ``("reading 32,000 train images", 256, 32000)``, ``("building the network", 0, 1)``:
            first with ``done`` 0, last with ``done == total``.
        processes: under torchrun, this process's rank (see :mod:`.distributed`): joins the
            process group and takes the device ``cuda:LOCAL_RANK``; rank 0 downloads data first.

    Raises:
        RunInUse: another ``finetune`` process holds ``run`` (nothing is written).
        RunInterrupted: SIGINT (Ctrl-C) arrived; nothing is written.
        RecipeError, DataError, RunError, TrainError, ModelSourceError, CheckpointError: one-line
        messages for everything the user can fix.
    """
    run = Path(run).expanduser()
    torch_device = init_process_group(processes, select_device(device))
    if resume and (checkpoint, weights) != (None,) * 2:
        raise RunError(
            f"--resume continues RUN with its own network (RUN/{LAST}): leave out "
            f"{'DIR' if checkpoint is not None else '--weights'}; only --epochs may change, "
            f"and the settings that change no number ({', '.join(RESUMABLE[1:])})"
        )
    check_log(log)
    changes = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "method": method}
    lock = RunLock.acquire(run) if processes.is_main else None
    try:
        if resume:
            resolved, state = _resumed_recipe(run, changes, overrides, settings, recipe)
        else:
            resolved = load_recipe(recipe or default_recipe).with_overrides(
                **changes, values=overrides, settings=settings
            )
            state = None
            check_scheduler(resolved.train)
            check_optimizer(resolved.train)
            check_new_run(run)
            if checkpoint is not None:
                if method is not None:
                    raise RunError(
                        "--method applies to the recipe's network; a checkpoint keeps its own conversion "
                        "(convert it first with `ilmconvert swap --method ...`)"
                    )
                if weights is not None:
                    raise RunError(
                        "--weights applies to the recipe's network; a checkpoint keeps its own weights "
                        "(convert the weights first with `ilmconvert swap --weights ...`)"
                    )
                resolve_checkpoint(checkpoint, run_folder=False)
        with processes.main_first():  # one download of cifar10 / cifar100
            source = resolve_data(data, data_root)
            classes = list_classes(source)
            report = steps or _no_report
            building = "loading the network" if resume or checkpoint is not None else "building the network"
            report(building, 0, 1)
            network, notes = _network(resolved, run if resume else None, checkpoint, data, len(classes), weights)
            report(building, 1, 1)
            _compile_cpu_kernels(network, torch_device, report)
            found = resolve_preprocessing(network, config=read_config(checkpoint) if checkpoint is not None else None)
            settings_before = resolved.data
            resolved = resolved.model_copy(update={"data": resolve_pipeline(resolved.data, network, found)})
            train, test = _open_splits(resolved, source, report)
        if checkpoint is not None and resolved.train.batch_size > len(train):
            notes.append(f"batch size {resolved.train.batch_size} is larger than the {len(train)} training images")
    except BaseException as err:
        if lock is not None:
            lock.discard()
        if isinstance(err, KeyboardInterrupt):
            raise RunInterrupted("interrupted while preparing the run; nothing was written") from None
        raise
    if processes.enabled:
        notes.append(
            f"{processes.world_size} processes: batch {resolved.train.batch_size} per process, "
            f"{resolved.train.batch_size * processes.world_size} per update; the learning rate is not rescaled"
        )
    start = int(state["epoch"]) if state else 0
    command = _resume_command(run, data, data_root, device, processes)
    return FinetunePlan(
        resolved, run, source, train, test, network, torch_device, start, state, notes, processes, lock, command,
        log=tuple(log), input_note=_input_note(settings_before, resolved.data, found, overrides),
    )


#: the start-up step that compiles the GN + Proxy Norm CPU operator
COMPILING = "compiling the GN + Proxy Norm CPU kernel (once per machine)"


def _compile_cpu_kernels(network: nn.Module, device: torch.device, report: StepReport) -> None:
    """Compile the C++ operator of GN + Proxy Norm (:mod:`~ilmconvert.nn.cpu_op`) now, as a reported
    start-up step, where the run will use it (a :class:`~ilmconvert.nn.ProxyGroupNormAct` on CPU) and
    it is not compiled for this machine yet: ~20 s once, which the first training step would
    otherwise spend without a word. Under torchrun rank 0 compiles, the others find it cached."""
    if device.type != "cpu" or not (cpu_kernel.enabled() and cpu_op.enabled()):
        return
    if not any(isinstance(m, ProxyGroupNormAct) for m in network.modules()) or cpu_op.is_cached():
        return  # is_cached runs the compiler once (`c++ --version`): only for networks that need it
    report(COMPILING, 0, 1)
    if cpu_kernel.library() is not None:  # the operator shares its kernel source and build checks
        cpu_op.operator()
    report(COMPILING, 1, 1)


def _input_note(
    before: DataSettings, after: DataSettings, found: Preprocessing, overrides: Mapping[str, Any] | None
) -> str:
    """``input N px, mean (...) std (...)`` and where they came from: ``--input-size``, the recipe,
    the network (:func:`~ilmconvert.train.data.resolve_pipeline`), or the recipe defaults."""
    given = before.model_fields_set

    def origin(keys: tuple[str, ...]) -> str:
        if keys == ("image_size",) and (overrides or {}).get("data.image_size") is not None:
            return "--input-size"
        if any(k in given for k in keys):
            return "the recipe"
        if after.pipeline == "timm" or found.from_weights:  # as resolve_pipeline decides
            return found.source
        return "the recipe defaults (the network brings none of its own)"

    size, norm = origin(("image_size",)), origin(("mean", "std"))
    mean, std = (", ".join(f"{v:.4g}" for v in values) for values in (after.mean, after.std))
    if size == norm:
        return f"input {after.image_size} px, mean ({mean}) std ({std}) from {size}"
    return f"input {after.image_size} px from {size}, mean ({mean}) std ({std}) from {norm}"


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(before: Recipe, after: Recipe) -> list[str]:
    """The dotted recipe keys whose values differ between ``before`` and ``after``."""
    a, b = _flat(before.model_dump(mode="json")), _flat(after.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _shown(value: Any) -> str:
    """A recipe value as YAML writes it (``0.05``, ``null``, ``[0.9, 0.999]``, ``adamw``)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _refuse_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Refuse a ``--resume`` that changes a flat recipe key outside :data:`RESUMABLE` (keys missing
    from ``after`` are not compared), naming each key with its value in the run and the new one.

    Raises:
        RunError: such a change.
    """
    refused = [k for k in sorted(after) if k not in RESUMABLE and before.get(k) != after[k]]
    if refused:
        values = "; ".join(f"{k}: {_shown(before.get(k))} in the run, {_shown(after[k])} now" for k in refused)
        raise RunError(
            f"--resume cannot change {', '.join(refused)} ({values}): the run would no longer continue exactly; "
            f"only {', '.join(RESUMABLE)} may change (start a new run for the others)"
        )


def _resumed_recipe(
    run: Path,
    changes: Mapping[str, Any],
    overrides: Mapping[str, Any] | None,
    settings: Sequence[str],
    recipe: str | Path | None = None,
) -> tuple[Recipe, dict[str, Any]]:
    """The recipe (with the allowed changes) and trainer state of the run folder ``run`` for ``--resume``.

    The run continues with its own ``recipe.yaml``. Options given again with the values the run
    has (the original command re-run with ``--resume``: ``--recipe``, ``--set``, overrides) change
    nothing and are accepted; ``recipe`` is compared on the keys it (with the overrides) sets.

    Raises:
        RunError: ``run`` is not a resumable run folder; a change of a key outside :data:`RESUMABLE`
            (the message names it, the run's value and the new one); or the run is finished
            (``epochs`` not larger).
        RecipeError, CheckpointError: its recipe or trainer state cannot be read.
    """
    recover_checkpoint(run / LAST)  # a kill in the middle of replacing last/ leaves it beside
    if not is_checkpoint(run / LAST) or not (run / RECIPE_FILE).is_file():
        if (run / LAST / CONFIG_FILE).exists():
            read_config(run / LAST)  # a damaged last/config.json: raises, naming the problem
        raise RunError(
            f"--resume: {run} is not a run folder with last/ and {RECIPE_FILE}; start a new run without --resume"
        )
    saved = parse_recipe((run / RECIPE_FILE).read_text(), str(run / RECIPE_FILE))
    resolved = saved.with_overrides(**changes, values=overrides, settings=settings)
    before, after = _flat(saved.model_dump(mode="json")), _flat(resolved.model_dump(mode="json"))
    _refuse_changes(before, {k: after.get(k) for k in changed_keys(saved, resolved)})
    if recipe is not None:  # what the named recipe (with the same overrides) sets must be what the run has
        named = load_recipe(recipe).with_overrides(**changes, values=overrides, settings=settings)
        given = _flat(named.model_dump(mode="json", exclude_unset=True))
        _refuse_changes(after, {k: v for k, v in given.items() if k not in ("name", "description")})
    state = load_trainer_state(run / LAST)
    if not state or "epoch" not in state or "optimizer" not in state:
        raise RunError(f"--resume: {run / LAST} has no trainer state; start a new run without --resume")
    saved_at = (read_config(run / LAST).get("metadata") or {}).get("epoch")
    if saved_at is not None and saved_at != state["epoch"]:  # a state without the weights' hash (older versions)
        raise RunError(
            f"--resume: {run / LAST}/trainer_state.pt is of epoch {state['epoch']} but the weights beside it of "
            f"epoch {saved_at} (another run's, or an older copy); put back the trainer_state.pt saved with them, "
            "or start a new run"
        )
    if state["epoch"] >= resolved.train.epochs:
        raise RunError(
            f"--resume: {run} already finished {state['epoch']} of {resolved.train.epochs} epochs; "
            "pass a larger --epochs to go on"
        )
    if not os.access(run, os.W_OK):
        raise RunError(f"--out {run} is not writable")
    return resolved, state


def _network(
    recipe: Recipe,
    resumed: Path | None,
    checkpoint: str | Path | None,
    data: str,
    num_classes: int,
    weights: str | Path | None = None,
) -> tuple[nn.Module, list[str]]:
    """The network to train: ``resumed/last``, the ``checkpoint``, or the recipe's (seeded); and notes.

    Raises:
        RunError: a resumed run trained for another number of classes. CheckpointError,
        ModelSourceError, ConversionError: the network cannot be loaded or built.
    """
    notes: list[str] = []
    if resumed is not None:
        try:
            network = load(resumed / LAST)
        except CheckpointError as err:  # e.g. a truncated model.safetensors: nothing to continue from
            raise RunError(f"--resume: {err}; the run cannot continue from it: start a new run") from None
        if fit_classifier(network, num_classes):
            raise RunError(
                f"--resume: {resumed} was trained on another number of classes than {data} has ({num_classes})"
            )
    elif checkpoint is not None:
        network = load(checkpoint)
        notes.append(
            f"training the converted checkpoint {checkpoint}; the recipe's model and conversion settings are not used"
        )
        if fit_classifier(network, num_classes, seed=recipe.train.seed):
            notes.append(f"classifier resized to {num_classes} classes (freshly initialized, seed {recipe.train.seed})")
    else:
        network = build_network(recipe.model, recipe.conversion, num_classes, seed=recipe.train.seed, weights=weights)
    return network, notes
