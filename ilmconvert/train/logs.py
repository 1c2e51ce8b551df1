"""What a run logs besides ``metrics.jsonl``: timm's ``summary.csv`` and, optionally, TensorBoard.

``RUN/summary.csv`` has one row per epoch with timm's column names (``epoch``, ``train_loss``,
``eval_loss``, ``eval_top1``, ``eval_top5``, ``lr``; ``ema_eval_*`` with an EMA) and is rewritten
from the run's rows after every epoch, so that after ``--resume`` it matches ``metrics.jsonl``.
``--log tensorboard`` writes event files into ``RUN/tensorboard/`` with ``torch.utils.tensorboard``
(the optional extra ``ilmconvert[tensorboard]``); a resumed run purges the events of the epochs
after the checkpoint it resumes from.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import IlmconvertError

SUMMARY_FILE = "summary.csv"
TENSORBOARD_DIR = "tensorboard"
LOGGERS = ("tensorboard",)
#: metrics.jsonl key -> summary.csv column (timm's names where timm has one).
COLUMNS = {
    "epoch": "epoch",
    "train_loss": "train_loss",
    "train_top1": "train_top1",
    "test_loss": "eval_loss",
    "top1": "eval_top1",
    "top5": "eval_top5",
    "ema_test_loss": "ema_eval_loss",
    "ema_top1": "ema_eval_top1",
    "ema_top5": "ema_eval_top5",
    "lr": "lr",
    "images_per_s": "images_per_s",
    "epoch_s": "epoch_s",
}


class LogError(IlmconvertError):
    """A logger cannot be used (unknown name, package not installed)."""


def check_log(log: Sequence[str]) -> None:
    """Refuse an unknown logger, or ``tensorboard`` without its package, before anything is written.

    Raises:
        LogError: one line naming the logger and the fix.
    """
    for name in log:
        if name not in LOGGERS:
            raise LogError(f"--log {name!r}: unknown logger; choose from {', '.join(LOGGERS)}")
        if name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise LogError(
                    "--log tensorboard needs the tensorboard package; pip install 'ilmconvert[tensorboard]'"
                ) from None


class RunLog:
    """The per-epoch logs of run folder ``run``: ``summary.csv`` and the loggers in ``log``.

    Args:
        run: the run folder.
        log: logger names (:data:`LOGGERS`).
        start_epoch: epochs already done (a resumed run drops TensorBoard events after it).
    """

    def __init__(self, run: Path, log: Sequence[str], start_epoch: int) -> None:
        self.run = run
        self.logged = start_epoch
        self.writer: Any = None
        if "tensorboard" in log:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=start_epoch + 1)

    def rows(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``summary.csv`` from all ``rows`` and send the new ones to the loggers."""
        if rows:
            columns = [c for c in COLUMNS if any(c in r for r in rows)]
            text = io.StringIO()
            out = csv.writer(text, lineterminator="\n")
            out.writerow([COLUMNS[c] for c in columns])
            for row in rows:
                out.writerow([row.get(c, "") for c in columns])
            atomic.write_text(self.run / SUMMARY_FILE, text.getvalue())
        for row in rows:
            if row["epoch"] <= self.logged:
                continue
            if self.writer is not None:
                for key, value in row.items():
                    if key not in ("epoch", "head_steps") and isinstance(value, (int, float)):
                        self.writer.add_scalar(f"{'train' if key.startswith('train') else 'eval'}/{key}",
                                               value, row["epoch"])
                self.writer.flush()
            self.logged = row["epoch"]

    def close(self) -> None:
        """Flush and close the loggers."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
