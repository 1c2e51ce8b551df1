"""ILM Norm layers (one core, :class:`ILMNorm`, and thin GroupNorm / InstanceNorm / LayerNorm front-ends)
and Proxy Norm layers (:class:`ProxyNormAct` and the GN / LN + PN norms)."""

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
from .proxy import ProxyGroupNormAct, ProxyLayerNormAct, ProxyNormAct, proxy_points

__all__ = [
    "ILMNorm",
    "ILMGroupNorm",
    "ILMGroupNormAct",
    "ILMInstanceNorm",
    "ILMLayerNorm",
    "ILMLayerNormAct",
    "ILMLayerNormActFp32",
    "ILMLayerNormFp32",
    "ProxyGroupNormAct",
    "ProxyLayerNormAct",
    "ProxyNormAct",
    "UnsupportedNormError",
    "encoder_size",
    "proxy_points",
    "resolve_key_group_size",
]
