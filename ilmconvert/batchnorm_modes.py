"""What BatchNorm becomes under each ``batchnorm=`` mode of :func:`ilmconvert.convert` (docs/design.md §2).

- ``"gn"``: GroupNorm standardization (G = 32 or the largest divisor of C not above it) with the
  method's rescaling: ILM, Proxy Norm, ILM + PN, or plain GroupNorm (``method="none"``). Changes
  the function; :func:`ilmconvert.calibrate.calibrate` fits it back.
- ``"frozen"``: BN's standardization with its running statistics, fixed, under ILM rescaling
  (:class:`~ilmconvert.nn.frozen.ILMFrozenBatchNorm`), or timm's ``FrozenBatchNorm2d`` for
  ``method="none"``: the same function, batch-independent. Proxy Norm needs a per-instance
  standardization, so ``proxy`` and ``ilm+proxy`` refuse it.
"""

from __future__ import annotations

from torch import nn

from . import methods

BATCHNORM_MODES: tuple[str, ...] = ("gn", "frozen")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_batchnorm(batchnorm: str | None, method: str) -> str:
    """"" when ``batchnorm`` works with ``method``, else why not (one line)."""
    if batchnorm is not None and batchnorm not in BATCHNORM_MODES:
        return f"batchnorm must be None or one of {', '.join(BATCHNORM_MODES)}; got {batchnorm!r}"
    if batchnorm == "frozen" and method in (methods.PROXY, methods.ILM_PROXY):
        return (
            f"batchnorm='frozen' keeps BatchNorm's running statistics, and {method} needs a per-instance "
            "standardization; use method 'ilm' or 'none' with frozen, or batchnorm='gn' with Proxy Norm"
        )
    return ""


def batchnorm_mapping(mapping: dict, method: str, batchnorm: str | None, adapter_class: type) -> dict:
    """``mapping`` (a fresh copy, changed in place) with the BatchNorm entries of ``batchnorm``'s mode.

    For ``"frozen"`` the ILM targets of the ``"bn"`` entries become their frozen counterparts; for
    ``method="none"`` (where ``mapping`` is empty) the plain baselines are added, as
    ``adapter_class(kind, target)`` (:class:`ilmconvert.convert.NormAdapter`).
    """
    from dataclasses import replace

    from timm.layers import BatchNormAct2d

    from .nn import ILMGroupNorm, ILMGroupNormAct
    from .nn.baselines import FrozenBatchNorm, PlainGroupNorm
    from .nn.frozen import ILMFrozenBatchNorm, ILMFrozenBatchNormAct

    if batchnorm is None:
        return mapping
    if method == methods.NONE:
        target = FrozenBatchNorm if batchnorm == "frozen" else PlainGroupNorm
        sources = (nn.BatchNorm2d, BatchNormAct2d) if batchnorm == "frozen" else (*_BATCHNORMS, BatchNormAct2d)
        mapping.update({source: adapter_class("bn", target) for source in sources})
    elif batchnorm == "frozen":
        frozen = {ILMGroupNorm: ILMFrozenBatchNorm, ILMGroupNormAct: ILMFrozenBatchNormAct}
        for source, adapter in list(mapping.items()):
            if adapter.kind == "bn" and adapter.target in frozen:
                mapping[source] = replace(adapter, target=frozen[adapter.target])
    return mapping
