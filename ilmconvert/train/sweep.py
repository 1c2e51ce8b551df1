"""``ilmconvert sweep``: train a grid of variants × batch sizes × seeds and compare them honestly.

A *variant* is a partial recipe merged over the sweep's recipe: the built-in ones change only the
network's norm layer (``model.kwargs.norm_layer``, a timm name) and the conversion method, so BN,
GN, ILM+GN and GN+PN differ in nothing else (:data:`BUILTIN_VARIANTS`). A recipe may define more
under its ``variants:`` key, e.g.::

    variants:
      ilm+gn-preserve: {model: {kwargs: {norm_layer: groupnorm}}, conversion: {method: ilm, init: preserve}}

A variant may also name a ``checkpoint:`` folder (from ``swap``, ``finetune`` or
:func:`ilmconvert.save`) to fine-tune instead of building the recipe's network, as ``finetune CKPT``
does; that is how a pretrained network is compared with its conversions (docs/study.md).

Each *cell* (variant, batch size, seed) is an ordinary ``finetune`` run folder
``DIR/cells/VARIANT-bB-sS`` that ``eval`` and ``plot`` read. The sweep is resumable: finished cells
are skipped, an interrupted cell resumes exactly (``finetune --resume``). After every cell the
summary files are rewritten from the cell folders (atomically):

- ``DIR/results.jsonl``: one line per finished cell (final and best test error, per-epoch curve,
  images/s, seconds);
- ``DIR/summary.json`` / ``DIR/summary.md``: mean ± 95 % confidence interval (Student t over seeds)
  per variant and batch size, and each variant's difference to a reference variant paired by seed;
- ``DIR/error_vs_batch.png`` (the form of the ILM paper's Figure 1) and ``DIR/curves.png``.

The learning rate follows the batch size linearly by default (``lr × B / recipe batch``, the rule
of the Group Normalization paper); ``none`` keeps the recipe's, as the ILM paper says it did.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import IlmconvertError
from .recipes import Recipe, load_recipe, parse_recipe

#: The built-in variants: partial recipes (merged over the sweep's recipe). The norm layer names
#: are timm's (``timm.layers.get_norm_layer``), so they apply to timm networks.
BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "bn": {"model": {"kwargs": {"norm_layer": "batchnorm"}}, "conversion": {"method": "none"}},
    "gn": {"model": {"kwargs": {"norm_layer": "groupnorm"}}, "conversion": {"method": "none"}},
    "ilm+gn": {"model": {"kwargs": {"norm_layer": "groupnorm"}}, "conversion": {"method": "ilm"}},
    "gn+pn": {"model": {"kwargs": {"norm_layer": "groupnorm"}}, "conversion": {"method": "proxy"}},
}
LR_SCALINGS = ("linear", "none")
SWEEP_FILE = "sweep.json"
CELLS = "cells"
RECIPES = "recipes"
#: The settings that must not change when a sweep folder is resumed (the grid may grow).
_FIXED = ("epochs", "lr_scaling", "data", "recipe")


class SweepError(IlmconvertError):
    """Bad sweep arguments, or a sweep folder that does not match them (one line)."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``variant`` at ``batch_size`` with ``seed``."""

    variant: str
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        """The run folder's name, ``VARIANT-bB-sS``."""
        return f"{self.variant}-b{self.batch_size}-s{self.seed}"


@dataclass
class SweepHooks:
    """Callbacks for a front-end: a cell starts (with ``finetune``'s progress hooks to use), is
    skipped as finished, or ends with its ``results.jsonl`` row."""

    start: Callable[[Cell, int, int], Any] = lambda cell, index, total: None
    skipped: Callable[[Cell], None] = lambda cell: None
    done: Callable[[Cell, dict[str, Any]], None] = lambda cell, row: None


@dataclass
class Sweep:
    """A checked sweep: its recipe, variants (as partial recipes) and grid, ready to run."""

    out: Path
    data: str
    recipe: Recipe
    variants: dict[str, dict[str, Any]]
    batch_sizes: list[int]
    seeds: list[int]
    lr_scaling: str
    reference: str
    device: str = "auto"
    data_root: str | Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def cells(self) -> list[Cell]:
        """The grid, seed-major: every (variant, batch size) gets its first seed before any its second."""
        return [Cell(v, b, s) for s in self.seeds for b in self.batch_sizes for v in self.variants]

    def cell_recipe(self, cell: Cell) -> Recipe:
        """The recipe of ``cell``: the variant merged over the sweep's recipe, with the cell's batch
        size, seed and (scaled) learning rate.

        Raises:
            RecipeError: the merged recipe is invalid (names the variant).
        """
        change = {k: v for k, v in self.variants[cell.variant].items() if k != "checkpoint"}
        data = _merge(self.recipe.model_dump(mode="json"), change)
        data.pop("variants", None)
        train = data["train"]
        base_batch = self.recipe.train.batch_size
        scale = cell.batch_size / base_batch if self.lr_scaling == "linear" else 1.0
        train.update(batch_size=cell.batch_size, seed=cell.seed, lr=self.recipe.train.lr * scale)
        if self.lr_scaling == "linear":
            train["warmup_lr"] = train["warmup_lr"] * scale
            train["min_lr"] = train["min_lr"] * scale
        data["name"] = f"{self.recipe.name or 'recipe'}/{cell.name}"
        return parse_recipe(yaml.safe_dump(data, sort_keys=False), f"{self.recipe.name} + variant {cell.variant}")


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``change`` merged in, recursively for nested mappings (a copy)."""
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _parse_list(text: str | Sequence[Any], what: str, cast: Callable[[str], Any]) -> list[Any]:
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    if not items or any(not s for s in items):
        raise SweepError(f"--{what}: expected a comma-separated list, got {text!r}")
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise SweepError(f"--{what}: {text!r} is not a comma-separated list of {cast.__name__}s") from None
    if len(set(values)) != len(values):
        raise SweepError(f"--{what}: {text!r} names a value twice")
    return values


def plan_sweep(
    *,
    recipe: str | Path,
    data: str,
    out: str | Path,
    variants: str | Sequence[str] = "bn,gn,ilm+gn,gn+pn",
    batch_sizes: str | Sequence[int] = "64,16,4,2",
    seeds: str | Sequence[int] = "0,1,2",
    epochs: int | None = None,
    lr_scaling: str = "linear",
    reference: str | None = None,
    device: str = "auto",
    data_root: str | Path | None = None,
) -> Sweep:
    """Check the sweep's arguments and its folder; write nothing.

    Args:
        recipe: a bundled recipe name or YAML file (its ``variants:`` add to the built-in ones).
        data: as for ``finetune`` (an ImageFolder root, ``cifar10``, ``cifar100``).
        out: the sweep folder (new, empty, or a sweep folder with the same recipe, data, epochs
            and learning-rate scaling: the grid may grow, finished cells are kept).
        variants, batch_sizes, seeds: comma-separated lists (or sequences).
        epochs: override the recipe's epochs.
        lr_scaling: ``linear`` (lr × B / recipe batch size) or ``none``.
        reference: the variant that the others are compared with, paired by seed (default ``gn``
            when swept, else the first variant).

    Raises:
        SweepError: bad lists, unknown variant (the known ones are listed), a folder of another
            sweep. RecipeError: the recipe or a variant's merged recipe is invalid.
    """
    base = load_recipe(recipe)
    if epochs is not None:
        base = base.with_overrides(epochs=epochs)
    known = BUILTIN_VARIANTS | base.variants
    names = _parse_list(variants, "variants", str)
    for name in names:
        if name not in known:
            raise SweepError(
                f"unknown variant {name!r}; known: {', '.join(known)} (define more under the recipe's variants: key)"
            )
        if "/" in name or name.startswith("."):
            raise SweepError(f"variant name {name!r} cannot be a folder name; rename it in the recipe")
        checkpoint = known[name].get("checkpoint")
        if checkpoint is not None and not Path(str(checkpoint), "config.json").is_file():
            raise SweepError(f"variant {name!r}: checkpoint {checkpoint} is not a checkpoint folder (no config.json)")
    sizes = _parse_list(batch_sizes, "batch-sizes", int)
    seed_list = _parse_list(seeds, "seeds", int)
    if min(sizes) < 1:
        raise SweepError(f"--batch-sizes must be positive, got {batch_sizes!r}")
    if lr_scaling not in LR_SCALINGS:
        raise SweepError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, got {lr_scaling!r}")
    reference = reference or ("gn" if "gn" in names else names[0])
    if reference not in names:
        raise SweepError(f"--reference {reference!r} is not one of the swept variants ({', '.join(names)})")
    sweep = Sweep(
        out=Path(out).expanduser(),
        data=str(data),
        recipe=base,
        variants={n: known[n] for n in names},
        batch_sizes=sizes,
        seeds=seed_list,
        lr_scaling=lr_scaling,
        reference=reference,
        device=device,
        data_root=data_root,
    )
    sweep.settings = {
        "recipe": base.model_dump(mode="json"),
        "data": str(data),
        "epochs": base.train.epochs,
        "lr_scaling": lr_scaling,
        "variants": sweep.variants,
        "batch_sizes": sizes,
        "seeds": seed_list,
        "reference": reference,
    }
    for cell in sweep.cells[: len(sweep.variants)]:  # every variant's merged recipe is valid
        sweep.cell_recipe(cell)
    _check_folder(sweep)
    return sweep


def _check_folder(sweep: Sweep) -> None:
    out = sweep.out
    if not out.exists():
        return
    if not out.is_dir():
        raise SweepError(f"--out {out} is a file; choose a folder")
    recorded_file = out / SWEEP_FILE
    if not recorded_file.is_file():
        if any(out.iterdir()):
            raise SweepError(f"--out {out} is not empty and holds no {SWEEP_FILE}; choose a new folder")
        return
    try:
        recorded = json.loads(recorded_file.read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{recorded_file} cannot be read ({err}); choose a new --out") from None
    for key in _FIXED:
        if recorded.get(key) != sweep.settings[key]:
            raise SweepError(
                f"--out {out} holds a sweep with another {key.replace('_', ' ')}; "
                "its cells would not be comparable: use the same settings or a new --out"
            )
    for name, variant in sweep.variants.items():
        if name in recorded.get("variants", {}) and recorded["variants"][name] != variant:
            raise SweepError(
                f"--out {out}: variant {name!r} was defined differently there; rename it or use a new --out"
            )


def _write_json_atomic(path: Path, value: Any) -> None:
    _write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        raise SweepError(f"cannot write {path}: {err.strerror or err}") from err


# ------------------------------------------------------------------------------------------ running
def run_sweep(sweep: Sweep, hooks: SweepHooks | None = None) -> dict[str, Any]:
    """Train every cell of ``sweep`` that is not finished, then write the summaries.

    Cells run one after another in this process, seed-major (see :attr:`Sweep.cells`). A cell
    folder with a resumable run (``last/``) that is not finished is resumed exactly; a finished
    one is skipped. The summaries are rewritten after every cell, so a sweep stopped at any point
    has them for the finished cells.

    Returns:
        The summary (as in ``summary.json``).

    Raises:
        RunInterrupted: Ctrl-C; running the same command again resumes. SweepError, RunError,
        RecipeError, DataError, TrainError: as ``finetune``.
    """
    from ..io import is_checkpoint
    from .run import prepare_finetune, run_finetune

    hooks = hooks or SweepHooks()
    out = sweep.out
    (out / CELLS).mkdir(parents=True, exist_ok=True)
    (out / RECIPES).mkdir(exist_ok=True)
    recorded = _recorded(out)
    recorded["variants"] = recorded.get("variants", {}) | sweep.variants
    _write_json_atomic(out / SWEEP_FILE, sweep.settings | {"variants": recorded["variants"]})
    started = time.perf_counter()
    cells = sweep.cells
    for index, cell in enumerate(cells):
        run = out / CELLS / cell.name
        if _finished(run, sweep.recipe.train.epochs):
            hooks.skipped(cell)
            continue
        progress = hooks.start(cell, index, len(cells))
        if is_checkpoint(run / "last"):
            plan = prepare_finetune(
                data=sweep.data, run=run, resume=True, device=sweep.device, data_root=sweep.data_root
            )
        else:
            recipe_file = out / RECIPES / f"{cell.name}.yaml"
            _write_text_atomic(recipe_file, sweep.cell_recipe(cell).to_yaml())
            plan = prepare_finetune(
                data=sweep.data,
                run=run,
                recipe=recipe_file,
                checkpoint=sweep.variants[cell.variant].get("checkpoint"),
                device=sweep.device,
                data_root=sweep.data_root,
            )
        run_finetune(plan, progress)
        rows = write_summaries(sweep)
        hooks.done(cell, next(r for r in rows["cells"] if r["cell"] == cell.name))
    summary = write_summaries(sweep)
    summary["wall_s_this_invocation"] = round(time.perf_counter() - started, 1)
    return summary


def _recorded(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _finished(run: Path, epochs: int) -> bool:
    """The cell's run has trained all ``epochs`` (its ``last/`` trainer state says so)."""
    from ..io import is_checkpoint, load_trainer_state

    if not is_checkpoint(run / "last"):
        return False
    state = load_trainer_state(run / "last") or {}
    return int(state.get("epoch", 0)) >= epochs


# ------------------------------------------------------------------------------------------ results
def cell_result(sweep: Sweep, cell: Cell) -> dict[str, Any] | None:
    """The ``results.jsonl`` row of a finished cell (``None`` when it is not finished).

    Errors are top-1 errors in percent on the test split; ``final_error`` is the last epoch's,
    ``best_error`` the lowest over epochs; ``seconds`` sums the epochs' training and test time.
    """
    from .run import read_metrics

    run = sweep.out / CELLS / cell.name
    epochs = sweep.recipe.train.epochs
    if not _finished(run, epochs):
        return None
    rows = [r for r in read_metrics(run) if r["epoch"] <= epochs]
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
        "curve": [
            {
                "epoch": r["epoch"],
                "test_error": 100.0 - r["top1"],
                "train_loss": r["train_loss"],
                "test_loss": r["test_loss"],
            }
            for r in rows
        ],
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "seconds": sum(r["epoch_s"] for r in rows),
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
    """Per (variant, batch size): mean ± 95 % CI of the final and best test error over seeds, and
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
            table.append({
                "variant": variant, "batch_size": size, "seeds": [r["seed"] for r in rows], "n": len(rows),
                "final_error_mean": final, "final_error_ci95": final_ci,
                "best_error_mean": best, "best_error_ci95": best_ci,
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
    _write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    _write_json_atomic(out / "summary.json", {k: v for k, v in summary.items() if k != "cells"})
    _write_text_atomic(out / "summary.md", summary_markdown(summary))
    if results:
        plot_error_vs_batch(
            summary["table"], out / "error_vs_batch.png", title=f"{sweep.recipe.name}: final test error"
        )
        plot_sweep_curves(results, out / "curves.png")
    return summary


def _pm(mean: float, ci: float | None) -> str:
    return f"{mean:.2f}" if ci is None else f"{mean:.2f} ± {ci:.2f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables: final test error (the headline), best-epoch error, paired
    differences to the reference, and the cost per cell."""
    table = summary["table"]
    sizes = list(dict.fromkeys(r["batch_size"] for r in table))
    variants = list(dict.fromkeys(r["variant"] for r in table))
    cell = {(r["variant"], r["batch_size"]): r for r in table}
    lines = [
        f"# Sweep: {summary['recipe']} on {summary['data']}",
        "",
        f"{summary['cells_finished']} of {summary['cells_planned']} cells finished; {summary['epochs']} epochs; "
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
