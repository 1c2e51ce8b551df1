"""The Triton kernels of the pooled fast path, run by Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` must be in the environment before Triton is imported, and recent PyTorch
imports Triton with ``import torch``. So in an ordinary test session the single launcher test
below re-runs this file in a child process with ``TRITON_INTERPRET=1``; in that child the kernel
tests run and the launcher skips itself. Skipped where Triton is not installed. Shapes stay
tiny: the interpreter executes every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

from ilmconvert.nn import ILMGroupNorm, ILMInstanceNorm

pytest.importorskip("triton")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in the child process (see module doc)")

from helpers import compare_fast_path, count_calls, randomize, run_under_triton_interpreter  # noqa: E402


@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_kernels_under_the_triton_interpreter():
    run_under_triton_interpreter(__file__)


CASES = [
    (lambda: ILMGroupNorm(8, 64), (2, 64, 5, 7)),  # odd H*W, channels-first tiles
    (lambda: ILMGroupNorm(4, 40), (1, 40, 3, 3)),  # K = 10, batch 1
    (lambda: ILMGroupNorm(2, 16, bias=False), (2, 16, 9, 9)),  # several P tiles per reduction
    (lambda: ILMInstanceNorm(24, key_group_size=4), (2, 24, 6, 5)),
]


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts the launches of each Triton kernel wrapper; after the test, asserts that every pass
    kernel ran, that the fused (B, C) kernels (ilmconvert/nn/triton_small.py) ran exactly when
    enabled, and that the fast path never fell back to PyTorch (it would compute the same values)."""
    from ilmconvert.nn import triton_ilm, triton_small

    passes = ("moments", "apply", "bwd_sums", "bwd_apply")
    calls = count_calls(monkeypatch, triton_ilm, passes)
    count_calls(monkeypatch, triton_small, ("small_forward", "small_backward"), calls)
    yield calls
    assert triton_ilm.FAILURE is None, f"the Triton path fell back to PyTorch: {triton_ilm.FAILURE}"
    assert all(calls[name] for name in passes), f"a Triton kernel did not run: {calls}"
    fused = triton_small.ENABLED
    assert bool(calls["small_forward"]) == bool(calls["small_backward"]) == fused, (fused, calls)


@needs_interpreter
@pytest.mark.parametrize("fused", [True, False], ids=["fused_small", "torch_small"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("make, shape", CASES)
def test_triton_matches_reference_float32(make, shape, layout, fused, triton_launches, monkeypatch):
    from ilmconvert.nn import triton_small

    monkeypatch.setattr(triton_small, "ENABLED", fused)  # the (B, C) part: one kernel, or PyTorch
    layer = make()
    randomize(layer, seed=21)
    x = torch.randn(shape) * 1.5 - 0.4
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    compare_fast_path(layer, x, tol=1e-5, fast_choice="triton")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_triton_half_precision(dtype, layout, triton_launches):
    layer = ILMGroupNorm(8, 64)
    randomize(layer, seed=22)
    x = torch.randn(2, 64, 5, 7).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    compare_fast_path(layer, x, tol=1e-2, fast_choice="triton")


@needs_interpreter
def test_triton_large_mean_is_exact():
    """1e3 + N(0, 1): tile-wise Chan merging keeps the variance; centred sums keep the gradients."""
    from ilmconvert.nn import triton_ilm

    x = 1e3 + torch.randn(2, 32, 7, 9, generator=torch.Generator().manual_seed(23))
    m, v = triton_ilm.moments(x)
    v64, m64 = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    assert ((v.double() - v64).abs() / v64).max() < 1e-5
    assert ((m.double() - m64).abs() / m64).max() < 2.5e-7  # two float32 ulps at 1e3
    y = triton_ilm.apply(x, m, torch.ones_like(m), torch.zeros_like(m), torch.float32)
    assert (y.double() - (x.double() - m64[..., None, None])).abs().max() < 1e-4
