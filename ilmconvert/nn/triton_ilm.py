"""Triton kernels of the pooled ILM fast path (ILM+GN / ILM+IN), channels-first and channels_last.

Imported lazily by :mod:`ilmconvert.nn.fast` only when Triton is installed and the input is on
CUDA (or ``TRITON_INTERPRET=1`` for tests on CPU); importing :mod:`ilmconvert` never needs Triton.
A kernel that fails to compile or launch is given up for the rest of the process (:func:`give_up`,
one warning); the PyTorch implementation (:mod:`ilmconvert.nn.fast_torch`) then computes the same
function, in the forward and, from the same saved tensors, in the backward.

``x`` is addressed as a ``(B, C, P)`` tensor through strides ``(sB, sC, sP)``, which covers both
contiguous (``sP = 1``) and channels_last (``sC = 1``) 4-d tensors, in float32, bfloat16 and
float16 (statistics and coefficients always float32). Four kernels, each one pass:

- ``_moments``:   per (b, c) mean and biased variance, tiles merged with Chan's formula (exact
                  for large means: every tile is centred on its own mean before squaring);
- ``_apply``:     ``y = (x - M) * a + beta`` (eqs. 1, 2, 6 fused), in the output dtype;
- ``_bwd_sums``:  ``S0 = sum dy``, ``S1 = sum dy * (x - M)`` per (b, c);
- ``_bwd_apply``: ``dx = dy * a + (x - M) * e + f``.

Everything between the passes (group moments, auto-encoder, alignment and their backward) is, where
:func:`triton_small.applies`, one more kernel each way (:mod:`ilmconvert.nn.triton_small`):
``moments -> _small_forward -> apply`` forward, ``bwd_sums -> _small_backward (+ one sum over the
batch) -> bwd_apply`` backward. Elsewhere (tiles above :data:`triton_small.MAX_TILE`, e.g. K = 1 at
thousands of channels, or ``ILMCONVERT_TRITON_SMALL=0``) it runs on ``(B, C)`` tensors in PyTorch,
shared with the pure-PyTorch path (:func:`fast_torch.pooled_coefficients`,
:func:`fast_torch.pooled_small_backward`). Both compute eq. 6 as the layers parametrize it,
``omega = up(D_gamma - 1/2) + weight``; the pass kernels only ever see the per-(b, c) coefficients
``M``, ``a``, ``beta``, ``e``, ``f``. A fused backward that fails rebuilds the PyTorch path's saved
tensors from the saved moments (:class:`triton_small.SavedForFallback`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import fast_torch, triton_small

#: Why the kernels were given up in this process (None while they work).
FAILURE: str | None = None


def give_up(err: BaseException) -> None:
    """Stop using the Triton kernels in this process after ``err``, with one ``RuntimeWarning``.

    Called when a kernel fails to compile or launch (forward or backward); the PyTorch
    implementation computes the same function, so training goes on.
    """
    global FAILURE
    if FAILURE is not None:
        return
    lines = str(err).strip().splitlines()
    FAILURE = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    warnings.warn(
        f"ilmconvert: a Triton kernel of the ILM fast path failed ({FAILURE}); using the PyTorch "
        "fast path for the rest of this process",
        RuntimeWarning,
        stacklevel=3,
    )


@triton.jit
def _moments(X, MEAN, VAR, C, P, sB, sC, sP, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    base = X + b.to(tl.int64) * sB + cs.to(tl.int64)[:, None] * sC
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = 0.0
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (ps < P)[None, :]
        x = tl.load(base + ps.to(tl.int64)[None, :] * sP, mask=mask, other=0.0).to(tl.float32)
        n_t = tl.minimum(P - p0, BLOCK_P).to(tl.float32)
        t_mean = tl.sum(x, axis=1) / n_t
        xc = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(xc * xc, axis=1)
        total = count + n_t
        delta = t_mean - mean
        mean = mean + delta * (n_t / total)
        m2 = m2 + t_m2 + delta * delta * (count * n_t / total)
        count = total
    out = b * C + cs
    tl.store(MEAN + out, mean, mask=cmask)
    tl.store(VAR + out, m2 / count, mask=cmask)


@triton.jit
def _apply(X, Y, M, A, BETA, C, P, sB, sC, sP, yB, yC, yP, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cs < C
    mask = cmask[:, None] & (ps < P)[None, :]
    cs64, ps64 = cs.to(tl.int64), ps.to(tl.int64)
    x = tl.load(X + b.to(tl.int64) * sB + cs64[:, None] * sC + ps64[None, :] * sP, mask=mask, other=0.0)
    m = tl.load(M + b * C + cs, mask=cmask, other=0.0)
    a = tl.load(A + b * C + cs, mask=cmask, other=0.0)
    beta = tl.load(BETA + b * C + cs, mask=cmask, other=0.0)
    y = (x.to(tl.float32) - m[:, None]) * a[:, None] + beta[:, None]
    tl.store(Y + b.to(tl.int64) * yB + cs64[:, None] * yC + ps64[None, :] * yP, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums(DY, X, M, S0, S1, C, P, sB, sC, sP, dB, dC, dP, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    cs64 = cs.to(tl.int64)
    xbase = X + b.to(tl.int64) * sB + cs64[:, None] * sC
    dbase = DY + b.to(tl.int64) * dB + cs64[:, None] * dC
    m = tl.load(M + b * C + cs, mask=cmask, other=0.0)
    s0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = cmask[:, None] & (ps < P)[None, :]
        x = tl.load(xbase + ps[None, :] * sP, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dbase + ps[None, :] * dP, mask=mask, other=0.0).to(tl.float32)
        s0 += tl.sum(dy, axis=1)
        s1 += tl.sum(tl.where(mask, dy * (x - m[:, None]), 0.0), axis=1)
    tl.store(S0 + b * C + cs, s0, mask=cmask)
    tl.store(S1 + b * C + cs, s1, mask=cmask)


@triton.jit
def _bwd_apply(
    DY, X, DX, M, A, E, F, C, P, sB, sC, sP, dB, dC, dP, oB, oC, oP, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr
):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = cs < C
    mask = cmask[:, None] & (ps < P)[None, :]
    cs64, ps64 = cs.to(tl.int64), ps.to(tl.int64)
    b64 = b.to(tl.int64)
    x = tl.load(X + b64 * sB + cs64[:, None] * sC + ps64[None, :] * sP, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + b64 * dB + cs64[:, None] * dC + ps64[None, :] * dP, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + b * C + cs, mask=cmask, other=0.0)
    a = tl.load(A + b * C + cs, mask=cmask, other=0.0)
    e = tl.load(E + b * C + cs, mask=cmask, other=0.0)
    f = tl.load(F + b * C + cs, mask=cmask, other=0.0)
    dx = dy * a[:, None] + (x - m[:, None]) * e[:, None] + f[:, None]
    tl.store(DX + b64 * oB + cs64[:, None] * oC + ps64[None, :] * oP, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launch helpers
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    s = fast_torch.pooled_view_strides(t)
    if s is None:  # not (B, C, P)-addressable: make it so
        raise ValueError("tensor is not addressable as (B, C, P)")
    return s


def _blocks(sc: int, sp: int, p: int, reduce: bool) -> tuple[int, int]:
    """Tile shape: long along the contiguous axis."""
    if sp == 1 and sc != 1:  # channels-first: positions contiguous
        bp = min(1024 if reduce else 512, triton.next_power_of_2(max(p, 16)))
        return max(1, 2048 // bp) if not reduce else max(1, 1024 // bp), bp
    bc = 64
    return bc, (32 if not reduce else 16)


def _like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmt = (
        torch.channels_last
        if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        else torch.contiguous_format
    )
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, c) mean and biased variance of ``x`` ``(B, C, *spatial)``: ``(B, C)`` float32 each."""
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    sb, sc, sp = _strides(x)
    mean = torch.empty(b, c, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    bc, bp = _blocks(sc, sp, p, True)
    _moments[(b, triton.cdiv(c, bc))](x, mean, var, c, p, sb, sc, sp, BLOCK_C=bc, BLOCK_P=bp)
    return mean, var


def apply(
    x: torch.Tensor, m: torch.Tensor, a: torch.Tensor, beta: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``y = (x - m) * a + beta`` per (b, c); ``m, a, beta`` are ``(B, C)`` float32."""
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    y = _like(x, out_dtype)
    sb, sc, sp = _strides(x)
    yb, yc, yp = _strides(y)
    bc, bp = _blocks(sc, sp, p, False)
    grid = (b, triton.cdiv(c, bc), triton.cdiv(p, bp))
    _apply[grid](
        x, y, m.contiguous(), a.contiguous(), beta.contiguous(), c, p, sb, sc, sp, yb, yc, yp, BLOCK_C=bc, BLOCK_P=bp
    )
    return y


def bwd_sums(dy: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S0 = sum_p dy``, ``S1 = sum_p dy * (x - m)`` per (b, c), float32."""
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    sb, sc, sp = _strides(x)
    db, dc, dp = _strides(dy)
    s0 = torch.empty(b, c, device=x.device, dtype=torch.float32)
    s1 = torch.empty_like(s0)
    bc, bp = _blocks(sc, sp, p, True)
    _bwd_sums[(b, triton.cdiv(c, bc))](
        dy, x, m.contiguous(), s0, s1, c, p, sb, sc, sp, db, dc, dp, BLOCK_C=bc, BLOCK_P=bp
    )
    return s0, s1


def bwd_apply(dy, x, m, a, e, f) -> torch.Tensor:
    """``dx = dy * a + (x - m) * e + f`` per (b, c), in ``x``'s dtype and memory format."""
    b, c = x.shape[:2]
    p = math.prod(x.shape[2:])
    dx = _like(x, x.dtype)
    sb, sc, sp = _strides(x)
    db, dc, dp = _strides(dy)
    ob, oc, op = _strides(dx)
    bc, bp = _blocks(sc, sp, p, False)
    grid = (b, triton.cdiv(c, bc), triton.cdiv(p, bp))
    _bwd_apply[grid](
        dy,
        x,
        dx,
        m.contiguous(),
        a.contiguous(),
        e.contiguous(),
        f.contiguous(),
        c,
        p,
        sb,
        sc,
        sp,
        db,
        dc,
        dp,
        ob,
        oc,
        op,
        BLOCK_C=bc,
        BLOCK_P=bp,
    )
    return dx


class _TritonPooledILM(torch.autograd.Function):
    """ILM+GN / ILM+IN on the Triton kernels; the (B, C) part fused (:mod:`.triton_small`) where it
    applies, else the PyTorch path's (B, C) code (``ctx.fused`` says which, and what was saved)."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, w1, w2, w3, spec):
        groups, k, eps, out_dtype = spec
        if fast_torch.pooled_view_strides(x) is None:
            x = x.contiguous()
        m_c, v_c = moments(x)
        p = [t.to(torch.float32).contiguous() if t is not None else None for t in (weight, bias, w1, w2, w3)]
        ctx.spec = spec
        ctx.fused = triton_small.applies(x.device, x.shape[1], groups, k, w1.shape[0])
        if ctx.fused:  # moments -> _small_forward -> apply: three launches
            big_m, a, beta, *small = triton_small.small_forward(m_c, v_c, *p, groups, k, eps)
            y = apply(x, big_m, a, beta, out_dtype)
            ctx.save_for_backward(x, weight, bias, w1, w2, w3, m_c, v_c, big_m, a, *small)
            return y
        a, _d, beta, aux = fast_torch.pooled_coefficients(m_c, v_c, *p, groups, k, eps)
        y = apply(x, aux[0][:, 0], a, beta, out_dtype)  # aux[0][:, 0]: M, the norm-group mean
        ctx.save_for_backward(x, weight, bias, w1, w2, w3, a, *aux)  # as fast_torch.PooledILM
        return y

    @staticmethod
    @once_differentiable
    @fast_torch.autocast_off
    def backward(ctx: Any, dy):
        try:
            return _TritonPooledILM._backward(ctx, dy)
        except Exception as err:  # compile or launch failure: the PyTorch backward, same saved tensors
            give_up(err)
            if ctx.fused:  # rebuild pooled_coefficients' saved tensors from the moments
                x, weight, bias, w1, w2, w3, m_c, v_c, *_ = ctx.saved_tensors
                ctx = triton_small.SavedForFallback(ctx, x, (weight, bias, w1, w2, w3), m_c, v_c)
            return fast_torch.pooled_backward(ctx, dy)

    @staticmethod
    def _backward(ctx: Any, dy):
        if fast_torch.pooled_view_strides(dy) is None:
            dy = dy.contiguous()
        if ctx.fused:
            return _TritonPooledILM._fused_backward(ctx, dy)
        x, _weight, _bias, _w1, _w2, _w3, a, up_means, *_ = ctx.saved_tensors
        big_m = up_means[:, 0]
        s0, s1 = bwd_sums(dy, x, big_m)
        e, f, grads = fast_torch.pooled_small_backward(ctx, s0, s1)
        dx = bwd_apply(dy, x, big_m, a, e, f) if ctx.needs_input_grad[0] else None
        return (dx, *grads, None)

    @staticmethod
    def _fused_backward(ctx: Any, dy):
        """bwd_sums -> _small_backward (+ one sum over the batch) -> bwd_apply."""
        x, weight, bias, w1, w2, w3, _m_c, _v_c, big_m, a, *small = ctx.saved_tensors
        groups, k, _, _ = ctx.spec
        s0, s1 = bwd_sums(dy, x, big_m)
        p = [t.to(torch.float32).contiguous() for t in (weight, w1, w2, w3)]
        e, f, g = triton_small.small_backward(s0, s1, (*p, big_m, *small), groups, k, math.prod(x.shape[2:]))
        needs = ctx.needs_input_grad
        params = (weight, bias, w1, w2, w3)
        grads = tuple(fast_torch._cast_grad(gi, t, nd) for gi, t, nd in zip(g, params, needs[1:6]))
        dx = bwd_apply(dy, x, big_m, a, e, f) if needs[0] else None
        return (dx, *grads, None)


def pooled_ilm(x, weight, bias, w1, w2, w3, spec) -> torch.Tensor:
    """Fast ILM+GN / ILM+IN forward on Triton (autograd-aware); see :func:`ilmconvert.nn.fast.forward`."""
    return _TritonPooledILM.apply(x, weight, bias, w1, w2, w3, spec)
