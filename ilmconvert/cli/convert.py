"""The conversion commands ``inspect`` and ``swap``: parse options, call the library, render with rich."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from .. import methods
from ..errors import IlmconvertError
from .calibration import (
    batchnorm_mode,
    calibration_groups,
    calibration_progress,
    check_calibration,
    render_calibration,
)
from .output import console, expected_errors, fail

# ------------------------------------------------------------------------------------- shared options
NormsOpt = Annotated[str, typer.Option("--norms", help="Norm kinds to convert, comma-separated: gn, in, ln.")]
KeyGroupOpt = Annotated[int, typer.Option("--key-group-size", "-K", min=1, help="K: channels per key group (eq. 3).")]
ReductionOpt = Annotated[int, typer.Option("--reduction", "-r", min=1, help="r in M = max(2, N // r) (eq. 4).")]
IncludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--include", help="Only convert modules whose qualified name matches this glob (repeatable)."),
]
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Leave modules whose qualified name matches this glob (repeatable)."),
]
BatchNormOpt = Annotated[
    bool,
    typer.Option(
        "--include-batchnorm",
        help="Also convert BatchNorm to GroupNorm standardization + ILM / PN (changes the function: fine-tune).",
    ),
]
BatchNormModeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--batchnorm",
        metavar="gn|frozen",
        help=(
            "Convert BatchNorm too. gn: GroupNorm standardization (= --include-batchnorm; changes the function, "
            "see --calibrate); frozen: BN's running statistics, fixed (same function, batch-independent)."
        ),
    ),
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        metavar="|".join(methods.names()),
        help="; ".join(f"{m}: {methods.get_method(m).summary}" for m in methods.names()) + ".",
    ),
]


def _conversion_kwargs(
    norms: str,
    key_group_size: int,
    reduction: int,
    include: list[str] | None,
    exclude: list[str] | None,
    batchnorm: str | None,
    method: str,
    init: str = "preserve",
) -> dict[str, Any]:
    return {
        "method": method,
        "norms": norms,
        "init": init,
        "key_group_size": key_group_size,
        "reduction": reduction,
        "include": include or None,
        "exclude": exclude or None,
        "batchnorm": batchnorm,
    }


def render_report(report: Any, title: str) -> None:
    """Print a :class:`~ilmconvert.convert.ConversionReport` as rich tables."""
    method = methods.find_method(report.settings.get("method", methods.DEFAULT))
    columns = method.report_columns if method is not None else ()
    table = Table(title=title, title_justify="left", show_lines=False)
    numbers = ("C", "groups", *columns, "+params")
    for col in ("module", "source", "becomes", *numbers):  # fold, never cut: --include needs the names
        table.add_column(col, justify="right" if col in numbers and col != "activation" else "left", overflow="fold")
    for c in report.converted:
        absorbed = f" ({', '.join(c.absorbed)} -> Identity)" if c.absorbed else ""
        cells = {
            "K": f"{c.key_group_size}*" if c.key_group_size_adjusted else str(c.key_group_size),
            "N": str(c.num_key_groups),
            "M": str(c.embedding_size),
            "activation": c.activation + absorbed if c.activation else f"none: {c.note}",
        }
        name = c.name + (f" (+{len(c.aliases)} shared)" if c.aliases else "")
        target = c.target + (" [yellow](changes function)[/]" if c.function_changing else "")
        source = c.source.rsplit(".", 1)[-1]
        sizes = (cells[col] for col in columns)
        table.add_row(name, source, target, str(c.channels), str(c.norm_groups), *sizes, f"{c.params_added:,}")
    console.print(table)
    if any(c.key_group_size_adjusted for c in report.converted):
        console.print("[dim]* C is not a multiple of the requested K: the largest divisor of C not above K is used.[/]")
    if report.skipped:
        skipped = Table(title="left as they are", title_justify="left")
        for col in ("module", "class", "reason"):
            skipped.add_column(col, overflow="fold")
        for s in report.skipped:
            skipped.add_row(s.name, s.source.rsplit(".", 1)[-1], s.reason)
        console.print(skipped)
    console.print(
        f"converted [bold]{len(report.converted)}[/] modules, skipped {len(report.skipped)}; parameters "
        f"{report.params_before:,} -> {report.params_after:,} ([bold]{report.increase_percent:+.3f} %[/])"
    )
    if report.function_changing:
        console.print(
            "[yellow]BatchNorm layers were converted: the network computes a different function; fine-tune it.[/]"
        )


# ------------------------------------------------------------------------------------- inspect
@expected_errors
def inspect(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="timm:NAME[.TAG], torchvision:NAME or a bare timm name.")
    ],
    norms: NormsOpt = "gn,in,ln",
    key_group_size: KeyGroupOpt = 16,
    reduction: ReductionOpt = 16,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    include_batchnorm: BatchNormOpt = False,
    batchnorm: BatchNormModeOpt = None,
    method: MethodOpt = methods.DEFAULT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """List the norm layers of MODEL, what each becomes, and the parameter increase (no weights are loaded)."""
    from ..convert import convert
    from ..models import create_model

    mode = batchnorm_mode(batchnorm, include_batchnorm)
    network = create_model(model, pretrained=False, device="meta")
    report = convert(network, **_conversion_kwargs(norms, key_group_size, reduction, include, exclude, mode, method))
    if as_json:
        print(json.dumps({"model": model, **report.to_dict()}, indent=2))
    else:
        render_report(report, title=f"{model}: instance-level norms")


# ------------------------------------------------------------------------------------- swap
@expected_errors
def swap(
    model: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="timm:NAME[.TAG], torchvision:NAME[.WEIGHTS] or a bare timm name."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint directory to write (new, empty, or an earlier checkpoint).")
    ],
    norms: NormsOpt = "gn,in,ln",
    init: Annotated[
        str,
        typer.Option(
            "--init", metavar="preserve|paper",
            help="preserve: same function as the original; paper: B_omega=1, B_beta=0.",
        ),
    ] = "preserve",
    weights: Annotated[
        Optional[Path],
        typer.Option("--weights", help="Local weights (safetensors, or a state dict read with weights_only=True)."),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--no-pretrained", help="Start from the library's pretrained weights, or from random ones."
        ),
    ] = True,
    num_classes: Annotated[
        Optional[int], typer.Option("--num-classes", min=1, help="Resize the classifier to N classes.")
    ] = None,
    key_group_size: KeyGroupOpt = 16,
    reduction: ReductionOpt = 16,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    include_batchnorm: BatchNormOpt = False,
    batchnorm: BatchNormModeOpt = None,
    method: MethodOpt = methods.DEFAULT,
    weights_by_position: Annotated[
        bool,
        typer.Option(
            "--weights-by-position",
            help="Load --weights by the order of its tensors, not their names (after checking count and shapes).",
        ),
    ] = False,
    calibrate: Annotated[
        Optional[Path],
        typer.Option(
            "--calibrate",
            help="Folder of unlabeled images (recursive; an ImageFolder works): fit the layers that replace "
            "BatchNorm so the network reproduces the original (needs --batchnorm gn).",
        ),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option("--calibration-images", min=2, help="Images taken from --calibrate (1/8 held out).")
    ] = 1024,
    groups: Annotated[
        str, typer.Option("--groups", metavar="auto|G", help="Group count of each calibrated layer: auto or G.")
    ] = "auto",
    calibration_time: Annotated[
        float, typer.Option("--calibration-time", min=0, help="Seconds of distillation at most (after the fit).")
    ] = 300.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random check batch and of the new ILM weights.")] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the summary lines, not the per-module table.")
    ] = False,
) -> None:
    """Convert MODEL's norms to ILM (or Proxy Norm), verify the function is preserved on a random batch, save it."""
    import copy

    import torch

    from ..io import check_target, save
    from ..models import create_model
    from ..swapping import swap as swap_checked

    if init not in ("preserve", "paper"):
        raise IlmconvertError(f"--init must be preserve or paper, got {init!r}")
    if method not in methods.names():
        raise IlmconvertError(f"--method must be one of {', '.join(methods.names())}, got {method!r}")
    mode = batchnorm_mode(batchnorm, include_batchnorm)
    check_calibration(calibrate, mode, init)
    group_choice = calibration_groups(groups, calibrate is not None)
    if weights_by_position and weights is None:
        raise IlmconvertError("--weights-by-position applies to --weights FILE; add it")
    check_target(out)
    torch.manual_seed(seed)
    with console.status(f"building {model}"):
        network = create_model(
            model, pretrained=pretrained, weights=weights, num_classes=num_classes,
            weights_by_position=weights_by_position,
        )
    original, images = None, None
    if calibrate is not None:
        from ..calibration_images import load_images

        original = copy.deepcopy(network).eval()
        with console.status(f"reading {calibration_images} images from {calibrate}"):
            images = load_images(calibrate, calibration_images, original, seed=seed)
    settings = _conversion_kwargs(norms, key_group_size, reduction, include, exclude, mode, method, init)
    result = swap_checked(network, check=False, **settings)  # the PASS / FAIL line comes after the table
    report, diff = result.report, result.difference
    if not quiet:
        render_report(report, title=f"{model}: conversion")
    else:
        console.print(f"converted {len(report.converted)} modules; parameters +{report.increase_percent:.3f} %")
    check = (
        f"preservation check on a random batch {'x'.join(map(str, diff.shape))} ({diff.dtype}): "
        f"max |diff| = {diff.max_abs:.3g}, relative = {diff.relative:.3g}"
    )
    if result.expected_to_preserve:
        ok = result.preserved
        console.print(("[green]PASS[/] " if ok else "[red]FAIL[/] ") + check + " (target <= 1e-4)")
        if not ok:
            fail(
                "the converted network does not compute what the original did; nothing was written "
                "(please report this)",
                code=1,
            )
    else:
        console.print(f"[yellow]function changed ({result.why_changed}, expected; fine-tune it):[/] {check}")
    if original is not None:
        with calibration_progress() as progress:
            result.calibrate(
                original, images, groups=group_choice, time_budget=calibration_time, seed=seed, progress=progress
            )
        render_calibration(result.calibration)
    save(network, out, metadata=result.metadata)  # the check and calibration, shown in the model card
    console.print(
        f"wrote [bold]{out}[/] (model.safetensors, config.json, README.md); reload with ilmconvert.load({str(out)!r})"
    )
