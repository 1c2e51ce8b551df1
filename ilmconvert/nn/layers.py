"""ILM front-ends: one thin class per standardization (GroupNorm, InstanceNorm, LayerNorm).

Each front-end only says how the norm it augments standardizes (eq. 1, via the same
``torch.nn.functional`` call the original uses) and how to build itself from such a norm
(``from_norm``, the pattern of ``torch.ao.quantization``'s ``from_float``). Everything else
(key features, encoder, decoders, alignment) is :class:`~ilmconvert.nn.core.ILMNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core import ILMNorm
from .from_norm import FromNorm, UnsupportedNormError, group_norm_settings, keeps_bias, layer_norm_settings


class _ILMFromNorm(FromNorm):
    """:class:`~ilmconvert.nn.from_norm.FromNorm` of the ILM front-ends: K, r, and B_beta unless the
    replaced norm has a weight but no bias. ``init="preserve"``: ``weight = w`` (B_omega = w - 1/2),
    ``bias = b``, W2 = W3 = 0, the same function as the norm; ``"paper"``: B_omega = 1 (stored as
    ``weight = 1.5``), B_beta = 0, nn.Linear defaults (docs/design.md §1-2)."""

    @classmethod
    def _build_kwargs(
        cls, norm: nn.Module, *, init: str, key_group_size: int, reduction: int, act: nn.Module | None
    ) -> dict[str, Any]:
        base = super()._build_kwargs(norm, init=init, key_group_size=key_group_size, reduction=reduction, act=act)
        return {**base, "key_group_size": key_group_size, "reduction": reduction, "bias": keeps_bias(norm)}


class ILMGroupNorm(_ILMFromNorm, ILMNorm):
    """ILM Norm on GroupNorm standardization (the paper's ILM+GN; GN with one group is its "LN").

    ``from_norm`` also takes a BatchNorm (opt-in, function-changing): G = 32, or the largest
    divisor of C not above 32, and the BN affine becomes ``weight`` / ``bias`` (as preserve init does).

    Input ``(B, C, *spatial)``; an instance is one sample. Standardization is
    ``F.group_norm(x, num_groups, eps=eps)`` exactly as ``nn.GroupNorm``; key features use groups
    of K channels, independent of ``num_groups``.

    Args:
        num_groups: G, the standardization groups (C must be a multiple of G).
        num_channels: C.
        eps: as in ``nn.GroupNorm``.
        **kwargs: ``key_group_size``, ``reduction``, ``bias``, ``device``, ``dtype`` of ILMNorm.

    Raises:
        ValueError: if C is not a multiple of G.
    """

    pooled = True
    standardization = "group"

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, **kwargs: Any) -> None:
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be a multiple of num_groups ({num_groups})")
        super().__init__(num_channels, eps, **kwargs)
        self.num_groups = int(num_groups)

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        return group_norm_settings(norm, **layout)  # opt-in BatchNorm -> ILM+GN: function-changing

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, None, None, self.eps)

    @property
    def num_norm_groups(self) -> int:
        return self.num_groups

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, " + super().extra_repr()


class ILMInstanceNorm(_ILMFromNorm, ILMNorm):
    """ILM Norm on InstanceNorm standardization (the paper's ILM+IN).

    Input ``(B, C, *spatial)`` or unbatched ``(C, *spatial)``; an instance is one sample.
    Standardization is ``F.instance_norm`` with the input's own statistics, as ``nn.InstanceNorm*d``
    without running statistics.

    Args:
        num_features: C.
        eps: as in ``nn.InstanceNorm*d``.
        spatial_dims: 1, 2 or 3 for InstanceNorm1d/2d/3d (decides what counts as unbatched input);
            ``None`` accepts batched input of any rank.
        **kwargs: ``key_group_size``, ``reduction``, ``bias``, ``device``, ``dtype`` of ILMNorm.
    """

    pooled = True
    standardization = "instance"

    def __init__(self, num_features: int, eps: float = 1e-5, *, spatial_dims: int | None = None, **kwargs: Any) -> None:
        super().__init__(num_features, eps, **kwargs)
        self.spatial_dims = spatial_dims

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        if getattr(norm, "track_running_stats", False):
            raise UnsupportedNormError(
                "track_running_stats=True: in eval mode it standardizes with running statistics, not per instance"
            )
        dims = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(norm))
        return {"num_features": norm.num_features, "eps": norm.eps, "spatial_dims": dims, **layout}

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, None, None, None, None, True, 0.0, self.eps)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims is not None and x.dim() == self.spatial_dims + 1:
            return super()._forward(x.unsqueeze(0)).squeeze(0)
        return super()._forward(x)

    @property
    def num_norm_groups(self) -> int:
        return self.num_channels


class ILMLayerNorm(_ILMFromNorm, ILMNorm):
    """ILM Norm on LayerNorm standardization over the channel dimension.

    Two layouts, as found in the zoos:

    - ``channels_first=False``: input ``(..., C)`` normalized over the last dim (ViT / Swin
      tokens, ``nn.LayerNorm(C)``); every token is an instance with its own key features.
    - ``channels_first=True``: input ``(B, C, H, W)`` normalized over C at each pixel (timm's and
      torchvision's ``LayerNorm2d`` in ConvNeXt); every pixel is an instance.

    Key features are never pooled across positions, so the layer stays independent of sequence
    length and causal-safe. Standardization is ``F.layer_norm(x, (C,), eps=eps)`` (after the same
    permute as ``LayerNorm2d``).

    Args:
        num_channels: C.
        eps: as in the replaced LayerNorm.
        channels_first: the layout, see above.
        **kwargs: ``key_group_size``, ``reduction``, ``bias``, ``device``, ``dtype`` of ILMNorm.
    """

    pooled = False
    standardization = "layer"

    def __init__(self, num_channels: int, eps: float = 1e-5, *, channels_first: bool = False, **kwargs: Any) -> None:
        super().__init__(num_channels, eps, **kwargs)
        self.channels_first = bool(channels_first)

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        return layer_norm_settings(norm, "; ILM rescales per channel", **layout)

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.num_channels,), None, None, self.eps)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return super()._forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super()._forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_first=True" if self.channels_first else "")


class _ActMixin(nn.Module):
    """Adds timm's ``*Act`` tail, ``act(drop(norm(x)))``, to an ILM front-end."""

    def __init__(self, *args: Any, act: nn.Module | None = None, drop: nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(super()._forward(x))
        if y._is_view() and torch.is_grad_enabled() and getattr(self.act, "inplace", False):
            # an in-place activation on a view (LayerNorm2d's permute) of an autograd Function's
            # output is forbidden: give it its own storage, same strides
            y = y.clone(memory_format=torch.preserve_format)
        return self.act(y)


class ILMGroupNormAct(_ActMixin, ILMGroupNorm):
    """:class:`ILMGroupNorm` followed by the drop and activation of timm's ``GroupNormAct``."""


class ILMLayerNormAct(_ActMixin, ILMLayerNorm):
    """:class:`ILMLayerNorm` followed by the drop and activation of timm's ``LayerNormAct(2d)``."""


class _Fp32Mixin(nn.Module):
    """Runs the whole ILM layer in float32 and returns the input's dtype, as timm's ``*Fp32`` norms.

    timm's ``LayerNormFp32`` / ``LayerNorm2dFp32`` / ``LayerNormAct(2d)Fp32`` compute
    ``F.layer_norm(x.float(), ..., weight.float(), bias.float()).to(x.dtype)``: statistics,
    standardization and affine in float32 whatever the input dtype (float64 input included, which
    they round to float32), output in the input dtype. The ILM front-end does the same, so key
    features, standardization and rescaling see exactly the float32 tensor the original saw.
    """

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return super()._forward(x.float()).to(x.dtype)


class ILMLayerNormFp32(_Fp32Mixin, ILMLayerNorm):
    """:class:`ILMLayerNorm` computed in float32 (timm's ``LayerNormFp32`` / ``LayerNorm2dFp32``).

    Input ``(..., C)`` (or ``(B, C, H, W)`` with ``channels_first=True``) of any float dtype; the
    output has the input's shape and dtype. Everything in between is float32, as in the original,
    so a float64 input is preserved to float32 precision only (the original is no better).
    """


class ILMLayerNormActFp32(_ActMixin, ILMLayerNormFp32):
    """:class:`ILMLayerNormFp32` followed by drop and activation (timm's ``LayerNormAct(2d)Fp32``).

    The activation runs in the input dtype, after the cast back, as in the original.
    """
