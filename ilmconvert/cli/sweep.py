"""The comparison commands ``sweep`` and ``plot``: thin wrappers over :mod:`ilmconvert.train.sweep`
and :mod:`ilmconvert.train.plots`, rendered with rich."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from .output import console, count, expected_errors
from .train import (
    DATA_OVERRIDES,
    DataOpt,
    DataRootOpt,
    DeviceOpt,
    SetOpt,
    TestSubsetOpt,
    TrainSubsetOpt,
    _bars,
    _batches,
)


def _grid(sweep: Any, results: dict[tuple[str, int], list[float]], running: Any) -> Table:
    """Variants × batch sizes: seeds finished and their mean final test error so far."""
    table = Table(title=f"sweep {sweep.out}: final test error % (seeds done)", title_justify="left")
    table.add_column("variant")
    for size in sweep.batch_sizes:
        table.add_column(f"batch {size}", justify="right")
    for variant in sweep.variants:
        row = []
        for size in sweep.batch_sizes:
            errors = results.get((variant, size), [])
            text = f"{sum(errors) / len(errors):.2f} ({len(errors)}/{len(sweep.seeds)})" if errors else ""
            if running is not None and (running.variant, running.batch_size) == (variant, size):
                text = (text + " " if text else "") + f"[yellow]seed {running.seed}…[/]"
            row.append(text)
        table.add_row(variant, *row)
    return table


def _network_hooks() -> Any:
    """The sweep's network preparation shown in the terminal: a line per variant (what was
    converted, the calibration's held-out top-1 agreement per stage), calibration bars."""
    from ..train.sweep_networks import PrepareHooks
    from .calibration import calibration_progress

    stack = contextlib.ExitStack()

    def calibrating(variant: str) -> Any:
        stack.close()
        return stack.enter_context(calibration_progress()) if console.is_terminal else None

    def ready(done: Any) -> None:
        stack.close()
        made = "reused" if done.reused else f"made in {done.seconds:.0f} s"
        line = f"network {done.variant}: {done.description}, {count(done.converted, 'module')} converted; {made}"
        if not done.converted and done.reused:
            line = f"network {done.variant}: {done.description} ({done.path})"
        if done.calibration:
            stages = " / ".join(f"{100 * done.calibration[s]['top1_agreement']:.1f} %" for s in done.calibration)
            line += f"; held-out top-1 agreement {' / '.join(done.calibration)}: {stages}"
        console.print(line, highlight=False)

    return PrepareHooks(
        waiting=lambda v: console.print(f"network {v}: another sweep process is making it; waiting", highlight=False),
        calibrating=calibrating,
        ready=ready,
    )


@expected_errors
def sweep(
    recipe: Annotated[
        str, typer.Option("--recipe", help="Bundled recipe name or YAML file: the setting every cell shares.")
    ],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Sweep folder (run it again to resume).")],
    variants: Annotated[
        str,
        typer.Option(
            "--variants",
            help="Comma-separated: bn, gn, ilm+gn, gn+pn (timm norm_layer + method) or the recipe's variants. "
            "With --checkpoint, conversions of it: bn (as is), bn-frozen, gn, ilm+gn, gn+pn, gn-cal, ilm+gn-cal, "
            "gn+pn-cal (-cal: calibrated), ilm+frozen, or the recipe's swap: variants.",
        ),
    ] = "bn,gn,ilm+gn,gn+pn",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "64,16,4,2",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Override the recipe's epochs.")] = None,
    lr_scaling: Annotated[
        str, typer.Option("--lr-scaling", help="linear: lr x B / recipe batch size (GN paper); none: the recipe's lr.")
    ] = "linear",
    reference: Annotated[
        Optional[str], typer.Option("--reference", help="Variant the others are compared with (default gn).")
    ] = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    settings: SetOpt = None,
    train_subset: TrainSubsetOpt = None,
    test_subset: TestSubsetOpt = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option(
            "--checkpoint",
            help="Pretrained checkpoint folder (from swap, save, finetune): the variants are conversions of it, "
            "each made once into OUT/networks/VARIANT.",
        ),
    ] = None,
    calibration_images: Annotated[
        int,
        typer.Option(
            "--calibration-images", min=8,
            help="Training images the -cal variants calibrate on (1/8 held out), at the cells' input size.",
        ),
    ] = 1024,
    calibration_time: Annotated[
        float,
        typer.Option("--calibration-time", min=0, help="Seconds of distillation at most, per calibrated variant."),
    ] = 300.0,
) -> None:
    """Train every variant x batch size x seed on DATA and compare final test errors with 95 % intervals.

    Each cell is a finetune run folder under OUT/cells; OUT gets results.jsonl, summary.md / .json,
    error_vs_batch.png and curves.png. Interrupted? Run the same command again. Two processes may
    share one OUT with disjoint grids (e.g. one per --batch-sizes); a last run with the whole grid
    writes the summaries of every cell.
    """
    from ..train.run import Progress as Hooks
    from ..train.stopping import SIGNALS
    from ..train.sweep import SweepHooks, plan_sweep, prepare_sweep, run_sweep

    plan = plan_sweep(
        recipe=recipe, data=data, out=out, variants=variants, batch_sizes=batch_sizes, seeds=seeds,
        epochs=epochs, lr_scaling=lr_scaling, reference=reference, device=device, data_root=data_root,
        values={DATA_OVERRIDES[k]: v for k, v in (("train_subset", train_subset), ("test_subset", test_subset))},
        settings=settings or (), checkpoint=checkpoint, calibration_images=calibration_images,
        calibration_time=calibration_time,
    )  # fmt: skip
    console.print(
        f"[bold]sweep[/] {plan.recipe.name}: {count(len(plan.variants), 'variant')} x "
        f"{count(len(plan.batch_sizes), 'batch size')} x {count(len(plan.seeds), 'seed')} = "
        f"{count(len(plan.cells), 'cell')} of {count(plan.recipe.train.epochs, 'epoch')}; "
        f"lr scaling {plan.lr_scaling}; reference {plan.reference}"
    )
    results: dict[tuple[str, int], list[float]] = {}
    bars = _bars()
    bars = bars if isinstance(bars, Progress) else None  # None: not a terminal, plain lines instead
    state: dict[str, Any] = {"running": None}
    live = Live(console=console, refresh_per_second=4) if bars is not None else contextlib.nullcontext()

    def refresh() -> None:
        if bars is not None:
            live.update(Group(_grid(plan, results, state["running"]), bars))

    def start(cell: Any, index: int, total: int) -> Hooks:
        state["running"] = cell
        refresh()
        if bars is None:
            console.print(f"cell {index + 1}/{total}: {cell.name}", highlight=False)
        return Hooks(
            train=lambda e: _batches(bars, f"{cell.name} epoch {e} train"),
            test=lambda e: _batches(bars, f"{cell.name} epoch {e} test"),
        )

    def done(cell: Any, row: dict[str, Any]) -> None:
        results.setdefault((cell.variant, cell.batch_size), []).append(row["final_error"])
        state["running"] = None
        refresh()
        if bars is None:
            console.print(f"{cell.name}: final test error {row['final_error']:.2f} %", highlight=False)

    def skipped(cell: Any) -> None:
        from ..train.sweep_results import cell_result

        row = cell_result(plan, cell)
        if row is not None:
            results.setdefault((cell.variant, cell.batch_size), []).append(row["final_error"])

    hooks = SweepHooks(start=start, skipped=skipped, done=done, networks=_network_hooks())
    prepared = prepare_sweep(plan, hooks)  # before the live grid: calibration shows its own bars
    with live, SIGNALS.installed():  # SIGTERM stops like Ctrl-C: the cell in flight saves its state
        refresh()
        summary = run_sweep(plan, hooks, prepared=prepared)
    if bars is None:
        console.print(_grid(plan, results, None))
    console.print(
        f"{summary['cells_finished']} / {summary['cells_planned']} cells; "
        f"{summary['seconds_total'] / 60:.1f} min of training and testing; wrote {out}/summary.md, "
        f"{out}/results.jsonl, {out}/error_vs_batch.png, {out}/curves.png"
    )


@expected_errors
def plot(
    runs: Annotated[
        list[Path], typer.Argument(metavar="RUN...", help="Run folders written by finetune (or sweep cells).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Image file (.png, .pdf or .svg).")] = Path("curves.png"),
    labels: Annotated[
        Optional[str], typer.Option("--labels", help="Comma-separated labels, one per run (default: folder names).")
    ] = None,
) -> None:
    """Plot train / test loss, test top-1 / error and learning rate per epoch of one or more runs."""
    from ..train.plots import plot_runs

    written = plot_runs(runs, out, labels=labels.split(",") if labels else None)
    console.print(f"wrote {written}")
