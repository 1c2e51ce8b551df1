"""Frozen BatchNorm: BN's standardization with its running statistics, fixed, under ILM rescaling.

BatchNorm in eval mode standardizes every sample with the running statistics it learned,
``x_s = (x - running_mean) / sqrt(running_var + eps)``, the same for every batch; frozen, as
torchvision's / detectron2's ``FrozenBatchNorm2d``, it does so in training mode too, so no output
depends on the other samples of the batch. :class:`ILMFrozenBatchNorm` keeps that standardization
exactly and replaces BN's affine by ILM's per-instance rescaling (docs/design.md §1), an instance
being one sample. Both steps run in one call of BatchNorm's own inference kernel, with the
sample's ``omega`` / ``beta`` as its affine: at preserve init ``omega = w`` and ``beta = b`` bit
for bit, so the converted network computes the original's eval function to the last bit in
float32, float64 and half precision (docs/design.md §2, ``batchnorm="frozen"``).

The plain baselines without ILM (``method="none"``) are in :mod:`ilmconvert.nn.baselines`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .core import ILMNorm
from .from_norm import UnsupportedNormError
from .layers import _ActMixin, _ILMFromNorm

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def running_statistics(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(running_mean, running_var)`` of a BatchNorm, or :class:`UnsupportedNormError`."""
    if not isinstance(norm, _BatchNorm):
        raise UnsupportedNormError(f"{type(norm).__name__} is not a BatchNorm: nothing to freeze")
    if norm.running_mean is None or norm.running_var is None:
        raise UnsupportedNormError("track_running_stats=False: no running statistics to freeze")
    return norm.running_mean, norm.running_var


class ILMFrozenBatchNorm(_ILMFromNorm, ILMNorm):
    """ILM Norm on frozen BatchNorm standardization (BatchNorm1d / 2d / 3d, ``batchnorm="frozen"``).

    Input ``(B, C, *spatial)`` (``(B, C)`` for BatchNorm1d); an instance is one sample, its key
    features pooled over its positions as for :class:`~ilmconvert.nn.ILMGroupNorm`. The
    standardization is ``F.batch_norm(x, running_mean, running_var, None, None, False, 0, eps)``
    in training and eval mode alike: the statistics are buffers, never updated, so no output
    depends on other samples. The fast path (docs/design.md §4) does not know this
    standardization (``standardization = None``): the layer takes the reference path.

    Args:
        num_features: C.
        eps: BatchNorm's ``eps``.
        **kwargs: ``key_group_size``, ``reduction``, ``bias``, ``device``, ``dtype`` of ILMNorm.

    Buffers:
        running_mean, running_var: ``(C,)``, the replaced BatchNorm's running statistics (copied).
    """

    pooled = True
    standardization = None
    #: the conversion keeps the function (the report does not mark it function-changing)
    preserves_function = True

    def __init__(self, num_features: int, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(num_features, eps, **kwargs)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.register_buffer("running_mean", torch.zeros(self.num_channels, **factory))
        self.register_buffer("running_var", torch.ones(self.num_channels, **factory))

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        running_statistics(norm)
        return {"num_features": norm.num_features, "eps": norm.eps}

    @classmethod
    def from_norm(cls, norm: nn.Module, **kwargs: Any) -> ILMFrozenBatchNorm:
        """Build from a BatchNorm with running statistics, copying them (see
        :meth:`~ilmconvert.nn.from_norm.FromNorm.from_norm`).

        Raises:
            UnsupportedNormError: ``norm`` is not a BatchNorm or has no running statistics.
        """
        layer = super().from_norm(norm, **kwargs)
        mean, var = running_statistics(norm)
        with torch.no_grad():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        return layer

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.running_mean, self.running_var
        if x.dtype not in _LOW_PRECISION:  # F.batch_norm takes float32 statistics with half input
            mean, var = mean.to(x.dtype), var.to(x.dtype)
        return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)

    def _standardize_and_rescale(self, x: torch.Tensor, omega: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Eqs. 1-2 as BatchNorm rounds them: ``F.batch_norm`` in inference mode on ``x`` viewed as
        one sample of ``B * C`` channels, with the running statistics repeated per sample and
        ``omega``, ``beta`` ``(B, C)`` flattened as its weight and bias.

        The kernel folds ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale`` and
        computes ``x * scale + shift``; standardizing first and rescaling after rounds differently
        (about 1 ulp per layer, 1.3-1.6e-6 relative over EfficientNet-Lite1's 64 layers). The
        parameters go in the dtype the replaced BatchNorm would have had: the input's, except for
        half-precision input to float32 buffers (autocast), where the kernel's mixed-precision form
        takes them in float32. Gradients reach ``omega`` and ``beta`` through the kernel's weight
        and bias. The output is contiguous, or channels-last when the input is.
        """
        b, c = x.shape[0], x.shape[1]
        dtype = x.dtype
        if dtype in _LOW_PRECISION and self.running_mean.dtype != dtype:
            dtype = torch.float32
        mean, var = self.running_mean.to(dtype), self.running_var.to(dtype)
        y = F.batch_norm(
            x.reshape(1, b * c, *x.shape[2:]), mean.repeat(b), var.repeat(b),
            omega.reshape(b * c).to(dtype), beta.reshape(b * c).to(dtype), False, 0.0, self.eps,
        ).reshape(x.shape)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    def extra_repr(self) -> str:
        return "frozen, " + super().extra_repr()


class ILMFrozenBatchNormAct(_ActMixin, ILMFrozenBatchNorm):
    """:class:`ILMFrozenBatchNorm` followed by the drop and activation of timm's ``BatchNormAct2d``."""
