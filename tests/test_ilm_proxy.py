"""ILM + Proxy Norm (method="ilm+proxy"): the layer against a transcription, gradients, conversion, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.layers.norm_act import GroupNormAct, LayerNormAct2d
from torch import nn

import ilmconvert
from helpers import TINY_MODEL, randomize, reference_pn, relative_difference
from ilmconvert.nn import ILMProxyGroupNormAct


def _layer(act: str, seed: int) -> ILMProxyGroupNormAct:
    """A float64 layer with every parameter random, the decoders included (so omega, beta differ per instance)."""
    layer = ILMProxyGroupNormAct(4, 16, act_layer=act, num_proxy=30, proxy_eps=0.05, key_group_size=4,
                                 output_affine=True).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.weight.add_(1.0)
        layer.output_weight.add_(1.0)
    return layer


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_layer_is_proxy_norm_with_each_instances_rescaling(act):
    layer = _layer(act, seed=1)
    x = torch.randn(3, 16, 5, 4, dtype=torch.float64)
    y = layer(x).detach().numpy()
    omega, beta = (t.detach().numpy() for t in layer.rescaling(*layer.key_features(x)))  # (B, C): ILM, eqs. 3-6
    assert np.ptp(omega, axis=0).min() > 1e-3  # the instances really differ
    groups = x.numpy().reshape(3, 4, -1)  # GroupNorm standardization, 4 groups, in NumPy
    x_hat = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5))
    x_hat = x_hat.reshape(3, 16, 5, 4).transpose(0, 2, 3, 1)  # channels last
    proxy = (layer.proxy_weight, layer.proxy_bias, layer.output_weight, layer.output_bias)
    params = [t.detach().numpy() for t in proxy]
    for b in range(3):  # PN-Act with omega_b, beta_b as gamma, beta: proxy statistics per instance
        expected = reference_pn(x_hat[b], omega[b], beta[b], params[0], params[1], act=act, n=30, eps=0.05)
        np.testing.assert_allclose(y[b].transpose(1, 2, 0), expected * params[2] + params[3], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_gradients_by_gradcheck(act):
    layer = _layer(act, seed=2)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    names = [n for n, _ in layer.named_parameters()]

    def of_parameters(*values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x.detach(),))

    assert torch.autograd.gradcheck(of_parameters, tuple(p.detach().requires_grad_() for p in layer.parameters()))


def test_outputs_do_not_depend_on_the_other_samples():
    layer = _layer("relu", seed=3).float().train()
    x = torch.randn(4, 16, 6, 6)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(layer(x), alone, rtol=1e-6, atol=1e-6)


def test_conversion_preserves_resnet50_gn_and_leaves_layernorm_alone():
    model = ilmconvert.create_model("timm:resnet50_gn", pretrained=False, num_classes=5).double().eval()
    randomize(model, seed=2)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    before = model(x)
    report = ilmconvert.convert(model, method="ilm+proxy")
    assert len(report.converted) == 33 and {c.target for c in report.converted} == {"ILMProxyGroupNormAct"}
    assert relative_difference(model(x), before) <= 1e-10

    mixed = nn.Sequential(nn.Conv2d(3, 16, 1), GroupNormAct(16, 4, act_layer=nn.GELU), LayerNormAct2d(16))
    report = ilmconvert.convert(mixed, method="ilm+proxy")
    assert [c.name for c in report.converted] == ["1"] and report.converted[0].activation == "GELU"
    assert [s.name for s in report.skipped] == ["2"]
    assert "no ILM + Proxy Norm counterpart" in report.skipped[0].reason


def test_checkpoint_rebuilds_bit_exactly(tmp_path):
    model = ilmconvert.create_model("timm:resnet18", pretrained=False, num_classes=3, **TINY_MODEL).eval()
    ilmconvert.convert(model, method="ilm+proxy")
    randomize(model, seed=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ILMProxyGroupNormAct):
                m.proxy_weight.normal_(0, 0.2)
                m.proxy_bias.normal_(0, 0.2)
    ilmconvert.save(model, tmp_path / "ck")
    reloaded = ilmconvert.load(tmp_path / "ck")
    assert reloaded.ilm_conversion.settings["method"] == "ilm+proxy"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
