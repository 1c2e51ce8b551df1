"""A compiled CPU kernel for small pooled ILM layers (and GN + Proxy Norm): the whole forward in one call, the
whole backward in one.

At a small batch (the paper's Figure 1 trains at 2 images per GPU) an ILM+GN layer's input is a few
thousand elements, and the eager PyTorch fast path (:mod:`ilmconvert.nn.fast_torch`) spends its
time on ~55 small operations of 3-10 us dispatch each, not on arithmetic (docs/performance.md,
issue 20). This module computes the same function as :class:`~ilmconvert.nn.fast_torch.PooledILM`
for such inputs in two calls into C++ (:mod:`ilmconvert.nn.cpu_kernel_source`): the forward (channel
moments, eqs. 1 and 3 from them, the auto-encoder of eqs. 4-5, the alignment of eq. 6, ``y = x * a +
d``) and the backward (``dx`` and every parameter's gradient, the statistics recomputed from the
forward's channel moments). :class:`ProxyGroupNormActCPU` does the same for GroupNorm + PN-Act
(:class:`~ilmconvert.nn.ProxyGroupNormAct`), whose proxy statistics are two dozen small operations
on ``(C, n)`` tensors in eager PyTorch.

The C++ has no PyTorch headers: it is compiled once per machine with the system's C++ compiler
(``$CXX``, else ``c++``; about a second), cached under ``$ILMCONVERT_KERNEL_DIR`` (default
``~/.cache/ilmconvert/kernels``, keyed by a hash of the source, flags and compiler version) and
loaded with ``ctypes``. When there is no compiler, the build fails or the library does not load,
one warning says so and the layers keep the PyTorch fast path for the rest of the process.

Used only where it applies (:func:`applies`): eager mode (never while ``torch.compile`` traces, nor
under export, where the layers take the reference path), CPU, float32 / float64 input and
parameters of the input's dtype, contiguous, and with more than one torch thread at most
:data:`MAX_NUMEL` elements (the kernel runs on one thread). Switched off by
``ILMCONVERT_CPU_KERNEL=0`` in the environment, :func:`set_enabled(False) <set_enabled>`, or
``layer.fast = "torch"``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .cpu_kernel_source import SOURCE

ENV = "ILMCONVERT_CPU_KERNEL"
DIR_ENV = "ILMCONVERT_KERNEL_DIR"
#: with more than one torch thread, only inputs of at most this many elements take the kernel (it runs
#: on one thread; ATen's passes over larger inputs use them all); with one thread, every size does
#: (it was faster than the PyTorch fast path at every Figure-1 shape up to 64 x 64 x 16 x 16,
#: docs/performance.md)
MAX_NUMEL = 65536
FLAGS = ("-O3", "-std=c++17", "-fopenmp-simd", "-shared", "-fPIC")
NATIVE = ("-march=native",)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

#: The loaded library, False when it could not be built or loaded, None: not tried yet.
_LIB: Any = None
#: Why the kernel is unavailable (the warning's text), None while it is not known to be.
FAILURE: str | None = None
_ENABLED: bool | None = None


def set_enabled(flag: bool | None) -> None:
    """Turn the kernel on (True), off (False) or back to the environment's choice (None)."""
    global _ENABLED
    _ENABLED = flag


def enabled() -> bool:
    """Whether the kernel may be used: :func:`set_enabled`'s choice, else not ``ILMCONVERT_CPU_KERNEL=0``."""
    return switched_on(_ENABLED, ENV)


def switched_on(choice: bool | None, env: str) -> bool:
    """``choice`` where it is not None, else False where ``$env`` is 0 / false / no / off, else True."""
    if choice is not None:
        return choice
    return os.environ.get(env, "").strip().lower() not in ("0", "false", "no", "off")


def reset() -> None:
    """Forget the loaded library and any failure (the next use builds or loads it again)."""
    global _LIB, FAILURE
    _LIB, FAILURE = None, None


def kernel_dir() -> Path:
    """Where the compiled library is cached: ``$ILMCONVERT_KERNEL_DIR`` or ``~/.cache/ilmconvert/kernels``."""
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ilmconvert" / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    found = shutil.which(cxx)
    if found is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r}; set CXX)")
    return found


def _host_cpu() -> str:
    """This CPU's model and feature flags (Linux ``/proc/cpuinfo``), else the platform's processor string.

    Part of the cache key because the library is built with ``-march=native``: a cache directory
    shared between different machines gets one library per CPU kind.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return platform.machine() + "\n" + "\n".join(dict.fromkeys(keep))


def build(directory: Path | None = None) -> Path:
    """Compile the kernel (or find it already compiled) and return the shared library's path.

    Built with ``-march=native`` (8x faster backward passes than baseline x86-64 SSE2 code here,
    whose branches on the activation's sign mispredict), or without it where the compiler refuses.

    Raises:
        RuntimeError: no compiler, or the compiler failed (its message included).
    """
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key_text = "\0".join((SOURCE, cxx, version, *FLAGS, *NATIVE, sys.platform, _host_cpu()))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    directory = directory or kernel_dir()
    target = directory / f"ilm_pooled_cpu_{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(tmp) / "ilm_pooled_cpu.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        for extra in (NATIVE, ()):
            done = subprocess.run([cxx, *FLAGS, *extra, str(src), "-o", str(out)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: a concurrent process sees the whole library or none
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in _SUFFIX.values():
        fwd = getattr(lib, f"ilm_pooled_forward_{suffix}")
        fwd.argtypes = [ptr] * 8 + [i64] * 6 + [f64]
        fwd.restype = None
        bwd = getattr(lib, f"ilm_pooled_backward_{suffix}")
        bwd.argtypes = [ptr] * 14 + [i64] * 6 + [f64]
        bwd.restype = None
        fwd = getattr(lib, f"proxy_gn_forward_{suffix}")
        fwd.argtypes = [ptr] * 11 + [i64] * 6 + [f64] * 2
        fwd.restype = None
        bwd = getattr(lib, f"proxy_gn_backward_{suffix}")
        bwd.argtypes = [ptr] * 18 + [i64] * 6 + [f64] * 2
        bwd.restype = None
    # the GN + PN entry points by input dtype, looked up once (not per call by name)
    lib.proxy_forward = {dt: getattr(lib, f"proxy_gn_forward_{sfx}") for dt, sfx in _SUFFIX.items()}
    lib.proxy_backward = {dt: getattr(lib, f"proxy_gn_backward_{sfx}") for dt, sfx in _SUFFIX.items()}
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (after one warning) when unavailable."""
    global _LIB, FAILURE
    if _LIB is None:
        try:
            _LIB = _load(build())
        except Exception as err:  # no compiler, compile error, unwritable cache, load error
            _LIB, FAILURE = False, f"{type(err).__name__}: {err}"
            warnings.warn(
                f"ilmconvert: the compiled CPU kernel for small ILM layers is unavailable ({FAILURE}); "
                f"using the PyTorch fast path (same results, slower at small batches). "
                f"Set {ENV}=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _LIB or None


def applies(x: torch.Tensor, params: tuple[torch.Tensor | None, ...], out_dtype: torch.dtype) -> bool:
    """Whether :class:`PooledILMCPU` computes ``PooledILM`` for this call (and its library loads).

    Args:
        x: the layer's input ``(B, C, *spatial)``; params: ``(weight, bias, w1, w2, w3)``
            (``bias`` may be None); out_dtype: the dtype the layer must return.
    """
    if (
        torch.compiler.is_compiling()  # first: dynamo folds it, and reads nothing else
        or x.device.type != "cpu"
        or x.dtype not in _SUFFIX
        or out_dtype != x.dtype
        or not x.is_contiguous()
        or (x.numel() > MAX_NUMEL and torch.get_num_threads() > 1)
        or not enabled()
    ):
        return False
    return _parameters_fit(x, params) and library() is not None


def _parameters_fit(x: torch.Tensor, params: tuple[torch.Tensor | None, ...]) -> bool:
    """Every parameter (None: absent) is a contiguous CPU tensor of ``x``'s dtype."""
    return all(t is None or (t.dtype == x.dtype and t.device.type == "cpu" and t.is_contiguous()) for t in params)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _like_input(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The incoming gradient as a contiguous tensor of ``x``'s shape and dtype (itself when it is one)."""
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    if dy.shape != x.shape:
        dy = dy.reshape(x.shape)
    return dy if dy.is_contiguous() else dy.contiguous()


def _dims(x: torch.Tensor, w1: torch.Tensor, spec: tuple) -> tuple:
    groups, k, eps, _ = spec
    b, c = x.shape[:2]
    return b, c, x.numel() // (b * c), groups, k, w1.shape[0], eps


class PooledILMCPU(torch.autograd.Function):
    """ILM+GN / ILM+IN as one autograd node whose forward and backward are one kernel call each.

    Same inputs and output as :class:`~ilmconvert.nn.fast_torch.PooledILM` (``spec = (groups,
    K, eps, out_dtype)``); call only where :func:`applies` is True.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, w1, w2, w3, spec):
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        moments = x.new_empty((x.shape[0], 2, x.shape[1]), dtype=torch.float64)  # channel mean, variance
        ctx.dims = _dims(x, w1, spec)
        fn = getattr(_LIB, f"ilm_pooled_forward_{_SUFFIX[x.dtype]}")
        fn(x.data_ptr(), y.data_ptr(), moments.data_ptr(), *map(_ptr, (weight, bias, w1, w2, w3)), *ctx.dims)
        ctx.save_for_backward(x, moments, weight, bias, w1, w2, w3)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy):
        x, moments, weight, bias, w1, w2, w3 = ctx.saved_tensors
        dy = _like_input(dy, x)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        grads = [None if t is None else torch.empty_like(t) for t in (weight, bias, w1, w2, w3)]
        fn = getattr(_LIB, f"ilm_pooled_backward_{_SUFFIX[x.dtype]}")
        fn(x.data_ptr(), dy.data_ptr(), moments.data_ptr(), dx.data_ptr(), *map(_ptr, grads),
           *map(_ptr, (weight, bias, w1, w2, w3)), *ctx.dims)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, *(g if need else None for g, need in zip(grads, needs[1:6])), None)


# ====================================================================== GroupNorm + Proxy Norm
#: activation codes of the kernel (exact types: a subclass may change the function)
_ACTIVATIONS = {torch.nn.ReLU: 0, torch.nn.SiLU: 3}


def activation_code(act: torch.nn.Module) -> int | None:
    """The kernel's code for PN-Act's activation ``act`` (ReLU, GELU exact or tanh, SiLU), else None."""
    if type(act) is torch.nn.GELU:
        return 2 if act.approximate == "tanh" else 1
    return _ACTIVATIONS.get(type(act))


def proxy_applies(x: torch.Tensor, params: tuple[torch.Tensor | None, ...], act: torch.nn.Module) -> bool:
    """Whether :class:`ProxyGroupNormActCPU` computes GN + PN-Act for ``x`` (eager CPU, no autocast).

    Args:
        x: ``(B, C, *spatial)``; params: ``(gamma, beta, gamma~, beta~, w_out, b_out)`` (the output
            affine may be None); act: the activation (ReLU, GELU, SiLU).

    Called once per layer and step at small batches, where each microsecond of Python shows in the
    step time (docs/performance.md, issue 20): the cheap tensor checks come before the rest and the
    parameters are checked in one plain loop.
    """
    if torch.compiler.is_compiling():  # first: dynamo folds it, and reads nothing else
        return False
    dtype = x.dtype
    if not x.is_cpu or dtype not in _SUFFIX or x.dim() < 3 or not x.is_contiguous() or torch.is_autocast_enabled("cpu"):
        return False
    numel = x.numel()
    if numel == 0 or (numel > MAX_NUMEL and torch.get_num_threads() > 1) or activation_code(act) is None:
        return False
    for t in params:
        if t is not None and (t.dtype != dtype or not t.is_cpu or not t.is_contiguous()):
            return False
    return enabled() and (_LIB or library()) is not None


class ProxyGroupNormActCPU(torch.autograd.Function):
    """GroupNorm standardization + PN-Act (:class:`~ilmconvert.nn.ProxyGroupNormAct`) as one kernel
    call forward and one backward; call only where :func:`proxy_applies` is True.

    Inputs: ``x`` ``(B, C, *spatial)``, ``(C,)`` parameters gamma, beta, gamma~, beta~, output
    weight and bias (both or neither None), ``q`` the ``(n,)`` float64 proxy points, ``spec =
    (groups, norm_eps, proxy_eps, activation code)``. Output: the input's shape and dtype.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, proxy_weight, proxy_bias, output_weight, output_bias, q, spec):
        groups, norm_eps, proxy_eps, act = spec
        b, c = x.shape[0], x.shape[1]
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        # one float64 workspace: (B, G, 2) group mean and rstd, then (4, C) the proxy's s, t, m, r
        work = torch.empty(b * groups * 2 + 4 * c, dtype=torch.float64)
        stats, coef = work.data_ptr(), work.data_ptr() + 8 * b * groups * 2
        ctx.dims = dims = (b, c, x.numel() // (b * c), groups, q.shape[0], act, norm_eps, proxy_eps)
        ctx.coef_offset = coef - stats
        _LIB.proxy_forward[x.dtype](
            x.data_ptr(), y.data_ptr(), stats, coef, weight.data_ptr(), bias.data_ptr(), proxy_weight.data_ptr(),
            proxy_bias.data_ptr(), _ptr(output_weight), _ptr(output_bias), q.data_ptr(), *dims,
        )
        ctx.save_for_backward(x, work, q, weight, bias, proxy_weight, proxy_bias, output_weight, output_bias)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy):
        x, work, q, *params = ctx.saved_tensors
        dy = _like_input(dy, x)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        grads = [None if t is None else torch.empty_like(t) for t in params]
        stats = work.data_ptr()
        _LIB.proxy_backward[x.dtype](
            x.data_ptr(), dy.data_ptr(), stats, stats + ctx.coef_offset, dx.data_ptr(), *map(_ptr, grads),
            *map(_ptr, params), q.data_ptr(), *ctx.dims,
        )
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, *(g if need else None for g, need in zip(grads, needs[1:7])), None, None)
