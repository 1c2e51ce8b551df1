"""Loading batches: the training order (:class:`EpochSampler`), the DataLoader with its workers
(:func:`make_loader`) and the move to the device (:func:`to_input`).

An epoch's order and every image's augmentation seed are pure functions of (seed, epoch, index),
so ``--resume`` replays an epoch exactly, with or without worker processes (docs/design.md §9).
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from .distributed import SINGLE, Distributed

if TYPE_CHECKING:
    from .data import ImageSet

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A seed in ``[0, 2**63)`` that depends on every one of ``values`` (a splitmix64 chain):
    neighbouring tuples such as (seed, epoch) and (seed, epoch + 1) give unrelated seeds."""
    h = 0
    for value in values:
        h = ((h ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class EpochSampler(Sampler):
    """One epoch's training order as ``(index, seed)`` pairs, which :class:`ImageSet` reads.

    The order (a permutation of ``range(size)``, or this process's shard through ``shard``, a
    ``DistributedSampler``) and each image's augmentation seed are pure functions of (``seed``,
    epoch, index); call :meth:`set_epoch` before each epoch. An epoch therefore replays exactly
    after ``--resume``, whatever ``num_workers`` is: the seeds travel with the indices, so neither
    the loader's workers (persistent ones keep their random state across epochs) nor the random
    draws made before the epoch play any part.
    """

    def __init__(self, size: int, seed: int, shard: Sampler[int] | None = None) -> None:
        self.size, self.seed, self.shard, self.epoch, self.skip = size, seed, shard, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the order and seeds of ``epoch`` (0-based), leaving out its first ``skip`` images
        (this process's): the part of the epoch that a run stopped in its middle has trained."""
        self.epoch, self.skip = epoch, skip
        if self.shard is not None:
            self.shard.set_epoch(epoch)

    def __len__(self) -> int:
        return (len(self.shard) if self.shard is not None else self.size) - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if self.shard is not None:
            order = list(self.shard)
        else:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        for index in order[self.skip :]:
            yield index, mix_seed(self.seed, epoch, index, 1)


def _quiet_when_main_process_left(previous: Callable[..., Any]) -> Callable[..., Any]:
    """A ``sys.excepthook`` for loader workers that drops the one error that is not one: the
    handshake of ``multiprocessing.resource_sharer`` (which hands a batch's shared-memory file
    descriptor to the main process) cut short because the main process stopped (Ctrl-C) while
    receiving. Its serving thread reports that EOFError / ConnectionError through
    ``sys.excepthook`` and carries on; anything else goes to ``previous``."""
    import multiprocessing.resource_sharer

    sharer = multiprocessing.resource_sharer.__file__

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        frames = traceback.extract_tb(tb)
        if issubclass(exc_type, (EOFError, ConnectionError)) and any(f.filename == sharer for f in frames):
            return
        previous(exc_type, exc, tb)

    return hook


def _init_worker(worker_id: int) -> None:
    """DataLoader worker start-up: leave Ctrl-C and SIGTERM to the main process, which finishes
    its step and shuts the workers down (a terminal sends SIGINT to the whole process group, a
    scheduler SIGTERM to every process of the job; a worker killed by it would abort the step), and
    print no traceback when the main process went away in the middle of receiving a batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = _quiet_when_main_process_left(sys.excepthook)


def make_loader(
    dataset: ImageSet,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    processes: Distributed = SINGLE,
) -> DataLoader:
    """A DataLoader over ``dataset`` yielding (uint8 (B, 3, H, W), int64 (B,)).

    Training loaders read in the order of an :class:`EpochSampler` (``loader.sampler``): call
    ``loader.sampler.set_epoch(epoch)`` (or :func:`~ilmconvert.train.loop.seed_epoch`) before each
    epoch; the order and every image's augmentation then depend only on (seed, epoch), which makes
    ``--resume`` replay an epoch exactly as an uninterrupted run does, with or without worker
    processes. With several processes, a training loader reads this process's shard through
    torch's ``DistributedSampler`` (shuffled with ``seed`` and the epoch, equal shard sizes), and a
    test loader the disjoint slice ``rank::world_size``, so that sums over the processes count
    every test image once. Workers are persistent and ignore SIGINT (the main process stops them).
    A loader's own generator only seeds its workers' start-up; it never draws from torch's
    global generator.
    """
    sampler = None
    if train:
        shard = None
        if processes.enabled:
            from torch.utils.data.distributed import DistributedSampler

            world, rank = processes.world_size, processes.rank
            shard = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler = EpochSampler(len(dataset), seed, shard)
    elif processes.enabled:
        dataset = Subset(dataset, range(processes.rank, len(dataset), processes.world_size))
    per_process = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and per_process >= 2 * batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def to_input(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalized float32 on ``device``: ``(x / 255 - mean) / std``."""
    from torchvision.transforms.v2 import functional as F

    x = images.to(device, non_blocking=True).float().div_(255.0)
    x = F.normalize(x, list(mean), list(std))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
