"""Several processes with ``torchrun``: process group, per-process device, sums across processes.

``torchrun --nproc_per_node N -m ilmconvert finetune ...`` starts N copies of the command;
torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment. Each process
then trains a :class:`~torch.nn.parallel.DistributedDataParallel` copy of the network on its own
shard of the training set (``batch_size`` images per process and step, as in timm's
``train.py``: the global batch is ``batch_size x N``) and tests on its own slice of the test set;
the metrics are summed over processes with ``all_reduce``. Only rank 0 writes the run folder and
draws progress. ILM's statistics are per instance, so unlike BatchNorm nothing needs to be
synchronized across processes beyond DDP's gradient averaging.

Backends: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), Gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import IlmconvertError, first_line


class DistributedError(IlmconvertError):
    """The torchrun environment cannot be used as it is (bad variables, too few GPUs)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ``world_size`` training processes (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place (a no-op for one process); returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first (e.g. a download), then on the other ranks."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


SINGLE = Distributed()


def from_environment() -> Distributed:
    """The :class:`Distributed` torchrun describes in the environment (``SINGLE`` without it).

    Raises:
        DistributedError: when ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` are not integers.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise DistributedError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers; start several processes with torchrun"
        ) from None
    return Distributed(rank, world, local) if world > 1 else SINGLE


def init_process_group(info: Distributed, device: torch.device) -> torch.device:
    """Join torchrun's process group and return this process's device.

    On CUDA each process takes ``cuda:LOCAL_RANK`` (NCCL); on CPU all use Gloo. A no-op that
    returns ``device`` for a single process.

    Raises:
        DistributedError: when there are fewer visible GPUs than processes on this node, or the
            process group cannot be joined (e.g. ``WORLD_SIZE`` set without torchrun's rendezvous).
    """
    if not info.enabled:
        return device
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"process {info.rank} wants cuda:{info.local_rank} but this node shows "
                f"{torch.cuda.device_count()} GPU(s); "
                "pass --nproc_per_node at most the GPU count"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
            )
        except (RuntimeError, ValueError) as err:  # no MASTER_ADDR / MASTER_PORT, unreachable peers, ...
            raise DistributedError(
                f"WORLD_SIZE={info.world_size} but joining the process group failed ({first_line(err)}); "
                "start several processes with torchrun"
            ) from None
    return device


# How long a process that leaves a Gloo group holds back its exit, in seconds (see below).
GLOO_DRAIN_S = 0.25


def destroy_process_group() -> None:
    """Leave the process group (if one was joined), and on Gloo let its worker threads drain.

    A Gloo worker thread can still hold the last reference to the tensors of the process's last
    collective when the collective has already returned (e.g. ``all_reduce`` of a temporary).
    Releasing them takes the GIL; if the interpreter is finalizing by then, the thread is torn
    down inside a C++ destructor and the process aborts ("terminate called without an active
    exception", exit -6; the core dump shows ``AsyncAllgatherWork``'s destructor in
    ``ProcessGroupGloo::runLoop`` blocked in ``take_gil``), so torchrun reports a run that
    finished as failed. Measured with ``tests/test_head_steps.py``'s two-process script on the
    2-core CPU machine (torch 2.14.1): rank 1 aborted in 2 of 10 runs as written and in 3 of 30
    with a ``dist.barrier()`` before leaving; in 0 of 40 with this pause, which releases the GIL
    so that the threads finish while the interpreter is still alive.
    """
    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.destroy_process_group()
        if gloo:
            time.sleep(GLOO_DRAIN_S)
