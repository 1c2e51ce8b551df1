"""A fine-tuning run folder: its files, its lock, its metrics, and where its checkpoints are.

A run directory ``RUN`` holds::

    RUN/recipe.yaml     the resolved recipe (with command-line overrides), read by --resume
    RUN/metrics.jsonl   one JSON object per epoch (see :data:`METRIC_KEYS`; epoch 0: train.head_steps)
    RUN/last/           checkpoint after the latest epoch (or update, when stopped inside one), with
                        trainer_state.pt for --resume
    RUN/best/           checkpoint with the best test top-1 so far
    RUN/best_ema/       with train.model_ema: the EMA weights with the best EMA test top-1 so far
    RUN/checkpoint-N/   with train.checkpoint_hist: the checkpoints of the best epochs (timm's)
    RUN/summary.csv     timm-style per-epoch table; RUN/tensorboard/ with --log tensorboard
    RUN/.finetune.lock  held by the finetune process that writes RUN (see :class:`RunLock`)

Checkpoints are written with :func:`ilmconvert.save` (atomic replace), so :func:`ilmconvert.load`
and ``ilmconvert eval`` read them. Everything that can be wrong with the arguments (recipe, data,
output folder, network) is checked in :func:`~ilmconvert.train.prepare.prepare_finetune`, before anything but the lock
file is written.

A run can be stopped at any moment (``kill -9``, Ctrl-C, SIGTERM) and continued with ``--resume``:
the resumed run reproduces the uninterrupted one's ``metrics.jsonl`` exactly on CPU (every number
but the timings), because every epoch's randomness is a function of (seed, epoch, rank) alone (see
:func:`~ilmconvert.train.loop.seed_epoch`), ``last/`` exists from the start (epoch 0) and is
replaced atomically after each epoch (and, with ``train.checkpoint_interval``, inside epochs), and
``metrics.jsonl`` is rewritten atomically before it. Ctrl-C and SIGTERM finish the update in
flight, save it to ``last/`` and raise :class:`RunInterrupted` (:mod:`.stopping`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Optional

from .. import atomic
from ..errors import IlmconvertError, first_line
from ..io import CONFIG_FILE, existing_ancestor, is_checkpoint, read_config
from .stopping import SIGNALS

METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
LAST, BEST, BEST_EMA = "last", "best", "best_ema"
LOCK_FILE = ".finetune.lock"
#: Keys of each line of ``RUN/metrics.jsonl`` (a first line of epoch 0, with ``head_steps`` as well,
#: is the test after ``train.head_steps``' head-only phase): epoch (1-based), mean train loss, train top-1 (%,
#: on augmented images, while the weights change), test loss, test top-1 / top-5 (%), learning
#: rate at the end of the epoch, training images per second, and seconds for train + test.
METRIC_KEYS = ("epoch", "train_loss", "train_top1", "test_loss", "top1", "top5", "lr", "images_per_s", "epoch_s")


class RunError(IlmconvertError):
    """The run directory cannot be created, resumed or read."""


class RunInUse(RunError):
    """Another ``finetune`` process holds the run folder's lock (see :class:`RunLock`)."""


class RunInterrupted(IlmconvertError):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM; the message says how to resume it, if it can be.

    ``RUN/last`` is then complete: the update in flight was finished and saved as a mid-epoch
    checkpoint (a second Ctrl-C stops at once, from the previous ``last/``), and ``--resume``
    continues exactly as if the run had not stopped. ``exit_code`` is 128 + the signal's number
    (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended.
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = SIGNALS.exit_code if signum is None else 128 + signum


# ------------------------------------------------------------------------------------------ run folder
def check_new_run(run: Path) -> None:
    """``run`` must be absent or an empty folder (but for a lock file), inside a writable folder.

    Raises:
        RunError: otherwise (the message says to pass --resume or choose another folder).
    """
    if run.exists() and (not run.is_dir() or any(p.name != LOCK_FILE for p in run.iterdir())):
        raise RunError(
            f"--out {run} exists and is not empty; pass --resume to continue that run, or choose a new directory"
        )
    parent = existing_ancestor(run)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {run}: {parent} is not a writable directory; choose another --out")


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run (``[]`` when there are none yet).

    A last line without its newline (the line being written when a process died) is skipped.

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


def resumed_metrics(run: Path, epoch: int) -> list[dict[str, Any]]:
    """The lines of ``RUN/metrics.jsonl`` for epochs 0 (the head-only phase's, if any) to ``epoch``
    (those ``last/`` holds), for ``--resume``.

    Lines of later epochs (a run stopped after writing them but before ``last/``) and a torn last
    line (the line being written when the process died) are dropped: those epochs are trained
    again, so nothing is lost.

    Raises:
        RunError: a line that is not JSON, or a missing line of an epoch up to ``epoch`` (its
            numbers cannot be recomputed); the message names the file and what to do.
    """
    path = run / METRICS_FILE
    try:
        rows = read_metrics(run)
    except (OSError, ValueError) as err:
        raise RunError(
            f"{path} is damaged ({first_line(err)}): restore it from a copy, or start a new run"
        ) from None
    rows = [r for r in rows if isinstance(r, dict) and r.get("epoch", 0) <= epoch]
    missing = sorted(set(range(1, epoch + 1)) - {r.get("epoch") for r in rows})
    if missing:
        raise RunError(
            f"{path} lacks the line of epoch {', '.join(map(str, missing))} that {run / LAST} holds, and its "
            "numbers cannot be recomputed: restore metrics.jsonl from a copy, or start a new run"
        )
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a kill leaves the old or the new file, never half.

    Raises:
        RunError: the file cannot be written.
    """
    try:
        atomic.write_text(path, text)
    except OSError as err:
        raise RunError(f"cannot write {path}: {err.strerror or err}") from err


def write_metrics(run: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(run / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


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


def resolve_checkpoint(path: str | Path, *, run_folder: bool = True) -> Path:
    """The checkpoint folder ``path`` names: ``path`` itself, or (``run_folder``) a run folder's ``best/``.

    ``ilmconvert eval`` takes either; ``finetune CKPT`` (``run_folder=False``) only a checkpoint,
    and is told which of a run folder's checkpoints to pass.

    Raises:
        RunError: ``path`` is neither (no ilmconvert ``config.json``), saying what to pass instead.
        CheckpointError: a ``config.json`` that is not valid JSON, not an ilmconvert config, or
        malformed.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    if run_folder:
        if is_checkpoint(path / BEST):
            return path / BEST
        if not path.exists():
            raise RunError(
                f"{path} does not exist; pass a checkpoint folder (written by swap / finetune) or a run folder"
            )
    for folder in (path, path / BEST) if run_folder else (path,):
        if (folder / CONFIG_FILE).exists():
            read_config(folder)  # raises CheckpointError saying what is wrong with it (not JSON, not ours, ...)
    if run_folder:
        raise RunError(f"{path} is neither a checkpoint (no ilmconvert config.json) nor a run folder with best/")
    if is_checkpoint(path / BEST):
        raise RunError(f"{path} is a run folder, not a checkpoint; pass {path / BEST} (or {path / LAST})")
    raise RunError(f"{path} is not an ilmconvert checkpoint (no config.json); write one with `ilmconvert swap`")
