"""Export a (converted) network to ONNX or to a ``torch.export`` archive, and check the file.

:func:`export` traces the network in eval mode with a dynamic (or fixed) batch, writes the file
under a temporary name, runs it (ONNX: onnxruntime on the CPU; pt2: ``torch.export.load``) at
batch 1 and 3 against the PyTorch model, and renames it into place only when it matches: ONNX
within ``tolerance`` (1e-5) relative, pt2 bit for bit against the exported program (and within
``tolerance`` of the eager model). While tracing, the ILM and Proxy Norm layers take their
traceable path (:func:`ilmconvert.nn.fast.exporting`, docs/design.md §4).

Input size, normalization and class names travel with the file: the ONNX ``metadata_props``
(keys ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``label_names``, ...,
values JSON), or for pt2 the archive's extra file ``ilmconvert.json`` (read it with
``torch.export.load(path, extra_files={"ilmconvert.json": ""})``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic
from .errors import IlmconvertError
from .models import resolve_preprocessing
from .version import __version__

FORMATS = ("onnx", "pt2")
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
#: batch sizes the written file is run at when its batch is dynamic
CHECK_BATCHES = (1, 3)
TOLERANCE = 1e-5
PT2_METADATA_FILE = "ilmconvert.json"
#: timm's ``pretrained_cfg`` keys that describe the input, copied into the metadata
PREPROCESSING_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std")
_ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(IlmconvertError):
    """An export that cannot start: bad format, batch, size or model, or onnxruntime missing (exit 2)."""


def format_for(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The format to write ``path`` in: ``format`` when given, else the one its extension names
    (``.onnx``: ONNX, ``.pt2``: a ``torch.export`` archive).

    Raises:
        ExportError: an unknown ``format``; a ``format`` that contradicts the extension (``pt2``
            for ``model.onnx``); no ``format`` and an extension that names none.
    """
    suffix = Path(path).suffix.lower()
    named = suffix[1:] if suffix[1:] in FORMATS else None
    if format is None:
        if named is None:
            raise ExportError(
                f"cannot tell the format from the file name {str(path)!r}: name it .onnx or .pt2, or give "
                f"the format ({' or '.join(FORMATS)})"
            )
        return named
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if named is not None and named != format:
        raise ExportError(
            f"format {format} contradicts the file name {str(path)!r} ({suffix} is {named}): write to "
            f"{str(Path(path).with_suffix('.' + format))!r}, or leave the format out to write {named}"
        )
    return format


class ParityError(ExportError):
    """The written file does not compute what the PyTorch model does; the file was removed (exit 1)."""

    exit_code = 1


@dataclass
class ExportResult:
    """What :func:`export` wrote and measured.

    Attributes:
        path: the file written.
        format: ``"onnx"`` or ``"pt2"``.
        exporter: ``"dynamo"`` / ``"torchscript"`` (ONNX) or ``"torch.export"`` (pt2).
        seconds: wall time of the export (trace and write), without the check.
        parity: batch size -> max relative difference ``max|file - torch| / max|torch|`` (float32).
        exact: pt2 only: the reloaded program equals the exported one bit for bit.
        domains: ONNX only: the operator domains in the graph (``""`` is the standard one).
        opset: ONNX only: the default-domain opset.
        metadata: the metadata written with the file (strings, JSON where structured).
    """

    path: Path
    format: str
    exporter: str
    seconds: float
    parity: dict[int, float] = field(default_factory=dict)
    exact: bool | None = None
    domains: list[str] = field(default_factory=list)
    opset: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- input description
def preprocessing(
    model: nn.Module, pretrained_cfg: dict[str, Any] | None = None, input_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The input description of ``model``, with timm's ``pretrained_cfg`` names.

    :func:`ilmconvert.models.resolve_preprocessing` with ``pretrained_cfg`` (a checkpoint's
    ``config.json`` top-level field) as the given values: key by key from it, else the network's
    library (timm's ``pretrained_cfg``, torchvision's weights transforms), else timm's ImageNet
    defaults (3 x 224 x 224, bicubic, crop 0.875). ``input_size`` ``(H, W)`` overrides the height
    and width.

    Returns:
        ``{"input_size": [C, H, W], "crop_pct": float, "interpolation": str, "mean": [...],
        "std": [...]}`` (JSON-ready).

    Raises:
        ExportError: if ``input_size`` is not two positive integers.
    """
    found = resolve_preprocessing(model, config={"pretrained_cfg": pretrained_cfg or {}}, metadata={})
    cfg = found.pretrained_cfg()
    out = {key: cfg[key] for key in PREPROCESSING_KEYS}
    out["input_size"] = [int(v) for v in out["input_size"]]
    if input_size is not None:
        if len(input_size) != 2 or any(int(v) < 1 for v in input_size):
            raise ExportError(f"input size must be two positive integers H W, got {input_size}")
        out["input_size"] = [out["input_size"][0], int(input_size[0]), int(input_size[1])]
    return out


def _metadata(
    model: nn.Module, prep: dict[str, Any], label_names: list[str] | None, extra: dict[str, Any] | None
) -> dict[str, str]:
    """String metadata: the preprocessing keys (JSON values), label_names, the source and conversion."""
    meta = {key: json.dumps(value) for key, value in prep.items()}
    if label_names:
        meta["label_names"] = json.dumps(list(label_names))
    source = getattr(model, "ilm_source", None)
    if source is not None:
        meta["source"] = json.dumps(source.to_dict() if hasattr(source, "to_dict") else str(source))
    report = getattr(model, "ilm_conversion", None)
    if report is not None and getattr(report, "settings", None):
        meta["conversion"] = json.dumps(report.settings, default=str)
    meta["producer"] = f"ilmconvert {__version__}"
    for key, value in (extra or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return meta


# ------------------------------------------------------------------------------------- export
def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    exporter: str = "dynamo",
    opset: int | None = None,
    batch: int | str = "dynamic",
    input_size: tuple[int, int] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    check: bool = True,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export ``model`` to ``path`` (ONNX or ``torch.export`` archive) and check the file.

    The model is put in eval mode (its parameters are not changed) and traced on a random
    ``(B, C, H, W)`` float32 batch on its own device. ONNX: standard operators only, opset
    ``opset`` (default 18), input ``input`` and output ``output``, weights inline below 2 GB and as
    external data (``PATH.data``) above. pt2: ``torch.export.save`` with the metadata as the extra
    file ``ilmconvert.json``.

    The file is written into a temporary folder next to ``path``, checked (see module doc) and
    only then renamed into place; a failed check removes it.

    Args:
        model: a float32 network taking one image batch ``(B, C, H, W)``.
        path: the file to write (replaced if it exists).
        format: ``"onnx"`` or ``"pt2"``; default: the one ``path``'s extension names
            (:func:`format_for`).
        exporter: ONNX only: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, on ``torch.export``)
            or ``"torchscript"`` (``dynamo=False``, on ``torch.jit.trace``).
        opset: ONNX opset (18 or newer by default; the exporters accept what they support).
        batch: ``"dynamic"`` (a dynamic batch axis, checked at batch 1 and 3) or a fixed size N.
        input_size: ``(H, W)``; default from ``pretrained_cfg`` / the model (:func:`preprocessing`).
        pretrained_cfg: timm-style input description (a checkpoint's ``config.json`` field).
        label_names: class names, stored in the metadata.
        metadata: extra metadata (strings, or JSON-serializable values).
        check: run the written file against the model (default True).
        tolerance: the largest relative difference accepted in the check.

    Returns:
        An :class:`ExportResult` (the parity figures are empty when ``check`` is False).

    Raises:
        ExportError: bad ``format`` (or one that contradicts ``path``'s extension, or none given
            nor named by it) / ``exporter`` / ``batch`` / ``input_size``, a model that is
            not float32, onnxruntime missing for ``onnx``, or the exporter failing.
        ParityError: the written file does not match (nothing is left at ``path``).
        WriteError: the file system is full, over quota or read-only (nothing is left at ``path``).
    """
    format = format_for(path, format)
    if format == "onnx" and exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    batches = _check_batches(batch)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ExportError(f"export needs a float32 model, this one has {sorted(map(str, dtypes))}; call model.float()")
    if format == "onnx":
        require_onnx()
    prep = preprocessing(model, pretrained_cfg, input_size)
    meta = _metadata(model, prep, label_names, metadata)
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    trace_batch = 2 if batch == "dynamic" else int(batch)
    example = torch.randn(trace_batch, *prep["input_size"], generator=torch.Generator().manual_seed(0)).to(device)
    target = Path(path)
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic.guard(target, need):  # a full disk: one WriteError line
        target.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tmp = workdir / target.name
            start = time.perf_counter()
            if format == "onnx":
                result = _export_onnx(model, example, tmp, exporter, opset or DEFAULT_OPSET, batch == "dynamic", meta)
            else:
                result = _export_pt2(model, example, tmp, batch == "dynamic", meta)
            result.seconds = time.perf_counter() - start
            if check:
                _check(model, result, batches, prep["input_size"], device, tolerance)
            for item in sorted(workdir.iterdir()):  # the file, and its external data if any
                os.replace(item, target.parent / item.name)
            result.path = target
            return result
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _check_batches(batch: int | str) -> tuple[int, ...]:
    if batch == "dynamic":
        return CHECK_BATCHES
    try:
        n = int(batch)
    except (TypeError, ValueError):
        n = 0
    if isinstance(batch, bool) or n < 1:
        raise ExportError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    return (n,)


def require_onnx() -> None:
    """Raise :class:`ExportError` (one line, how to install) unless onnx, onnxruntime and onnxscript import."""
    import importlib.util

    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'ilmconvert[onnx]'")


def _export_onnx(
    model: nn.Module, x: torch.Tensor, path: Path, exporter: str, opset: int, dynamic: bool, meta: dict[str, str]
) -> ExportResult:
    import onnx

    try:
        if exporter == "dynamo":
            _onnx_dynamo(model, x, path, opset, dynamic)
        else:
            _onnx_torchscript(model, x, path, opset, dynamic)
    except Exception as err:  # the exporters raise many types; one line with the first line of theirs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"the {exporter} ONNX exporter failed: {first}") from err
    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))  # the external data, if any, stays where it is (same folder)
    domains = sorted({n.domain for n in proto.graph.node})
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return ExportResult(path, "onnx", exporter, 0.0, domains=domains, opset=opset_found, metadata=meta)


def _onnx_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    """``torch.onnx.export(dynamo=True)`` without onnxscript's pattern rewriter (see docs/performance.md).

    The rewriter takes time quadratic in the graph's size (60 of 120 s for a converted
    ``resnet50_gn``); constant folding, dead-node removal and common-subexpression elimination
    keep the graph as small as the full optimizer does within a few percent, in about a second.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript

    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=shapes,
        optimize=False,
        verbose=False,
    )
    onnxscript.optimizer.fold_constants(program.model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.DeduplicateInitializersPass(),
    )(program.model)
    program.save(str(path))


def _onnx_torchscript(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    """``torch.onnx.export(dynamo=False)``: the TorchScript tracer."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice and tracer warnings
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None,
        )


def _export_pt2(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool, meta: dict[str, str]) -> ExportResult:
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.export failed: {first}") from err
    buffer = io.BytesIO()  # written by Python, so a full disk is an OSError with its errno
    torch.export.save(program, buffer, extra_files={PT2_METADATA_FILE: json.dumps(meta)})
    atomic.write_bytes(path, buffer.getvalue())
    result = ExportResult(path, "pt2", "torch.export", 0.0, metadata=meta)
    result._program = program  # type: ignore[attr-defined]  # for the exactness check
    return result


# ------------------------------------------------------------------------------------- check
def _check(
    model: nn.Module,
    result: ExportResult,
    batches: tuple[int, ...],
    size: list[int],
    device: torch.device,
    tolerance: float,
) -> None:
    """Run the written file at each batch size against ``model``; fill ``result.parity``.

    Raises:
        ParityError: a difference above ``tolerance``, a non-finite output, or (pt2) a reloaded
            program that differs from the exported one.
    """
    run, exact = _runner(result, device)
    g = torch.Generator().manual_seed(1)
    result.exact = True if result.format == "pt2" else None
    for n in batches:
        x = torch.randn(n, *size, generator=g).to(device)
        with torch.no_grad():
            ref = model(x).float()
            got = run(x).float().to(ref.device)
            if exact is not None and not torch.equal(run(x), exact(x)):
                result.exact = False
        if got.shape != ref.shape:
            raise ParityError(f"{result.format} output has shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        scale = ref.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        rel = float((got - ref).abs().max() / scale) if ref.numel() else 0.0
        result.parity[n] = rel
        if not (rel <= tolerance and torch.isfinite(got).all()):
            raise ParityError(
                f"the exported {result.format} differs from the PyTorch model at batch {n}: max relative "
                f"difference {rel:.3g} > {tolerance:g}; nothing was written (please report this)"
            )
    if result.exact is False:
        raise ParityError("the reloaded pt2 program differs from the exported one; nothing was written")


def _runner(result: ExportResult, device: torch.device) -> tuple[Any, Any]:
    """``(run, exact)``: the written file as a function of a batch, and (pt2) the in-memory program."""
    if result.format == "pt2":
        loaded = torch.export.load(str(result.path)).module()
        return loaded, result._program.module()  # type: ignore[attr-defined]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return run, None
