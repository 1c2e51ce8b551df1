"""``ilmconvert.swap``: convert a network and prove on a batch that it computes what it did.

:func:`ilmconvert.convert` replaces the norms; :func:`swap` also runs the preservation check of
:mod:`ilmconvert.check` (before and after, eval mode, a fixed-seed standard-normal batch of the
network's own input size) and raises :class:`PreservationError` when a conversion that should
keep the function (``init="preserve"``, no BatchNorm converted) does not: relative difference
above 1e-4 (the float32 target, docs/design.md §2) or non-finite outputs. ``ilmconvert swap``
(the CLI) is this function plus printing and saving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .check import OutputDifference, check_conversion
from .convert import ConversionReport, convert
from .errors import IlmconvertError
from .models import create_model

#: The largest relative output difference a function-preserving conversion may show in float32
#: (``max |after - before| / max |before|``; in practice 0 to ~1e-7, docs/design.md §2).
PRESERVATION_TOLERANCE = 1e-4


@dataclass
class SwapResult:
    """What :func:`swap` did.

    Attributes:
        model: the converted network (the one passed in, or the one built from a spec).
        report: the :class:`~ilmconvert.convert.ConversionReport`.
        difference: outputs after vs before on the check batch
            (:class:`~ilmconvert.check.OutputDifference`: ``max_abs``, ``relative``, ``shape``,
            ``dtype``, ``finite``).
        tolerance: the relative difference allowed where the function should be preserved.
        calibration: the :class:`~ilmconvert.calibrate.CalibrationReport` once :meth:`calibrate`
            ran, else ``None``.
    """

    model: nn.Module
    report: ConversionReport
    difference: OutputDifference
    tolerance: float = PRESERVATION_TOLERANCE
    calibration: Any = None

    def calibrate(self, original: nn.Module, images: Any, **calibrate_kwargs: Any) -> Any:
        """Fit the layers that replaced BatchNorm so that :attr:`model` reproduces ``original``
        (:func:`ilmconvert.calibrate.calibrate`, in place; what ``swap --calibrate`` does) and keep
        the report in :attr:`calibration`.

        Args:
            original: the network before conversion (a deep copy taken before :func:`swap`).
            images: preprocessed images ``(N, C, H, W)`` float32, or an iterable of batches.
            **calibrate_kwargs: ``groups``, ``time_budget``, ``seed``, ``progress``, ... of
                :func:`~ilmconvert.calibrate.calibrate`.

        Returns:
            The :class:`~ilmconvert.calibrate.CalibrationReport`.

        Raises:
            CalibrationError: not converted with ``batchnorm="gn"``, too few images, bad settings.
        """
        from .calibrate import calibrate

        self.calibration = calibrate(self.model, original, images, **calibrate_kwargs)
        return self.calibration

    @property
    def metadata(self) -> dict[str, Any]:
        """What a checkpoint of :attr:`model` records about this conversion (``save(metadata=...)``,
        shown in its model card): ``preservation_check`` (the :class:`OutputDifference` as a dict)
        and, after :meth:`calibrate`, ``calibration`` (the report's ``to_dict()``)."""
        out: dict[str, Any] = {"preservation_check": dataclasses.asdict(self.difference)}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        return out

    @property
    def expected_to_preserve(self) -> bool:
        """True for ``init="preserve"`` conversions that converted no BatchNorm."""
        return self.report.settings.get("init") == "preserve" and not self.report.function_changing

    @property
    def preserved(self) -> bool:
        """Every output is finite and the relative difference is at most :attr:`tolerance`."""
        return self.difference.finite and self.difference.relative <= self.tolerance

    @property
    def why_changed(self) -> str:
        """Why the function is expected to change ("" when it is expected to be preserved)."""
        if self.expected_to_preserve:
            return ""
        return "init=paper" if self.report.settings.get("init") != "preserve" else "BatchNorm was converted"


class PreservationError(IlmconvertError):
    """A conversion that should keep the network's function did not (exit code 1: not a user's
    mistake, a defect to report). ``result`` is the :class:`SwapResult`; the network is converted."""

    exit_code = 1

    def __init__(self, message: str, result: SwapResult) -> None:
        super().__init__(message)
        self.result = result


def swap(
    model: nn.Module | str,
    *,
    check: bool = True,
    tolerance: float = PRESERVATION_TOLERANCE,
    x: torch.Tensor | None = None,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    **convert_kwargs: Any,
) -> SwapResult:
    """Convert ``model`` in place and measure, on one batch, how much its outputs moved.

    Args:
        model: the network, or a spec (``timm:NAME[.TAG]``, ``torchvision:NAME[.WEIGHTS]``, a
            bare timm name) that :func:`ilmconvert.create_model` builds with ``pretrained``,
            ``weights`` and ``num_classes`` (which only apply to a spec).
        check: raise :class:`PreservationError` when the function should be preserved and is not.
        tolerance: the relative difference allowed (default 1e-4, the float32 target).
        x: the check batch; by default a fixed-seed standard-normal ``(2, C, H, W)`` batch of the
            network's input size (``pretrained_cfg``, else 3 x 224 x 224) in its parameters' dtype.
        **convert_kwargs: :func:`ilmconvert.convert`'s arguments (``method``, ``norms``, ``init``,
            ``batchnorm``, ``include``, ``exclude``, ``key_group_size``, ``reduction``, ``mapping``).

    Returns:
        :class:`SwapResult` (model, report, difference).

    Raises:
        PreservationError: ``check`` and the converted network does not compute what the original
            did (relative difference above ``tolerance``, or non-finite outputs).
        ConversionError: bad settings, or nothing to convert (the network is then unchanged).
        ModelSourceError: a spec that cannot be built.
        TypeError: ``pretrained``, ``weights`` or ``num_classes`` given with a module.
    """
    if isinstance(model, str):
        model = create_model(model, pretrained=pretrained, weights=weights, num_classes=num_classes)
    elif weights is not None or num_classes is not None:
        raise TypeError("weights and num_classes apply to a model spec, not to a module")
    report, difference = check_conversion(model, lambda m: convert(m, **convert_kwargs), x)
    result = SwapResult(model, report, difference, tolerance)
    if check and result.expected_to_preserve and not result.preserved:
        raise PreservationError(
            f"the converted network does not compute what the original did: relative difference "
            f"{difference.relative:.3g} (target <= {tolerance:.3g}), finite outputs: {difference.finite}, "
            f"on a random batch {'x'.join(map(str, difference.shape))} ({difference.dtype}); please report this",
            result,
        )
    return result
