"""The compiled CPU kernel for pooled ILM layers and GroupNorm + Proxy Norm (ilmconvert.nn.cpu_kernel).

Against the exact reference (float64 oracle, as tests/test_fast_path.py does for the PyTorch fast
path), against the PyTorch fast path in float64 (the same function to rounding), by finite
differences, and its fallbacks: switched off, no compiler, under ``torch.compile``, more threads.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import (
    ILM_PARAMS,
    compare_fast_path,
    forward_backward,
    module_gradcheck,
    randomize,
    relative_difference,
    run_layer,
)
from ilmconvert.nn import ILMGroupNorm, ILMInstanceNorm, ProxyGroupNormAct, cpu_kernel, cpu_op, fast_torch

pytestmark = pytest.mark.skipif(cpu_kernel.library() is None, reason=f"no compiled kernel: {cpu_kernel.FAILURE}")

POOLED = [
    (lambda: ILMGroupNorm(8, 64), (3, 64, 5, 7)),  # odd H*W
    (lambda: ILMGroupNorm(4, 40), (1, 40, 3, 3)),  # K = 10, batch 1
    (lambda: ILMGroupNorm(1, 48), (2, 48, 9)),  # GN(1), 1-d spatial
    (lambda: ILMGroupNorm(6, 24, key_group_size=4), (2, 24, 2, 3, 3)),  # 3-d spatial
    (lambda: ILMGroupNorm(32, 64), (2, 64, 4, 4)),  # the Figure-1 network's stage 2 at batch 2
    (lambda: ILMGroupNorm(4, 32, bias=False), (2, 32, 3, 5)),  # no B_beta
    (lambda: ILMGroupNorm(2, 16, key_group_size=4), (4, 16, 1)),  # one position
    (lambda: ILMInstanceNorm(32), (2, 32, 6, 5)),
    (lambda: ILMInstanceNorm(20, key_group_size=1), (1, 20, 7)),  # K = 1
]


def _forward_calls(monkeypatch, function: type) -> list:
    """The input shapes of every call of ``function.forward`` from now on (an autograd Function)."""
    calls = []
    real = function.forward

    def spy(ctx, *args):
        calls.append(args[0].shape)
        return real(ctx, *args)

    monkeypatch.setattr(function, "forward", staticmethod(spy))
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the ILM kernel's forward (the automatic choice must take it)."""
    return _forward_calls(monkeypatch, cpu_kernel.PooledILMCPU)


@pytest.mark.parametrize("make, shape", POOLED)
def test_kernel_matches_reference(make, shape, kernel_calls):
    layer = make()
    randomize(layer, seed=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 2 + 0.3
    compare_fast_path(layer, x, tol=1e-5, fast_choice=None)
    assert kernel_calls, "the kernel was not used"


@pytest.mark.parametrize("make, shape", POOLED)
def test_kernel_equals_pytorch_fast_path_in_float64(make, shape, kernel_calls):
    layer = make().double()
    randomize(layer, seed=3)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1).contiguous()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y_k, g_k = run_layer(layer, x, dy, fast_choice=None)
    assert kernel_calls
    y_t, g_t = run_layer(layer, x, dy, fast_choice="torch")
    assert relative_difference(y_k, y_t) < 1e-12
    for name, a, b in zip(("x",) + ILM_PARAMS, g_k, g_t):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype == torch.float64
            assert relative_difference(a, b) < 1e-11, (name, relative_difference(a, b))


@pytest.mark.parametrize("make, shape", [POOLED[0], POOLED[5], POOLED[7]])
def test_kernel_gradcheck_in_float64(make, shape, kernel_calls):
    layer = make().double()
    randomize(layer, seed=6)
    small = tuple(min(s, 3) if i != 1 else s for i, s in enumerate(shape))
    assert module_gradcheck(layer, torch.randn(small, dtype=torch.float64))
    assert kernel_calls


def test_large_mean_keeps_the_variance(kernel_calls):
    """x = 1e3 + N(0, 1) in float32: the kernel's statistics are in double, as good as the oracle allows."""
    layer = ILMGroupNorm(8, 64)
    randomize(layer, seed=7)
    g = torch.Generator().manual_seed(8)
    x = 1e3 + torch.randn(3, 64, 5, 7, generator=g)
    dy = torch.randn(x.shape, generator=g)
    y64, g64 = run_layer(copy.deepcopy(layer).double(), x.double(), dy.double(), fast_choice=False)
    y_k, g_k = run_layer(layer, x, dy, fast_choice=None)
    assert kernel_calls
    bound = 1e-5 * y64.abs().max() + 4 * 2.0**-24 * 1e3 * layer.weight.abs().max().item() * 2
    assert (y_k.double() - y64).abs().max() < bound
    for name, a, c in zip(("x",) + ILM_PARAMS, g_k, g64):
        assert relative_difference(a, c) < 1e-4, name


def test_switched_off_takes_the_pytorch_fast_path(monkeypatch, kernel_calls):
    layer = ILMGroupNorm(8, 64)
    x = torch.randn(2, 64, 4, 4)
    layer(x)
    assert len(kernel_calls) == 1
    pooled = []
    real = fast_torch.PooledILM.forward
    spy = staticmethod(lambda ctx, *a: pooled.append(1) or real(ctx, *a))
    monkeypatch.setattr(fast_torch.PooledILM, "forward", spy)
    for off in (lambda: cpu_kernel.set_enabled(False), lambda: monkeypatch.setenv(cpu_kernel.ENV, "0")):
        off()
        try:
            layer(x)
        finally:
            cpu_kernel.set_enabled(None)
            monkeypatch.delenv(cpu_kernel.ENV, raising=False)
    assert len(kernel_calls) == 1 and pooled == [1, 1]
    layer.fast = "torch"
    layer(x)
    assert len(kernel_calls) == 1
    layer.fast = None
    layer(x)
    assert len(kernel_calls) == 2


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path, kernel_calls):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_kernel.DIR_ENV, str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "FAILURE", None)
    layer = ILMGroupNorm(8, 64)
    randomize(layer, seed=9)
    x = torch.randn(2, 64, 4, 4)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel .* unavailable .*no C\\+\\+ compiler"):
        y = layer(x)
    assert not kernel_calls and "no C++ compiler" in cpu_kernel.FAILURE
    ref = copy.deepcopy(layer)
    ref.fast = False
    assert relative_difference(y, ref(x)) < 1e-5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # no second warning


def test_build_caches_one_library_per_source(tmp_path):
    first = cpu_kernel.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_not_used_for_channels_last_other_dtypes_or_large_inputs_with_threads(monkeypatch):
    params = (torch.ones(32), torch.zeros(32), torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2))
    x = torch.randn(2, 32, 4, 4)
    assert cpu_kernel.applies(x, params, torch.float32)
    assert not cpu_kernel.applies(x.contiguous(memory_format=torch.channels_last), params, torch.float32)
    assert not cpu_kernel.applies(x.bfloat16(), params, torch.bfloat16)
    assert not cpu_kernel.applies(x.double(), params, torch.float64)  # parameters of another dtype
    big = torch.randn(2, 32, 64, 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not cpu_kernel.applies(big, params, torch.float32)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_kernel.applies(big, params, torch.float32)


def test_compiled_network_traces_the_pytorch_path(kernel_calls):
    """Under ``torch.compile`` the kernel is never called (dynamo traces the PyTorch fast path)."""
    import torch._dynamo

    layer = ILMGroupNorm(8, 64)
    randomize(layer, seed=11)
    x = torch.randn(2, 64, 4, 4)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xr = x.clone().requires_grad_(True)
    compiled(xr).square().sum().backward()
    assert not kernel_calls
    xk = x.clone().requires_grad_(True)
    layer(xk).square().sum().backward()
    assert kernel_calls
    assert relative_difference(xr.grad, xk.grad) < 1e-5


# ------------------------------------------------------------------ GroupNorm + Proxy Norm
PROXY_ACTS = [nn.ReLU, nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU]


@pytest.fixture
def proxy_kernel_calls(monkeypatch):
    """Counts the calls of the GN + PN kernel's forward through ``ctypes`` (the C++ operator switched off,
    tests/test_cpu_op.py tests it)."""
    monkeypatch.setattr(cpu_op, "_ENABLED", False)
    return _forward_calls(monkeypatch, cpu_kernel.ProxyGroupNormActCPU)


def _proxy_run(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, kernel: bool) -> list[torch.Tensor]:
    cpu_kernel.set_enabled(kernel)
    try:
        y, grads = forward_backward(layer, x, dy)
    finally:
        cpu_kernel.set_enabled(None)
    return [y.detach(), *grads]


@pytest.mark.parametrize("output_affine", [False, True])
@pytest.mark.parametrize("act", PROXY_ACTS)
def test_proxy_kernel_equals_pytorch_in_float64(act, output_affine, proxy_kernel_calls):
    layer = ProxyGroupNormAct(4, 32, act_layer=act(), output_affine=output_affine).double()
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(2, 32, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with_kernel = _proxy_run(layer, x, dy, kernel=True)
    assert len(proxy_kernel_calls) == 1
    without = _proxy_run(layer, x, dy, kernel=False)
    assert len(proxy_kernel_calls) == 1
    assert len(with_kernel) == len(without) == 6 + 2 * output_affine
    for i, (a, b) in enumerate(zip(with_kernel, without)):
        assert a.dtype == b.dtype == torch.float64
        assert relative_difference(a, b) < 1e-12, (i, relative_difference(a, b))


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
def test_proxy_kernel_gradcheck_in_float64(act, proxy_kernel_calls):
    layer = ProxyGroupNormAct(2, 8, act_layer=act(), output_affine=True, num_proxy=16).double()
    randomize(layer, seed=13)
    assert module_gradcheck(layer, torch.randn(2, 8, 3, dtype=torch.float64))
    assert proxy_kernel_calls


def test_proxy_kernel_float32_against_float64_pytorch(proxy_kernel_calls):
    layer = ProxyGroupNormAct(8, 64, act_layer=nn.ReLU, output_affine=True)
    randomize(layer, seed=14)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 64, 4, 4, generator=g) + 3
    dy = torch.randn(x.shape, generator=g)
    got = _proxy_run(layer, x, dy, kernel=True)
    assert proxy_kernel_calls
    oracle = _proxy_run(copy.deepcopy(layer).double(), x.double(), dy.double(), kernel=False)
    for i, (a, b) in enumerate(zip(got, oracle)):
        assert a.dtype == torch.float32 and relative_difference(a, b) < 1e-5, (i, relative_difference(a, b))


def test_proxy_kernel_not_used_where_it_does_not_apply(proxy_kernel_calls):
    layer = ProxyGroupNormAct(8, 64, act_layer=nn.ReLU)
    x = torch.randn(2, 64, 4, 4)
    layer(x.contiguous(memory_format=torch.channels_last))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    ProxyGroupNormAct(8, 64, act_layer=nn.LeakyReLU)(x)  # an activation the kernel does not have
    torch.func.vmap(layer)(x.unsqueeze(1))
    assert layer(x[:0]).shape == (0, 64, 4, 4)  # an empty batch: PyTorch's path
    assert not proxy_kernel_calls
    layer(x)
    assert len(proxy_kernel_calls) == 1


def test_proxy_relu_closed_form_at_its_corners(proxy_kernel_calls):
    """ReLU's proxy sums come from one run of active points (bisection + prefix sums): every kind of run
    (rising, falling, flat active, flat inactive, all inactive, all active) against the PyTorch loop."""
    c = 8
    layer = ProxyGroupNormAct(2, c, act_layer=nn.ReLU, output_affine=True).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -1.5, 0.0, 0.0, 0.7, 0.4, -0.3, 2.0]))
        layer.bias.copy_(torch.tensor([0.2, 0.1, 0.5, -0.5, -9.0, 9.0, 0.05, -1.0]))
        layer.proxy_weight.copy_(torch.linspace(-0.2, 0.3, c))
        layer.proxy_bias.copy_(torch.linspace(0.1, -0.2, c))
    g = torch.Generator().manual_seed(16)
    x = torch.randn(3, c, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with_kernel = _proxy_run(layer, x, dy, kernel=True)
    assert proxy_kernel_calls
    without = _proxy_run(layer, x, dy, kernel=False)
    for i, (a, b) in enumerate(zip(with_kernel, without)):
        assert relative_difference(a, b) < 1e-12, (i, relative_difference(a, b))
