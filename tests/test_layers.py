"""ILM layers against an independent float64 transcription of the paper's eqs. 1-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import randomize
from ilmconvert.nn import ILMGroupNorm, ILMInstanceNorm, ILMLayerNorm, encoder_size, resolve_key_group_size


# ------------------------------------------------------------------ the reference, written from the paper
def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def reference_ilm(
    x: np.ndarray, *, key_groups: int, norm_groups: int, eps: float, w1, w2, w3, b_omega, b_beta, per_position: bool
) -> np.ndarray:
    """Eqs. 1-6 with explicit loops, in float64.

    ``x`` is ``(B, C, P)``. With ``per_position`` every position is an instance (LayerNorm);
    otherwise the positions of a sample are pooled (GroupNorm / InstanceNorm).
    """
    b, c, p = x.shape
    instances = (
        [(i, [j]) for i in range(b) for j in range(p)] if per_position else [(i, list(range(p))) for i in range(b)]
    )
    y = np.empty_like(x)
    k = c // key_groups
    g = c // norm_groups
    for i, positions in instances:
        xi = x[i][:, positions]  # (C, P_i)
        mu = np.array([xi[n * k : (n + 1) * k].mean() for n in range(key_groups)])  # eq. 3
        gamma = np.array([xi[n * k : (n + 1) * k].var() for n in range(key_groups)])  # biased
        e_mu, e_gamma = np.maximum(w1 @ mu, 0), np.maximum(w1 @ gamma, 0)  # eq. 4
        d_mu, d_gamma = np.tanh(w2 @ e_mu), _sigmoid(w3 @ e_gamma)  # eq. 5
        omega = np.repeat(d_gamma, k) + b_omega  # eq. 6
        beta = np.repeat(d_mu, k) + b_beta
        xs = np.empty_like(xi)
        for gi in range(norm_groups):  # eq. 1, the underlying norm's groups
            block = xi[gi * g : (gi + 1) * g]
            xs[gi * g : (gi + 1) * g] = (block - block.mean()) / np.sqrt(block.var() + eps)
        y[i][:, positions] = xs * omega[:, None] + beta[:, None]  # eq. 2
    return y


def _params(layer) -> dict:
    return dict(
        w1=layer.encoder.weight.detach().numpy(),
        w2=layer.decoder_mu.weight.detach().numpy(),
        w3=layer.decoder_gamma.weight.detach().numpy(),
        b_omega=layer.weight.detach().numpy() - 0.5,  # the layers store weight = B_omega + 1/2
        b_beta=layer.bias.detach().numpy(),
        key_groups=layer.num_key_groups,
        eps=layer.eps,
    )


@pytest.mark.parametrize(
    "groups, channels, spatial, key_group_size",
    [(8, 64, (5, 3), 16), (4, 40, (7,), 16), (1, 48, (3, 3), 16), (6, 24, (2, 2, 3), 4), (2, 6, (9,), 16)],
)
def test_group_norm_matches_paper_equations(groups, channels, spatial, key_group_size):
    layer = ILMGroupNorm(groups, channels, eps=1e-5, key_group_size=key_group_size, dtype=torch.float64)
    randomize(layer, seed=channels)
    x = torch.randn(3, channels, *spatial, dtype=torch.float64) * 2 + 0.5
    expected = reference_ilm(
        x.reshape(3, channels, -1).numpy(), norm_groups=groups, per_position=False, **_params(layer)
    )
    np.testing.assert_allclose(layer(x).detach().reshape(3, channels, -1).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels, spatial", [(32, (11,)), (20, (4, 5)), (16, (2, 3, 2))])
def test_instance_norm_matches_paper_equations(channels, spatial):
    layer = ILMInstanceNorm(channels, eps=1e-3, dtype=torch.float64)
    randomize(layer, seed=1)
    x = torch.randn(2, channels, *spatial, dtype=torch.float64)
    expected = reference_ilm(
        x.reshape(2, channels, -1).numpy(), norm_groups=channels, per_position=False, **_params(layer)
    )
    np.testing.assert_allclose(layer(x).detach().reshape(2, channels, -1).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_tokens_match_paper_equations():
    layer = ILMLayerNorm(40, eps=1e-6, dtype=torch.float64)  # K = 10 (40 is not a multiple of 16)
    randomize(layer, seed=2)
    x = torch.randn(2, 7, 40, dtype=torch.float64)  # (batch, tokens, C)
    as_bcp = x.reshape(14, 40, 1).numpy()  # every token an instance
    expected = reference_ilm(as_bcp, norm_groups=1, per_position=True, **_params(layer))
    np.testing.assert_allclose(layer(x).detach().reshape(14, 40, 1).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_channels_first_is_per_pixel():
    layer = ILMLayerNorm(32, eps=1e-6, channels_first=True, dtype=torch.float64)
    randomize(layer, seed=3)
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    expected = reference_ilm(x.reshape(2, 32, 15).numpy(), norm_groups=1, per_position=True, **_params(layer))
    np.testing.assert_allclose(layer(x).detach().reshape(2, 32, 15).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_per_position_key_features_do_not_mix_tokens():
    layer = ILMLayerNorm(32, dtype=torch.float64)
    randomize(layer, seed=4)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    full = layer(x)
    for t in range(9):  # each token alone gives the same output: causal-safe, length-independent
        torch.testing.assert_close(layer(x[:, t : t + 1]), full[:, t : t + 1], rtol=0, atol=1e-14)


def test_instances_are_independent_of_the_batch():
    layer = ILMGroupNorm(4, 32, dtype=torch.float64)
    randomize(layer, seed=5)
    x = torch.randn(4, 32, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[2:3], layer(x[2:3]), rtol=0, atol=1e-14)


def test_unbatched_instance_norm_input():
    layer = ILMInstanceNorm(16, spatial_dims=1, dtype=torch.float64)
    randomize(layer, seed=6)
    x = torch.randn(16, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer(x[None])[0])


@pytest.mark.parametrize(
    "channels, k, expected_k",
    [(64, 16, 16), (40, 16, 10), (96, 16, 16), (30, 16, 15), (7, 16, 7), (13, 4, 1), (320, 16, 16)],
)
def test_key_group_size_is_largest_divisor_not_above_k(channels, k, expected_k):
    assert resolve_key_group_size(channels, k) == expected_k


@pytest.mark.parametrize("n, r, m", [(4, 16, 2), (32, 16, 2), (64, 16, 4), (2048, 16, 128), (128, 4, 32)])
def test_encoder_size(n, r, m):
    assert encoder_size(n, r) == m


def test_parameter_shapes_and_names():
    layer = ILMGroupNorm(32, 256)  # K = 16, N = 16, M = max(2, 1) = 2
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "weight": (256,),
        "bias": (256,),
        "encoder.weight": (2, 16),
        "decoder_mu.weight": (16, 2),
        "decoder_gamma.weight": (16, 2),
    }
    assert layer.added_parameters() == 3 * 16 * 2


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="expects 32 channels"):
        ILMGroupNorm(4, 32)(torch.randn(2, 16, 3, 3))
    with pytest.raises(ValueError, match="multiple of num_groups"):
        ILMGroupNorm(5, 32)


# ------------------------------------------------------------------ gradients
def _gradcheck_layer(layer: nn.Module, x: torch.Tensor) -> None:
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: ILMGroupNorm(2, 8, key_group_size=4, dtype=torch.float64), (2, 8, 3, 2)),
        (lambda: ILMInstanceNorm(8, key_group_size=2, dtype=torch.float64), (2, 8, 5)),
        (lambda: ILMLayerNorm(12, key_group_size=4, dtype=torch.float64), (2, 3, 12)),
        (lambda: ILMLayerNorm(8, key_group_size=4, channels_first=True, dtype=torch.float64), (1, 8, 2, 3)),
    ],
)
def test_gradients_by_gradcheck(make, shape):
    layer = make()
    randomize(layer, seed=7)
    _gradcheck_layer(layer, torch.randn(*shape, dtype=torch.float64))


# ------------------------------------------------------------------ dtypes, memory formats, compile
# (no-graph-break checks of torch._dynamo.explain live in tests/test_fast_path.py)
def test_autocast_bf16_uses_float32_statistics():
    layer = ILMGroupNorm(8, 64)
    randomize(layer, seed=8)
    x = torch.randn(2, 64, 8, 8)
    mu, gamma = layer.key_features(x.bfloat16())
    assert mu.dtype == gamma.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert torch.isfinite(y).all()
    ref = layer(x)
    assert (y.float() - ref).abs().max() / ref.abs().max() < 2e-2


def test_half_precision_input_keeps_its_dtype():
    layer = ILMLayerNorm(32)
    randomize(layer, seed=9)
    x = torch.randn(2, 5, 32)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("make", [lambda: ILMGroupNorm(8, 64), lambda: ILMLayerNorm(64, channels_first=True)])
def test_channels_last_input(make):
    layer = make()
    randomize(layer, seed=10)
    x = torch.randn(2, 64, 7, 5)
    torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), layer(x), rtol=1e-5, atol=1e-5)


def test_inductor_compiled_forward_and_backward_match_eager():
    """The real torch.compile backend (inductor, C++ on CPU): outputs and gradients as in eager mode."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = ILMGroupNorm(4, 32)
    randomize(layer, seed=12)
    x = torch.randn(2, 32, 5, 5)
    eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(eager_x).square().sum().backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.compile(layer)(compiled_x).square().sum().backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-4, atol=1e-4)
    for p, g in zip(layer.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)
