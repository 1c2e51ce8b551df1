"""The fine-tuning commands ``finetune``, ``eval`` and ``recipes``.

Thin: each command parses its options, calls the headless :mod:`ilmconvert.train` library and
renders its progress and results with rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .. import methods
from ..train.distributed import Distributed
from .output import console, count, expected_errors, literal, steps

#: ``--method``'s choices: the registered methods (:mod:`ilmconvert.methods`).
MethodChoice = Literal[methods.names()]  # type: ignore[valid-type]
_METHOD_HELP = "Override the recipe's conversion: " + ", ".join(
    f"{m.name} ({m.title or m.label})" for m in map(methods.get_method, methods.names())
)

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
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="auto|cpu|cuda", help="auto (CUDA when available), cpu or cuda.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override any recipe key (repeatable): --set train.lr=0.01 --set data.mixup=0.2 (YAML values).",
    ),
]
TrainSubsetOpt = Annotated[
    Optional[int],
    typer.Option(
        "--train-subset", min=1, show_default=False, rich_help_panel="Recipe overrides",
        help="Train on a fixed random subset of N training images (data.train_subset).",
    ),
]
TestSubsetOpt = Annotated[
    Optional[int],
    typer.Option(
        "--test-subset", min=1, show_default=False, rich_help_panel="Recipe overrides",
        help="Test on a fixed random subset of N test images (data.test_subset).",
    ),
]
#: the data keys with flags of their own on ``finetune`` and ``sweep``: option name -> recipe key
DATA_OVERRIDES = {"train_subset": "data.train_subset", "test_subset": "data.test_subset"}
#: every 50 batches a plain progress line when stdout is not a terminal (batch jobs, CI logs)
PLAIN_EVERY = 50


def _opt(*names: str, help: str, **kwargs: Any) -> Any:
    """A recipe-override option: ``None`` (the default) keeps the recipe's value."""
    return typer.Option(*names, help=help, show_default=False, rich_help_panel="Recipe overrides", **kwargs)


#: CLI option name -> dotted recipe key, for the recipe overrides of ``finetune``.
OVERRIDES = {
    "opt": "train.opt",
    "opt_eps": "train.opt_eps",
    "opt_betas": "train.opt_betas",
    "momentum": "train.momentum",
    "weight_decay": "train.weight_decay",
    "layer_decay": "train.layer_decay",
    "sched": "train.sched",
    "warmup_epochs": "train.warmup_epochs",
    "clip_grad": "train.clip_grad",
    "clip_mode": "train.clip_mode",
    "grad_accum_steps": "train.grad_accum_steps",
    "model_ema": "train.model_ema",
    "model_ema_decay": "train.model_ema_decay",
    "smoothing": "train.smoothing",
    "amp_dtype": "train.amp_dtype",
    "channels_last": "train.channels_last",
    "compile_": "train.compile",
    "trainable": "train.trainable",
    "head_steps": "train.head_steps",
    "checkpoint_hist": "train.checkpoint_hist",
    "checkpoint_interval": "train.checkpoint_interval",
    "seed": "train.seed",
    "workers": "data.num_workers",
    **DATA_OVERRIDES,
    "pipeline": "data.pipeline",
    "input_size": "data.image_size",
    "aa": "data.aa",
    "mixup": "data.mixup",
    "cutmix": "data.cutmix",
}


def _bars() -> Any:
    """rich progress bars on a terminal; elsewhere (batch jobs, CI logs) a context that yields
    ``None``, for which :func:`_batches` prints plain lines."""
    import contextlib

    if not console.is_terminal:
        return contextlib.nullcontext(None)
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


def _plain_batches(label: str, every: int = PLAIN_EVERY) -> Any:
    """Progress as a plain line every ``every`` batches (and at the end), for logs that are not a terminal."""
    import time

    from ..train.loop import Batches

    task: dict[str, Any] = {}

    def start(total: int) -> None:
        task.update(total=total, done=0, loss=None, start=time.perf_counter())

    def advance(loss: float | None) -> None:
        task["done"] += 1
        task["loss"] = loss if loss is not None else task["loss"]
        if task["done"] % every == 0:
            shown = f" loss {task['loss']:.3f}" if task["loss"] is not None else ""
            seconds = time.perf_counter() - task["start"]
            print(f"{label} {task['done']}/{task['total']}{shown} {seconds:.0f} s", flush=True)

    return Batches(start, advance, lambda: None)


def _batches(bars: Progress | None, label: str) -> Any:
    if bars is None:
        return _plain_batches(label)
    return _rich_batches(bars, label)


def _rich_batches(bars: Progress, label: str) -> Any:
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
        Optional[int], typer.Option("--batch-size", "-b", min=1, help="Override the recipe's batch size.")
    ] = None,
    lr: Annotated[
        Optional[float], typer.Option("--lr", min=0.0, help="Override the recipe's peak learning rate.")
    ] = None,
    method: Annotated[
        Optional[MethodChoice],
        typer.Option(
            "--method",
            help=_METHOD_HELP,
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
    weights: Annotated[
        Optional[Path],
        typer.Option("--weights", help="Local weights for the recipe's network (safetensors or a state dict)."),
    ] = None,
    settings: SetOpt = None,
    log: Annotated[
        Optional[list[str]],
        typer.Option(
            "--log", metavar="tensorboard",
            help=literal("Also log to TensorBoard (RUN/tensorboard; pip install 'ilmconvert[tensorboard]')."),
        ),
    ] = None,
    opt: Annotated[Optional[str], _opt("--opt", help="timm optimizer: momentum, sgd, adamw, lamb, ...")] = None,
    opt_eps: Annotated[Optional[float], _opt("--opt-eps", help="Optimizer epsilon.")] = None,
    opt_betas: Annotated[
        Optional[tuple[float, float]], _opt("--opt-betas", help="Optimizer betas (two numbers).")
    ] = None,
    momentum: Annotated[Optional[float], _opt("--momentum", help="SGD momentum.")] = None,
    weight_decay: Annotated[Optional[float], _opt("--weight-decay", help="Weight decay.")] = None,
    layer_decay: Annotated[Optional[float], _opt("--layer-decay", help="Layer-wise lr decay (timm).")] = None,
    sched: Annotated[Optional[str], _opt("--sched", help="timm scheduler: cosine, step, multistep, none, ...")] = None,
    warmup_epochs: Annotated[Optional[int], _opt("--warmup-epochs", help="Warm-up epochs.")] = None,
    clip_grad: Annotated[Optional[float], _opt("--clip-grad", help="Clip gradients at this norm / value.")] = None,
    clip_mode: Annotated[
        Optional[Literal["norm", "value", "agc"]], _opt("--clip-mode", help="Gradient clipping mode.")
    ] = None,
    grad_accum_steps: Annotated[
        Optional[int], _opt("--grad-accum-steps", min=1, help="Batches per optimizer update.")
    ] = None,
    model_ema: Annotated[
        Optional[bool], _opt("--model-ema/--no-model-ema", help="Keep an EMA of the weights (timm ModelEmaV3).")
    ] = None,
    model_ema_decay: Annotated[Optional[float], _opt("--model-ema-decay", help="EMA decay per update.")] = None,
    smoothing: Annotated[Optional[float], _opt("--smoothing", help="Label smoothing.")] = None,
    mixup: Annotated[Optional[float], _opt("--mixup", help="Mixup alpha (0: off).")] = None,
    cutmix: Annotated[Optional[float], _opt("--cutmix", help="CutMix alpha (0: off).")] = None,
    amp_dtype: Annotated[
        Optional[Literal["auto", "bf16", "fp16", "none"]],
        _opt("--amp-dtype", help="Autocast dtype (auto: bf16 on CUDA, none on CPU; fp16 uses a grad scaler)."),
    ] = None,
    channels_last: Annotated[
        Optional[bool], _opt("--channels-last/--no-channels-last", help="Channels-last memory format.")
    ] = None,
    compile_: Annotated[
        Optional[bool], _opt("--compile/--no-compile", help="torch.compile the trained network.")
    ] = None,
    trainable: Annotated[
        Optional[Literal["all", "norms", "norms+head"]],
        _opt("--trainable", help="Train all parameters, only the norms, or the norms and the classifier."),
    ] = None,
    head_steps: Annotated[
        Optional[int],
        _opt("--head-steps", min=0, metavar="N",
             help="First train only the classifier for N steps, the rest frozen (linear probing, LP-FT); "
             "its test is epoch 0."),
    ] = None,
    pipeline: Annotated[
        Optional[Literal["cifar", "timm"]], _opt("--pipeline", help="Data pipeline: cifar (cached) or timm.")
    ] = None,
    aa: Annotated[Optional[str], _opt("--aa", help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1.")] = None,
    train_subset: TrainSubsetOpt = None,
    test_subset: TestSubsetOpt = None,
    input_size: Annotated[
        Optional[int],
        _opt(
            "--input-size", min=1,
            help="Square input side in pixels (data.image_size). Default: the recipe's, else the network's own "
            "(a pretrained or fine-tuned checkpoint's), else 32.",
        ),
    ] = None,
    checkpoint_hist: Annotated[
        Optional[int], _opt("--checkpoint-hist", min=0, help="Keep the checkpoints of the N best epochs.")
    ] = None,
    checkpoint_interval: Annotated[
        Optional[float],
        _opt("--checkpoint-interval", min=0.0, metavar="MINUTES",
             help="Also write RUN/last/ inside epochs every MINUTES (resumable exactly)."),
    ] = None,
    seed: Annotated[Optional[int], _opt("--seed", help="Seed of initialization, data order, augmentation.")] = None,
    workers: Annotated[Optional[int], _opt("--workers", "-j", min=0, help="Data loader worker processes.")] = None,
) -> None:
    """Fine-tune an ILM network on DATA with a recipe (timm optimizers, schedulers, EMA, Mixup), per-epoch test.

    Any recipe key can be overridden with --set KEY=VALUE or the options under "Recipe overrides".

    Several GPUs: `torchrun --nproc_per_node N -m ilmconvert finetune ...` (batch size per process).
    """
    from ..train.distributed import destroy_process_group, from_environment
    from ..train.stopping import SIGNALS

    values = dict(locals())
    overrides = {key: values[name] for name, key in OVERRIDES.items()}
    processes = from_environment()
    try:
        with SIGNALS.installed():  # SIGTERM stops like Ctrl-C
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
                weights=weights,
                overrides=overrides,
                settings=settings or (),
                log=log or (),
            )
    finally:
        destroy_process_group()


def _conversion_label(conversion: Any) -> str:
    method = methods.get_method(conversion.method)
    return f"{method.label} init={conversion.init}" if method.converts else method.label


def _finetune(processes: Distributed, **options: Any) -> None:
    """``finetune`` in one process: rank 0 (or the only process) reports, the others train silently."""
    import contextlib

    from ..train.run import METRICS_FILE, RunInterrupted, prepare_finetune, run_finetune
    from ..train.run import Progress as Hooks

    with steps() if processes.is_main else contextlib.nullcontext(None) as report:
        plan = prepare_finetune(**options, processes=processes, steps=report)
    checkpoint, data, out = options["checkpoint"], options["data"], options["run"]
    if not processes.is_main:  # the other torchrun processes train in silence; rank 0 reports and writes
        try:
            run_finetune(plan)
        except RunInterrupted as err:  # rank 0 says how to resume
            raise typer.Exit(err.exit_code) from None
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
        f"{count(len(plan.train.classes), 'class', 'classes')}; {count(r.train.epochs, 'epoch')}, "
        f"batch {r.train.batch_size}, lr {r.train.lr:g}, "
        f"{r.train.sched}, device {plan.device.type}"
        + (f" x {processes.world_size} processes" if processes.enabled else "")
        + (f"; resuming after epoch {plan.start_epoch}" if plan.start_epoch else "")
        + (f"; {plan.input_note}" if plan.input_note else "")
    )
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
    if r.train.compile:
        epoch = plan.start_epoch + 1
        console.print(f"compiling the network (torch.compile): the first batches of epoch {epoch} are slow")

    with _bars() as bars:

        def epoch_done(m: dict[str, Any], best: bool) -> None:
            console.print(
                f"epoch {m['epoch']:>3}/{r.train.epochs}  "
                + (f"head only ({count(m['head_steps'], 'step')})  " if "head_steps" in m else "")
                + f"train loss {m['train_loss']:.3f} top1 {m['train_top1']:5.1f}  "
                f"test loss {m['test_loss']:.3f} top1 [bold]{m['top1']:5.2f}[/] top5 {m['top5']:5.2f}  "
                f"lr {m['lr']:.4g}  "
                f"{m['images_per_s']:.0f} img/s  {m['epoch_s']:.0f} s"
                + (f"  ema top1 {m['ema_top1']:5.2f}" if "ema_top1" in m else "")
                + ("  [green]best[/]" if best else ""),
                highlight=False,
            )

        hooks = Hooks(
            train=lambda e: _batches(bars, f"epoch {e} train" if e else "head only (epoch 0) train"),
            test=lambda e: _batches(bars, f"epoch {e} test" if e else "head only (epoch 0) test"),
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
        Optional[int], typer.Option("--batch-size", "-b", min=1, help="Images per evaluation step.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as one JSON object (no progress bar).")
    ] = False,
) -> None:
    """Print test top-1 / top-5 accuracy and loss of a checkpoint on DATA's test (or val) split."""
    import contextlib
    import json

    from ..train.run import evaluate_checkpoint

    with contextlib.nullcontext(None) if as_json else _bars() as bars:
        result = evaluate_checkpoint(
            path,
            data,
            data_root=data_root,
            device=device,
            subset=subset,
            batch_size=batch_size,
            batches=None if as_json else _batches(bars, "eval"),
        )
    if as_json:
        print(json.dumps(result))
        return
    console.print(
        f"{result['checkpoint']} on {data} ({result['images']} images, {result['classes']} classes): "
        f"top-1 [bold]{result['top1']:.2f} %[/]  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}",
        highlight=False,
    )


@expected_errors
def recipes(
    action: Annotated[
        Optional[Literal["list", "show"]],
        typer.Argument(help="list (the default): the bundled recipes; show NAME: print a recipe's YAML."),
    ] = None,
    name: Annotated[Optional[str], typer.Argument(help="The recipe to show (a bundled name or a YAML file).")] = None,
) -> None:
    """List the bundled fine-tuning recipes, or print one (`ilmconvert recipes show NAME`)."""
    from ..train.recipes import bundled_recipes, list_recipes, load_recipe

    if action == "show":
        if name is None:
            raise typer.BadParameter("which recipe? e.g. `ilmconvert recipes show cifar10`", param_hint="NAME")
        bundled = bundled_recipes()
        text = bundled[name] if name in bundled else load_recipe(name).to_yaml()  # validates files; names errors
        print(text, end="" if text.endswith("\n") else "\n")
        return
    table = Table(title="bundled recipes (ilmconvert finetune --recipe NAME)", title_justify="left")
    for col in ("name", "network", "epochs", "batch", "lr", "description"):
        table.add_column(
            col,
            justify="right" if col in ("epochs", "batch", "lr") else "left",
            no_wrap=col == "name",
            overflow="fold",
            min_width=16 if col == "network" else None,
        )
    for r in list_recipes():
        name = r.model.name.split(".", 1)[0]  # without the pretrained tag (`recipes show NAME` has it)
        network = name + (f" + {', '.join(r.model.adaptations)}" if r.model.adaptations else "")
        table.add_row(r.name, network, str(r.train.epochs), str(r.train.batch_size), f"{r.train.lr:g}", r.description)
    console.print(table)
