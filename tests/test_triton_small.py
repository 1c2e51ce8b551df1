"""The fused ``(B, C)`` kernels of the pooled ILM layer (ilmconvert/nn/triton_small.py), on Triton's
interpreter: one launch forward (moments -> ``M, a, beta``), one backward (``S0, S1`` -> ``e, f``
and the parameters' gradients), against the PyTorch ``(B, C)`` code in float64.

As in ``tests/test_triton_interpret.py``, the kernel tests run in a child process with
``TRITON_INTERPRET=1`` (started by the one launcher test); :func:`triton_small.applies` is tested
in both processes. Shapes stay tiny; every case takes well under a second.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from ilmconvert.nn import ILMGroupNorm, ILMInstanceNorm, fast_torch

pytest.importorskip("triton")
from ilmconvert.nn import triton_ilm, triton_small  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the child process (see module doc)")

from helpers import (  # noqa: E402
    compare_fast_path,
    count_calls,
    randomize,
    relative_difference,
    run_layer,
    run_under_triton_interpreter,
)


@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_kernels_under_the_triton_interpreter():
    run_under_triton_interpreter(__file__)


# (B, C, G, K, M, bias): G norm groups of C/G channels, N = C/K key groups, M encoder units
CASES = [
    (1, 40, 4, 10, 2, True),  # batch 1; C/G = K = 10: tiles padded to 16
    (3, 64, 8, 16, 2, True),
    (2, 24, 2, 8, 3, False),  # norm groups (12 channels) and key groups (8) not nested; no bias
    (2, 48, 48, 4, 3, True),  # InstanceNorm: G = C
    (4, 96, 32, 1, 6, True),  # K = 1: every channel a key group
    (2, 256, 32, 16, 2, True),  # a Figure-1 layer (GroupNorm 32, C = 256)
    (2, 16, 4, 16, 2, True),  # one key group (N = 1)
    (1, 32, 1, 8, 2, True),  # one norm group (G = 1)
]
IDS = [f"B{b}-C{c}-G{g}-K{k}-M{m}" + ("" if bias else "-nobias") for b, c, g, k, m, bias in CASES]
#: float32 kernels against the float64 PyTorch code: relative to each tensor's largest entry. Where the
#: float32 PyTorch code is itself further off (saturated decoders: sigmoid' = (1 - s) s loses all of its
#: digits in float32 once s rounds to 1), its own error is allowed on top, as in ``compare_fast_path``.
TOL = 1e-5
#: the interpreter runs tl.sigmoid as 1 / (1 + exp(-u)) in NumPy, which warns where exp overflows (to
#: exactly 0 / 1, as on the GPU)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _close(got, want64, want32, name):
    bound = TOL + relative_difference(want32, want64)
    assert relative_difference(got, want64) < bound, (name, relative_difference(got, want64), bound)


def _problem(b, c, g, k, m, bias, seed=0, w_scale=1.0):
    """Random moments and parameters, float64: ``(m_c, v_c, weight, bias, w1, w2, w3)``; W1..W3
    ``~ w_scale * N(0, 1)`` (3: the decoders saturate, tanh / sigmoid within 1e-5 of +-1)."""
    gen = torch.Generator().manual_seed(seed)
    n = c // k

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    m_c = 0.3 + rand(b, c)
    v_c = rand(b, c).exp()  # biased variances: positive, spread over a decade
    weight = 1.0 + rand(c, scale=0.5)
    b_beta = rand(c, scale=0.5) if bias else None
    return m_c, v_c, weight, b_beta, rand(m, n, scale=w_scale), rand(n, m, scale=w_scale), rand(n, m, scale=w_scale)


def _f32(tensors):
    return [None if t is None else t.float().contiguous() for t in tensors]


def _reference_forward(problem, g, k, eps=1e-5):
    """``(big_m, a, beta, rstd, keys, enc, dec)`` from the PyTorch code, in the problem's dtype."""
    m_c, v_c, *params = problem
    a, _d, beta, aux = fast_torch.pooled_coefficients(m_c, v_c, *params, g, k, eps)
    up_means, rstd, _omega, _rstd_up, keys, enc, _w23, dec = aux
    return up_means[:, 0], a, beta, rstd, keys, enc, dec


@needs_interpreter
@pytest.mark.parametrize("w_scale", [1.0, 3.0], ids=["decoders", "saturated"])
@pytest.mark.parametrize("b, c, g, k, m, bias", CASES, ids=IDS)
def test_small_forward_matches_the_pytorch_coefficients(b, c, g, k, m, bias, w_scale):
    problem = _problem(b, c, g, k, m, bias, w_scale=w_scale)
    got = triton_small.small_forward(*_f32(problem), g, k, 1e-5)
    want64 = _reference_forward(problem, g, k)
    want32 = _reference_forward(_f32(problem), g, k)
    names = ("M", "a", "beta", "rstd", "keys", "enc", "dec")
    for name, x, y64, y32 in zip(names, got, want64, want32):
        assert x.dtype == torch.float32 and x.shape == y64.shape, name
        _close(x, y64, y32, name)


def _reference_backward(problem, s0, g_a, g, k, npos):
    """``[e, f, g_weight, g_bias, g_w1, g_w2, g_w3]`` from ``fast_torch.pooled_small_backward``."""
    m_c, v_c, *params = problem
    b, c = m_c.shape
    ctx = SimpleNamespace(spec=(g, k, 1e-5, m_c.dtype), needs_input_grad=(True,) * 6 + (False,))
    x = torch.zeros(b, c, npos, dtype=m_c.dtype)  # the backward reads only its shape
    e, f, grads = fast_torch.pooled_small_backward(triton_small.SavedForFallback(ctx, x, params, m_c, v_c), s0, g_a)
    return [e, f, *grads]


@needs_interpreter
@pytest.mark.parametrize("w_scale", [1.0, 3.0], ids=["decoders", "saturated"])
@pytest.mark.parametrize("b, c, g, k, m, bias", CASES, ids=IDS)
def test_small_backward_matches_the_pytorch_backward(b, c, g, k, m, bias, w_scale):
    """``e, f`` and every parameter gradient against ``fast_torch.pooled_small_backward`` in float64."""
    npos = 7
    problem = _problem(b, c, g, k, m, bias, seed=1, w_scale=w_scale)
    gen = torch.Generator().manual_seed(2)
    s0 = torch.randn(b, c, generator=gen, dtype=torch.float64) * 3.0  # sum_p dy
    g_a = torch.randn(b, c, generator=gen, dtype=torch.float64) * 3.0  # sum_p dy * (x - M)
    want64 = _reference_backward(problem, s0, g_a, g, k, npos)
    p32 = _f32(problem)
    want32 = _reference_backward(p32, s0.float(), g_a.float(), g, k, npos)

    big_m, _a, _beta, *small = triton_small.small_forward(*p32, g, k, 1e-5)
    w32 = [p32[2], *p32[4:]]
    e, f, grads = triton_small.small_backward(s0.float(), g_a.float(), (*w32, big_m, *small), g, k, npos)
    names = ("e", "f", "weight", "bias", "W1", "W2", "W3")
    for name, got, y64, y32 in zip(names, [e, f, *grads], want64, want32):
        if y64 is None:  # no bias
            continue
        assert got.dtype == torch.float32 and got.shape == y64.shape, name
        _close(got, y64, y32, name)


@needs_interpreter
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: ILMGroupNorm(8, 64), (1, 64, 4, 4)),
        (lambda: ILMGroupNorm(4, 40, bias=False), (2, 40, 3, 5)),
        (lambda: ILMInstanceNorm(24, key_group_size=4), (3, 24, 2, 3)),
    ],
)
def test_layer_on_the_fused_kernels_matches_the_float64_reference(make, shape, monkeypatch):
    """The whole layer, forward and backward: against autograd through the float64 reference path."""
    monkeypatch.setattr(triton_ilm, "FAILURE", None)
    calls = count_calls(monkeypatch, triton_small, ("small_forward", "small_backward"))
    layer = make()
    randomize(layer, seed=5)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last) * 2.0 + 0.5
    compare_fast_path(layer, x, tol=TOL, fast_choice="triton")
    assert calls == {"small_forward": 1, "small_backward": 1}, calls
    assert triton_ilm.FAILURE is None


@needs_interpreter
def test_bfloat16_layer_and_input_on_the_fused_kernels(monkeypatch):
    """bfloat16 parameters and input: the kernels compute in float32 and the parameter gradients
    come back in bfloat16, within 1e-2 of the float64 reference path (as tests/test_triton_interpret.py
    bounds half-precision input)."""
    monkeypatch.setattr(triton_ilm, "FAILURE", None)
    calls = count_calls(monkeypatch, triton_small, ("small_forward", "small_backward"))
    layer = ILMGroupNorm(8, 64)
    randomize(layer, seed=7)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 64, 3, 3).to(torch.bfloat16)
    compare_fast_path(layer, x, tol=1e-2, fast_choice="triton")
    assert calls == {"small_forward": 1, "small_backward": 1}, calls
    assert triton_ilm.FAILURE is None


def _fail(*args, **kwargs):
    raise RuntimeError("injected: triton.compiler.errors.CompilationError at 1:2")


@needs_interpreter
@pytest.mark.parametrize("which", ["small_forward", "small_backward"])
def test_a_failing_fused_kernel_falls_back_to_pytorch(which, monkeypatch):
    """Forward failure: the PyTorch fast path at once; backward failure: the PyTorch backward from
    the moments the fused forward saved. One warning, the same numbers, Triton given up."""
    monkeypatch.setattr(triton_ilm, "FAILURE", None)
    layer = ILMGroupNorm(4, 32)
    randomize(layer, seed=6)
    x, dy = torch.randn(2, 32, 3, 3), torch.randn(2, 32, 3, 3)
    want_y, want_grads = run_layer(layer, x, dy, fast_choice="torch")
    monkeypatch.setattr(triton_small, which, _fail)
    with pytest.warns(RuntimeWarning, match="Triton kernel .* failed .*injected"):
        y, grads = run_layer(layer, x, dy, fast_choice="triton")
    assert triton_ilm.FAILURE.startswith("RuntimeError: injected")
    assert relative_difference(y, want_y) < TOL
    assert all(relative_difference(a, b) < TOL for a, b in zip(grads, want_grads))


def test_applies_only_where_triton_runs_and_the_tiles_fit(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(triton_small, "ENABLED", True)
    assert triton_small.applies(cuda, 256, 32, 16, 2)
    assert triton_small.applies(cuda, 2048, 32, 16, 8)  # resnet50's widest GroupNorm
    assert not triton_small.applies(cuda, 4096, 32, 1, 256)  # N x M = 4096 x 256 > MAX_TILE
    assert not triton_small.applies(cuda, 32768, 32, 16, 128)  # G x C/G = 32 x 1024 > MAX_TILE
    assert triton_small.applies(cpu, 256, 32, 16, 2) == INTERPRETING  # CPU: only under the interpreter
    monkeypatch.setattr(triton_small, "ENABLED", False)
    assert not triton_small.applies(cuda, 256, 32, 16, 2)


@pytest.mark.parametrize("value, enabled", [("", True), ("1", True), ("0", False), (" Off", False), ("no", False)])
def test_the_environment_turns_the_fused_kernels_off(value, enabled, monkeypatch):
    monkeypatch.setenv(triton_small.ENV, value)
    assert triton_small._enabled_by_environment() is enabled

