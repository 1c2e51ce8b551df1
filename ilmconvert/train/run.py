"""A fine-tuning run directory and the two jobs that use it: ``finetune`` and ``eval``.

A run directory ``RUN`` holds::

    RUN/recipe.yaml     the resolved recipe (with command-line overrides), read by --resume
    RUN/metrics.jsonl   one JSON object per epoch (see :data:`METRIC_KEYS`)
    RUN/last/           checkpoint after the latest epoch, with trainer_state.pt for --resume
    RUN/best/           checkpoint with the best test top-1 so far
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import IlmconvertError
from .data import (
    DataSource,
    ImageSet,
    check_same_classes,
    make_loader,
    open_split,
    resolve_data,
    train_transform,
)
from .distributed import SINGLE, Distributed, init_process_group
from .loop import (
    Batches,
    Precision,
    build_network,
    check_scheduler,
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
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
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

    def release(self) -> None:
        """Give up the run folder's lock (:func:`run_finetune` does when it returns or raises)."""
        if self.lock is not None:
            self.lock.release()


def _open_data(recipe: Recipe, data: str, data_root: str | Path | None) -> tuple[DataSource, ImageSet, ImageSet]:
    settings, seed = recipe.data, recipe.train.seed
    source = resolve_data(data, data_root)
    test = open_split(source, "test", settings, subset=settings.test_subset, seed=seed + 1)
    transform = train_transform(settings)
    train = open_split(source, "train", settings, subset=settings.train_subset, seed=seed, transform=transform)
    check_same_classes(train, test, source)
    return source, train, test


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
        resume: continue ``run`` from ``run/last`` with the recipe saved in ``run/recipe.yaml``
            (only ``epochs`` may change).
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
    if resume and (recipe, batch_size, lr, checkpoint, method) != (None,) * 5:
        raise RunError("--resume continues RUN with its own recipe (RUN/recipe.yaml); only --epochs may change")
    lock = RunLock.acquire(run) if processes.is_main else None
    try:
        if resume:
            resolved, state = _resumed_recipe(run, epochs)
        else:
            resolved = load_recipe(recipe or default_recipe).with_overrides(
                epochs=epochs, batch_size=batch_size, lr=lr, method=method
            )
            state = None
            check_scheduler(resolved.train)
            check_new_run(run)
            if checkpoint is not None:
                if method is not None:
                    raise RunError(
                        "--method applies to the recipe's network; a checkpoint keeps its own conversion "
                        "(convert it first with `ilmconvert swap --method ...`)"
                    )
                check_checkpoint(checkpoint)
        with processes.main_first():  # one download of cifar10 / cifar100
            source, train, test = _open_data(resolved, data, data_root)
        network, notes = _network(resolved, run if resume else None, checkpoint, data, len(train.classes), len(train))
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
        resolved, run, source, train, test, network, torch_device, start, state, notes, processes, lock, command
    )


def _resumed_recipe(run: Path, epochs: int | None) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and trainer state of the run folder ``run`` for ``--resume``.

    Raises:
        RunError: ``run`` is not a resumable run folder, or it is finished (``epochs`` not larger).
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
    resolved = parse_recipe((run / RECIPE_FILE).read_text(), str(run / RECIPE_FILE)).with_overrides(epochs=epochs)
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
    recipe: Recipe, resumed: Path | None, checkpoint: str | Path | None, data: str, num_classes: int, images: int
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
        if recipe.train.batch_size > images:
            notes.append(f"batch size {recipe.train.batch_size} is larger than the {images} training images")
    else:
        network = build_network(recipe.model, recipe.conversion, num_classes, seed=recipe.train.seed)
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


def _trainer_state(
    epoch: int, epochs: int, num_updates: int, best: tuple[float, int], optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "epochs": epochs,
        "num_updates": num_updates,
        "best_top1": best[0],
        "best_epoch": best[1],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
    }


def _fit(plan: FinetunePlan, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``plan.network`` for the recipe's epochs, writing ``RUN`` as it goes.

    A new run first writes ``RUN/last`` (epoch 0: the initial weights), ``RUN/metrics.jsonl``
    (empty) and ``RUN/recipe.yaml``, so that it can be resumed from its first epoch on. After each
    epoch: ``RUN/metrics.jsonl`` rewritten with the epoch's line, ``RUN/best`` when the test top-1
    improved, then ``RUN/last`` with the trainer state; a run killed between these writes resumes
    from the previous ``last`` and drops the metric lines after it. Ctrl-C is held back during the
    writes. Under torchrun every process trains a ``DistributedDataParallel`` copy on its shard and
    only rank 0 writes.

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
    if scheduler is not None:  # the same learning rate whether the run starts here or resumes here
        scheduler.step_update(num_updates=num_updates)
    rows = [r for r in read_metrics(run) if r.get("epoch", 0) <= plan.start_epoch] if state and main else []
    if main:
        with _sigint_held_back():
            if state:
                _write_metrics(run, rows)  # drop the lines of epochs after last/ (a run killed before saving it)
            else:
                run.mkdir(parents=True, exist_ok=True)
                initial = _trainer_state(0, train_cfg.epochs, 0, (best_top1, best_epoch), optimizer, scheduler)
                save(network, run / LAST, metadata=_metadata(plan, 0, best_top1, None), trainer_state=initial)
                _write_metrics(run, rows)
                _write_atomic(run / RECIPE_FILE, recipe.to_yaml())

    metrics: dict[str, Any] = {}
    for epoch in range(plan.start_epoch, train_cfg.epochs):
        seed_epoch(train_loader, train_cfg.seed, epoch, processes.rank)
        trained, num_updates = train_one_epoch(
            trained_network, train_loader, optimizer, scheduler, train_cfg, data_cfg, precision, num_updates,
            progress.train(epoch + 1), processes,
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
        if main:
            rows.append(metrics)
            metadata = _metadata(plan, epoch + 1, best_top1, metrics)
            trainer_state = _trainer_state(
                epoch + 1, train_cfg.epochs, num_updates, (best_top1, best_epoch), optimizer, scheduler
            )
            with _sigint_held_back():
                _write_metrics(run, rows)
                if improved:
                    save(network, run / BEST, metadata=metadata)
                save(network, run / LAST, metadata=metadata, trainer_state=trainer_state)
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
    if recorded is None:
        recorded = {"augment": "none", **(preprocessing(network) or {})}
    from pydantic import ValidationError

    from ..errors import first_line

    try:
        settings = DataSettings.model_validate(recorded)
    except ValidationError as err:  # written by another version, or edited
        raise RunError(f"{checkpoint}/config.json: metadata.data.settings are invalid ({first_line(err)})") from None
    source = resolve_data(data, data_root, needed=("test",))
    test = open_split(source, "test", settings, subset=subset, seed=1)
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
