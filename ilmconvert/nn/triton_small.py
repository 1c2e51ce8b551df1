"""One Triton kernel each way for the ``(B, C)`` part of the pooled ILM layer (issue 20 part d).

Between the passes over ``x`` (:mod:`ilmconvert.nn.triton_ilm`), the pooled ILM layer turns the
per (sample, channel) moments into the coefficients of ``y = (x - M) * a + beta``, and in the
backward turns ``S0 = sum dy``, ``S1 = sum dy * (x - M)`` into ``dx = dy * a + (x - M) * e + f`` and
the parameters' gradients. In PyTorch (:func:`fast_torch.pooled_coefficients`,
:func:`fast_torch.pooled_small_backward`) that is 35 top-level aten operations forward and 47
backward (at 2 x 64 channels, views included), most of them a kernel launch on CUDA, which at batch
1-4 costs more than the passes over ``x``. Here each direction is one kernel with one program per
sample, plus one ``sum(0)`` for the parameter gradients (deterministic: per-sample partials, no
atomics):

- ``_small_forward``: Chan's combination of the moments into the norm groups (eq. 1, ``(G,)``) and
  key groups (eq. 3, ``(N,)``), the encoder / decoders (eqs. 4-5), alignment (eq. 6 as the layers
  parametrize it, ``omega = up(D_gamma - 1/2) + weight``, ``beta = up(D_mu) + bias``) and
  ``a = omega * rstd``. It writes ``M, a, beta`` per channel and, for the backward, ``rstd``
  ``(B, G)``, the key features ``(2, B, N)``, the encodings ``(2, B, M)`` and the decodings
  ``(2, B, N)`` (the layout of :func:`fast_torch._mlp_forward`'s saved tensors).
- ``_small_backward``: the group sums of ``S0``, ``S1``, the MLP's backward, the chain through
  Chan's combination to ``e``, ``f``, and each sample's partial gradients of ``weight``, ``bias``,
  W1, W2, W3 in one ``(B, L)`` row, summed over the batch by one ``sum(0)``.

Each program holds the sample's channels twice, as a ``(G, C/G)`` tile (norm groups: sums along
one axis) and as an ``(N, K)`` tile (key groups). A per-channel value of the other grouping is
never moved between the two layouts: the decoder output at each channel's key group is
recomputed from the encoding and W2 / W3 (one multiply-add per hidden unit and channel), and the
backward reads the forward's saved ``rstd`` / key features at each channel's group (gathered
loads of tensors written by an earlier launch), so the kernels need no barrier.

When it applies (:func:`applies`): Triton usable on the tensors' device (CUDA, or CPU under
``TRITON_INTERPRET=1``), :data:`ENABLED`, and every tile at most :data:`MAX_TILE` elements after
rounding to powers of two (``G x C/G``, ``N x K``, ``N x M``; e.g. C <= 8192 with the default
K = 16, r = 16). Elsewhere the layer keeps the PyTorch ``(B, C)`` code. ``ILMCONVERT_TRITON_SMALL=0``
in the environment (read at import) or ``triton_small.ENABLED = False`` turns it off (benchmarks
compare both). A compile or launch failure gives up every Triton kernel through
:func:`triton_ilm.give_up` (one warning); the PyTorch path then computes the same function.

All arithmetic is float32 (the Triton path's statistics dtype). Tested under the Triton
interpreter against :func:`fast_torch.pooled_coefficients` / ``pooled_small_backward`` and the
float64 reference (``tests/test_triton_small.py``); not yet run on a GPU (docs/performance.md).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from . import fast_torch

ENV = "ILMCONVERT_TRITON_SMALL"
#: Largest tile (elements, after rounding each side to a power of two) a program holds.
MAX_TILE = 16384


def _enabled_by_environment() -> bool:
    """False when ``ILMCONVERT_TRITON_SMALL`` is ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


#: Whether the fused kernels may run (:func:`applies`): from the environment at import; benchmarks
#: and tests set it to compare with the PyTorch ``(B, C)`` code.
ENABLED: bool = _enabled_by_environment()


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def applies(device: torch.device, c: int, groups: int, k: int, hidden: int) -> bool:
    """Whether the fused kernels run the ``(B, C)`` part of a layer with C channels, G norm groups,
    key groups of K channels and an encoder of ``hidden`` (M) units, on ``device``."""
    if not ENABLED:
        return False
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") != "1":
        return False
    n = c // k
    tiles = (_p2(groups) * _p2(c // groups), _p2(n) * _p2(k), _p2(n) * _p2(hidden))
    return max(tiles) <= MAX_TILE


@triton.jit
def _tanh(u):
    """``tanh(u) = sign(u) (1 - 2 / (exp(2 |u|) + 1))`` (the interpreter has no libdevice tanh).

    Odd by construction, so near saturation ``1 - |tanh|`` keeps its relative accuracy on both
    sides (the backward's ``(1 - t)(1 + t)``); ``|u|`` is clamped at 15, where tanh is 1 in float32,
    so exp never overflows.
    """
    t = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(tl.abs(u), 15.0)) + 1.0)
    return tl.where(u < 0, -t, t)


@triton.jit
def _tile(NG, SIZE, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """A sample's channels as a ``(groups, channels per group)`` tile of contiguous groups:
    ``(group index, mask, channel index)``."""
    gi = tl.arange(0, BLOCK_A)
    mask = (gi < NG)[:, None] & (tl.arange(0, BLOCK_B) < SIZE)[None, :]
    return gi, mask, gi[:, None] * SIZE + tl.arange(0, BLOCK_B)[None, :]


@triton.jit
def _group_moments(MEAN, VAR, row, mask, ch, SIZE):
    """Each group's mean and biased variance from its channels' (Chan's combination, equal counts):
    ``mean = avg m_c``, ``var = avg (v_c + (m_c - mean)^2)``."""
    m = tl.load(MEAN + row + ch, mask=mask, other=0.0)
    v = tl.load(VAR + row + ch, mask=mask, other=0.0)
    mean = tl.sum(m, axis=1) / SIZE
    dm = tl.where(mask, m - mean[:, None], 0.0)
    return mean, tl.sum(v + dm * dm, axis=1) / SIZE


@triton.jit
def _small_forward(
    MEAN, VAR, W, BIAS, W1, W2, W3,  # inputs: (B, C) x2, (C,) x2, (M, N), (N, M) x2
    BIGM, A, BETA, RSTD, KEYS, ENC, DEC,  # outputs: (B, C) x3, (B, G), (2, B, N), (2, B, M), (2, B, N)
    B, C, G, S, K, N, H, eps,
    HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row = b * C
    # key features (eq. 3) on the (N, K) tile
    ns, kmask, kch = _tile(N, K, BLOCK_N, BLOCK_K)
    mu, gamma = _group_moments(MEAN, VAR, row, kmask, kch, K)
    # encoder (eq. 4, W1 shared) and decoders (eq. 5)
    hs = tl.arange(0, BLOCK_H)
    nmask, hmask = ns < N, hs < H
    w1 = tl.load(W1 + hs[:, None] * N + ns[None, :], mask=hmask[:, None] & nmask[None, :], other=0.0)  # (M, N)
    e_mu = tl.maximum(tl.sum(w1 * mu[None, :], axis=1), 0.0)
    e_ga = tl.maximum(tl.sum(w1 * gamma[None, :], axis=1), 0.0)
    wmask = nmask[:, None] & hmask[None, :]
    w2 = tl.load(W2 + ns[:, None] * H + hs[None, :], mask=wmask, other=0.0)  # (N, M)
    w3 = tl.load(W3 + ns[:, None] * H + hs[None, :], mask=wmask, other=0.0)
    d_mu = _tanh(tl.sum(w2 * e_mu[None, :], axis=1))
    d_ga = tl.sigmoid(tl.sum(w3 * e_ga[None, :], axis=1))
    tl.store(KEYS + b * N + ns, mu, mask=nmask)
    tl.store(KEYS + (B + b) * N + ns, gamma, mask=nmask)
    tl.store(ENC + b * H + hs, e_mu, mask=hmask)
    tl.store(ENC + (B + b) * H + hs, e_ga, mask=hmask)
    tl.store(DEC + b * N + ns, d_mu, mask=nmask)
    tl.store(DEC + (B + b) * N + ns, d_ga, mask=nmask)
    # norm groups (eq. 1) on the (G, C/G) tile
    gs, gmask, ch = _tile(G, S, BLOCK_G, BLOCK_S)
    mean_g, var_g = _group_moments(MEAN, VAR, row, gmask, ch, S)
    rstd = 1.0 / tl.sqrt(var_g + eps)
    tl.store(RSTD + b * G + gs, rstd, mask=gs < G)
    # up(D_mu), up(D_gamma) on this tile: the decoders at each channel's key group, from e_mu / e_ga
    nc = ch // K
    u_mu = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    u_ga = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    for h in range(H):
        u_mu += tl.load(W2 + nc * H + h, mask=gmask, other=0.0) * tl.sum(tl.where(hs == h, e_mu, 0.0))
        u_ga += tl.load(W3 + nc * H + h, mask=gmask, other=0.0) * tl.sum(tl.where(hs == h, e_ga, 0.0))
    u_mu = _tanh(u_mu)
    u_ga = tl.sigmoid(u_ga)
    # alignment (eq. 6): omega = up(D_gamma) + (weight - 1/2), beta = up(D_mu) + bias; a = omega * rstd
    omega = u_ga + (tl.load(W + ch, mask=gmask, other=0.0) - 0.5)
    beta = u_mu
    if HAS_BIAS:
        beta += tl.load(BIAS + ch, mask=gmask, other=0.0)
    tl.store(A + row + ch, omega * rstd[:, None], mask=gmask)
    tl.store(BETA + row + ch, beta, mask=gmask)
    tl.store(BIGM + row + ch, tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32) + mean_g[:, None], mask=gmask)


@triton.jit
def _small_backward(
    S0, GA, W, W1, W2, W3, BIGM, RSTD, KEYS, ENC, DEC,  # inputs (shapes as in _small_forward)
    E, F, PART,  # outputs: (B, C) x2, (B, L) per-sample gradient partials
    B, C, G, S, K, N, H, L, npos,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row = b * C
    part = PART + b * L
    # key groups: dL/dD_mu = sum S0, dL/dD_gamma = sum S1 * rstd (rstd read at each channel's norm group)
    ns, kmask, kch = _tile(N, K, BLOCK_N, BLOCK_K)
    nmask = ns < N
    s0 = tl.load(S0 + row + kch, mask=kmask, other=0.0)
    ga = tl.load(GA + row + kch, mask=kmask, other=0.0)
    r = tl.load(RSTD + b * G + kch // S, mask=kmask, other=0.0)
    g_dmu = tl.sum(s0, axis=1)
    g_dga = tl.sum(ga * r, axis=1)
    # the MLP's backward (fast_torch._mlp_backward): tanh' = (1 - t)(1 + t), sigmoid' = (1 - s) s, relu'
    t = tl.load(DEC + b * N + ns, mask=nmask, other=0.0)
    sg = tl.load(DEC + (B + b) * N + ns, mask=nmask, other=0.0)
    z_mu = g_dmu * (1.0 - t) * (t + 1.0)
    z_ga = g_dga * (1.0 - sg) * sg
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < H
    e_mu = tl.load(ENC + b * H + hs, mask=hmask, other=0.0)
    e_ga = tl.load(ENC + (B + b) * H + hs, mask=hmask, other=0.0)
    wmask = nmask[:, None] & hmask[None, :]
    nh = ns[:, None] * H + hs[None, :]
    w2 = tl.load(W2 + nh, mask=wmask, other=0.0)
    w3 = tl.load(W3 + nh, mask=wmask, other=0.0)
    tl.store(part + 2 * C + H * N + nh, z_mu[:, None] * e_mu[None, :], mask=wmask)  # dL/dW2
    tl.store(part + 2 * C + 2 * H * N + nh, z_ga[:, None] * e_ga[None, :], mask=wmask)  # dL/dW3
    h_mu = tl.where(e_mu > 0, tl.sum(z_mu[:, None] * w2, axis=0), 0.0)  # (M,)
    h_ga = tl.where(e_ga > 0, tl.sum(z_ga[:, None] * w3, axis=0), 0.0)
    mu = tl.load(KEYS + b * N + ns, mask=nmask, other=0.0)
    gamma = tl.load(KEYS + (B + b) * N + ns, mask=nmask, other=0.0)
    g_w1 = h_mu[:, None] * mu[None, :] + h_ga[:, None] * gamma[None, :]
    tl.store(part + 2 * C + hs[:, None] * N + ns[None, :], g_w1, mask=hmask[:, None] & nmask[None, :])
    # norm groups: S_a = sum a * S0 (= -dL/dmean_g), Q = sum S1 * omega * rstd^3 (dL/dvar_g = -Q / 2)
    gs, gmask, ch = _tile(G, S, BLOCK_G, BLOCK_S)
    nc = ch // K
    s0 = tl.load(S0 + row + ch, mask=gmask, other=0.0)
    ga = tl.load(GA + row + ch, mask=gmask, other=0.0)
    rstd = tl.load(RSTD + b * G + gs, mask=gs < G, other=0.0)
    omega = tl.load(DEC + (B + b) * N + nc, mask=gmask, other=0.0) + (tl.load(W + ch, mask=gmask, other=0.0) - 0.5)
    s_a = tl.sum(omega * rstd[:, None] * s0, axis=1)
    q = tl.sum(ga * omega, axis=1) * (rstd * rstd * rstd)
    tl.store(part + ch, ga * rstd[:, None], mask=gmask)  # dL/dweight = sum_b S1 * rstd
    tl.store(part + C + ch, s0, mask=gmask)  # dL/dbias = sum_b S0
    # dL/dmu, dL/dgamma = (h @ W1) at each channel's key group
    g_mu = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    g_gamma = tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.float32)
    for h in range(H):
        w1 = tl.load(W1 + h * N + nc, mask=gmask, other=0.0)
        g_mu += w1 * tl.sum(tl.where(hs == h, h_mu, 0.0))
        g_gamma += w1 * tl.sum(tl.where(hs == h, h_ga, 0.0))
    # chain through Chan's combination and dm_c/dx = 1/P, dv_c/dx = 2 (x - m_c) / P
    e_key = g_gamma * (2.0 / (K * npos))
    e = e_key - q[:, None] / (S * npos)
    big_m = tl.load(BIGM + row + ch, mask=gmask, other=0.0)
    mu_c = tl.load(KEYS + b * N + nc, mask=gmask, other=0.0)
    f = (g_mu / K - s_a[:, None] / S) / npos + e_key * (big_m - mu_c)
    tl.store(E + row + ch, e, mask=gmask)
    tl.store(F + row + ch, f, mask=gmask)


def _blocks(c: int, groups: int, k: int, hidden: int) -> dict[str, int]:
    return {
        "BLOCK_G": _p2(groups),
        "BLOCK_S": _p2(c // groups),
        "BLOCK_N": _p2(c // k),
        "BLOCK_K": _p2(k),
        "BLOCK_H": _p2(hidden),
    }


def _warps(c: int) -> int:
    return 4 if c <= 1024 else 8


def small_forward(m_c, v_c, weight, bias, w1, w2, w3, groups: int, k: int, eps: float):
    """The coefficients of ``y = (x - M) * a + beta`` from per-channel moments, in one launch.

    Args:
        m_c, v_c: ``(B, C)`` float32 contiguous, per (sample, channel) mean and biased variance.
        weight, bias: ``(C,)`` float32 (``weight = B_omega + 1/2``; bias may be None); w1 ``(M, N)``,
            w2 and w3 ``(N, M)`` float32 contiguous.
        groups, k, eps: G, K, the norm's eps.

    Returns:
        ``(big_m, a, beta, rstd, keys, enc, dec)``: ``(B, C)`` x3, ``(B, G)``, ``(2, B, N)``,
        ``(2, B, M)``, ``(2, B, N)``, float32; the same values as
        :func:`fast_torch.pooled_coefficients` (``big_m = up_means[:, 0]``, ``keys, enc, dec`` its
        saved MLP tensors), up to float32 rounding.
    """
    b, c = m_c.shape
    hidden, n = w1.shape
    dev = m_c.device
    out = [torch.empty(b, c, device=dev, dtype=torch.float32) for _ in range(3)]
    rstd = torch.empty(b, groups, device=dev, dtype=torch.float32)
    keys = torch.empty(2, b, n, device=dev, dtype=torch.float32)
    enc = torch.empty(2, b, hidden, device=dev, dtype=torch.float32)
    dec = torch.empty(2, b, n, device=dev, dtype=torch.float32)
    _small_forward[(b,)](
        m_c, v_c, weight, weight if bias is None else bias, w1, w2, w3,
        *out, rstd, keys, enc, dec,
        b, c, groups, c // groups, k, n, hidden, eps,
        HAS_BIAS=bias is not None, num_warps=_warps(c), **_blocks(c, groups, k, hidden),
    )  # fmt: skip
    return (*out, rstd, keys, enc, dec)


def small_backward(s0, g_a, saved, groups: int, k: int, npos: int):
    """``e, f`` of ``dx = dy * a + (x - M) * e + f`` and the parameters' gradients, in one launch
    and one ``sum(0)``.

    Args:
        s0, g_a: ``(B, C)`` float32, ``sum_p dy`` and ``sum_p dy * (x - M)`` per (sample, channel).
        saved: ``(weight, w1, w2, w3, big_m, rstd, keys, enc, dec)``, float32 contiguous, the
            parameters and :func:`small_forward`'s outputs.
        groups, k, npos: G, K and P (positions per channel).

    Returns:
        ``(e, f, (g_weight, g_bias, g_w1, g_w2, g_w3))``, float32, as
        :func:`fast_torch.pooled_small_backward` computes them (``g_bias`` also when the layer has
        no bias; the caller drops it).
    """
    weight, w1, w2, w3, big_m, rstd, keys, enc, dec = saved
    b, c = s0.shape
    hidden, n = w1.shape
    width = 2 * c + 3 * hidden * n
    e = torch.empty(b, c, device=s0.device, dtype=torch.float32)
    f = torch.empty_like(e)
    part = torch.empty(b, width, device=s0.device, dtype=torch.float32)
    _small_backward[(b,)](
        s0, g_a, weight, w1, w2, w3, big_m, rstd, keys, enc, dec,
        e, f, part,
        b, c, groups, c // groups, k, n, hidden, width, float(npos),
        num_warps=_warps(c), **_blocks(c, groups, k, hidden),
    )  # fmt: skip
    sums = part.sum(0)
    hn = hidden * n
    grads = (
        sums[:c],
        sums[c : 2 * c],
        sums[2 * c : 2 * c + hn].view(hidden, n),
        sums[2 * c + hn : 2 * c + 2 * hn].view(n, hidden),
        sums[2 * c + 2 * hn :].view(n, hidden),
    )
    return e, f, grads


class SavedForFallback:
    """The autograd context :func:`fast_torch.pooled_backward` expects, rebuilt in PyTorch from what
    the fused forward saved (used only when a fused backward kernel fails)."""

    def __init__(self, ctx: Any, x, params, m_c, v_c) -> None:
        groups, k, eps, _ = ctx.spec
        p = [t.to(m_c.dtype) if t is not None else None for t in params]
        a, _d, _beta, aux = fast_torch.pooled_coefficients(m_c, v_c, *p, groups, k, eps)
        self.saved_tensors = (x, *params, a, *aux)
        self.spec = ctx.spec
        self.needs_input_grad = ctx.needs_input_grad
