"""Function-preservation check: does the converted network compute what the original did?"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .models import input_size


@dataclass
class OutputDifference:
    """Difference between two forward passes on the same batch.

    Attributes:
        max_abs: ``max |after - before|`` over every output element.
        relative: ``max_abs / max |before|`` (the figure the preservation targets are stated in).
        shape: shape of the random input batch.
        dtype: dtype of the computation, e.g. ``"float32"``.
        finite: whether every output element of ``after`` is finite.
    """

    max_abs: float
    relative: float
    shape: tuple[int, ...]
    dtype: str
    finite: bool


def random_batch(
    model: nn.Module, batch_size: int = 2, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A standard-normal batch ``(batch_size, C, H, W)`` of the network's input size (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_size(model), generator=generator, dtype=dtype)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in tree_leaves(model(x)) if isinstance(t, torch.Tensor)]


def output_difference(before: list[torch.Tensor], after: list[torch.Tensor], x: torch.Tensor) -> OutputDifference:
    """Compare two lists of output tensors (as returned for the same input ``x``)."""
    max_abs = max(float((a.double() - b.double()).abs().max()) for a, b in zip(after, before))
    scale = max(float(b.double().abs().max()) for b in before)
    finite = all(bool(torch.isfinite(a).all()) for a in after)
    return OutputDifference(
        max_abs, max_abs / scale if scale else max_abs, tuple(x.shape), str(x.dtype).removeprefix("torch."), finite
    )


def check_conversion(
    model: nn.Module, convert_fn: Callable[[nn.Module], Any], x: torch.Tensor | None = None
) -> tuple[Any, OutputDifference]:
    """Run ``convert_fn(model)`` (in place) and measure how much the outputs on ``x`` moved.

    The network is put in eval mode for both passes (dropout off), then restored to its mode.

    Args:
        model: the network, not yet converted.
        convert_fn: e.g. ``lambda m: ilmconvert.convert(m)``; its result is returned.
        x: the input batch; by default :func:`random_batch` in the parameters' dtype.

    Returns:
        ``(convert_fn's result, OutputDifference)``.
    """
    was_training = model.training
    model.eval()
    if x is None:
        param = next(model.parameters(), None)
        x = random_batch(model, dtype=param.dtype if param is not None else torch.float32)
    before = _outputs(model, x)
    result = convert_fn(model)
    after = _outputs(model, x)
    model.train(was_training)
    return result, output_difference(before, after, x)
