"""The fast path of the ILM layers: when it applies, and which implementation runs it.

:func:`use_fast_path` decides per call whether a layer can take the fast path; :func:`forward`
runs it: the PyTorch implementation (:mod:`ilmconvert.nn.fast_torch`, everywhere), for the
pooled front-ends on CUDA the Triton kernels (:mod:`ilmconvert.nn.triton_ilm`, imported lazily), and
for small pooled inputs on eager CPU a compiled C++ kernel (:mod:`ilmconvert.nn.cpu_kernel`).
A Triton kernel that fails to compile or launch is given up for the rest of the process with one
warning, and the PyTorch implementation computes the same function (docs/design.md §4).

Which standardization a layer uses comes from its class attribute ``standardization``
(``"group"``, ``"instance"``, ``"layer"``; ``None``: reference path only), which the front-ends
declare and :class:`~ilmconvert.nn.core.ILMNorm` clears for subclasses that override the math; so
this module never imports the layers (like timm's ``fast_norm.py``).

``ILMCONVERT_REFERENCE=1`` in the environment, or ``layer.fast = False``, forces the reference
path; ``layer.fast = "torch"`` (PyTorch operations only) or ``"triton"`` forces one implementation (``True`` / ``None``:
automatic).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType

import torch
from torch import nn

from . import cpu_kernel
from .fast_torch import PooledILM, TokenILM, pooled_view_strides

REFERENCE_ENV = "ILMCONVERT_REFERENCE"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def reference_forced() -> bool:
    """True when the environment variable ``ILMCONVERT_REFERENCE`` is set to ``1``/``true``/``yes``."""
    return os.environ.get(REFERENCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def exporting() -> bool:
    """True while the network is being traced or exported, when the layers take their traceable path.

    That is ``torch.jit.trace`` (and with it the TorchScript-based ONNX exporter,
    ``torch.onnx.export(..., dynamo=False)``), ``torch.onnx.is_in_onnx_export()``, and
    ``torch.export`` (``torch.compiler.is_exporting()``, which also covers
    ``torch.onnx.export(..., dynamo=True)``). There the ILM layers take the reference path and
    the Proxy Norm layers their general path (docs/design.md §4, §8).
    """
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def autocast_disabled(device_type: str) -> AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, else a no-op context.

    The same computation either way; entering no context where there is nothing to disable keeps
    ``torch.export`` from wrapping every layer in an autocast higher-order op.
    """
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _kind_of(layer: nn.Module) -> tuple[str, str] | None:
    """``("pooled" | "tokens", standardization)`` of ``layer``'s class, or None (reference path).

    Read from the class attribute ``standardization`` that each front-end declares and that
    :class:`~ilmconvert.nn.core.ILMNorm` clears for subclasses overriding the math, so this
    module never imports the front-ends.
    """
    std = getattr(type(layer), "standardization", None)
    if std in ("group", "instance"):
        return "pooled", std
    if std == "layer":
        return "tokens", std
    return None


def output_dtype(x: torch.Tensor, norm: str) -> torch.dtype:
    """Dtype the reference path returns for input ``x``: that of the standardization's output.

    Under CUDA autocast ``F.group_norm`` and ``F.layer_norm`` run in float32 (autocast's fp32
    list), so float16 / bfloat16 input gives float32 output; ``F.instance_norm`` keeps the input
    dtype, as does every norm on CPU autocast and outside autocast.
    """
    if (
        x.dtype in _LOW_PRECISION
        and norm in ("group", "layer")
        and x.device.type == "cuda"
        and torch.is_autocast_enabled("cuda")
    ):
        return torch.float32
    return x.dtype


def use_fast_path(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` can take the fast path; False means: use the reference path.

    Applies to the unmodified ILMGroupNorm / ILMInstanceNorm / ILMLayerNorm front-ends on
    float16 / bfloat16 / float32 / float64 input with at least one element, on CPU or CUDA.
    It does not apply (reference path) when ``ILMCONVERT_REFERENCE=1``, when ``layer.fast`` is
    False, under autocast on another device type, or for input the reference would reject in
    the standardization (InstanceNorm with a single position), and for ``(B, C)`` input to a pooled
    layer (no positions: nothing to gain).

    While tracing or exporting (:func:`exporting`) it is always False: the reference path is
    plain differentiable PyTorch (no autograd Function, no CPU-only kernel, no branch on a value
    read back from a tensor), so it traces into a graph that does not freeze the batch size.
    """
    if exporting():
        return False
    choice = getattr(layer, "fast", None)
    if choice is False or reference_forced():
        return False
    kind = _kind_of(layer)
    if kind is None or x.dtype not in _FLOAT_DTYPES or x.numel() == 0:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    if kind[0] == "pooled":
        if x.dim() < 3:
            return False  # (B, C) input: no positions to pool, nothing to gain; reference path
        if kind[1] == "instance" and x[0, 0].numel() <= 1:
            return False  # F.instance_norm raises for one spatial element; let it
    return True


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fast ILM forward for ``layer`` (call only when :func:`use_fast_path` is True).

    Args:
        layer: an ILMGroupNorm / ILMInstanceNorm / ILMLayerNorm (ILMNorm core).
        x: ``(B, C, *spatial)`` for the pooled front-ends, ``(..., C)`` for LayerNorm (the
            channels-first LayerNorm passes its permuted view); any float dtype, any strides.

    Returns:
        The reference path's output (same shape, same dtype, equal up to rounding).
    """
    kind = _kind_of(layer)
    assert kind is not None
    out_dtype = output_dtype(x, kind[1])
    b_omega, b_beta = layer.weight, layer.bias
    w1, w2, w3 = layer.encoder.weight, layer.decoder_mu.weight, layer.decoder_gamma.weight
    if kind[0] == "pooled":
        groups = layer.num_groups if kind[1] == "group" else layer.num_channels
        spec = (int(groups), int(layer.key_group_size), float(layer.eps), out_dtype)
        if _want_triton(layer, x):
            triton_ilm = _triton()
            try:
                with autocast_disabled(x.device.type):
                    return triton_ilm.pooled_ilm(x, b_omega, b_beta, w1, w2, w3, spec)
            except Exception as err:  # compile or launch failure: the PyTorch implementation takes over
                triton_ilm.give_up(err)
        elif layer.fast != "torch" and cpu_kernel.applies(x, (b_omega, b_beta, w1, w2, w3), out_dtype):
            return cpu_kernel.PooledILMCPU.apply(x, b_omega, b_beta, w1, w2, w3, spec)
        with autocast_disabled(x.device.type):  # statistics and MLP never autocast
            y = PooledILM.apply(x, b_omega, b_beta, w1, w2, w3, spec)
        # the Function returns a fresh tensor (maybe as (1, B*C, P)); reshaping out here keeps an
        # in-place op on the result (timm's ReLU(inplace=True)) legal for autograd
        return y if y.shape == x.shape else y.view(x.shape)
    spec = (int(layer.key_group_size), float(layer.eps), out_dtype)
    with autocast_disabled(x.device.type):
        return TokenILM.apply(x, b_omega, b_beta, w1, w2, w3, spec).flatten(-2)


#: The imported :mod:`ilmconvert.nn.triton_ilm`, False when Triton cannot be imported, None: not tried.
_TRITON_MODULE: ModuleType | bool | None = None


def _triton() -> ModuleType | None:
    """:mod:`ilmconvert.nn.triton_ilm`, or None when Triton cannot be imported (checked once)."""
    global _TRITON_MODULE
    if _TRITON_MODULE is None:
        try:
            from . import triton_ilm
        except Exception:  # triton missing or broken: the PyTorch implementation
            _TRITON_MODULE = False
        else:
            _TRITON_MODULE = triton_ilm
    return _TRITON_MODULE or None


def _want_triton(layer: nn.Module, x: torch.Tensor) -> bool:
    choice = getattr(layer, "fast", None)
    if choice == "torch" or (choice != "triton" and not x.is_cuda):
        return False
    if choice == "triton":
        return (x.is_cuda or os.environ.get("TRITON_INTERPRET", "") == "1") and _triton_usable()
    if not x.is_cuda or x.dtype == torch.float64 or torch.compiler.is_compiling():
        return False
    return _triton_usable() and pooled_view_strides(x) is not None


def _triton_usable() -> bool:
    """Triton imports and no kernel has failed in this process."""
    module = _triton()
    return module is not None and module.FAILURE is None
