"""A fine-tuning run directory and the two jobs that use it: ``finetune`` and ``eval``.

A run directory ``RUN`` holds::

    RUN/recipe.yaml     the resolved recipe (with command-line overrides), read by --resume
    RUN/metrics.jsonl   one JSON object per epoch (see :data:`METRIC_KEYS`)
    RUN/last/           checkpoint after the latest epoch, with trainer_state.pt for --resume
    RUN/best/           checkpoint with the best test top-1 so far
    RUN/best_ema/       with train.model_ema: the EMA weights with the best EMA test top-1 so far
    RUN/checkpoint-N/   with train.checkpoint_hist: the checkpoints of the best epochs (timm's)
    RUN/summary.csv     timm-style per-epoch table; RUN/tensorboard/ with --log tensorboard
    RUN/.finetune.lock  held by the finetune process that writes RUN (see :class:`RunLock`)

Checkpoints are written with :func:`ilmconvert.save` (atomic replace), so :func:`ilmconvert.load`
and ``ilmconvert eval`` read them. Everything that can be wrong with the arguments (recipe, data,
output folder, network) is checked in :func:`prepare_finetune`, before anything but the lock
file is written.

A run can be stopped at any moment (``kill -9``, Ctrl-C) and continued with ``--resume``: the
resumed run reproduces the uninterrupted one's ``metrics.jsonl`` exactly on CPU (every number but
the timings), because every epoch's randomness is a function of (seed, epoch, rank) alone (see
:func:`~ilmconvert.train.loop.seed_epoch`), ``last/`` exists from the start (epoch 0) and is
replaced atomically after each epoch, and ``metrics.jsonl`` is rewritten atomically before it.
Ctrl-C is held back while the run folder is written and then raises :class:`RunInterrupted`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import atomic
from ..errors import IlmconvertError
from .data import (
    DataSource,
    ImageSet,
    check_same_classes,
    list_classes,
    make_loader,
    open_split,
    resolve_data,
    resolve_pipeline,
    test_transform,
    train_transform,
)
from .distributed import SINGLE, Distributed, init_process_group
from .logs import RunLog, check_log
from .loop import (
    Batches,
    Precision,
    build_network,
    check_optimizer,
    check_scheduler,
    cpu_threads,
    create_extras,
    create_optimizer,
    create_scheduler,
    evaluate,
    fit_classifier,
    seed_epoch,
    select_device,
    set_trainable,
    train_one_epoch,
    updates_per_epoch,
)
from .recipes import DataSettings, Recipe, load_recipe, parse_recipe

METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
LAST, BEST, BEST_EMA = "last", "best", "best_ema"
#: Recipe keys that ``--resume`` may change: they do not change any number the run computes.
RESUMABLE = ("train.epochs", "data.num_workers", "train.checkpoint_hist")
LOCK_FILE = ".finetune.lock"
#: Keys of each line of ``RUN/metrics.jsonl``: epoch (1-based), mean train loss, train top-1 (%,
#: on augmented images, while the weights change), test loss, test top-1 / top-5 (%), learning
#: rate at the end of the epoch, training images per second, and seconds for train + test.
METRIC_KEYS = ("epoch", "train_loss", "train_top1", "test_loss", "top1", "top5", "lr", "images_per_s", "epoch_s")


class RunError(IlmconvertError):
    """The run directory cannot be created, resumed or read."""


class RunInUse(RunError):
    """Another ``finetune`` process holds the run folder's lock (see :class:`RunLock`)."""


class RunInterrupted(IlmconvertError):
    """The run was stopped by SIGINT (Ctrl-C); the message says how to resume it, if it can be.

    ``RUN/last`` is then the complete checkpoint of the last finished epoch (Ctrl-C is held back
    while the run folder is written), and ``--resume`` continues exactly as if it had not stopped.
    """

    exit_code = 130


# ------------------------------------------------------------------------------------------ run folder
def check_new_run(run: Path) -> None:
    """``run`` must be absent or an empty folder (but for a lock file), inside a writable folder.

    Raises:
        RunError: otherwise (the message says to pass --resume or choose another folder).
    """
    from ..io import existing_ancestor

    if run.exists() and (not run.is_dir() or any(p.name != LOCK_FILE for p in run.iterdir())):
        raise RunError(
            f"--out {run} exists and is not empty; pass --resume to continue that run, or choose a new directory"
        )
    parent = existing_ancestor(run)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {run}: {parent} is not a writable directory; choose another --out")


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (``[]`` when there are none yet).

    A last line without its newline (half-written by an older version that was killed) is skipped.

    Raises:
        ValueError: another line is not JSON (``json.JSONDecodeError``).
    """
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a kill leaves the old or the new file, never half.

    Raises:
        RunError: the file cannot be written.
    """
    try:
        atomic.write_text(path, text)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}") from err


def _write_metrics(run: Path, rows: list[dict[str, Any]]) -> None:
    _write_atomic(run / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def _sigint_held_back() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) while the body runs, then raise the KeyboardInterrupt it would
    have raised. Only in the main thread (elsewhere Python delivers no signal), and only where
    SIGINT is not ignored (a job started with ``&`` from a script, or under ``nohup``, inherits an
    ignored SIGINT and must keep ignoring it); a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


class RunLock:
    """An exclusive hold on a run folder, so that two ``finetune`` processes never write one.

    ``fcntl.flock`` on ``RUN/.finetune.lock``, which holds the holder's pid. The kernel releases
    the lock when its process ends in any way (``kill -9`` included), so a left-over file never
    blocks ``--resume``; forked children (DataLoader workers) close their copy of the descriptor
    at once, so a worker that outlives a killed run does not keep the lock either. Where ``fcntl``
    is missing (Windows) no lock is taken.
    """

    _held: ClassVar[set[int]] = set()  # descriptors this process holds (closed in forked children)

    def __init__(self, path: Path, fd: int, created: list[Path]) -> None:
        self.path, self.fd, self.created = path, fd, created

    @classmethod
    def acquire(cls, run: Path) -> Optional[RunLock]:
        """Lock the run folder ``run``, creating it (and its missing parents) when absent.

        Returns:
            The lock, or ``None`` where no lock can be taken and nothing was created: no
            ``fcntl``, a file system without locks, or a ``run`` that cannot be a run folder (a
            file, a folder that cannot be written, a non-empty folder without ``recipe.yaml``),
            which the checks that follow report.

        Raises:
            RunInUse: another process holds the lock (this process has written nothing).
        """
        try:
            import fcntl
        except ImportError:
            return None
        path = run / LOCK_FILE
        if not path.exists() and not _may_become_run(run):
            return None
        created = [p for p in (*reversed(run.parents), run) if not p.exists()]
        for _ in range(10):  # retried when the holder removed the file between our open and lock
            try:
                run.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                _remove_folders(created)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if isinstance(err, BlockingIOError):
                    who = f" (pid {holder})" if holder.isdigit() else ""
                    raise RunInUse(
                        f"--out {run} is in use by another finetune{who}; wait for it or choose another --out"
                    ) from None
                return None  # no locks on this file system
            if _is_file_of(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                cls._held.add(fd)
                return cls(path, fd, created)
            os.close(fd)
        return None

    def release(self) -> None:
        """Remove the lock file and release the lock (nothing when already released)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a process that opened it re-checks and retries
        RunLock._held.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def discard(self) -> None:
        """:meth:`release`, and remove the folders :meth:`acquire` created (when still empty)."""
        self.release()
        _remove_folders(self.created)


def _may_become_run(run: Path) -> bool:
    """``run`` is absent, an empty folder or a run folder: a lock file may be created in it."""
    if not run.exists():
        return True
    return run.is_dir() and (not any(run.iterdir()) or (run / RECIPE_FILE).is_file())


def _is_file_of(fd: int, path: Path) -> bool:
    """``fd`` is still the file at ``path`` (not one that was removed after we opened it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _remove_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first) where they are empty, innermost first."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _close_locks_in_child() -> None:
    for fd in RunLock._held:
        with contextlib.suppress(OSError):
            os.close(fd)
    RunLock._held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


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
    if is_checkpoint(Path(path) / BEST):
        raise RunError(f"{path} is a run folder, not a checkpoint; pass {Path(path) / BEST} (or {Path(path) / LAST})")
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
        lock: the run folder's lock while this plan holds it (rank 0; ``None`` where none was taken).
        resume_command: the command line that continues this run with ``--resume``.
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

    def release(self) -> None:
        """Give up the run folder's lock (:func:`run_finetune` does when it returns or raises)."""
        if self.lock is not None:
            self.lock.release()


def _open_splits(recipe: Recipe, source: DataSource) -> tuple[ImageSet, ImageSet]:
    settings, seed = recipe.data, recipe.train.seed
    test = open_split(
        source, "test", settings, subset=settings.test_subset, seed=seed + 1, transform=test_transform(settings)
    )
    transform = train_transform(settings)
    train = open_split(source, "train", settings, subset=settings.train_subset, seed=seed, transform=transform)
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
    if resume and (recipe, checkpoint, weights) != (None,) * 3:
        raise RunError(
            "--resume continues RUN with its own recipe (RUN/recipe.yaml) and network; only --epochs may change, "
            f"and the settings that change no number ({', '.join(RESUMABLE[1:])})"
        )
    check_log(log)
    changes = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "method": method}
    lock = RunLock.acquire(run) if processes.is_main else None
    try:
        if resume:
            resolved, state = _resumed_recipe(run, changes, overrides, settings)
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
                check_checkpoint(checkpoint)
        with processes.main_first():  # one download of cifar10 / cifar100
            source = resolve_data(data, data_root)
            classes = list_classes(source)
            network, notes = _network(resolved, run if resume else None, checkpoint, data, len(classes), weights)
            resolved = resolved.model_copy(update={"data": resolve_pipeline(resolved.data, network)})
            train, test = _open_splits(resolved, source)
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
        log=tuple(log),
    )


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


def _resumed_recipe(
    run: Path, changes: Mapping[str, Any], overrides: Mapping[str, Any] | None, settings: Sequence[str]
) -> tuple[Recipe, dict[str, Any]]:
    """The recipe (with the allowed changes) and trainer state of the run folder ``run`` for ``--resume``.

    Raises:
        RunError: ``run`` is not a resumable run folder; a change of a key outside :data:`RESUMABLE`
            (the message names it); or the run is finished (``epochs`` not larger).
        RecipeError, CheckpointError: its recipe or trainer state cannot be read.
    """
    from ..io import CONFIG_FILE, is_checkpoint, load_trainer_state, read_config, recover_checkpoint

    recover_checkpoint(run / LAST)  # a kill in the middle of replacing last/ leaves it beside
    if not is_checkpoint(run / LAST) or not (run / RECIPE_FILE).is_file():
        if (run / LAST / CONFIG_FILE).exists():
            read_config(run / LAST)  # a damaged last/config.json: raises, naming the problem
        raise RunError(
            f"--resume: {run} is not a run folder with last/ and {RECIPE_FILE}; start a new run without --resume"
        )
    saved = parse_recipe((run / RECIPE_FILE).read_text(), str(run / RECIPE_FILE))
    resolved = saved.with_overrides(**changes, values=overrides, settings=settings)
    refused = [k for k in changed_keys(saved, resolved) if k not in RESUMABLE]
    if refused:
        raise RunError(
            f"--resume cannot change {', '.join(refused)}: the run would no longer continue exactly; "
            f"only {', '.join(RESUMABLE)} may change (start a new run for the others)"
        )
    state = load_trainer_state(run / LAST)
    if not state or "epoch" not in state or "optimizer" not in state:
        raise RunError(f"--resume: {run / LAST} has no trainer state; start a new run without --resume")
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
    from ..io import load

    notes: list[str] = []
    if resumed is not None:
        network = load(resumed / LAST)
        if fit_classifier(network, num_classes):
            raise RunError(
                f"--resume: {resumed} was trained on another number of classes than {data} has ({num_classes})"
            )
    elif checkpoint is not None:
        network = load(checkpoint)
        notes.append(
            f"training the converted checkpoint {checkpoint}; the recipe's model and conversion settings are not used"
        )
        if fit_classifier(network, num_classes):
            notes.append(f"classifier resized to {num_classes} classes (freshly initialized)")
    else:
        network = build_network(recipe.model, recipe.conversion, num_classes, seed=recipe.train.seed, weights=weights)
    return network, notes


@dataclass
class Progress:
    """Callbacks for a front-end: per-batch hooks and a per-epoch report."""

    train: Callable[[int], Batches] = lambda epoch: Batches()
    test: Callable[[int], Batches] = lambda epoch: Batches()
    epoch_done: Callable[[dict[str, Any], bool], None] = lambda metrics, best: None


def _metadata(plan: FinetunePlan, epoch: int, best_top1: float, metrics: dict[str, Any] | None) -> dict[str, Any]:
    tested = {k: metrics[k] for k in ("top1", "top5", "test_loss")} if metrics else {}
    settings = plan.recipe.data.model_dump(mode="json")
    return {
        "recipe": plan.recipe.name,
        "epoch": epoch,
        "epochs": plan.recipe.train.epochs,
        **tested,
        "best_top1": best_top1 if best_top1 >= 0 else None,
        "data": {"name": str(plan.source.name), "classes": plan.train.classes, "settings": settings},
        "train": plan.recipe.train.model_dump(mode="json"),
    }


def run_finetune(plan: FinetunePlan, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``plan.network`` for the recipe's epochs, writing ``RUN`` as it goes (see :func:`_fit`).

    Releases the run folder's lock when it returns or raises.

    Returns:
        ``{"epochs": done, "best_top1", "best_epoch", "last": metrics of the final epoch}``.

    Raises:
        RunInterrupted: SIGINT (Ctrl-C); its message is the command that resumes the run.
        TrainError: the loss diverged. CheckpointError, RunError: the run folder cannot be written.
    """
    try:
        with cpu_threads(plan.device, plan.recipe.train.cpu_threads):
            return _fit(plan, progress)
    except KeyboardInterrupt:
        raise _interrupted(plan) from None
    except BaseException:
        if not _written(plan) and plan.lock is not None:
            plan.lock.discard()  # nothing but the lock was written: leave nothing behind
        raise
    finally:
        plan.release()


def _written(plan: FinetunePlan) -> bool:
    """Whether the run folder holds a resumable run (its ``last/`` checkpoint and recipe)."""
    from ..io import is_checkpoint

    return is_checkpoint(plan.run / LAST) and (plan.run / RECIPE_FILE).is_file()


def _interrupted(plan: FinetunePlan) -> RunInterrupted:
    """The error for Ctrl-C during :func:`_fit`: how to resume, or (before RUN was written) that
    nothing was written; then the lock file and any folder created for it are removed."""
    if _written(plan):
        return RunInterrupted(f"interrupted; resume with: {plan.resume_command}")
    if plan.lock is not None:
        plan.lock.discard()
    return RunInterrupted("interrupted before the run folder was written; nothing was written")


@dataclass
class _Best:
    """The best test top-1 so far and its epoch, of the network and of its EMA (-1: none yet)."""

    top1: float = -1.0
    epoch: int = 0
    ema_top1: float = -1.0

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> _Best:
        return cls(float(state.get("best_top1", -1.0)), int(state.get("best_epoch", 0)),
                   float(state.get("best_ema_top1", -1.0)))

    def update(self, metrics: Mapping[str, Any]) -> tuple[bool, bool]:
        """Take an epoch's metrics; returns whether the network's and the EMA's top-1 improved."""
        improved = metrics["top1"] > self.top1
        if improved:
            self.top1, self.epoch = metrics["top1"], metrics["epoch"]
        ema_improved = "ema_top1" in metrics and metrics["ema_top1"] > self.ema_top1
        if ema_improved:
            self.ema_top1 = metrics["ema_top1"]
        return improved, ema_improved


def _trainer_state(
    epoch: int, epochs: int, num_updates: int, best: _Best, optimizer: Any, scheduler: Any, extras: Any
) -> dict[str, Any]:
    state = {
        "epoch": epoch,
        "epochs": epochs,
        "num_updates": num_updates,
        "best_top1": best.top1,
        "best_epoch": best.epoch,
        "best_ema_top1": best.ema_top1,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
    }
    if extras.ema is not None:
        state["model_ema"] = extras.ema.module.state_dict()
    if extras.scaler is not None:
        state["amp_scaler"] = extras.scaler.state_dict()
    return state


def _restore(state: Mapping[str, Any], optimizer: Any, scheduler: Any, extras: Any, epochs: int) -> None:
    """Load the optimizer, scheduler, EMA and grad scaler of a resumed run's trainer state."""
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") and state.get("epochs") == epochs:
        scheduler.load_state_dict(state["scheduler"])
    if extras.ema is not None and "model_ema" in state:
        extras.ema.module.load_state_dict(state["model_ema"])
    if extras.scaler is not None and "amp_scaler" in state:
        extras.scaler.load_state_dict(state["amp_scaler"])


def _training_network(plan: FinetunePlan, network: nn.Module) -> nn.Module:
    """``network`` as it is trained: wrapped in DDP under torchrun, compiled with ``train.compile``.
    Checkpoints are saved from ``network`` itself, so their keys carry no ``module.`` / ``_orig_mod.``."""
    trained = network
    if plan.processes.enabled:
        # static_graph: a norm that the forward never reaches is no error for DDP's reduction
        device_ids = [plan.device.index] if plan.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(network, device_ids=device_ids, static_graph=True)
    option = plan.recipe.train.compile
    if option:
        trained = torch.compile(trained, backend=option if isinstance(option, str) else "inductor")
    return trained


def _keep_history(run: Path, rows: list[dict[str, Any]], keep: int, upto: int) -> None:
    """Keep ``RUN/checkpoint-EPOCH`` of the ``keep`` best epochs up to ``upto`` (by top-1, then the
    later epoch), as timm's ``CheckpointSaver`` does; remove the others (and any after ``upto``)."""
    import shutil

    if not keep and not any(run.glob("checkpoint-*")):
        return
    ranked = sorted((r for r in rows if r["epoch"] <= upto), key=lambda r: (r["top1"], r["epoch"]), reverse=True)
    wanted = {f"checkpoint-{r['epoch']}" for r in ranked[:keep]}
    for folder in run.glob("checkpoint-*"):
        if folder.is_dir() and folder.name not in wanted:
            shutil.rmtree(folder, ignore_errors=True)


def _epoch_metrics(epoch: int, trained: dict[str, Any], tested: dict[str, Any], lr: float,
                   ema: dict[str, Any] | None) -> dict[str, Any]:
    metrics = {
        "epoch": epoch,
        "train_loss": trained["train_loss"],
        "train_top1": trained["train_top1"],
        "test_loss": tested["loss"],
        "top1": tested["top1"],
        "top5": tested["top5"],
        "lr": lr,
        "images_per_s": trained["images_per_s"],
        "epoch_s": trained["seconds"] + tested["seconds"] + (ema["seconds"] if ema else 0.0),
    }
    if ema is not None:
        metrics.update({"ema_test_loss": ema["loss"], "ema_top1": ema["top1"], "ema_top5": ema["top5"]})
    return metrics


def _write_epoch(
    plan: FinetunePlan, network: nn.Module, ema: Any, rows: list[dict[str, Any]], improved: tuple[bool, bool],
    best_top1: float, trainer_state: dict[str, Any], log: RunLog,
) -> None:
    """After an epoch (the last of ``rows``): metrics.jsonl and summary.csv, best/ and best_ema/
    when ``improved`` (network, EMA), checkpoint-EPOCH/ with checkpoint_hist, then last/ with
    ``trainer_state``; Ctrl-C held back meanwhile."""
    from ..io import save

    run, metrics = plan.run, rows[-1]
    metadata = _metadata(plan, metrics["epoch"], best_top1, metrics)
    with _sigint_held_back():
        _write_metrics(run, rows)
        log.rows(rows)
        if improved[0]:
            save(network, run / BEST, metadata=metadata)
        if improved[1]:
            save(ema.module, run / BEST_EMA, metadata={**metadata, "ema": True})
        if plan.recipe.train.checkpoint_hist:
            save(network, run / f"checkpoint-{metrics['epoch']}", metadata=metadata)
        _keep_history(run, rows, plan.recipe.train.checkpoint_hist, metrics["epoch"])
        save(network, run / LAST, metadata=metadata, trainer_state=trainer_state)


def _fit(plan: FinetunePlan, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``plan.network`` for the recipe's epochs, writing ``RUN`` as it goes.

    A new run first writes ``RUN/last`` (epoch 0: the initial weights), ``RUN/metrics.jsonl``
    (empty) and ``RUN/recipe.yaml``, so that it can be resumed from its first epoch on. After each
    epoch: ``RUN/metrics.jsonl`` (and ``summary.csv``) rewritten with the epoch's line, ``RUN/best``
    when the test top-1 improved (``RUN/best_ema`` when the EMA's did), ``RUN/checkpoint-EPOCH``
    with ``checkpoint_hist``, then ``RUN/last`` with the trainer state (optimizer, scheduler, EMA
    weights, grad scaler); a run killed between these writes resumes from the previous ``last``
    and drops the metric lines after it. Ctrl-C is held back during the writes. Under torchrun
    every process trains a ``DistributedDataParallel`` copy on its shard and only rank 0 writes.

    Raises:
        KeyboardInterrupt: Ctrl-C (after the writes in progress); ``run_finetune`` turns it into
        :class:`RunInterrupted`. TrainError: the loss diverged. CheckpointError, RunError: a
        checkpoint or file could not be written.
    """
    from ..io import save

    progress = progress or Progress()
    recipe, run, processes = plan.recipe, plan.run, plan.processes
    main = processes.is_main
    train_cfg, data_cfg = recipe.train, recipe.data
    precision = Precision.of(plan.device, train_cfg)
    network = precision.prepare(plan.network)
    set_trainable(network, train_cfg.trainable)
    trained_network = _training_network(plan, network)
    if processes.enabled:
        processes.barrier()  # every process has checked the run folder before rank 0 writes it
    pin = plan.device.type == "cuda"
    loaders = {"num_workers": data_cfg.num_workers, "pin_memory": pin, "processes": processes}
    train_loader = make_loader(plan.train, train_cfg.batch_size, train=True, seed=train_cfg.seed, **loaders)
    test_loader = make_loader(plan.test, data_cfg.eval_batch_size, train=False, **loaders)
    optimizer = create_optimizer(network, train_cfg)
    scheduler = create_scheduler(
        optimizer, train_cfg, updates_per_epoch(len(train_loader), train_cfg.grad_accum_steps)
    )
    extras = create_extras(network, train_cfg, data_cfg, precision, len(plan.train.classes))
    state = plan.trainer_state or {}
    num_updates = int(state.get("num_updates", 0))
    best = _Best.of(state)
    if state:
        _restore(state, optimizer, scheduler, extras, train_cfg.epochs)
    if scheduler is not None:  # the same learning rate whether the run starts here or resumes here
        scheduler.step_update(num_updates=num_updates)
    rows = [r for r in read_metrics(run) if r.get("epoch", 0) <= plan.start_epoch] if state and main else []
    log = RunLog(run, plan.log, plan.start_epoch) if main else None
    if main:
        with _sigint_held_back():
            if state:
                _write_metrics(run, rows)  # drop the lines of epochs after last/ (a run killed before saving it)
            else:
                run.mkdir(parents=True, exist_ok=True)
                initial = _trainer_state(0, train_cfg.epochs, 0, best, optimizer, scheduler, extras)
                save(network, run / LAST, metadata=_metadata(plan, 0, best.top1, None), trainer_state=initial)
                _write_metrics(run, rows)
                _write_atomic(run / RECIPE_FILE, recipe.to_yaml())
            log.rows(rows)
            _keep_history(run, rows, train_cfg.checkpoint_hist, plan.start_epoch)

    metrics: dict[str, Any] = {}
    try:
        for epoch in range(plan.start_epoch, train_cfg.epochs):
            seed_epoch(train_loader, train_cfg.seed, epoch, processes.rank)
            trained, num_updates = train_one_epoch(
                trained_network, train_loader, optimizer, scheduler, train_cfg, data_cfg, precision, num_updates,
                progress.train(epoch + 1), processes, extras,
            )
            tested = evaluate(network, test_loader, data_cfg, precision, progress.test(epoch + 1), processes)
            ema_tested = None
            if extras.ema is not None:
                ema_tested = evaluate(extras.ema.module, test_loader, data_cfg, precision, None, processes)
            lr = float(optimizer.param_groups[0]["lr"])
            if scheduler is not None:
                scheduler.step(epoch + 1)
            metrics = _epoch_metrics(epoch + 1, trained, tested, lr, ema_tested)
            improved, ema_improved = best.update(metrics)
            if main:
                rows.append(metrics)
                trainer_state = _trainer_state(
                    epoch + 1, train_cfg.epochs, num_updates, best, optimizer, scheduler, extras
                )
                _write_epoch(plan, network, extras.ema, rows, (improved, ema_improved), best.top1, trainer_state, log)
                progress.epoch_done(metrics, improved)
    finally:
        if log is not None:
            log.close()
    processes.barrier()  # RUN is complete when any process returns
    return {"epochs": train_cfg.epochs, "best_top1": best.top1, "best_epoch": best.epoch, "last": metrics}


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
    if recorded is None:  # written by swap: the pretrained weights' preprocessing (timm's protocol for timm)
        expected = preprocessing(network)
        timm_source = expected is not None and getattr(network, "ilm_source", None) is not None
        pipeline = "timm" if timm_source and network.ilm_source.library == "timm" else "cifar"
        recorded = {"augment": "none", **(expected or {}), "pipeline": pipeline}
    from pydantic import ValidationError

    from ..errors import first_line

    try:
        settings = DataSettings.model_validate(recorded)
    except ValidationError as err:  # written by another version, or edited
        raise RunError(f"{checkpoint}/config.json: metadata.data.settings are invalid ({first_line(err)})") from None
    settings = resolve_pipeline(settings, network)
    source = resolve_data(data, data_root, needed=("test",))
    test = open_split(source, "test", settings, subset=subset, seed=1, transform=test_transform(settings))
    classes = classifier_size(network)
    if classes != len(test.classes):
        raise RunError(
            f"{checkpoint} predicts {classes} classes but {data} has {len(test.classes)}; "
            "evaluate on the data it was trained for"
        )
    trained_on = meta.get("data", {}).get("classes")
    if trained_on and list(trained_on) != test.classes:
        raise RunError(
            f"{checkpoint} was trained on classes {trained_on[:3]}... but {data} has {test.classes[:3]}...; "
            "evaluate on the data it was trained for"
        )
    precision = Precision(torch_device)
    network = precision.prepare(network)
    pin = torch_device.type == "cuda"
    loader = make_loader(test, batch_size or settings.eval_batch_size, train=False, pin_memory=pin)
    with cpu_threads(torch_device, (meta.get("train") or {}).get("cpu_threads")):
        result = evaluate(network, loader, settings, precision, batches)
    return {"checkpoint": str(checkpoint), **result, "classes": len(test.classes)}
