"""Conversion targets of the plain BatchNorm baselines (``method="none"``), without ILM or Proxy Norm.

- :class:`FrozenBatchNorm` (``batchnorm="frozen"``): timm's ``freeze_batch_norm_2d``, BN with its
  running statistics fixed (``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``): the same function,
  batch-independent.
- :class:`PlainGroupNorm` (``batchnorm="gn"``): BN -> ``nn.GroupNorm`` (timm's ``BatchNormAct2d``
  -> ``GroupNormAct`` with the same activation and drop) keeping BN's affine: the BN -> GN swap
  other tools offer, and the baseline :func:`ilmconvert.calibrate.calibrate` fits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .from_norm import BATCHNORM_GROUPS, UnsupportedNormError, factory_kwargs, group_norm_of_batchnorm
from .frozen import running_statistics


class FrozenBatchNorm:
    """Conversion target of the plain baseline ``method="none", batchnorm="frozen"``.

    ``from_norm`` is timm's ``freeze_batch_norm_2d`` on one module: ``BatchNorm2d`` becomes
    ``FrozenBatchNorm2d`` and ``BatchNormAct2d`` becomes ``FrozenBatchNormAct2d`` (activation and
    drop kept), computing ``x * scale + shift`` with the running statistics in training mode too.
    """

    #: the conversion keeps the function (the report does not mark it function-changing)
    preserves_function = True

    @classmethod
    def from_norm(cls, norm: nn.Module, **_: Any) -> nn.Module:
        """The frozen copy of ``norm`` (its running statistics are shared, as timm does).

        Raises:
            UnsupportedNormError: ``norm`` is not a 2-d BatchNorm with running statistics
                (timm's frozen layers are 4-d only).
        """
        from timm.layers import freeze_batch_norm_2d

        mean, _ = running_statistics(norm)
        with torch.device(mean.device):  # timm assigns .data: build on the norm's device (meta too)
            frozen = freeze_batch_norm_2d(norm)
        if frozen is norm:
            raise UnsupportedNormError(
                f"timm's freeze_batch_norm_2d takes 2-d BatchNorm only, not {type(norm).__name__}"
            )
        return frozen


class PlainGroupNorm:
    """Conversion target of the plain GroupNorm baseline ``method="none", batchnorm="gn"``.

    ``from_norm`` builds ``nn.GroupNorm(G, C, eps)`` with G = 32 or the largest divisor of C not
    above it (``batchnorm_groups`` changes it) and BN's affine; a timm ``BatchNormAct2d`` becomes
    timm's ``GroupNormAct`` whose activation and drop are the BN's own modules.
    """

    @classmethod
    def from_norm(cls, norm: nn.Module, *, batchnorm_groups: int = BATCHNORM_GROUPS, **_: Any) -> nn.Module:
        """The GroupNorm replacing the BatchNorm ``norm`` (same device, dtype, affine).

        Raises:
            UnsupportedNormError: ``norm`` is not a BatchNorm.
        """
        from timm.layers import BatchNormAct2d, GroupNormAct

        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedNormError(f"{type(norm).__name__} is not a BatchNorm")
        gn = group_norm_of_batchnorm(norm, batchnorm_groups=batchnorm_groups)
        if not isinstance(norm, BatchNormAct2d):
            return gn
        factory = factory_kwargs(norm)
        act = GroupNormAct(gn.num_channels, gn.num_groups, gn.eps, affine=gn.affine, apply_act=False, **factory)
        if gn.affine:
            act.load_state_dict(gn.state_dict())
        act.act, act.drop = norm.act, norm.drop
        return act
