"""``ilmconvert sweep``: train a grid of variants × batch sizes × seeds and compare them honestly.

A *variant* is a partial recipe merged over the sweep's recipe: the built-in ones change only the
network's norm layer (``model.kwargs.norm_layer``, a timm name) and the conversion method, so BN,
GN, ILM+GN and GN+PN differ in nothing else (:data:`BUILTIN_VARIANTS`). A recipe may define more
under its ``variants:`` key, e.g.::

    variants:
      ilm+gn-preserve: {model: {kwargs: {norm_layer: groupnorm}}, conversion: {method: ilm, init: preserve}}

A variant may also name a ``checkpoint:`` folder (from ``swap``, ``finetune`` or
:func:`ilmconvert.save`) to fine-tune instead of building the recipe's network, as ``finetune CKPT``
does. With ``--checkpoint CKPT`` (``plan_sweep(checkpoint=CKPT)``) the built-in variants are
conversions of CKPT's pretrained network instead (:data:`PRETRAINED_VARIANTS`: ``bn`` as is,
``bn-frozen``, ``gn``, ``ilm+gn``, ``gn+pn``, calibrated ``gn-cal``, ``ilm+gn-cal``, ``gn+pn-cal``,
``ilm+frozen``), and a recipe's variants may be ``swap:`` settings, e.g.
``gn-cal-g8: {swap: {method: none, batchnorm: gn, calibrate: true, groups: 8}}``; each network is
made once into ``DIR/networks/VARIANT`` before its cells (:mod:`ilmconvert.train.sweep_networks`).
That is how a pretrained network is compared with its conversions (docs/study.md, docs/design.md §10).

Each *cell* (variant, batch size, seed) is an ordinary ``finetune`` run folder
``DIR/cells/VARIANT-bB-sS`` that ``eval`` and ``plot`` read. The sweep is resumable: finished cells
are skipped, an interrupted cell resumes exactly (``finetune --resume``). After every cell the
summary files are rewritten from the cell folders (atomically):

- ``DIR/results.jsonl``: one line per finished cell (final and best test error, per-epoch curve,
  images/s, seconds);
- ``DIR/summary.json`` / ``DIR/summary.md``: mean ± 95 % confidence interval (Student t over seeds)
  per variant and batch size, and each variant's difference to a reference variant paired by seed;
- ``DIR/error_vs_batch.png`` (the form of the ILM paper's Figure 1) and ``DIR/curves.png``.

Two processes may share one sweep folder with disjoint grids (e.g. one per batch size): each
network is made once, ``sweep.json`` and each set of summary files are written under a lock; the
summaries hold the grid of the invocation that wrote them last, so a last invocation with the whole
grid writes them from every cell folder.

The learning rate follows the batch size linearly by default (``lr × B / recipe batch``, the rule
of the Group Normalization paper); ``none`` keeps the recipe's, as the ILM paper says it did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import methods
from ..io import is_checkpoint
from .prepare import prepare_finetune
from .recipes import load_recipe
from .run import RunInterrupted, run_finetune
from .sweep_grid import CELLS, Cell, Sweep, SweepError
from .sweep_networks import (
    CALIBRATION_IMAGES,
    CALIBRATION_TIME,
    PRETRAINED_VARIANTS,
    PreparedNetwork,
    PrepareHooks,
    check_calibration_count,
    folder_lock,
    network_folder,
    plan_pretrained,
    prepare_networks,
    swap_settings,
)
from .sweep_results import finished, write_json_atomic, write_summaries, write_text_atomic

#: The built-in variants: partial recipes (merged over the sweep's recipe). The norm layer names
#: are timm's (``timm.layers.get_norm_layer``), so they apply to timm networks.
BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "bn": {"model": {"kwargs": {"norm_layer": "batchnorm"}}, "conversion": {"method": methods.NONE}},
    "gn": {"model": {"kwargs": {"norm_layer": "groupnorm"}}, "conversion": {"method": methods.NONE}},
    "ilm+gn": {"model": {"kwargs": {"norm_layer": "groupnorm"}}, "conversion": {"method": methods.ILM}},
    "gn+pn": {"model": {"kwargs": {"norm_layer": "groupnorm"}}, "conversion": {"method": methods.PROXY}},
}
LR_SCALINGS = ("linear", "none")
SWEEP_FILE = "sweep.json"
RECIPES = "recipes"
#: The lock that two sweep processes on one folder take to update sweep.json and the summaries.
_LOCK = ".sweep.lock"
#: The settings that must not change when a sweep folder is resumed (the grid may grow); of
#: ``checkpoint``, all but its path (the folder may move, its weights_sha256 may not change).
_FIXED = ("epochs", "lr_scaling", "data", "recipe", "checkpoint")


@dataclass
class SweepHooks:
    """Callbacks for a front-end: a cell starts (with ``finetune``'s progress hooks to use), is
    skipped as finished, or ends with its ``results.jsonl`` row; ``networks``: the preparation of
    the networks of ``--checkpoint`` variants (waiting, calibration progress, one report each)."""

    start: Callable[[Cell, int, int], Any] = lambda cell, index, total: None
    skipped: Callable[[Cell], None] = lambda cell: None
    done: Callable[[Cell, dict[str, Any]], None] = lambda cell, row: None
    networks: PrepareHooks = field(default_factory=PrepareHooks)


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
    values: Mapping[str, Any] | None = None,
    settings: Sequence[str] = (),
    checkpoint: str | Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    calibration_time: float = CALIBRATION_TIME,
) -> Sweep:
    """Check the sweep's arguments and its folder; write nothing.

    Args:
        recipe: a bundled recipe name or YAML file (its ``variants:`` add to the built-in ones).
        data: as for ``finetune`` (an ImageFolder root, ``cifar10``, ``cifar100``).
        out: the sweep folder (new, empty, or a sweep folder with the same recipe, data, epochs
            and learning-rate scaling: the grid may grow, finished cells are kept).
        variants, batch_sizes, seeds: comma-separated lists (or sequences).
        epochs: override the recipe's epochs.
        values, settings: override recipe keys, as ``finetune`` does (:meth:`Recipe.with_overrides`:
            dotted keys mapped to values, ``KEY=VALUE`` strings of ``--set``); every cell shares them.
        lr_scaling: ``linear`` (lr × B / recipe batch size) or ``none``.
        reference: the variant that the others are compared with, paired by seed (default
            ``bn-frozen`` with ``checkpoint``, else ``gn``, when swept; else the first variant).
        checkpoint: a checkpoint folder (from ``swap``, ``save``, ``finetune``): the built-in
            variants become conversions of its network (:data:`PRETRAINED_VARIANTS`), and a
            recipe's ``swap:`` variants may be swept (:mod:`ilmconvert.train.sweep_networks`).
        calibration_images: images of the training split that calibrated variants fit on (1/8
            held out); calibration_time: seconds of distillation at most, per variant.

    Raises:
        SweepError: bad lists, unknown variant (the known ones are listed), a folder of another
            sweep, a ``swap:`` variant without ``checkpoint`` or with a bad key, a ``checkpoint``
            that is not a checkpoint folder, more calibration images than training images.
            RecipeError: the recipe or a variant's merged recipe is invalid, or a bad ``--set``
            (unknown key, with a did-you-mean; bad value). DataError: calibrated variants and
            data that cannot be found.
    """
    base = load_recipe(recipe).with_overrides(epochs=epochs, values=values, settings=settings)
    known = (PRETRAINED_VARIANTS if checkpoint is not None else BUILTIN_VARIANTS) | base.variants
    names = _parse_list(variants, "variants", str)
    for name in names:
        if name in PRETRAINED_VARIANTS and name not in known:
            raise SweepError(
                f"variant {name!r} is a conversion of a pretrained checkpoint: pass --checkpoint DIR "
                "(a checkpoint folder from swap, save or finetune)"
            )
        if name not in known:
            raise SweepError(
                f"unknown variant {name!r}; known: {', '.join(known)} (define more under the recipe's variants: key)"
            )
        if "/" in name or name.startswith("."):
            raise SweepError(f"variant name {name!r} cannot be a folder name; rename it in the recipe")
        folder = known[name].get("checkpoint")
        if folder is not None and not Path(str(folder), "config.json").is_file():
            raise SweepError(f"variant {name!r}: checkpoint {folder} is not a checkpoint folder (no config.json)")
        if "swap" in known[name]:
            if checkpoint is None:
                raise SweepError(
                    f"variant {name!r} is a conversion of a pretrained checkpoint: pass --checkpoint DIR "
                    "(a checkpoint folder from swap, save or finetune)"
                )
            known[name] = {**known[name], "swap": swap_settings(name, known[name]).model_dump()}
    swaps = {n: known[n] for n in names if "swap" in known[n]}
    pretrained = (
        plan_pretrained(checkpoint, swaps, calibration_images, calibration_time) if checkpoint is not None else None
    )
    sizes = _parse_list(batch_sizes, "batch-sizes", int)
    seed_list = _parse_list(seeds, "seeds", int)
    if min(sizes) < 1:
        raise SweepError(f"--batch-sizes must be positive, got {batch_sizes!r}")
    if lr_scaling not in LR_SCALINGS:
        raise SweepError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, got {lr_scaling!r}")
    default = "bn-frozen" if checkpoint is not None and "bn-frozen" in names else "gn"
    reference = reference or (default if default in names else names[0])
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
        pretrained=pretrained,
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
        "checkpoint": pretrained.record() if pretrained is not None else None,
    }
    for cell in sweep.cells[: len(sweep.variants)]:  # every variant's merged recipe is valid
        sweep.cell_recipe(cell)
    _check_folder(sweep)
    check_calibration_count(sweep)
    return sweep


def _check_folder(sweep: Sweep) -> None:
    out = sweep.out
    if not out.exists():
        return
    if not out.is_dir():
        raise SweepError(f"--out {out} is a file; choose a folder")
    recorded_file = out / SWEEP_FILE
    if not recorded_file.is_file():
        if any(not p.name.startswith(".") for p in out.iterdir()):  # another sweep's lock or temporary file
            raise SweepError(f"--out {out} is not empty and holds no {SWEEP_FILE}; choose a new folder")
        return
    try:
        recorded = json.loads(recorded_file.read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"{recorded_file} cannot be read ({err}); choose a new --out") from None
    for key in _FIXED:
        if _fixed(recorded.get(key)) != _fixed(sweep.settings[key]):
            raise SweepError(
                f"--out {out} holds a sweep with another {key.replace('_', ' ')}; "
                "its cells would not be comparable: use the same settings or a new --out"
            )
    for name, variant in sweep.variants.items():
        if name in recorded.get("variants", {}) and recorded["variants"][name] != variant:
            raise SweepError(
                f"--out {out}: variant {name!r} was defined differently there; rename it or use a new --out"
            )


def _fixed(value: Any) -> Any:
    """A fixed setting as compared on resuming (a checkpoint without its path)."""
    return {k: v for k, v in value.items() if k != "path"} if isinstance(value, dict) and "path" in value else value


# ------------------------------------------------------------------------------------------ running
def _merged(first: list[Any], then: list[Any]) -> list[Any]:
    return list(first) + [v for v in then if v not in first]


def record_sweep(sweep: Sweep) -> None:
    """Write ``OUT/sweep.json`` (creating ``OUT``): the fixed settings, and the union of the
    variants, batch sizes and seeds of every invocation on this folder (under a lock: two
    processes on one folder each add theirs)."""
    out = sweep.out
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out / _LOCK):
        recorded = _recorded(out)
        grid = {
            "variants": recorded.get("variants", {}) | sweep.variants,
            "batch_sizes": _merged(recorded.get("batch_sizes", []), sweep.batch_sizes),
            "seeds": _merged(recorded.get("seeds", []), sweep.seeds),
        }
        write_json_atomic(out / SWEEP_FILE, sweep.settings | grid)
    (out / CELLS).mkdir(exist_ok=True)
    (out / RECIPES).mkdir(exist_ok=True)


def prepare_sweep(sweep: Sweep, hooks: SweepHooks | None = None) -> dict[str, PreparedNetwork]:
    """Record the sweep (:func:`record_sweep`) and make the networks of its ``--checkpoint``
    variants that have a cell left to train (:func:`~ilmconvert.train.sweep_networks.prepare_networks`:
    once, reused by later invocations and by another process on the same folder).

    Raises:
        As :func:`~ilmconvert.train.sweep_networks.prepare_networks`.
    """
    hooks = hooks or SweepHooks()
    record_sweep(sweep)
    epochs = sweep.recipe.train.epochs
    open_variants = {c.variant for c in sweep.cells if not finished(sweep.out / CELLS / c.name, epochs)}
    return prepare_networks(sweep, hooks.networks, [v for v in sweep.variants if v in open_variants])


def run_sweep(
    sweep: Sweep, hooks: SweepHooks | None = None, prepared: dict[str, PreparedNetwork] | None = None
) -> dict[str, Any]:
    """Train every cell of ``sweep`` that is not finished, then write the summaries.

    Cells run one after another in this process, seed-major (see :attr:`Sweep.cells`). A cell
    folder with a resumable run (``last/``) that is not finished is resumed exactly; a finished
    one is skipped. The summaries are rewritten after every cell, so a sweep stopped at any point
    has them for the finished cells. The networks of ``--checkpoint`` variants are made first
    (:func:`prepare_sweep`), unless ``prepared`` says that was done.

    Two processes may run disjoint grids of one sweep folder at once (e.g. ``--batch-sizes 32``
    and ``--batch-sizes 4``): each network is made once, and sweep.json and each set of summary
    files are written by one process at a time; the summaries hold the cells of the grid of the
    process that wrote them last, so a last invocation with the whole grid (every cell finished,
    nothing to train) writes them from all cell folders.

    Returns:
        The summary (as in ``summary.json``).

    Raises:
        RunInterrupted: Ctrl-C or SIGTERM (the cell in flight saved its state); running the same
        command again resumes it exactly. SweepError, RunError,
        RecipeError, DataError, TrainError: as ``finetune``.
    """
    hooks = hooks or SweepHooks()
    out = sweep.out
    if prepared is None:
        prepare_sweep(sweep, hooks)
    else:
        record_sweep(sweep)
    started = time.perf_counter()
    summary = None
    cells = sweep.cells
    for index, cell in enumerate(cells):
        run = out / CELLS / cell.name
        if finished(run, sweep.recipe.train.epochs):
            hooks.skipped(cell)
            continue
        progress = hooks.start(cell, index, len(cells))
        if is_checkpoint(run / "last"):
            plan = prepare_finetune(
                data=sweep.data, run=run, resume=True, device=sweep.device, data_root=sweep.data_root
            )
        else:
            recipe_file = out / RECIPES / f"{cell.name}.yaml"
            write_text_atomic(recipe_file, sweep.cell_recipe(cell).to_yaml())
            plan = prepare_finetune(
                data=sweep.data,
                run=run,
                recipe=recipe_file,
                checkpoint=network_folder(sweep, cell.variant),
                device=sweep.device,
                data_root=sweep.data_root,
            )
        try:
            run_finetune(plan, progress)
        except RunInterrupted as err:
            if "resume with" not in str(err):
                raise
            raise RunInterrupted(
                f"{str(err).split(';')[0]} in cell {cell.name}; resume with the same `ilmconvert sweep` command",
                err.exit_code - 128,
            ) from None
        summary = _summaries(sweep)
        hooks.done(cell, next(r for r in summary["cells"] if r["cell"] == cell.name))
    if summary is None:  # nothing ran: the summaries of the finished cells, written once
        summary = _summaries(sweep)
    summary["wall_s_this_invocation"] = round(time.perf_counter() - started, 1)
    return summary


def _summaries(sweep: Sweep) -> dict[str, Any]:
    with folder_lock(sweep.out / _LOCK):  # one process at a time writes the set of summary files
        return write_summaries(sweep)


def _recorded(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}
