"""The fast path (ilmconvert.nn.fast) against the reference path: outputs and every gradient.

The reference path (``layer.fast = False``) is the oracle. Exactness: 1e-5 relative in float32,
1e-2 in bfloat16, outputs and gradients of x, weight, bias, W1, W2, W3; on fresh random inputs,
random parameters (so every term of eqs. 4-6 matters) and awkward shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import ILM_PARAMS, compare_fast_path, module_gradcheck, randomize, relative_difference, run_layer
from ilmconvert.nn import ILMGroupNorm, ILMInstanceNorm, ILMLayerNorm, fast, fast_torch

# ------------------------------------------------------------------ shapes
POOLED = [
    # (factory, input shape)
    (lambda: ILMGroupNorm(8, 64), (3, 64, 5, 7)),  # odd H*W
    (lambda: ILMGroupNorm(4, 40), (1, 40, 3, 3)),  # C not divisible by K=16 (K=10), batch 1
    (lambda: ILMGroupNorm(1, 48), (2, 48, 9)),  # GN(1) = the paper's "LN", 1-d spatial
    (lambda: ILMGroupNorm(6, 24, key_group_size=4), (2, 24, 2, 3, 3)),  # 3-d spatial
    (lambda: ILMGroupNorm(32, 32), (2, 32, 4, 4)),  # one channel per norm group
    (lambda: ILMGroupNorm(4, 32, bias=False), (2, 32, 3, 5)),  # no B_beta
    (lambda: ILMGroupNorm(2, 16, key_group_size=4), (4, 16, 1)),  # one position
    (lambda: ILMInstanceNorm(32), (2, 32, 6, 5)),
    (lambda: ILMInstanceNorm(20, key_group_size=1), (1, 20, 7)),  # the paper's IN scheme K=1
]
TOKENS = [
    (lambda: ILMLayerNorm(48), (2, 7, 48)),
    (lambda: ILMLayerNorm(40), (5, 40)),  # K=10
    (lambda: ILMLayerNorm(24, key_group_size=4, bias=False), (3, 2, 5, 24)),
    (lambda: ILMLayerNorm(32, channels_first=True), (2, 32, 3, 5)),
]


@pytest.mark.parametrize("make, shape", POOLED + TOKENS)
def test_float32_outputs_and_gradients_match_reference(make, shape):
    layer = make()
    randomize(layer, seed=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 2 + 0.3
    compare_fast_path(layer, x, tol=1e-5)


@pytest.mark.parametrize("make, shape", [POOLED[0], POOLED[1], POOLED[7], TOKENS[3]])
def test_channels_last_matches_reference(make, shape):
    layer = make()
    randomize(layer, seed=3)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    compare_fast_path(layer, x, tol=1e-5)


def test_strided_token_input_matches_reference():
    layer = ILMLayerNorm(48)
    randomize(layer, seed=3)
    x = torch.randn(7, 2, 48).transpose(0, 1)  # (2, 7, 48), not contiguous
    compare_fast_path(layer, x, tol=1e-5)


@pytest.mark.parametrize("make, shape", [POOLED[0], POOLED[1], POOLED[7], TOKENS[0], TOKENS[3]])
def test_bfloat16_matches_reference(make, shape):
    layer = make()
    randomize(layer, seed=4)
    x = torch.randn(shape).bfloat16()
    compare_fast_path(layer, x, tol=1e-2)


def test_bfloat16_parameters_get_bfloat16_gradients():
    layer = ILMGroupNorm(4, 32).bfloat16()
    randomize(layer, seed=5)
    compare_fast_path(layer, torch.randn(2, 32, 5, 5).bfloat16(), tol=1e-2)


@pytest.mark.parametrize("make, shape", [POOLED[0], POOLED[7], TOKENS[0], TOKENS[3]])
def test_float64_gradcheck_of_the_fast_path(make, shape):
    layer = make().double()
    randomize(layer, seed=6)
    layer.fast = "torch"
    small = tuple(
        min(s, 3) if i != 1 and not (i == len(shape) - 1 and not layer.pooled) else s for i, s in enumerate(shape)
    )
    assert module_gradcheck(layer, torch.randn(small, dtype=torch.float64))


# ------------------------------------------------------------------ large means
def _naive_group_norm_stats(x: torch.Tensor, groups: int):
    """A sum-of-squares variance in float32: what the test must catch."""
    xg = x.reshape(x.shape[0], groups, -1)
    m = xg.mean(-1)
    return m, (xg * xg).mean(-1) - m * m


@pytest.mark.parametrize("make, shape", POOLED[:3] + POOLED[4:5] + POOLED[6:8])
def test_large_input_code_path_matches_reference(make, shape, monkeypatch):
    """Eager CPU takes one-operation moments, centred channel sums and ``addcmul`` for inputs of at
    most ``fast_torch.SMALL_NUMEL`` elements (every shape above) and the vectorized multi-pass code
    (sum of squares with its guard, uncentred sums, the ``batch_norm`` affine) above it: the latter
    against the reference here, by making every input "large"."""
    monkeypatch.setattr(fast_torch, "SMALL_NUMEL", 0)
    layer = make()
    randomize(layer, seed=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 2 + 0.3
    compare_fast_path(layer, x, tol=1e-5)
    compare_fast_path(layer, x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, tol=1e-5)


@pytest.mark.parametrize("small_numel", [fast_torch.SMALL_NUMEL, 0], ids=["small-input-code", "large-input-code"])
@pytest.mark.parametrize("make, shape", [POOLED[0], POOLED[7], TOKENS[0]])
def test_large_mean_keeps_the_variance(make, shape, small_numel, monkeypatch):
    """x = 1e3 + N(0, 1): the fast path against a float64 oracle of the reference path.

    An fp32 input of size 1e3 carries 6e-5 of rounding, so any float32 algorithm is off by
    about ``eps32 * |x| * |a|`` in the output; the bound allows that and 1e-5 relative besides,
    and asks the fast path to be no worse than the float32 reference path. A sum-of-squares
    variance is off by percents and fails (checked below).
    """
    monkeypatch.setattr(fast_torch, "SMALL_NUMEL", small_numel)
    layer = make()
    randomize(layer, seed=7)
    g = torch.Generator().manual_seed(8)
    x = 1e3 + torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    oracle = copy.deepcopy(layer).double()
    y64, g64 = run_layer(oracle, x.double(), dy.double(), fast_choice=False)
    y_f, g_f = run_layer(layer, x, dy, fast_choice="torch")
    y_r, g_r = run_layer(layer, x, dy, fast_choice=False)
    bound = 1e-5 * y64.abs().max() + 4 * 2.0**-24 * 1e3 * layer.weight.abs().max().item() * 2
    err_fast, err_ref = (y_f.double() - y64).abs().max(), (y_r.double() - y64).abs().max()
    assert err_fast < bound and err_fast <= 2 * err_ref + 1e-5 * y64.abs().max()
    for name, a, b, c in zip(("x",) + ILM_PARAMS, g_f, g_r, g64):
        if c is None:
            continue
        scale = c.abs().max()
        ea, eb = (a.double() - c).abs().max(), (b.double() - c).abs().max()
        assert ea <= max(2 * eb, 1e-4 * scale), (name, ea.item(), eb.item(), scale.item())
    if layer.pooled and isinstance(layer, ILMGroupNorm):
        _, v_naive = _naive_group_norm_stats(x, layer.num_groups)
        _, v_exact = _naive_group_norm_stats(x.double(), layer.num_groups)
        assert (v_naive.double() - v_exact).abs().max() / v_exact.abs().max() > 1e-3


# ------------------------------------------------------------------ dispatch
def test_fast_path_is_taken_and_can_be_forced_off(monkeypatch):
    layer = ILMGroupNorm(4, 32)
    x = torch.randn(2, 32, 3, 3)
    calls = []
    real = fast.forward
    monkeypatch.setattr(fast, "forward", lambda *a: calls.append(1) or real(*a))
    layer(x)
    assert calls == [1]
    layer.fast = False
    layer(x)
    assert calls == [1]
    layer.fast = None
    monkeypatch.setenv("ILMCONVERT_REFERENCE", "1")
    layer(x)
    assert calls == [1]
    monkeypatch.delenv("ILMCONVERT_REFERENCE")
    layer(x)
    assert calls == [1, 1]


@pytest.mark.parametrize(
    "make, shape, cl",
    [
        (POOLED[0][0], POOLED[0][1], False),
        (POOLED[0][0], POOLED[0][1], True),
        (TOKENS[0][0], TOKENS[0][1], False),
        (TOKENS[3][0], TOKENS[3][1], False),
    ],
)
def test_inplace_op_on_the_output_is_legal(make, shape, cl):
    """timm follows norms with ReLU(inplace=True): the fast path's output must allow it."""
    layer = make()
    randomize(layer, seed=13)
    x = torch.randn(shape)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for choice in ("torch", False):
        lay = copy.deepcopy(layer)
        lay.fast = choice
        xr = x.clone().requires_grad_(True)
        torch.nn.functional.relu(lay(xr), inplace=True).sum().backward()
        grads.append(xr.grad)
    assert relative_difference(grads[0], grads[1]) < 1e-5


def test_fallback_for_overridden_front_ends_and_unsupported_input():
    class Custom(ILMGroupNorm):
        def _standardize(self, x):
            return super()._standardize(x) * 2

    assert not fast.use_fast_path(Custom(4, 32), torch.randn(2, 32, 3))
    assert fast.use_fast_path(ILMGroupNorm(4, 32), torch.randn(2, 32, 3))
    assert not fast.use_fast_path(ILMGroupNorm(4, 32), torch.randn(2, 32, 3).long())
    inorm = ILMInstanceNorm(8)
    assert not fast.use_fast_path(inorm, torch.randn(2, 8, 1))  # reference raises: let it
    assert not fast.use_fast_path(ILMGroupNorm(4, 32), torch.randn(2, 32))  # no positions
    with pytest.raises(ValueError):
        inorm(torch.randn(2, 8, 1))


def test_unbatched_instance_norm_and_eval_no_grad():
    layer = ILMInstanceNorm(16, spatial_dims=2)
    randomize(layer, seed=9)
    x = torch.randn(16, 5, 5)
    with torch.no_grad():
        y = layer(x)
        layer.fast = False
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-6)


def test_cpu_autocast_keeps_the_reference_dtype():
    layer = ILMGroupNorm(4, 32)
    randomize(layer, seed=10)
    x = torch.randn(2, 32, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        layer.fast = False
        y_ref = layer(x)
    assert y.dtype == y_ref.dtype
    assert relative_difference(y, y_ref) < 1e-2


@pytest.mark.parametrize("make, shape", [POOLED[0], TOKENS[0]])
def test_float32_input_under_cpu_autocast_stays_exact(make, shape):
    """Autocast must not reach the statistics or the auto-encoder (the reference disables it).

    Forward under autocast, backward outside it (as in a training loop).
    """
    layer = make()
    randomize(layer, seed=12)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    outs = []
    for choice in ("torch", False):
        lay = copy.deepcopy(layer)
        lay.fast = choice
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lay(xr)
        y.backward(dy)
        outs.append([y.detach(), xr.grad, lay.encoder.weight.grad, lay.weight.grad])
    assert outs[0][0].dtype == outs[1][0].dtype == torch.float32
    for a, b in zip(*outs):
        assert relative_difference(a, b) < 1e-5


def test_output_dtype_follows_cuda_autocast_rules():
    # F.group_norm / F.layer_norm are on CUDA autocast's fp32 list, F.instance_norm is not.
    x = torch.empty(2, 3, dtype=torch.bfloat16)
    assert fast.output_dtype(x, "group") == torch.bfloat16  # CPU: never promoted


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: ILMGroupNorm(4, 32), (2, 32, 5, 5)),
        (lambda: ILMLayerNorm(48), (2, 7, 48)),
        (lambda: ILMLayerNorm(32, channels_first=True), (2, 32, 4, 4)),
    ],
)
def test_compiled_fast_path_has_no_graph_break_and_matches(make, shape):
    import torch._dynamo

    layer = make()
    randomize(layer, seed=11)
    x = torch.randn(*shape)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xr = x.clone().requires_grad_(True)
    y = compiled(xr)
    y.square().sum().backward()
    ref = copy.deepcopy(layer)
    ref.fast = False
    xr2 = x.clone().requires_grad_(True)
    y2 = ref(xr2)
    y2.square().sum().backward()
    assert relative_difference(y, y2) < 1e-5 and relative_difference(xr.grad, xr2.grad) < 1e-5
    assert relative_difference(layer.encoder.weight.grad, ref.encoder.weight.grad) < 1e-5
