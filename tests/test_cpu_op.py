"""The GN + Proxy Norm kernel as a C++ autograd operator (ilmconvert.nn.cpu_op).

Against the ``ctypes`` path (tests/test_cpu_kernel.py tests that one against PyTorch): the same C++
entry points on the same buffers, so bit for bit; by finite differences in float64; without
autograd; and its fallbacks (switched off, no compiler). The operator is compiled once per machine
(~17 s here, cached next to the ``ctypes`` library): the first run of this file pays it; the tests
skip with the reason where it cannot be built.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import forward_backward, module_gradcheck, randomize
from ilmconvert.nn import ProxyGroupNormAct, cpu_kernel, cpu_op

pytestmark = pytest.mark.skipif(
    cpu_kernel.library() is None or cpu_op.operator() is None,
    reason=f"no compiled kernel or operator: {cpu_kernel.FAILURE or cpu_op.FAILURE}",
)

ACTS = [nn.ReLU, nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU]
OP_NODE = "CppNode<ilmconvert_op::ProxyGroupNormAct>"


def _run(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, op: bool) -> tuple[str, list[torch.Tensor]]:
    """The autograd node's name, the output and the gradients of x and every parameter, op on or off."""
    cpu_op.set_enabled(op)
    try:
        y, grads = forward_backward(layer, x, dy)
    finally:
        cpu_op.set_enabled(None)
    return y.grad_fn.name(), [y.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_affine", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_op_equals_ctypes_path_bit_for_bit(act, output_affine, dtype):
    layer = ProxyGroupNormAct(4, 32, act_layer=act(), output_affine=output_affine).to(dtype)
    randomize(layer, seed=21)
    g = torch.Generator().manual_seed(22)
    x = (torch.randn(2, 32, 3, 5, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    node, with_op = _run(layer, x, dy, op=True)
    assert OP_NODE in node
    node, ctypes_path = _run(layer, x, dy, op=False)
    assert "ProxyGroupNormActCPU" in node
    assert len(with_op) == len(ctypes_path) == 6 + 2 * output_affine
    for i, (a, b) in enumerate(zip(with_op, ctypes_path)):
        assert a.dtype == dtype and torch.equal(a, b), i


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU])
def test_op_gradcheck_in_float64(act):
    layer = ProxyGroupNormAct(2, 8, act_layer=act(), output_affine=True, num_proxy=16).double()
    randomize(layer, seed=23)
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    assert OP_NODE in layer(x.requires_grad_(True)).grad_fn.name()
    assert module_gradcheck(layer, x)


def test_op_without_autograd_gives_the_same_output():
    layer = ProxyGroupNormAct(4, 16, act_layer=nn.SiLU(), output_affine=True)
    randomize(layer, seed=24)
    x = torch.randn(3, 16, 4, 4)
    y = layer(x.clone().requires_grad_(True))
    assert OP_NODE in y.grad_fn.name()
    with torch.no_grad():
        y_no_grad = layer(x)
    with torch.inference_mode():
        y_inference = layer(x)
    assert not y_no_grad.requires_grad and torch.equal(y_no_grad, y.detach()) and torch.equal(y_inference, y.detach())


def test_op_refuses_double_backward():
    layer = ProxyGroupNormAct(2, 8, act_layer=nn.GELU()).double()
    x = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_switched_off_by_the_environment_takes_the_ctypes_path(monkeypatch):
    layer = ProxyGroupNormAct(2, 8)
    monkeypatch.setenv(cpu_op.ENV, "0")
    assert "ProxyGroupNormActCPU" in layer(torch.randn(2, 8, 3, requires_grad=True)).grad_fn.name()
    monkeypatch.setenv(cpu_op.ENV, "1")
    assert OP_NODE in layer(torch.randn(2, 8, 3, requires_grad=True)).grad_fn.name()


def test_no_compiler_warns_once_and_takes_the_ctypes_path(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_op, "_OP", None)  # not loaded yet, as in a fresh process
    monkeypatch.setattr(cpu_op, "FAILURE", None)
    monkeypatch.setenv(cpu_kernel.DIR_ENV, str(tmp_path))  # nothing cached
    monkeypatch.setenv("CXX", "no-such-compiler-ilmconvert")
    layer = ProxyGroupNormAct(2, 8)
    x = torch.randn(2, 8, 3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ operator is unavailable.*no C\\+\\+ compiler"):
        y = layer(x)
    assert "ProxyGroupNormActCPU" in y.grad_fn.name()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "ProxyGroupNormActCPU" in layer(x).grad_fn.name()
    assert "no C++ compiler" in cpu_op.FAILURE


def test_cached_library_is_keyed_by_the_source(monkeypatch):
    path = cpu_op.library_path()
    assert path.exists() and cpu_op.is_cached()  # built (or found) by this file's skip condition
    monkeypatch.setattr(cpu_op, "OP_SOURCE", cpu_op.OP_SOURCE + "\n// changed\n")
    assert cpu_op.library_path() != path and cpu_op.library_path().parent == path.parent
    assert not cpu_op.is_cached()  # a changed source is compiled anew
    monkeypatch.setenv("CXX", "no-such-compiler-ilmconvert")
    assert not cpu_op.is_cached()  # no compiler: nothing to find (operator() then warns at once)


def test_building_does_not_print_torchs_cuda_home_line():
    """Importing torch's cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." on a machine
    with a CUDA_HOME and no GPU; the CPU operator's build imports it without that line."""
    import subprocess
    import sys

    def stderr_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr

    line = "No CUDA runtime is found"
    if line not in stderr_of("import torch.utils.cpp_extension"):
        pytest.skip("torch logs no CUDA_HOME line on this machine (a GPU, or no CUDA_HOME)")
    assert line not in stderr_of("from ilmconvert.nn import cpu_op; cpu_op._import_cpp_extension()")
