"""Figures of runs and sweeps, drawn with matplotlib (Agg backend: no display needed).

- :func:`plot_runs`: train / test loss, test top-1 and learning rate per epoch of one or more run
  folders, overlaid and labelled (``ilmconvert plot``, and ``RUN/curves.png`` after ``finetune``).
- :func:`plot_error_vs_batch`: a sweep's final test error against the batch size per variant, with
  95 % confidence intervals as error bars (the form of the ILM paper's Figure 1).
- :func:`plot_sweep_curves`: a sweep's test error per epoch, one panel per batch size.

Every figure is written to a temporary file and renamed, so a killed process leaves the old figure
or the new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import IlmconvertError


class PlotError(IlmconvertError):
    """A figure cannot be drawn (no metrics in a run folder) or written."""


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    """Write ``fig`` to ``out`` (format from the suffix, PNG by default) atomically and close it."""
    out = Path(out)
    suffix = out.suffix or ".png"
    tmp = out.with_name(f".{out.name}.tmp{suffix}")
    try:
        with atomic.guard(out):  # a full disk: one WriteError line
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
            os.replace(tmp, out)
    except (OSError, ValueError) as err:  # ValueError: matplotlib does not know the format
        raise PlotError(f"cannot write {out}: {getattr(err, 'strerror', None) or err}; choose another --out") from err
    finally:
        tmp.unlink(missing_ok=True)
        _pyplot().close(fig)
    return out


def _plain_log_labels(axis: Any) -> None:
    """Label a log axis with plain numbers (``76.5``, ``20``, ``0.1``) instead of matplotlib's
    scientific notation (``7.65×10^1``), on the same ticks it would label."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


def plot_runs(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw the learning curves of the run folders ``runs`` into one figure at ``out``.

    Four panels over epochs: train and test loss (solid / dashed), test top-1 (%), test error (%) on
    a log axis, and the learning rate. Each run is one colour, labelled by ``labels`` or its folder.

    Args:
        runs: run folders written by ``finetune`` (each with ``metrics.jsonl``).
        out: the image file; its suffix picks the format (``.png``, ``.pdf``, ``.svg``).
        labels: one label per run (default: the folder names, with their parent when they clash).

    Returns:
        ``out``.

    Raises:
        PlotError: a folder has no metrics, ``labels`` has another length, ``out`` cannot be written.
    """
    from .run_folder import read_metrics

    if not runs:
        raise PlotError("no run folders given; pass one or more folders written by `ilmconvert finetune`")
    if labels is not None and len(labels) != len(runs):
        raise PlotError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    series = []
    for run in runs:
        try:
            rows = read_metrics(run)
        except ValueError as err:
            raise PlotError(f"{Path(run) / 'metrics.jsonl'} is not JSON lines: {err}") from None
        if not rows:
            raise PlotError(f"{run} has no finished epoch (no metrics.jsonl lines); is it a `finetune` run folder?")
        series.append(rows)
    names = list(labels) if labels is not None else _default_labels([Path(r) for r in runs])

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_top1), (ax_error, ax_lr) = axes
    for i, (rows, name) in enumerate(zip(series, names)):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, label=f"{name} train")
        ax_loss.plot(epochs, [r["test_loss"] for r in rows], color=color, linestyle="--", label=f"{name} test")
        ax_top1.plot(epochs, [r["top1"] for r in rows], color=color, marker="o", markersize=3, label=name)
        ax_error.plot(epochs, [100.0 - r["top1"] for r in rows], color=color, marker="o", markersize=3, label=name)
        ax_lr.plot(epochs, [r["lr"] for r in rows], color=color, label=name)
    ax_loss.set(title="loss (solid: train, dashed: test)", xlabel="epoch", ylabel="cross-entropy")
    ax_top1.set(title="test top-1", xlabel="epoch", ylabel="top-1 (%)")
    ax_error.set(title="test error", xlabel="epoch", ylabel="top-1 error (%)", yscale="log")
    _plain_log_labels(ax_error.yaxis)
    ax_lr.set(title="learning rate (after the epoch)", xlabel="epoch", ylabel="lr")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(out))


def _default_labels(runs: list[Path]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.parent.name}/{r.name}" for r in runs]


def plot_error_vs_batch(
    table: Sequence[Mapping[str, Any]], out: str | Path, *, title: str = "", key: str = "final_error"
) -> Path:
    """Test error against batch size per variant, with error bars (the form of the paper's Figure 1).

    Args:
        table: rows with ``variant``, ``batch_size``, ``{key}_mean`` and ``{key}_ci95`` (half-width
            of the 95 % interval, ``None`` for a single seed), as :func:`ilmconvert.train.sweep_results.summarize`
            writes them.
        out: the image file.
        title: the figure title.
        key: ``final_error`` (the headline) or ``best_error``.

    Returns:
        ``out``.

    Raises:
        PlotError: an empty table, or ``out`` cannot be written.
    """
    if not table:
        raise PlotError("no finished cells to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    variants = list(dict.fromkeys(row["variant"] for row in table))
    sizes = sorted({row["batch_size"] for row in table}, reverse=True)
    for i, variant in enumerate(variants):
        rows = sorted((r for r in table if r["variant"] == variant), key=lambda r: -r["batch_size"])
        x = [sizes.index(r["batch_size"]) + (i - (len(variants) - 1) / 2) * 0.06 for r in rows]
        y = [r[f"{key}_mean"] for r in rows]
        err = [r[f"{key}_ci95"] or 0.0 for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=variant, color=f"C{i % 10}")
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set(xlabel="batch size (images per step)", ylabel=f"{key.replace('_', ' ')} (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, Path(out))


def plot_sweep_curves(cells: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Test error per epoch of a sweep's cells: one panel per batch size, one colour per variant,
    one thin line per seed and a thick line for the mean over seeds.

    Args:
        cells: rows of ``results.jsonl`` (``variant``, ``batch_size``, ``seed``, ``curve``: a list
            of per-epoch dicts with ``epoch`` and ``test_error``; epoch 0, when there, is the test
            after the head-only phase, so the curves start there).
        out: the image file.

    Returns:
        ``out``.

    Raises:
        PlotError: no cells, or ``out`` cannot be written.
    """
    if not cells:
        raise PlotError("no finished cells to plot")
    plt = _pyplot()
    sizes = sorted({c["batch_size"] for c in cells}, reverse=True)
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        for i, variant in enumerate(variants):
            runs = [c["curve"] for c in cells if c["batch_size"] == size and c["variant"] == variant]
            for curve in runs:
                ax.plot([p["epoch"] for p in curve], [p["test_error"] for p in curve], color=f"C{i % 10}", alpha=0.3)
            if runs:  # the mean over the epochs every seed has (epoch 0: the head-only phase's test)
                errors = [{p["epoch"]: p["test_error"] for p in curve} for curve in runs]
                common = sorted(set.intersection(*(set(e) for e in errors)))
                mean = [sum(e[epoch] for e in errors) / len(errors) for epoch in common]
                ax.plot(common, mean, color=f"C{i % 10}", linewidth=2, label=variant)
        ax.set(title=f"batch {size}", xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 error (%)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(out))
