"""The fine-tuning commands ``finetune``, ``eval`` and ``recipes``.

Thin: each command parses its options, calls the headless :mod:`ilmconvert.train` library and
renders its progress and results with rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..train.distributed import Distributed
from .output import console, expected_errors

DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="ImageFolder root with train/ and test/ (or val/), or cifar10 / cifar100 (downloaded into --data-root).",
    ),
]
DataRootOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-root",
        help="Download folder for cifar10 / cifar100 (default $ILMCONVERT_DATA or ~/.cache/ilmconvert/data).",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]


def _bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _batches(bars: Progress, label: str) -> Any:
    from ..train.loop import Batches

    task: dict[str, Any] = {}

    def start(total: int) -> None:
        task["id"] = bars.add_task(label, total=total, info="")

    def advance(loss: float | None) -> None:
        fields = {"info": f"loss {loss:.3f}"} if loss is not None else {}
        bars.update(task["id"], advance=1, **fields)

    def stop() -> None:
        bars.remove_task(task["id"])

    return Batches(start, advance, stop)


@expected_errors
def finetune(
    checkpoint: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="DIR",
            show_default=False,
            help=(
                "A converted checkpoint (from `ilmconvert swap`) to train; without it the recipe's "
                "network is built and converted."
            ),
        ),
    ] = None,
    data: DataOpt = ...,  # type: ignore[assignment]
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: metrics.jsonl, last/, best/, recipe.yaml.")
    ] = ...,  # type: ignore[assignment]
    recipe: Annotated[
        Optional[str],
        typer.Option(
            "--recipe", help="Bundled recipe name (see `ilmconvert recipes`) or a YAML file. Default: cifar10."
        ),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Override the recipe's epochs.")] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", min=1, help="Override the recipe's batch size.")
    ] = None,
    lr: Annotated[
        Optional[float], typer.Option("--lr", min=0.0, help="Override the recipe's peak learning rate.")
    ] = None,
    method: Annotated[
        Optional[str],
        typer.Option(
            "--method",
            help=(
                "Override the recipe's conversion: ilm (ILM Norm), proxy (Proxy Norm) or none "
                "(train the network unconverted: the baseline)."
            ),
        ),
    ] = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last/ checkpoint (optimizer, scheduler, epoch, best top-1).",
        ),
    ] = False,
) -> None:
    """Fine-tune an ILM network on DATA with a recipe: SGD + momentum, CIFAR augmentation, per-epoch test.

    Several GPUs: `torchrun --nproc_per_node N -m ilmconvert finetune ...` (batch size per process).
    """
    from ..train.distributed import destroy_process_group, from_environment

    processes = from_environment()
    try:
        _finetune(
            processes,
            checkpoint=checkpoint,
            data=data,
            run=out,
            recipe=recipe,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            method=method,
            device=device,
            data_root=data_root,
            resume=resume,
        )
    finally:
        destroy_process_group()


def _conversion_label(conversion: Any) -> str:
    if conversion.method == "none":
        return "unconverted"
    return f"{'ILM' if conversion.method == 'ilm' else 'Proxy Norm'} init={conversion.init}"


def _finetune(processes: Distributed, **options: Any) -> None:
    """``finetune`` in one process: rank 0 (or the only process) reports, the others train silently."""
    import contextlib

    from ..train.run import METRICS_FILE, prepare_finetune, run_finetune
    from ..train.run import Progress as Hooks

    with console.status("reading data and building the network") if processes.is_main else contextlib.nullcontext():
        plan = prepare_finetune(**options, processes=processes)
    checkpoint, data, out = options["checkpoint"], options["data"], options["run"]
    if not processes.is_main:  # the other torchrun processes train in silence; rank 0 reports and writes
        run_finetune(plan)
        return
    r = plan.recipe
    what = (
        str(checkpoint)
        if checkpoint
        else f"{r.model.name} ({', '.join(r.model.adaptations) or 'as built'}, {_conversion_label(r.conversion)})"
    )
    console.print(
        f"[bold]{r.name or 'recipe'}[/]: {what} on {plan.source.name}: "
        f"{len(plan.train)} train / {len(plan.test)} test images, "
        f"{len(plan.train.classes)} classes; {r.train.epochs} epochs, batch {r.train.batch_size}, lr {r.train.lr:g}, "
        f"{r.train.sched}, device {plan.device.type}"
        + (f" x {processes.world_size} processes" if processes.enabled else "")
        + (f"; resuming after epoch {plan.start_epoch}" if plan.start_epoch else "")
    )
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")

    with _bars() as bars:

        def epoch_done(m: dict[str, Any], best: bool) -> None:
            console.print(
                f"epoch {m['epoch']:>3}/{r.train.epochs}  "
                f"train loss {m['train_loss']:.3f} top1 {m['train_top1']:5.1f}  "
                f"test loss {m['test_loss']:.3f} top1 [bold]{m['top1']:5.2f}[/] top5 {m['top5']:5.2f}  "
                f"lr {m['lr']:.4g}  "
                f"{m['images_per_s']:.0f} img/s  {m['epoch_s']:.0f} s" + ("  [green]best[/]" if best else ""),
                highlight=False,
            )

        hooks = Hooks(
            train=lambda e: _batches(bars, f"epoch {e} train"),
            test=lambda e: _batches(bars, f"epoch {e} test"),
            epoch_done=epoch_done,
        )
        summary = run_finetune(plan, hooks)
    from ..train.plots import plot_runs

    plot_runs([out], out / "curves.png", labels=[r.name or out.name])
    console.print(
        f"best test top-1 [bold]{summary['best_top1']:.2f} %[/] (epoch {summary['best_epoch']}); "
        f"wrote {out}/{METRICS_FILE}, {out}/curves.png, "
        f"{out}/last, {out}/best; evaluate with `ilmconvert eval {out} --data {data}`"
    )


@expected_errors
def eval_(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_OR_DIR", help="A checkpoint folder, or a run folder (its best/ checkpoint is used)."
        ),
    ],
    data: DataOpt = ...,  # type: ignore[assignment]
    data_root: DataRootOpt = None,
    device: DeviceOpt = "auto",
    subset: Annotated[
        Optional[int], typer.Option("--subset", min=1, help="Evaluate a fixed random subset of N test images.")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", min=1, help="Images per evaluation step.")
    ] = None,
) -> None:
    """Print test top-1 / top-5 accuracy and loss of a checkpoint on DATA's test (or val) split."""
    from ..train.run import evaluate_checkpoint

    with _bars() as bars:
        result = evaluate_checkpoint(
            path,
            data,
            data_root=data_root,
            device=device,
            subset=subset,
            batch_size=batch_size,
            batches=_batches(bars, "eval"),
        )
    console.print(
        f"{result['checkpoint']} on {data} ({result['images']} images, {result['classes']} classes): "
        f"top-1 [bold]{result['top1']:.2f} %[/]  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}",
        highlight=False,
    )


@expected_errors
def recipes() -> None:
    """List the bundled fine-tuning recipes."""
    from ..train.recipes import list_recipes

    table = Table(title="bundled recipes (ilmconvert finetune --recipe NAME)", title_justify="left")
    for col in ("name", "network", "epochs", "batch", "lr", "description"):
        table.add_column(col, justify="right" if col in ("epochs", "batch", "lr") else "left")
    for r in list_recipes():
        network = r.model.name + (f" + {', '.join(r.model.adaptations)}" if r.model.adaptations else "")
        table.add_row(r.name, network, str(r.train.epochs), str(r.train.batch_size), f"{r.train.lr:g}", r.description)
    console.print(table)
