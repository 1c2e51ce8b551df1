"""Stopping a run where it can go on: SIGTERM (what schedulers send: SLURM preemption and time
limits, Kubernetes eviction, torchrun's shutdown) and Ctrl-C (SIGINT) finish the update in flight,
write ``RUN/last/`` complete (a mid-epoch checkpoint, :class:`EpochPosition`) and exit with
128 + the signal (143, 130); ``train.checkpoint_interval`` writes the same checkpoint every N
minutes. ``--resume`` continues from it exactly (docs/design.md §9).

:data:`SIGNALS` catches both signals while a run is prepared and trained. Outside the training
loop a signal raises ``KeyboardInterrupt`` at once (nothing half-written: the run folder's writes
are atomic); inside it (:meth:`StopSignals.deferring`) the signal is only recorded, and the loop
asks :class:`RunControl` after every update whether to stop, the same answer on every torchrun
process. A second Ctrl-C of a single process stops at once (from the previous ``last/``), except
while files are written (:meth:`StopSignals.holding`); under torchrun, where the launcher passes
on the signal the processes already got, repeated signals change nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .distributed import Distributed

#: The signals that stop a run where it can go on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """SIGINT and SIGTERM handling for a run (one instance, :data:`SIGNALS`)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._depth = 0
        self._previous: dict[int, Any] = {}
        self._deferring = False
        self._force_repeat = True
        self._holding = 0
        self._raise_later = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Catch SIGTERM, and SIGINT unless it is ignored (a job started with ``&`` from a script,
        or under ``nohup``, must keep ignoring it), while the body runs; nested uses share the
        outermost's handlers. Only in the main thread (elsewhere Python delivers no signal)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        if self._depth == 0:
            self.signum, self._raise_later = None, False
            for signum in STOP_SIGNALS:
                current = signal.getsignal(signum)
                if signum == signal.SIGINT and current is signal.SIG_IGN:
                    continue
                self._previous[signum] = current
                signal.signal(signum, self._handle)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                for signum, previous in self._previous.items():
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
                self._previous.clear()

    @contextlib.contextmanager
    def deferring(self, force_repeat: bool = True) -> Iterator[StopSignals]:
        """Record a signal instead of raising (the training loop polls :attr:`signum`); with
        ``force_repeat``, a second SIGINT raises ``KeyboardInterrupt`` at once."""
        with self.installed():
            before = self._deferring, self._force_repeat
            self._deferring, self._force_repeat = True, force_repeat
            try:
                yield self
            finally:
                self._deferring, self._force_repeat = before

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """While files are written: no signal raises (the run folder stays consistent); one that
        would have raised does so when the body ends."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if self._holding == 0 and self._raise_later:
            self._raise_later = False
            raise KeyboardInterrupt

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self._deferring and (first or signum != signal.SIGINT or not self._force_repeat):
            return  # recorded: the training loop stops after the update in flight
        if self._holding:
            self._raise_later = True
            return
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM); 130 when none arrived."""
        return 128 + int(self.signum if self.signum is not None else signal.SIGINT)


SIGNALS = StopSignals()


@dataclass
class EpochPosition:
    """Where a run stands inside an epoch, enough to continue it exactly (a mid-epoch checkpoint).

    Attributes:
        step: batches of the epoch trained (per process); always at the end of an update.
        sums: ``(world_size, 3)`` float64: per process (index = rank), its partial train-loss sum
            (loss x images), top-1 count and image count, which the epoch's metrics continue.
        cpu_rng: ``(world_size, N)`` uint8: each process's torch CPU generator state (dropout,
            drop-path on CPU); the generator is restored to it after the loader's iterator starts.
        cuda_rng: the same for the CUDA generator of each process's device, or ``None`` on CPU.
        seconds: training seconds of the epoch so far (rank 0's).
    """

    step: int
    sums: torch.Tensor
    cpu_rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor] = None
    seconds: float = 0.0

    def to_state(self) -> dict[str, Any]:
        """Tensors and numbers only (``trainer_state.pt`` is read with ``weights_only=True``)."""
        return {"step": self.step, "sums": self.sums, "cpu_rng": self.cpu_rng, "cuda_rng": self.cuda_rng,
                "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochPosition:
        return cls(int(state["step"]), state["sums"], state["cpu_rng"], state.get("cuda_rng"),
                   float(state.get("seconds", 0.0)))

    @property
    def world_size(self) -> int:
        return int(self.sums.shape[0])

    @classmethod
    def gather(cls, processes: Distributed, step: int, sums: torch.Tensor, device: torch.device,
               seconds: float, group: Any = None) -> EpochPosition:
        """Every process's ``sums`` (3,) and generator states, collected on every process
        (``group``: a process group for CPU tensors, Gloo's under NCCL)."""
        rows = [sums.detach().double().cpu(), torch.get_rng_state()]
        if device.type == "cuda":
            rows.append(torch.cuda.get_rng_state(device))
        if processes.enabled:
            import torch.distributed as dist

            gathered = []
            for row in rows:
                parts = [torch.empty_like(row) for _ in range(processes.world_size)]
                dist.all_gather(parts, row, group=group)
                gathered.append(torch.stack(parts))
        else:
            gathered = [row[None] for row in rows]
        return cls(step, gathered[0], gathered[1], gathered[2] if len(gathered) > 2 else None, seconds)

    def restore_rng(self, rank: int, device: torch.device) -> None:
        """Put this process's generator states back."""
        # a copy with its own storage: torch misreads a row of the stacked states (a view at an offset)
        torch.set_rng_state(self.cpu_rng[rank].clone())
        if device.type == "cuda" and self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng[rank].clone(), device)


class EpochStopped(Exception):
    """Raised by the training loop when its :class:`RunControl` says stop (after an update).

    Attributes:
        position: where the epoch stopped (for the mid-epoch checkpoint).
        num_updates: the update count at that point.
    """

    def __init__(self, position: EpochPosition, num_updates: int) -> None:
        super().__init__(f"stopped after batch {position.step}")
        self.position, self.num_updates = position, num_updates


class RunControl:
    """What the training loop asks after every update: stop (a signal arrived), or write a
    mid-epoch checkpoint (``interval_minutes`` passed since the last one); the same answer on every
    process.

    Under torchrun each process's flags are combined with a non-blocking ``all_reduce`` (MAX) on a
    Gloo group of CPU tensors, started after one update and read after the next, so the answer
    costs no device synchronization and comes one update later on every process alike. Rank 0's
    clock decides the checkpoints.
    """

    def __init__(self, processes: Distributed, interval_minutes: float | None,
                 on_checkpoint: Callable[[EpochPosition, int], None]) -> None:
        self.processes, self.on_checkpoint = processes, on_checkpoint
        self.interval = 60.0 * interval_minutes if interval_minutes else None
        self.last_save = time.monotonic()
        self.group: Any = None
        self._pending: Any = None
        self.signum: int | None = None  # the stop signal (any process's) once the processes agreed on it
        if processes.enabled:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def _local(self) -> torch.Tensor:
        due = self.interval is not None and time.monotonic() - self.last_save >= self.interval
        return torch.tensor([SIGNALS.signum or 0, due and self.processes.is_main], dtype=torch.int32)

    def _ask(self) -> str | None:
        """``"stop"``, ``"checkpoint"`` or ``None``: the flags of every process, one update late
        under torchrun."""
        flags = self._local()
        if self.processes.enabled:
            import torch.distributed as dist

            previous = self._collect()
            self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flags)
            flags = previous
        if flags[0]:
            self.signum = int(flags[0])
            return "stop"
        return "checkpoint" if flags[1] else None

    def update_done(self, step: int, num_updates: int, sums: tuple[torch.Tensor, torch.Tensor, int],
                    device: torch.device, begun: float) -> None:
        """After an update (``step`` batches of the epoch done): write a mid-epoch checkpoint when
        one is due, or stop.

        Args:
            sums: this process's partial train-loss sum (float64), top-1 count (int64) and image count.
            begun: ``time.perf_counter()`` at the (virtual) start of the epoch's training.

        Raises:
            EpochStopped: a stop signal arrived (at any process).
        """
        action = self._ask()
        if action is None:
            return
        loss_sum, correct, seen = sums
        here = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=loss_sum.device)])
        position = EpochPosition.gather(self.processes, step, here, device, time.perf_counter() - begun, self.group)
        if action == "stop":
            raise EpochStopped(position, num_updates)
        self.on_checkpoint(position, num_updates)
        self.saved()

    def _collect(self) -> torch.Tensor:
        if self._pending is None:
            return torch.zeros(2, dtype=torch.int32)
        work, flags = self._pending
        work.wait()
        self._pending = None
        return flags

    def saved(self) -> None:
        """A checkpoint was written: the interval starts again."""
        self.last_save = time.monotonic()

    def stop_requested(self) -> bool:
        """Whether any process got a stop signal (a blocking agreement; at the end of an epoch);
        :attr:`signum` then says which."""
        self._collect()
        flags = self._local()
        if self.processes.enabled:
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flags[0]) or None
        return bool(flags[0])

    def close(self) -> None:
        """Wait for a combination still in flight (every process started it)."""
        self._collect()
