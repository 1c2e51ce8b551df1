"""The PyTorch implementation of the ILM fast path: one statistics pass, one fused ``y = x * a + d``.

The reference path (:meth:`ilmconvert.nn.core.ILMNorm.key_features`, ``rescaling``,
``_standardize``, ``_rescale``) reads ``x`` three or four times and materializes the up-sampled
``omega`` / ``beta``. An ILM layer is memory-bound like the norm it replaces, so this module
computes the same function at the floor (docs/design.md §4):

- **Pooled instances** (GroupNorm / InstanceNorm, ``x`` is ``(B, C, *spatial)``): one pass gives
  the per (instance, channel) mean ``m_c`` and biased variance ``v_c`` over the P positions (float32,
  float64 for float64 input). Both the key groups (K channels, eq. 3) and the norm groups (C / G
  channels, eq. 1) are combined from them *exactly* with Chan's formula for equal counts::

      mean_g = avg_c m_c,    var_g = avg_c (v_c + (m_c - mean_g)^2)

  then the auto-encoder (eqs. 4-5) runs on ``(B, N)``, and eqs. 1, 2, 6 collapse into one affine
  map per (instance, channel)::

      a = omega * rstd_g,   d = beta - mean_g * a,   y = x * a + d.

- **Per-position instances** (LayerNorm over the last dim; timm's ``LayerNorm2d`` arrives here as a
  permuted view): the key features are the ``(..., N)`` group moments of one pass over
  ``x.unflatten(-1, (N, K))``; ``torch.native_layer_norm`` gives ``weight * x_hat + bias`` and
  the token's mean and rstd, and two in-place passes add ``x_hat * up(D_gamma - 1/2) + up(D_mu)``.

Everywhere ``omega = up(D_gamma - 1/2) + weight``: the layers' ``weight`` is ``B_omega + 1/2``
(:data:`D_GAMMA_OFFSET`, docs/design.md §1), so d omega / d weight = 1 as for B_omega.

Backward (written by hand in :class:`PooledILM` / :class:`TokenILM`): one reduction pass over
``(dy, x)`` gives ``S0 = sum dy`` and ``S1 = sum dy * (x - M)`` per (instance, channel); the
gradients of the auto-encoder, ``weight`` and ``bias`` follow on ``(B, C)`` tensors; one fused pass
gives ``dx = dy * a + (x - M) * e + f``. Both are plain PyTorch, so ``torch.compile`` traces them
without a graph break and fuses each pass into one kernel. The ``(B, C)`` algebra between the
passes is shared with the Triton path (:mod:`ilmconvert.nn.triton_ilm`) wherever its fused
``(B, C)`` kernels (:mod:`ilmconvert.nn.triton_small`) do not apply, and is their reference.

A leaf module: it imports neither the layers nor the dispatcher (:mod:`ilmconvert.nn.fast`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

#: ``sigmoid(0)``: the value of D_gamma when ``W3 = 0`` (preserve init). The layers store
#: ``weight = B_omega + D_GAMMA_OFFSET`` and compute ``omega = up(D_gamma - D_GAMMA_OFFSET) + weight``
#: (eq. 6 reparametrized, docs/design.md §1), so that ``weight`` is the replaced norm's own weight.
D_GAMMA_OFFSET = 0.5


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the key features, statistics and auto-encoder: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd Function's ``backward(ctx, *grads)`` with autocast disabled on the grads'
    device: the hand-written backward computes in the statistics dtype, never in autocast's."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: torch.Tensor) -> Any:
        device = next((g.device.type for g in grads if g is not None), "cpu")
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return backward(ctx, *grads)  # nothing to disable (entering the context costs ~20 us)
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)

    return wrapper


def pooled_view_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides ``(sB, sC, sP)`` under which ``x`` is a ``(B, C, P)`` tensor, or None.

    True for contiguous (NCHW-like) and channels_last (NHWC-like) tensors: every spatial dim
    collapses into one P axis of constant stride.
    """
    if x.dim() < 2:
        return None
    sizes, strides = x.shape[2:], x.stride()[2:]
    sp = 1
    expected = None
    for size, stride in reversed(list(zip(sizes, strides))):
        if size == 1:
            continue
        if expected is None:
            sp, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected = stride * size
    return x.stride(0), x.stride(1), sp


# ====================================================================== shared small pieces
def _group_sum(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum ``(..., C)`` over each group of ``C // groups`` contiguous channels: ``(..., groups)``."""
    if groups == t.shape[-1]:
        return t
    return t.unflatten(-1, (groups, -1)).sum(-1)


def _mlp_forward(mu, gamma, w1, w2, w3):
    """Eqs. 4-5 on ``(R, N)`` key features, the mu and gamma paths stacked (W1 is shared).

    Returns ``(dec, saved)``: ``dec`` is ``(2, R, N)`` = ``[D_mu, D_gamma]``; ``saved`` what
    :func:`_mlp_backward` needs. Five operations for both paths: one product with W1, one ReLU,
    one batched product with ``[W2; W3]``, tanh and sigmoid in place.
    """
    keys = torch.stack((mu, gamma))  # (2, R, N)
    enc = torch.relu(keys @ w1.t())  # (2, R, M)
    w23 = torch.stack((w2, w3))  # (2, N, M)
    dec = torch.bmm(enc, w23.transpose(1, 2))  # (2, R, N)
    dec[0].tanh_()
    dec[1].sigmoid_()
    return dec, (keys, enc, w23, dec)


def _constant(build: Callable[..., torch.Tensor], *key: Any) -> torch.Tensor:
    """``build(*key)``, made once per key in eager mode (``key`` ends with dtype and device);
    built afresh while compiling, where the compiler folds it into the graph as a constant."""
    if torch.compiler.is_compiling():
        return build(*key)
    return _cached(build, *key)


@functools.lru_cache(maxsize=256)
def _cached(build: Callable[..., torch.Tensor], *key: Any) -> torch.Tensor:
    return build(*key)


def _tanh_sigmoid_shift(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[1, 0]`` as ``(2, 1, 1)``: tanh' = (1 - t)(1 + t), sigmoid' = (1 - s)(0 + s)."""
    return torch.tensor([1.0, 0.0], dtype=dtype, device=device).view(2, 1, 1)


def _mlp_backward(g_dec, w1, saved):
    """Hand-written backward of :func:`_mlp_forward`.

    Args:
        g_dec: ``(2, R, N)``, the gradients of ``[D_mu, D_gamma]`` (any strides).

    Returns:
        ``(g_keys, g_w1, g_w2, g_w3)``: ``g_keys`` is ``(2, R, N)`` = ``[g_mu, g_gamma]``.
    """
    keys, enc, w23, dec = saved
    shift = _constant(_tanh_sigmoid_shift, dec.dtype, dec.device)
    z = g_dec * (1 - dec) * (dec + shift)  # tanh', sigmoid'
    g_w23 = torch.bmm(z.transpose(1, 2), enc)  # (2, N, M)
    h = torch.bmm(z, w23) * (enc > 0)  # relu', (2, R, M)
    g_w1 = h.flatten(0, 1).t() @ keys.flatten(0, 1)  # (M, N)
    return h @ w1, g_w1, g_w23[0], g_w23[1]


def _cast_grad(g: torch.Tensor | None, like: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    if like is None or not needed or g is None:
        return None
    return g if g.dtype == like.dtype else g.to(like.dtype)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (``t`` itself when it already is; None stays None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


# ====================================================================== pooled (GN / IN)
#: sum-of-squares variance is used (eager CPU only) where E[x^2] <= this * Var[x]: at most 4 bits lost
_SUMSQ_MAX_CONDITION = 16.0
#: inputs of at most this many elements take the fewest operations on eager CPU (one-op moments, centred
#: channel sums, ``addcmul``): for them each operation's fixed cost outweighs its work (docs/performance.md)
SMALL_NUMEL = 16384


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (instance, channel) mean and biased variance of ``(B, C, *spatial)`` (>= 1 spatial dim).

    Returns ``(m, v)``, each ``(B, C)`` in float32 (float64 for float64 input). Large means such
    as ``1e3 + N(0, 1)`` never lose the variance to cancellation:

    - compiled or on CUDA: ``torch.var_mean`` (Welford; inductor fuses it into one pass);
    - eager CPU, contiguous, at most :data:`SMALL_NUMEL` elements: ``torch.batch_norm_update_stats``
      on the ``(1, B*C, P)`` view (a vectorized Welford in one operation; CPU ``var_mean`` costs
      ~100 us even on 2 x 64 x 4 x 4);
    - eager CPU, channels_last: ``torch.batch_norm_update_stats`` per sample (vectorized Welford);
    - eager CPU, other layouts: a sum and a sum of squares (two vectorized reductions, ~3x faster
      than CPU ``var_mean``), accepted only where ``E[x^2] <= 16 Var[x]`` in every channel
      (at most 4 bits lost); otherwise the exact two-pass ``mean((x - m)^2)``.
    """
    st = statistics_dtype(x.dtype)
    xf = x if x.dtype == st else x.to(st)
    dims = tuple(range(2, x.dim()))
    if torch.compiler.is_compiling() or x.device.type != "cpu":
        v, m = torch.var_mean(xf, dim=dims, correction=0)
        return m, v
    if x.numel() <= SMALL_NUMEL and xf.is_contiguous():
        b, c = x.shape[:2]
        m, v = torch.batch_norm_update_stats(xf.reshape(1, b * c, -1), None, None, 0.0)
        return m.view(b, c), v.view(b, c)
    if x.dim() == 4 and xf.is_contiguous(memory_format=torch.channels_last) and not xf.is_contiguous():
        stats = [torch.batch_norm_update_stats(xf[i : i + 1], None, None, 0.0) for i in range(x.shape[0])]
        return torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
    return _guarded_moments(xf, dims)


def _guarded_moments(xf: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims`` for eager CPU, where ``torch.var_mean`` is slow.

    A sum and a sum of squares (vectorized reductions), kept only where ``E[x^2] <= 16 Var[x]``
    everywhere (at most 4 bits lost to cancellation); otherwise the exact two-pass variance.
    """
    count = math.prod(xf.shape[d] for d in dims)
    m = xf.sum(dims) / count
    q = torch.linalg.vector_norm(xf, dim=dims).square() / count  # E[x^2]
    v = q - m * m
    if bool((q > _SUMSQ_MAX_CONDITION * v).any()):
        shape = list(xf.shape)
        for d in dims:
            shape[d] = 1
        v = torch.linalg.vector_norm(xf - m.reshape(shape), dim=dims).square() / count
    return m, v


def _group_index(c: int, size: int, device: torch.device) -> torch.Tensor:
    """``(C,)`` int64: the group of each channel, for groups of ``size`` contiguous channels."""
    return torch.arange(c, device=device) // size


def _up_index(c: int, groups: int, k: int, device: torch.device) -> torch.Tensor:
    """``(2C,)`` int64 into a ``(..., G + N)`` tensor ``[norm groups | key groups]``: each channel's
    norm group, then each channel's key group."""
    return torch.cat((_group_index(c, c // groups, device), groups + _group_index(c, k, device)))


def _grouping_average(c: int, groups: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(2C, G + N)``: block-diagonal averaging matrix, the first C rows average each norm group
    (eq. 1) into the first G columns, the last C rows each key group (eq. 3) into the last N."""
    cols = torch.arange(groups + c // k, device=device)
    idx = _up_index(c, groups, k, device)
    scale = torch.cat((torch.full((c,), c // groups, device=device), torch.full((c,), k, device=device)))
    return (idx[:, None] == cols).to(dtype) / scale[:, None].to(dtype)


def _channel_average(c: int, groups: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(C, G + N)``: ``m_c @`` this gives ``[mean over each norm group | mean over each key group]``."""
    return _grouping_average(c, groups, k, dtype, device).view(2, c, -1).sum(0)


def _grouping_sums(c: int, groups: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(C, G + N)`` of 0 / 1: sums over each norm group, then over each key group."""
    return (_channel_average(c, groups, k, dtype, device) != 0).to(dtype)


def _chain_matrix(c: int, groups: int, k: int, npos: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(2 (G + N), 3C)``: the backward through Chan's combination and the moments, as one product.

    ``[-g_M | g_mu | g_var * rstd^-3 ... ]``, precisely ``[S_a | g_mu | Q | g_gamma]`` with
    ``S_a = sum_group a * S0 = -dL/dmean_g`` and ``Q = (sum_group g_a * omega) * rstd^3``, times this
    gives ``[f_M | e_norm | e_key]``: ``f_M = (up(g_mean_g) / (C/G) + up(g_mu) / K) / P``,
    ``e_norm = up(dL/dvar_g) * 2 / ((C/G) P)`` (with ``dL/dvar_g = -Q / 2``), ``e_key =
    up(g_gamma) * 2 / (K P)``.
    """
    avg2 = _grouping_average(c, groups, k, dtype, device)  # (2C, G + N)
    n_cols = groups + c // k
    out = torch.zeros(2 * n_cols, 3 * c, dtype=dtype, device=device)
    out[:n_cols, :c] = avg2.view(2, c, -1).sum(0).t() / npos
    out[:groups, :c] *= -1  # S_a = -dL/dmean_g
    out[n_cols:, c:] = avg2.t() * (2.0 / npos)
    out[n_cols : n_cols + groups, c:] *= -0.5  # dL/dvar_g = -Q / 2
    return out


def pooled_coefficients(m_c, v_c, weight, bias, w1, w2, w3, groups, k, eps):
    """From per-channel moments to the affine map ``y = x * a + d`` of eqs. 1, 2, 6.

    Args:
        m_c, v_c: ``(B, C)`` per (instance, channel) mean and biased variance (statistics dtype).
        weight, bias, w1, w2, w3: the layer's parameters in the statistics dtype (bias may be None).
        groups, k, eps: G (norm groups), K (channels per key group), the norm's eps.

    Returns:
        ``(a, d, beta, aux)``: ``a``, ``d``, ``beta = up(D_mu) + bias`` ``(B, C)``; ``aux`` the
        tensors :func:`pooled_small_backward` needs (saved after ``x, params, a``).

    Both groupings come from one product with a ``(C, G + N)`` averaging matrix (means) and one
    with a ``(2C, G + N)`` one (Chan's ``avg_c (v_c + (m_c - mean_g)^2)``, exact for equal
    counts); the up-sampling to channels is an ``index_select``.
    """
    b, c = m_c.shape
    st, dev = m_c.dtype, m_c.device
    means = m_c @ _constant(_channel_average, c, groups, k, st, dev)  # (B, G + N): [mean_g | mu]
    up_means = means.index_select(1, _constant(_up_index, c, groups, k, dev)).view(b, 2, c)  # [M, up(mu)]
    centred = m_c.unsqueeze(1) - up_means
    var = torch.addcmul(v_c.unsqueeze(1), centred, centred).view(b, 2 * c)
    var = var @ _constant(_grouping_average, c, groups, k, st, dev)  # (B, G + N): [var_g | gamma]
    rstd = torch.rsqrt(var[:, :groups] + eps)
    dec, saved = _mlp_forward(means[:, groups:], var[:, groups:], w1, w2, w3)  # eqs. 4-5
    up_dec = dec.index_select(2, _constant(_group_index, c, k, dev))  # (2, B, C): [up(D_mu), up(D_gamma)]
    omega = up_dec[1] + (weight - D_GAMMA_OFFSET)  # eq. 6, weight = B_omega + 1/2
    rstd_up = rstd.index_select(1, _constant(_group_index, c, c // groups, dev))
    a = omega * rstd_up
    beta = up_dec[0] if bias is None else up_dec[0] + bias
    d = torch.addcmul(beta, up_means[:, 0], a, value=-1.0)
    return a, d, beta, (up_means, rstd, omega, rstd_up, *saved)


def _channel_sums(
    dy: torch.Tensor, x: torch.Tensor, big_m: torch.Tensor, rstd_c: torch.Tensor, st: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``S0 = sum_p dy`` and ``S1 = sum_p dy * (x - M)`` per (instance, channel), ``(B, C)`` in ``st``.

    ``M`` is the norm-group mean of each channel. Centring keeps ``S1`` exact when the mean is
    large against the spread (``1e3 + N(0, 1)``), where ``sum dy * x - M * S0`` cancels; eager
    CPU mode uses the uncentred sum (no ``(B, C, P)`` temporary for ``x - M``) wherever the input is
    well conditioned (``|M| * rstd <= 4`` in every channel) and larger than :data:`SMALL_NUMEL`.
    Also returns the centred input ``x - M`` when it was built (the dx pass reuses it), else None.
    """
    b, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    shape = (b, c, *([1] * len(dims)))
    dyf = dy if dy.dtype == st else dy.to(st)
    xf = x if x.dtype == st else x.to(st)
    s0 = dyf.sum(dims)
    if (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"  # the check reads a value back: never on an accelerator
        and x.numel() > SMALL_NUMEL
        and bool((big_m.abs() * rstd_c).max() <= 4.0)
    ):
        s1 = (dyf * xf).sum(dims)
        return s0, s1 - big_m * s0, None
    xc = xf - big_m.reshape(shape)
    return s0, (dyf * xc).sum(dims), xc


def _channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, keep_shape: bool = True) -> torch.Tensor:
    """``x * scale + shift`` with ``(B, C)`` coefficients broadcast over the positions: one pass.

    Eager CPU, contiguous: the inference kernel of ``F.batch_norm`` on the ``(1, B*C, P)`` view
    (mean 0, variance 1, eps 0: exactly ``x * w + b``), which is vectorized per channel and
    ~1.5x faster than a broadcasting ``addcmul``; elsewhere and for small inputs ``torch.addcmul``
    (inductor fuses it).
    """
    b, c = scale.shape
    if (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype == torch.float32  # its float64 CPU kernel is slow
        and x.is_contiguous()
        and x.numel() > SMALL_NUMEL
    ):
        flat = x.reshape(1, b * c, -1)
        zeros = torch.zeros(b * c, dtype=x.dtype, device=x.device)
        ones = torch.ones(b * c, dtype=x.dtype, device=x.device)
        y = F.batch_norm(flat, zeros, ones, scale.reshape(-1), shift.reshape(-1), False, 0.0, 0.0)
        return y.view(x.shape) if keep_shape else y  # (1, B*C, P) when not keep_shape
    shape = (b, c, *([1] * (x.dim() - 2)))
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


class PooledILM(torch.autograd.Function):
    """ILM+GN / ILM+IN as one autograd node: two passes forward, two passes backward."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, w1, w2, w3, spec):
        groups, k, eps, out_dtype = spec
        st = statistics_dtype(x.dtype)
        m_c, v_c = channel_moments(x)
        p = [_as(t, st) for t in (weight, bias, w1, w2, w3)]
        a, d, _beta, aux = pooled_coefficients(m_c, v_c, *p, groups, k, eps)
        xf = x if x.dtype == st else x.to(st)
        y = _channel_affine(xf, a, d, keep_shape=False).to(out_dtype)  # fresh, maybe (1, B*C, P)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, w1, w2, w3, a, *aux)
        return y

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx: Any, dy):
        return pooled_backward(ctx, dy)


def pooled_backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Backward of the pooled ILM (two passes over ``(dy, x)``), from the tensors the forward saved.

    Shared by :class:`PooledILM` and the Triton Function (whose forward saves the same tensors:
    ``x, weight, bias, w1, w2, w3, a, *aux`` of :func:`pooled_coefficients`), which falls back to
    it when a Triton kernel fails.
    """
    x, _weight, _bias, _w1, _w2, _w3, a, up_means, _rstd, _omega, rstd_up, *_ = ctx.saved_tensors
    dy = dy.view(x.shape) if dy.shape != x.shape else dy
    st = a.dtype
    big_m = up_means[:, 0]
    s0, g_a, xc = _channel_sums(dy, x, big_m, rstd_up, st)
    e, f, grads = pooled_small_backward(ctx, s0, g_a)
    shape = (*a.shape, *([1] * (x.dim() - 2)))
    dx = None
    if ctx.needs_input_grad[0]:
        # dx = dy * a + (x - M) * e + f  (dm_c/dx = 1/P, dv_c/dx = 2 (x - m_c) / P)
        if xc is not None:  # xc = x - M
            dx = torch.addcmul(f.reshape(shape), xc, e.reshape(shape))
        else:
            dx = _channel_affine(x if x.dtype == st else x.to(st), e, torch.addcmul(f, e, big_m, value=-1.0))
        dx = dx.addcmul_(dy if dy.dtype == st else dy.to(st), a.reshape(shape)).to(x.dtype)
    return (dx, *grads, None)


def pooled_small_backward(ctx: Any, s0: torch.Tensor, g_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Backward of everything between the two passes, on ``(B, C)`` tensors.

    Args:
        ctx: the autograd context of :class:`PooledILM` or the Triton Function (saved tensors
            ``x, weight, bias, w1, w2, w3, a, *aux`` of :func:`pooled_coefficients`, and
            ``ctx.spec = (groups, K, eps, out_dtype)``).
        s0: ``sum_p dy`` per (instance, channel); g_a: ``sum_p dy * (x - M)`` (= dL/da), ``M``
            the channel's norm-group mean.

    Returns:
        ``(e, f, grads)`` with ``dx = dy * a + (x - M) * e + f`` and ``grads`` the gradients of
        ``(weight, bias, w1, w2, w3)`` (None where not needed).

    Four group sums in one product, the MLP's backward in batched products
    (:func:`_mlp_backward`), and the chain through Chan's combination and the per-channel
    moments in one more (:func:`_chain_matrix`).
    """
    x, weight, bias, w1, _w2, _w3, a, up_means, rstd, omega, rstd_up, *saved = ctx.saved_tensors
    groups, k, _, _ = ctx.spec
    needs = ctx.needs_input_grad
    st = a.dtype
    b, c = a.shape
    key = (c, groups, k)
    # y = (x - M) * a + beta, a = omega * rstd: dL/dbeta = S0, dL/dM = -a S0, dL/domega = g_a rstd
    z = torch.stack((g_a * omega, a * s0, s0, g_a * rstd_up))  # (4, B, C)
    zs = (z.view(4 * b, c) @ _constant(_grouping_sums, *key, st, a.device)).view(4, b, -1)  # (4, B, G + N)
    # rows 2, 3 over the key groups: dL/dD_mu, dL/dD_gamma
    g_keys, g_w1, g_w2, g_w3 = _mlp_backward(zs[2:, :, groups:], _as(w1, st), saved)
    q = zs[0, :, :groups] * rstd.pow(3)  # dL/dvar_g = -q / 2
    chain = torch.cat((zs[1, :, :groups], g_keys[0], q, g_keys[1]), 1)
    npos = math.prod(x.shape[2:])
    fe = chain @ _constant(_chain_matrix, *key, npos, st, a.device)  # (B, 3C): [f_M | e_norm | e_key]
    e = fe[:, c : 2 * c] + fe[:, 2 * c :]
    # dx = dy a + (x - m_c) e + f_M + e_norm (m_c - M) + e_key (m_c - up(mu)) = dy a + (x - M) e + f
    f = torch.addcmul(fe[:, :c], fe[:, 2 * c :], up_means[:, 0] - up_means[:, 1])
    sums = z.sum(1)  # (4, C): row 3 = sum_b dL/domega, row 2 = sum_b S0
    grads = (
        _cast_grad(sums[3], weight, needs[1]),
        _cast_grad(sums[2], bias, needs[2]),
        _cast_grad(g_w1, w1, needs[3]),
        _cast_grad(g_w2, _w2, needs[4]),
        _cast_grad(g_w3, _w3, needs[5]),
    )
    return e, f, grads


# ====================================================================== per position (LN)
class TokenILM(torch.autograd.Function):
    """ILM+LN over the last dim, every position an instance, as one autograd node.

    The output is ``y = LN(x; weight, bias) + x_hat * up(D_gamma - 1/2) + up(D_mu)``: the affine
    LayerNorm is ``torch.native_layer_norm`` (which also gives the token's mean and rstd), the
    per-(token, key group) part two in-place passes.
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, w1, w2, w3, spec):
        k, eps, out_dtype = spec
        st = statistics_dtype(x.dtype)
        c = x.shape[-1]
        n = c // k
        xf = x if x.dtype == st else x.to(st)
        x3 = xf.unflatten(-1, (n, k))  # (..., N, K), a view
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            gamma, mu = torch.var_mean(x3, dim=-1, correction=0)  # eq. 3, (..., N)
        else:
            mu, gamma = _guarded_moments(x3, (x3.dim() - 1,))
        rows = mu.numel() // n
        mu2, gamma2 = mu.reshape(rows, n), gamma.reshape(rows, n)
        wf, w1f, w2f, w3f = weight.to(st), w1.to(st), w2.to(st), w3.to(st)
        dec, saved = _mlp_forward(mu2, gamma2, w1f, w2f, w3f)
        d_mu, d_g = dec[0], dec[1]
        bf = bias.to(st).view(n, k) if bias is not None else None
        # weight * x_hat + bias over the (N, K) view: a fresh (..., N, K) tensor, not a view
        y, mean, rstd = torch.native_layer_norm(x3, [n, k], wf.view(n, k), bf, eps)
        mean, rstd = mean.reshape(rows, 1), rstd.reshape(rows, 1)
        d_c = d_g - D_GAMMA_OFFSET  # (R, N), exactly 0 at preserve init: y is native_layer_norm's
        p = d_c * rstd  # (R, N): x_hat * d_c + D_mu = x * p + (D_mu - mean * p)
        y3 = y.view(rows, n, k)
        y3.addcmul_(x3.reshape(rows, n, k), p.unsqueeze(-1))
        y3.add_(torch.addcmul(d_mu, mean, p, value=-1.0).unsqueeze(-1))
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, w1, w2, w3, mu2, gamma2, mean, rstd, d_c, *saved)
        return y.to(out_dtype)  # (..., N, K): the caller flattens it

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx: Any, dy):
        k, eps, _ = ctx.spec
        x, weight, bias, w1, w2, w3, mu, gamma, mean, rstd, d_c, *saved = ctx.saved_tensors
        st = mu.dtype
        c = x.shape[-1]
        n = c // k
        rows = mu.shape[0]
        wf, w1f = weight.to(st), w1.to(st)
        dy2 = dy.to(st).reshape(rows, c)
        xc = x.to(st).reshape(rows, c) - mean  # centred first: no cancellation for large means
        dyxc = dy2 * xc  # (R, C); with xc and dx the only full-size temporaries
        s_dy = _group_sum(dy2, n)  # (R, N)
        s_dyxc = _group_sum(dyxc, n)
        g_dg = s_dyxc * rstd  # sum_k dy * x_hat
        g_dmu = s_dy
        # with omega = up(d_c) + weight, d_c = D_gamma - 1/2: sum_c dy * omega * (x - mean), sum_c dy * omega
        r = rstd.squeeze(-1)
        g_rstd = (d_c * s_dyxc).sum(-1) + dyxc @ wf  # (R,)
        g_mean = -((d_c * s_dy).sum(-1) + dy2 @ wf) * r
        g_var = -0.5 * g_rstd * r**3
        g_keys, g_w1, g_w2, g_w3 = _mlp_backward(torch.stack((g_dmu, g_dg)), w1f, saved)
        g_mu, g_gamma = g_keys[0], g_keys[1]
        need = ctx.needs_input_grad
        dx = None
        if need[0]:
            # dx = dy*a + g_mean/C + g_var*2(x-mean)/C + g_mu/K + g_gamma*2(x-mu)/K
            #    = dy*a + (x-mean)*E + Fc  with E, Fc per (row, key group)
            e = (g_var * (2.0 / c)).view(rows, 1) + g_gamma * (2.0 / k)
            fc = (g_mean / c).view(rows, 1) + g_mu / k - g_gamma * (2.0 / k) * (mu - mean)
            # dy*a = rstd * dy * weight + dy * up(d_c * rstd): in-place passes, no (R, C) `a`
            dx = torch.mul(dy2, wf).mul_(rstd)
            dx3 = dx.view(rows, n, k)
            dx3.addcmul_(dy2.view(rows, n, k), (d_c * rstd).unsqueeze(-1))
            dx3.addcmul_(xc.view(rows, n, k), e.unsqueeze(-1))
            dx3.add_(fc.unsqueeze(-1))
            dx = dx.reshape(x.shape).to(x.dtype)
        return (
            dx,
            _cast_grad(rstd.t().matmul(dyxc).reshape(c), weight, need[1]),  # sum_r dy * x_hat
            _cast_grad(dy2.sum(0), bias, need[2]),
            _cast_grad(g_w1, w1, need[3]),
            _cast_grad(g_w2, w2, need[4]),
            _cast_grad(g_w3, w3, need[5]),
            None,
        )
