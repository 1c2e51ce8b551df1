"""ILM Norm layers: one core (:class:`ILMNorm`) and thin GroupNorm / InstanceNorm / LayerNorm front-ends."""

from .core import ILMNorm, encoder_size, resolve_key_group_size
from .layers import (
    ILMGroupNorm,
    ILMGroupNormAct,
    ILMInstanceNorm,
    ILMLayerNorm,
    ILMLayerNormAct,
    ILMLayerNormActFp32,
    ILMLayerNormFp32,
    UnsupportedNormError,
)

__all__ = [
    "ILMNorm",
    "ILMGroupNorm",
    "ILMGroupNormAct",
    "ILMInstanceNorm",
    "ILMLayerNorm",
    "ILMLayerNormAct",
    "ILMLayerNormActFp32",
    "ILMLayerNormFp32",
    "UnsupportedNormError",
    "encoder_size",
    "resolve_key_group_size",
]
