"""ILM Norm layers (one core, :class:`ILMNorm`, and thin GroupNorm / InstanceNorm / LayerNorm front-ends),
Proxy Norm layers (:class:`ProxyNormAct` and the GN / LN + PN norms) and ILM + PN on GroupNorm
(:class:`ILMProxyGroupNormAct`)."""

from .core import ILMNorm, encoder_size, resolve_key_group_size
from .from_norm import UnsupportedNormError
from .ilm_proxy import ILMProxyGroupNormAct
from .layers import (
    ILMGroupNorm,
    ILMGroupNormAct,
    ILMInstanceNorm,
    ILMLayerNorm,
    ILMLayerNormAct,
    ILMLayerNormActFp32,
    ILMLayerNormFp32,
)
from .proxy import ProxyGroupNormAct, ProxyLayerNormAct, ProxyNormAct
from .proxy_common import proxy_points

__all__ = [
    "ILMNorm",
    "ILMProxyGroupNormAct",
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
