"""The BatchNorm options of ``swap`` / ``inspect`` (``--batchnorm``, ``--calibrate``): checks and rendering."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..errors import IlmconvertError
from .output import console


def batchnorm_mode(batchnorm: str | None, include_batchnorm: bool) -> str | None:
    """The ``batchnorm=`` of :func:`ilmconvert.convert` from ``--batchnorm`` and its older spelling
    ``--include-batchnorm`` (= ``--batchnorm gn``).

    Raises:
        IlmconvertError: an unknown mode, or both options saying different things.
    """
    from ..batchnorm_modes import BATCHNORM_MODES

    if batchnorm is not None and batchnorm not in BATCHNORM_MODES:
        raise IlmconvertError(f"--batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {batchnorm!r}")
    if include_batchnorm and batchnorm not in (None, "gn"):
        raise IlmconvertError(f"--include-batchnorm means --batchnorm gn; it contradicts --batchnorm {batchnorm}")
    return "gn" if include_batchnorm else batchnorm


def calibration_groups(groups: str, calibrating: bool) -> str | int | None:
    """``--groups auto|G`` as :func:`ilmconvert.calibrate.calibrate` takes it.

    Raises:
        IlmconvertError: not ``auto`` nor a positive integer, or given without ``--calibrate``.
    """
    if not calibrating:
        if groups != "auto":
            raise IlmconvertError("--groups chooses the group counts of --calibrate; add --calibrate DIR")
        return None
    if groups == "auto":
        return "auto"
    if not groups.isdigit() or int(groups) < 1:
        raise IlmconvertError(f"--groups must be auto or a positive integer, got {groups!r}")
    return int(groups)


def check_calibration(calibrate: Any, batchnorm: str | None, init: str) -> None:
    """``--calibrate`` needs ``--batchnorm gn`` and ``--init preserve``.

    Raises:
        IlmconvertError: otherwise.
    """
    if calibrate is not None and init != "preserve":
        raise IlmconvertError("--calibrate fits preserve-initialized layers; drop --init paper")
    if calibrate is not None and batchnorm != "gn":
        raise IlmconvertError(
            "--calibrate fits the layers that replace BatchNorm's standardization: add --batchnorm gn "
            "(--batchnorm frozen keeps the function without calibration)"
        )


def calibration_progress() -> Any:
    """The rich progress bars :func:`ilmconvert.calibrate.calibrate` advances (closed form, distillation)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )


def render_calibration(report: Any) -> None:
    """Print a :class:`~ilmconvert.calibrate.CalibrationReport`: the held-out stages and the worst fits."""
    table = Table(
        title=f"calibration: {report.images_fit} images fit, {report.images_heldout} held out",
        title_justify="left",
    )
    for col in ("stage", "relative output change", "top-1 agreement"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, numbers in report.stages.items():
        table.add_row(stage, f"{numbers.relative_change:.3f}", f"{100 * numbers.top1_agreement:.1f} %")
    console.print(table)
    worst = Table(title="largest fit errors (1 - R², closed form)", title_justify="left")
    for col in ("module", "C", "G", "fit error", "with exact inputs"):
        worst.add_column(col, justify="left" if col == "module" else "right")
    for layer in report.worst_layers():
        numbers = (str(layer.channels), str(layer.groups), f"{layer.fit_error:.3f}", f"{layer.isolated_error:.3f}")
        worst.add_row(layer.name, *numbers)
    console.print(worst)
    d = report.distillation
    if d:
        cut = " (stopped by --calibration-time)" if d["stopped_by_time_budget"] else ""
        console.print(f"distillation: {d['steps']} steps, {d['epochs_completed']:.2f} epochs, {d['seconds']} s{cut}")
