"""The results of a sweep (:mod:`ilmconvert.train.sweep`): each finished cell's row, the statistics
over seeds, and the files they are written to (``results.jsonl``, ``summary.json``, ``summary.md``
and the two figures). Everything is recomputed from the cell folders, never accumulated.

The functions take the sweep's grid (:class:`~ilmconvert.train.sweep_grid.Sweep`,
:class:`~ilmconvert.train.sweep_grid.Cell`); they do not depend on the module that runs it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import atomic
from ..io import is_checkpoint, load_trainer_state
from .head_probe import is_head_row
from .recipes import parse_recipe
from .run_folder import read_metrics
from .sweep_grid import CELLS, Cell, Sweep, SweepError


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    try:
        atomic.write_text(path, text)
    except OSError as err:
        raise SweepError(f"cannot write {path}: {err.strerror or err}") from err


def finished(run: Path, epochs: int) -> bool:
    """The cell's run has trained all ``epochs`` (its ``last/`` trainer state says so)."""
    if not is_checkpoint(run / "last"):
        return False
    state = load_trainer_state(run / "last") or {}
    return int(state.get("epoch", 0)) >= epochs


def cell_result(sweep: Sweep, cell: Cell) -> dict[str, Any] | None:
    """The ``results.jsonl`` row of a finished cell (``None`` when it is not finished).

    Errors are top-1 errors in percent on the test split; ``final_error`` is the last epoch's,
    ``best_error`` the lowest over the trained epochs (1 to ``epochs``); ``step0_error`` the test
    after the head-only phase (``train.head_steps``, the epoch-0 line; ``None`` without one), which
    the ``curve`` starts with; ``seconds`` sums the epochs' (and the head-only phase's) training and
    test time, ``images_per_s`` averages the trained epochs'.
    """
    run = sweep.out / CELLS / cell.name
    epochs = sweep.recipe.train.epochs
    if not finished(run, epochs):
        return None
    every = [r for r in read_metrics(run) if r["epoch"] <= epochs]
    rows = [r for r in every if not is_head_row(r)]
    step0 = [100.0 - r["top1"] for r in every if is_head_row(r)]
    recipe = parse_recipe((run / "recipe.yaml").read_text(), str(run / "recipe.yaml"))
    errors = [100.0 - r["top1"] for r in rows]
    best = min(range(len(rows)), key=lambda i: errors[i])
    return {
        "cell": cell.name,
        "variant": cell.variant,
        "batch_size": cell.batch_size,
        "seed": cell.seed,
        "lr": recipe.train.lr,
        "epochs": epochs,
        "final_error": errors[-1],
        "best_error": errors[best],
        "best_epoch": rows[best]["epoch"],
        "final_test_loss": rows[-1]["test_loss"],
        "step0_error": step0[0] if step0 else None,
        "head_steps": recipe.train.head_steps,
        "curve": [
            {
                "epoch": r["epoch"],
                "test_error": 100.0 - r["top1"],
                "train_loss": r["train_loss"],
                "test_loss": r["test_loss"],
            }
            for r in every
        ],
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "seconds": sum(r["epoch_s"] for r in every),
    }


def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the two-sided Student t confidence interval of the mean.

    ``mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation
    (``n - 1`` in the denominator); the half-width is ``None`` for fewer than two values.
    The quantile is ``scipy.stats.t.ppf``.
    """
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)


def summarize(sweep: Sweep, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (variant, batch size): mean ± 95 % CI of the final and best test error over seeds, of
    the step-0 error over the seeds that have one (``step0_error_*``, ``None`` when none has), and
    the difference to the reference variant paired by seed (``variant − reference``, so negative
    means fewer errors than the reference)."""
    table, paired = [], []
    by_key = {(r["variant"], r["batch_size"], r["seed"]): r for r in results}
    for size in sweep.batch_sizes:
        for variant in sweep.variants:
            rows = [by_key[(variant, size, s)] for s in sweep.seeds if (variant, size, s) in by_key]
            if not rows:
                continue
            final, final_ci = interval([r["final_error"] for r in rows])
            best, best_ci = interval([r["best_error"] for r in rows])
            step0 = [r["step0_error"] for r in rows if r.get("step0_error") is not None]
            step0_mean, step0_ci = interval(step0) if step0 else (None, None)
            table.append({
                "variant": variant, "batch_size": size, "seeds": [r["seed"] for r in rows], "n": len(rows),
                "final_error_mean": final, "final_error_ci95": final_ci,
                "best_error_mean": best, "best_error_ci95": best_ci,
                "step0_error_mean": step0_mean, "step0_error_ci95": step0_ci, "step0_n": len(step0),
                "lr": rows[0]["lr"], "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
                "seconds_per_cell": sum(r["seconds"] for r in rows) / len(rows),
            })  # fmt: skip
            if variant == sweep.reference:
                continue
            pairs = [
                (r["final_error"], by_key[(sweep.reference, size, r["seed"])]["final_error"])
                for r in rows
                if (sweep.reference, size, r["seed"]) in by_key
            ]
            if pairs:
                diff, diff_ci = interval([a - b for a, b in pairs])
                paired.append({
                    "variant": variant, "reference": sweep.reference, "batch_size": size, "n": len(pairs),
                    "final_error_diff_mean": diff, "final_error_diff_ci95": diff_ci,
                })  # fmt: skip
    return {
        "recipe": sweep.recipe.name,
        "data": sweep.data,
        "epochs": sweep.recipe.train.epochs,
        "recipe_batch_size": sweep.recipe.train.batch_size,
        "recipe_lr": sweep.recipe.train.lr,
        "lr_scaling": sweep.lr_scaling,
        "reference": sweep.reference,
        "cells_finished": len(results),
        "cells_planned": len(sweep.cells),
        "seconds_total": sum(r["seconds"] for r in results),
        "table": table,
        "paired": paired,
        "cells": results,
    }


def write_summaries(sweep: Sweep) -> dict[str, Any]:
    """Rewrite ``results.jsonl``, ``summary.json``, ``summary.md`` and the two figures from the
    finished cell folders. Returns the summary."""
    from .plots import plot_error_vs_batch, plot_sweep_curves

    results = [row for cell in sweep.cells if (row := cell_result(sweep, cell)) is not None]
    summary = summarize(sweep, results)
    out = sweep.out
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    write_json_atomic(out / "summary.json", {k: v for k, v in summary.items() if k != "cells"})
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    if results:
        plot_error_vs_batch(
            summary["table"], out / "error_vs_batch.png", title=f"{sweep.recipe.name}: final test error"
        )
        plot_sweep_curves(results, out / "curves.png")
    return summary


def _pm(mean: float, ci: float | None) -> str:
    return f"{mean:.2f}" if ci is None else f"{mean:.2f} ± {ci:.2f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables: final test error (the headline), the step-0 error (when a
    cell has one), best-epoch error, paired differences to the reference, and the cost per cell."""
    table = summary["table"]
    sizes = list(dict.fromkeys(r["batch_size"] for r in table))
    variants = list(dict.fromkeys(r["variant"] for r in table))
    cell = {(r["variant"], r["batch_size"]): r for r in table}
    lines = [
        f"# Sweep: {summary['recipe']} on {summary['data']}",
        "",
        f"{summary['cells_finished']} of {summary['cells_planned']} cells finished; {summary['epochs']} "
        f"epoch{'' if summary['epochs'] == 1 else 's'}; "
        f"learning rate {summary['recipe_lr']:g} at batch {summary['recipe_batch_size']}, scaling "
        f"`{summary['lr_scaling']}`; {summary['seconds_total'] / 60:.1f} min of training and testing in all.",
        "Top-1 test error in %, mean ± half-width of the 95 % Student t interval over seeds (n seeds).",
        "",
    ]

    def grid(title: str, value: Callable[[dict[str, Any]], str]) -> None:
        lines.extend([f"## {title}", "", "| variant | " + " | ".join(f"batch {s}" for s in sizes) + " |"])
        lines.append("|---" * (len(sizes) + 1) + "|")
        for v in variants:
            cells = [value(cell[(v, s)]) if (v, s) in cell else "" for s in sizes]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")

    grid(
        "Final-epoch test error (headline)", lambda r: f"{_pm(r['final_error_mean'], r['final_error_ci95'])} ({r['n']})"
    )
    if any(r.get("step0_error_mean") is not None for r in table):
        grid(
            "Step 0 (head only, before fine-tuning)",
            lambda r: "" if r.get("step0_error_mean") is None
            else f"{_pm(r['step0_error_mean'], r['step0_error_ci95'])} ({r['step0_n']})",
        )
    grid("Best-epoch test error (secondary)", lambda r: f"{_pm(r['best_error_mean'], r['best_error_ci95'])} ({r['n']})")
    if summary["paired"]:
        diffs = {(d["variant"], d["batch_size"]): d for d in summary["paired"]}
        lines.extend([
            f"## Difference to `{summary['reference']}` (final error, paired by seed; negative = fewer errors)", "",
            "| variant | " + " | ".join(f"batch {s}" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|",
        ])  # fmt: skip
        for v in variants:
            if v == summary["reference"]:
                continue
            row = [diffs.get((v, s)) for s in sizes]
            lines.append(
                f"| {v} | "
                + " | ".join(
                    f"{_pm(d['final_error_diff_mean'], d['final_error_diff_ci95'])} ({d['n']})" if d else ""
                    for d in row
                )
                + " |"
            )
        lines.append("")
    grid(
        "Cost per cell: seconds (train + test), images/s in training",
        lambda r: f"{r['seconds_per_cell']:.0f} s, {r['images_per_s']:.0f} img/s",
    )
    lr = {s: next(r["lr"] for r in table if r["batch_size"] == s) for s in sizes}
    lines.append("Learning rate per batch size: " + ", ".join(f"{s}: {v:.4g}" for s, v in lr.items()) + ".")
    return "\n".join(lines) + "\n"
