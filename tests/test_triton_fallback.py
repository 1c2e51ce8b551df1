"""A Triton kernel that fails to compile or launch: one warning, the PyTorch fast path, training goes on.

The failures are injected into the kernel wrappers of :mod:`ilmconvert.nn.triton_ilm`; the layer is
told that Triton applies (as it would on CUDA), so this runs on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import relative_difference, run_layer
from ilmconvert.nn import ILMGroupNorm, fast, fast_torch

pytest.importorskip("triton")
from ilmconvert.nn import triton_ilm  # noqa: E402


@pytest.fixture
def triton_applies(monkeypatch):
    """Triton is chosen wherever it is usable; the process has not given it up yet."""
    monkeypatch.setattr(triton_ilm, "FAILURE", None)
    monkeypatch.setattr(fast, "_want_triton", lambda layer, x: fast._triton_usable())


def _torch_apply(x, m, a, beta, out_dtype):
    """What the ``apply`` kernel computes, for 4-d input, in PyTorch."""
    shape = (*a.shape, 1, 1)
    return ((x.float() - m.reshape(shape)) * a.reshape(shape) + beta.reshape(shape)).to(out_dtype)


def _torch_bwd_sums(dy, x, m):
    """What the ``bwd_sums`` kernel computes, for 4-d input, in PyTorch."""
    return dy.sum((2, 3)), (dy * (x - m[..., None, None])).sum((2, 3))


def _fail(*args, **kwargs):
    raise RuntimeError("injected: triton.compiler.errors.CompilationError at 3:4")


def _layer() -> ILMGroupNorm:
    layer = ILMGroupNorm(4, 32)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def test_forward_failure_falls_back_with_one_warning(triton_applies, monkeypatch):
    monkeypatch.setattr(triton_ilm, "moments", _fail)
    layer, x, dy = _layer(), torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    with pytest.warns(RuntimeWarning, match="Triton kernel .* failed .*injected.*PyTorch fast path"):
        y, grads = run_layer(layer, x, dy, fast_choice=None)
    assert triton_ilm.FAILURE.startswith("RuntimeError: injected")
    y_ref, grads_ref = run_layer(layer, x, dy, fast_choice="torch")
    assert relative_difference(y, y_ref) == 0 and all(relative_difference(a, b) == 0 for a, b in zip(grads, grads_ref))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: Triton is given up for the process
        run_layer(layer, x, dy, fast_choice=None)


def test_backward_failure_falls_back_to_the_pytorch_backward(triton_applies, monkeypatch):
    calls = []
    monkeypatch.setattr(triton_ilm, "moments", lambda x: calls.append("moments") or fast_torch.channel_moments(x))
    monkeypatch.setattr(triton_ilm, "apply", _torch_apply)
    monkeypatch.setattr(triton_ilm, "bwd_sums", _fail)
    layer, x, dy = _layer(), torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    with pytest.warns(RuntimeWarning, match="injected"):
        y, grads = run_layer(layer, x, dy, fast_choice=None)
    assert calls == ["moments"]  # the forward ran on the (stand-in) Triton Function
    y_ref, grads_ref = run_layer(layer, x, dy, fast_choice=False)
    assert relative_difference(y, y_ref) < 1e-5
    assert all(relative_difference(a, b) < 1e-5 for a, b in zip(grads, grads_ref))


def test_training_goes_on_after_a_failure(triton_applies, monkeypatch):
    monkeypatch.setattr(triton_ilm, "bwd_apply", _fail)
    monkeypatch.setattr(triton_ilm, "moments", fast_torch.channel_moments)
    monkeypatch.setattr(triton_ilm, "apply", _torch_apply)
    monkeypatch.setattr(triton_ilm, "bwd_sums", _torch_bwd_sums)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), ILMGroupNorm(4, 32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
    losses = []
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len([w for w in record if "Triton" in str(w.message)]) == 1
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
