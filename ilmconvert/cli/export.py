"""The ``export`` command: a checkpoint to ONNX or a ``torch.export`` archive, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .output import console, expected_errors, literal


@expected_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder written by swap / finetune / ilmconvert.save.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.onnx or .pt2).")],
    format: Annotated[
        Optional[str],
        typer.Option(
            "--format",
            "-f",
            help=literal(
                "onnx (needs pip install 'ilmconvert[onnx]') or pt2 (torch.export archive); default: the one "
                "--out's extension names."
            ),
        ),
    ] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", min=7, help="ONNX opset (default 18).")] = None,
    batch: Annotated[
        str, typer.Option("--batch", help="dynamic: a dynamic batch axis (checked at 1 and 3); N: fixed batch N.")
    ] = "dynamic",
    input_size: Annotated[
        Optional[tuple[int, int]],
        typer.Option("--input-size", min=1, help="H W; default: the checkpoint's pretrained_cfg input_size."),
    ] = None,
    exporter: Annotated[
        str,
        typer.Option("--exporter", help="ONNX exporter: dynamo (dynamo=True) or torchscript (dynamo=False)."),
    ] = "dynamo",
) -> None:
    """Export CHECKPOINT to ONNX or pt2, run the file against the PyTorch model (batch 1 and 3), keep it if it matches.

    Input size, mean / std, crop_pct, interpolation and label_names come from the checkpoint's
    config.json (timm's pretrained_cfg names) and go into the file's metadata. A failed check
    removes the file and exits 1.
    """
    from ..exporting import FORMATS, ExportError, export, format_for, require_onnx
    from ..io import load, read_config

    if format is not None and format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    format = format_for(out, format)  # before loading anything: the name and the format agree
    if batch != "dynamic" and not (batch.isdigit() and int(batch) >= 1):
        raise ExportError(f"--batch must be 'dynamic' or a positive integer, got {batch!r}")
    if format == "onnx":
        require_onnx()  # before loading anything
    config = read_config(checkpoint)
    with console.status(f"loading {checkpoint}"):
        model = load(checkpoint)
    with console.status(f"exporting to {format}"):
        result = export(
            model,
            out,
            format=format,
            exporter=exporter,
            opset=opset,
            batch=batch if batch == "dynamic" else int(batch),
            input_size=input_size,
            pretrained_cfg=config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else None,
            label_names=config.get("label_names") if isinstance(config.get("label_names"), list) else None,
        )
    size = result.metadata["input_size"]
    how = f"{result.exporter}, opset {result.opset}" if result.format == "onnx" else result.exporter
    console.print(f"exported in {result.seconds:.1f} s ({how}); input {size}, batch {batch}")
    runtime = "onnxruntime" if result.format == "onnx" else "torch.export.load"
    for n, rel in result.parity.items():
        line = f"[green]PASS[/] {runtime} vs PyTorch, batch {n}: max relative difference {rel:.3g} (<= 1e-5)"
        console.print(line, soft_wrap=True)
    if result.exact:
        console.print("[green]PASS[/] the reloaded program equals the exported one bit for bit")
    console.print(f"wrote [bold]{result.path}[/] ({result.path.stat().st_size / 2**20:.1f} MiB)")
