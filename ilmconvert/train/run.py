"""Fine-tuning: :func:`run_finetune` trains a prepared plan for the recipe's epochs, writing its run folder.

The jobs of a run live in their own modules, and are importable from here too:

- :mod:`.run_folder`: the run folder's files, its lock (:class:`RunLock`), ``metrics.jsonl`` and
  checkpoint resolution (:func:`resolve_checkpoint`);
- :mod:`.prepare`: :func:`prepare_finetune` checks everything and builds the :class:`FinetunePlan`
  (``--resume`` included);
- this module: :func:`run_finetune` and the epoch loop (:func:`_fit`);
- :mod:`.evaluation`: :func:`evaluate_checkpoint` (``ilmconvert eval``).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import WriteError
from ..io import is_checkpoint, save
from .evaluation import evaluate_checkpoint
from .head_probe import head_row, probe_head
from .loader import make_loader
from .logs import RunLog
from .loop import (
    Batches,
    Precision,
    cpu_threads,
    create_extras,
    create_optimizer,
    create_scheduler,
    evaluate,
    seed_epoch,
    set_trainable,
    train_one_epoch,
    updates_per_epoch,
)
from .prepare import RESUMABLE, FinetunePlan, changed_keys, prepare_finetune
from .run_folder import (
    BEST,
    BEST_EMA,
    LAST,
    LOCK_FILE,
    METRIC_KEYS,
    METRICS_FILE,
    RECIPE_FILE,
    RunError,
    RunInterrupted,
    RunInUse,
    RunLock,
    check_new_run,
    read_metrics,
    resolve_checkpoint,
    resumed_metrics,
    write_atomic,
    write_metrics,
)
from .stopping import SIGNALS, EpochPosition, EpochStopped, RunControl

__all__ = [
    "BEST", "BEST_EMA", "LAST", "LOCK_FILE", "METRICS_FILE", "METRIC_KEYS", "RECIPE_FILE", "RESUMABLE",
    "FinetunePlan", "Progress", "RunError", "RunInUse", "RunInterrupted", "RunLock", "changed_keys",
    "check_new_run", "evaluate_checkpoint", "prepare_finetune", "read_metrics", "resolve_checkpoint", "run_finetune",
]


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
        RunInterrupted: SIGINT (Ctrl-C) or SIGTERM, after the update in flight was saved to
        ``RUN/last``; its message is the command that resumes the run, its ``exit_code`` 130 or 143.
        WriteError: the disk is full, over quota or read-only; ``RUN/last`` holds the previous
        checkpoint and the message says how to resume from it. TrainError: the loss diverged.
        CheckpointError, RunError: the run folder cannot be written or resumed.
    """
    try:
        with cpu_threads(plan.device, plan.recipe.train.cpu_threads), \
                SIGNALS.deferring(force_repeat=not plan.processes.enabled):
            return _fit(plan, progress)
    except KeyboardInterrupt as err:
        raise _interrupted(plan, getattr(err, "signum", None)) from None
    except BaseException as err:
        if not _written(plan) and plan.lock is not None:
            plan.lock.discard()  # nothing but the lock was written: leave nothing behind
        elif isinstance(err, WriteError):
            raise WriteError(
                f"cannot write {err.path}: {err.problem}; {plan.run / LAST} is intact: free space, then resume "
                f"with: {plan.resume_command}", err.path, err.problem,
            ) from err
        raise
    finally:
        plan.release()


def _written(plan: FinetunePlan) -> bool:
    """Whether the run folder holds a resumable run (its ``last/`` checkpoint and recipe)."""
    return is_checkpoint(plan.run / LAST) and (plan.run / RECIPE_FILE).is_file()


def _interrupted(plan: FinetunePlan, signum: int | None) -> RunInterrupted:
    """The error for a stop signal during :func:`_fit`: how to resume, or (before RUN was written)
    that nothing was written; then the lock file and any folder created for it are removed."""
    signum = signum if signum is not None else SIGNALS.signum
    if _written(plan):
        what = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        return RunInterrupted(f"{what}; resume with: {plan.resume_command}", signum)
    if plan.lock is not None:
        plan.lock.discard()
    return RunInterrupted("interrupted before the run folder was written; nothing was written", signum)


class _Stop(KeyboardInterrupt):
    """Every process stops after the state was saved (``signum``: the signal any of them got)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
    if not keep and not any(run.glob("checkpoint-*")):
        return
    ranked = sorted((r for r in rows if 0 < r["epoch"] <= upto), key=lambda r: (r["top1"], r["epoch"]), reverse=True)
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


def _test_epoch(plan: FinetunePlan, network: nn.Module, loader: Any, precision: Precision, progress: Progress,
                extras: Any, epoch: int, trained: dict[str, Any], optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """After epoch ``epoch + 1``'s training: test the network (and its EMA), step the scheduler's
    epoch; returns the epoch's metrics."""
    data_cfg, processes = plan.recipe.data, plan.processes
    tested = evaluate(network, loader, data_cfg, precision, progress.test(epoch + 1), processes)
    ema_tested = None
    if extras.ema is not None:
        ema_tested = evaluate(extras.ema.module, loader, data_cfg, precision, None, processes)
    lr = float(optimizer.param_groups[0]["lr"])
    if scheduler is not None:
        scheduler.step(epoch + 1)
    return _epoch_metrics(epoch + 1, trained, tested, lr, ema_tested)


def _write_epoch(
    plan: FinetunePlan, network: nn.Module, ema: Any, rows: list[dict[str, Any]], improved: tuple[bool, bool],
    best_top1: float, trainer_state: dict[str, Any], log: RunLog,
) -> None:
    """After an epoch (the last of ``rows``): metrics.jsonl and summary.csv, best/ and best_ema/
    when ``improved`` (network, EMA), checkpoint-EPOCH/ with checkpoint_hist, then last/ with
    ``trainer_state``; no signal stops the writes."""
    run, metrics = plan.run, rows[-1]
    metadata = _metadata(plan, metrics["epoch"], best_top1, metrics)
    with SIGNALS.holding():
        write_metrics(run, rows)
        log.rows(rows)
        if improved[0]:
            save(network, run / BEST, metadata=metadata)
        if improved[1]:
            save(ema.module, run / BEST_EMA, metadata={**metadata, "ema": True})
        if plan.recipe.train.checkpoint_hist:
            save(network, run / f"checkpoint-{metrics['epoch']}", metadata=metadata)
        _keep_history(run, rows, plan.recipe.train.checkpoint_hist, metrics["epoch"])
        save(network, run / LAST, metadata=metadata, trainer_state=trainer_state)


def _start_position(plan: FinetunePlan) -> EpochPosition | None:
    """Where a resumed run stopped inside its epoch (``None``: at an epoch's end, or a new run).

    Raises:
        RunError: it was saved by another number of processes (the shards would differ).
    """
    state = plan.trainer_state or {}
    position = EpochPosition.from_state(state["position"]) if state.get("position") else None
    if position is not None and position.world_size != plan.processes.world_size:
        raise RunError(
            f"--resume: {plan.run / LAST} was saved inside epoch {plan.start_epoch + 1} by {position.world_size} "
            f"process(es); resume it with as many (torchrun --nproc_per_node {position.world_size})"
        )
    return position


def _open_run_folder(plan: FinetunePlan, network: nn.Module, rows: list[dict[str, Any]],
                     initial: dict[str, Any] | None, log: RunLog, progress: Progress) -> None:
    """Before the first epoch (rank 0): a new run (``initial``: its epoch-0 trainer state) writes
    ``last/``, ``metrics.jsonl`` and ``recipe.yaml`` and reports its epoch-0 line (the test after
    the head-only phase) to ``progress``, if it has one; a resumed one rewrites ``metrics.jsonl``
    with the lines ``last/`` holds (dropping later and torn ones)."""
    run = plan.run
    with SIGNALS.holding():
        if initial is None:
            write_metrics(run, rows)
        else:
            run.mkdir(parents=True, exist_ok=True)
            save(network, run / LAST, metadata=_metadata(plan, 0, -1.0, rows[-1] if rows else None),
                 trainer_state=initial)
            write_metrics(run, rows)
            write_atomic(run / RECIPE_FILE, plan.recipe.to_yaml())
        log.rows(rows)
        _keep_history(run, rows, plan.recipe.train.checkpoint_hist, plan.start_epoch)
    if initial is not None and rows:
        progress.epoch_done(rows[-1], False)


def _probe(plan: FinetunePlan, network: nn.Module, train_loader: Any, test_loader: Any, precision: Precision,
           progress: Progress) -> dict[str, Any]:
    """A new run's head-only phase (``train.head_steps``, :func:`probe_head`) and its test: the
    epoch-0 line of ``metrics.jsonl``."""
    train_cfg, processes = plan.recipe.train, plan.processes
    trained = probe_head(network, train_loader, train_cfg, plan.recipe.data, precision, progress.train(0), processes)
    tested = evaluate(network, test_loader, plan.recipe.data, precision, progress.test(0), processes)
    return head_row(trained, tested, train_cfg.head_steps)


def _fit(plan: FinetunePlan, progress: Progress | None = None) -> dict[str, Any]:
    """Train ``plan.network`` for the recipe's epochs, writing ``RUN`` as it goes.

    A new run first writes ``RUN/last`` (epoch 0: the initial weights), ``RUN/metrics.jsonl``
    (empty) and ``RUN/recipe.yaml``, so that it can be resumed from its first epoch on; with
    ``train.head_steps`` it first trains the classifier alone (:func:`_probe`), and ``last/`` and
    ``metrics.jsonl`` (its epoch-0 line) hold the network after that phase (a run stopped during
    it has written nothing and starts anew; a resumed run never repeats it). After each
    epoch: ``RUN/metrics.jsonl`` (and ``summary.csv``) rewritten with the epoch's line, ``RUN/best``
    when the test top-1 improved (``RUN/best_ema`` when the EMA's did), ``RUN/checkpoint-EPOCH``
    with ``checkpoint_hist``, then ``RUN/last`` with the trainer state (optimizer, scheduler, EMA
    weights, grad scaler); a run killed between these writes resumes from the previous ``last``
    and drops the metric lines after it. Inside an epoch, ``RUN/last`` is also written every
    ``train.checkpoint_interval`` minutes and when a stop signal arrives, with the epoch's
    :class:`EpochPosition` in its trainer state. No signal interrupts the writes. Under torchrun
    every process trains a ``DistributedDataParallel`` copy on its shard and only rank 0 writes.

    Raises:
        KeyboardInterrupt: SIGINT / SIGTERM (after the state was saved, or a second Ctrl-C at
        once); ``run_finetune`` turns it into :class:`RunInterrupted`. TrainError: the loss
        diverged. CheckpointError, RunError, WriteError: a checkpoint or file could not be written.
    """
    progress = progress or Progress()
    recipe, run, processes = plan.recipe, plan.run, plan.processes
    main = processes.is_main
    train_cfg, data_cfg = recipe.train, recipe.data
    state = plan.trainer_state or {}
    position = _start_position(plan)
    precision = Precision.of(plan.device, train_cfg)
    network = precision.prepare(plan.network)
    pin = plan.device.type == "cuda"
    loaders = {"num_workers": data_cfg.num_workers, "pin_memory": pin, "processes": processes}
    train_loader = make_loader(plan.train, train_cfg.batch_size, train=True, seed=train_cfg.seed, **loaders)
    test_loader = make_loader(plan.test, data_cfg.eval_batch_size, train=False, **loaders)
    # the head-only phase on the bare network (before DDP's hooks and torch.compile), new runs only
    probed = None if state or not train_cfg.head_steps else _probe(plan, network, train_loader, test_loader,
                                                                   precision, progress)
    set_trainable(network, train_cfg.trainable)
    trained_network = _training_network(plan, network)
    if processes.enabled:
        processes.barrier()  # every process has checked the run folder before rank 0 writes it
    optimizer = create_optimizer(network, train_cfg)
    scheduler = create_scheduler(
        optimizer, train_cfg, updates_per_epoch(len(train_loader), train_cfg.grad_accum_steps)
    )
    extras = create_extras(network, train_cfg, data_cfg, precision, len(plan.train.classes))
    num_updates = int(state.get("num_updates", 0))
    best = _Best.of(state)
    if state:
        _restore(state, optimizer, scheduler, extras, train_cfg.epochs)
    if scheduler is not None:  # the same learning rate whether the run starts here or resumes here
        scheduler.step_update(num_updates=num_updates)
    rows = resumed_metrics(run, plan.start_epoch) if state and main else []
    rows += [probed] if probed is not None and main else []
    log = RunLog(run, plan.log, plan.start_epoch if state else -1) if main else None  # -1: epoch 0 is logged
    if main:
        initial = None if state else _trainer_state(0, train_cfg.epochs, 0, best, optimizer, scheduler, extras)
        _open_run_folder(plan, network, rows, initial, log, progress)

    epoch = plan.start_epoch

    def save_position(here: EpochPosition, updates: int) -> None:
        """``RUN/last`` inside epoch ``epoch + 1``: the weights and trainer state after ``here.step`` batches."""
        if not main:
            return
        inside = {**_trainer_state(epoch, train_cfg.epochs, updates, best, optimizer, scheduler, extras),
                  "position": here.to_state()}
        metadata = {**_metadata(plan, epoch, best.top1, rows[-1] if rows else None), "step": here.step}
        with SIGNALS.holding():
            save(network, run / LAST, metadata=metadata, trainer_state=inside)

    control = RunControl(processes, train_cfg.checkpoint_interval, save_position)
    metrics: dict[str, Any] = {}
    try:
        for epoch in range(plan.start_epoch, train_cfg.epochs):
            seed_epoch(train_loader, train_cfg.seed, epoch, processes.rank, position.step if position else 0)
            try:
                trained, num_updates = train_one_epoch(
                    trained_network, train_loader, optimizer, scheduler, train_cfg, data_cfg, precision, num_updates,
                    progress.train(epoch + 1), processes, extras, start=position, control=control,
                )
            except EpochStopped as stopped:
                save_position(stopped.position, stopped.num_updates)
                processes.barrier()  # the others wait for rank 0's write (torchrun ends all when one ends)
                raise _Stop(control.signum) from None
            position = None
            metrics = _test_epoch(plan, network, test_loader, precision, progress, extras, epoch, trained,
                                  optimizer, scheduler)
            improved, ema_improved = best.update(metrics)
            if main:
                rows.append(metrics)
                trainer_state = _trainer_state(
                    epoch + 1, train_cfg.epochs, num_updates, best, optimizer, scheduler, extras
                )
                _write_epoch(plan, network, extras.ema, rows, (improved, ema_improved), best.top1, trainer_state, log)
                progress.epoch_done(metrics, improved)
            control.saved()
            if epoch + 1 < train_cfg.epochs and control.stop_requested():
                raise _Stop(control.signum)
    finally:
        control.close()
        if log is not None:
            log.close()
    processes.barrier()  # RUN is complete when any process returns
    return {"epochs": train_cfg.epochs, "best_top1": best.top1, "best_epoch": best.epoch, "last": metrics}
