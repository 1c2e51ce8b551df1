"""The pieces of Proxy Norm that :class:`~ilmconvert.nn.ProxyNormAct` (and its GN / LN norms) and
:class:`~ilmconvert.nn.ILMProxyGroupNormAct` share: the proxy points, the moments over the proxy,
the normalizing map, the activation, PN's own parameters and the ``from_norm`` mixin of a target
that takes the activation over (docs/design.md §8).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from .fast import exporting


def proxy_points(num_proxy: int, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """The ``(num_proxy,)`` Gaussian quantiles ``q_i = sqrt(2) erfinv(2 (i + 1/2) / n - 1)``.

    Computed in float64 and rounded once to ``dtype``. While tracing or exporting
    (:func:`~ilmconvert.nn.fast.exporting`) the same values enter the graph as a constant: ONNX has
    no ``erfinv``, and the points depend on ``num_proxy`` only.
    """
    if exporting():
        return torch.tensor(proxy_points_float64(num_proxy), dtype=dtype, device=device)
    i = torch.arange(num_proxy, dtype=torch.float64, device=device)
    return (math.sqrt(2.0) * torch.erfinv((2.0 * i + 1.0) / num_proxy - 1.0)).to(dtype)


_POINTS: dict[int, tuple[float, ...]] = {}


def proxy_points_float64(num_proxy: int) -> tuple[float, ...]:
    """:func:`proxy_points` in float64 as Python floats, cached (filled eagerly by every layer's ``__init__``)."""
    if num_proxy not in _POINTS:
        i = torch.arange(num_proxy, dtype=torch.float64, device="cpu")
        _POINTS[num_proxy] = tuple((math.sqrt(2.0) * torch.erfinv((2.0 * i + 1.0) / num_proxy - 1.0)).tolist())
    return _POINTS[num_proxy]


_POINT_TENSORS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def cached_proxy_points(
    num_proxy: int, dtype: torch.dtype, device: torch.device, *, eager: bool = False
) -> torch.Tensor:
    """:func:`proxy_points`, kept per (n, dtype, device) in eager mode; computed afresh while
    compiling, tracing or exporting (a kept tensor would enter the graph as a stray constant).
    ``eager=True``: the caller has already checked that none of these is under way."""
    if not eager and (torch.compiler.is_compiling() or exporting()):
        return proxy_points(num_proxy, dtype, device)
    key = (num_proxy, dtype, device)
    if key not in _POINT_TENSORS:
        _POINT_TENSORS[key] = proxy_points(num_proxy, dtype, device)
    return _POINT_TENSORS[key]


def proxy_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean ``(..., C)``, centred values ``(..., C, n)`` and biased variance ``(..., C)`` of ``z``
    over its last dim (the proxy points)."""
    m = z.mean(-1)
    centred = z - m[..., None]
    return m, centred, (centred * centred).mean(-1)


def normalizing_map(
    m: torch.Tensor, v: torch.Tensor, eps: float, output_weight: torch.Tensor | None, output_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``z * scale + shift = (z - m) / sqrt(v + eps)``, then the output affine
    if any, in the dtype of ``m`` (shapes as ``m``, ``v``; the affine ``(C,)`` broadcasts)."""
    scale = torch.rsqrt(v + eps)
    shift = -m * scale
    if output_weight is not None:
        w = output_weight.to(m.dtype)
        scale, shift = scale * w, torch.addcmul(output_bias.to(m.dtype), shift, w)
    return scale, shift


def resolve_activation(act: nn.Module | type[nn.Module] | str | None) -> nn.Module:
    """An activation module from a module (used as is), a module class, or a name timm knows
    (``"gelu"``); ``None`` gives ``nn.Identity``."""
    if isinstance(act, nn.Module):
        return act
    if act is None:
        return nn.Identity()
    if isinstance(act, str):
        from timm.layers import create_act_layer

        return create_act_layer(act)
    return act()


def add_proxy_parameters(layer: nn.Module, output_affine: bool, factory: dict[str, Any]) -> None:
    """PN-Act's own parameters on ``layer`` (which has ``num_channels``): ``proxy_weight`` (gamma~)
    and ``proxy_bias`` (beta~), zeros ``(C,)``; ``output_weight`` / ``output_bias`` (ones / zeros)
    with ``output_affine``, else registered as None."""
    c = layer.num_channels
    layer.proxy_weight = nn.Parameter(torch.zeros(c, **factory))
    layer.proxy_bias = nn.Parameter(torch.zeros(c, **factory))
    if output_affine:
        layer.output_weight = nn.Parameter(torch.ones(c, **factory))
        layer.output_bias = nn.Parameter(torch.zeros(c, **factory))
    else:
        layer.register_parameter("output_weight", None)
        layer.register_parameter("output_bias", None)


@torch.no_grad()
def reset_proxy_parameters(layer: nn.Module) -> None:
    """gamma~ = beta~ = 0 and the output affine (if any) 1, 0: PN's parameters at the authors' init."""
    layer.proxy_weight.zero_()
    layer.proxy_bias.zero_()
    if layer.output_weight is not None:
        layer.output_weight.fill_(1.0)
        layer.output_bias.zero_()


class ProxyFromNorm:
    """The ``from_norm`` side of a Proxy Norm target (mixed in before
    :class:`~ilmconvert.nn.from_norm.FromNorm`'s subclasses): it takes over the activation, and
    ``init="preserve"`` adds the output affine that keeps the replaced norm + activation's function
    (``"paper"``: the authors' layer, no output affine)."""

    takes_activation: ClassVar[bool] = True

    @classmethod
    def _build_kwargs(
        cls, norm: nn.Module, *, init: str, key_group_size: int, reduction: int, act: nn.Module | None
    ) -> dict[str, Any]:
        base = super()._build_kwargs(  # type: ignore[misc]
            norm, init=init, key_group_size=key_group_size, reduction=reduction, act=act
        )
        return {**base, "act_layer": act, "output_affine": init == "preserve"}
