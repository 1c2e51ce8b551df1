"""BatchNorm opt-in (batchnorm="gn"): BN-pretrained ResNets become ILM+GN networks that train with
tiny batches and whose outputs do not depend on the other samples of the batch (paper, Fig. 1)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import ilmconvert
from ilmconvert.nn import ILMGroupNorm, ILMGroupNormAct


@pytest.fixture(scope="module")
def resnet50_ilm() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    report = ilmconvert.convert(model, batchnorm="gn")
    assert report.function_changing
    assert all(c.function_changing for c in report.converted)
    assert len(report.converted) == 53  # every BatchNorm2d of ResNet-50
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, ILMGroupNorm))
    return model


def test_outputs_do_not_depend_on_the_other_samples(resnet50_ilm):
    model = resnet50_ilm.train()  # train mode: where BatchNorm would mix the batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        a = model(x[[0, 1]])
        b = model(x[[0, 2]])
        alone = model(x[[0]])
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[0], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[1], b[1])

    # the unconverted BN network does depend on its batch mates (the point of the conversion)
    torch.manual_seed(0)
    bn = torchvision.models.resnet50(num_classes=10).train()
    with torch.no_grad():
        assert not torch.allclose(bn(x[[0, 1]])[0], bn(x[[0, 2]])[0], rtol=1e-3, atol=1e-3)


def test_trains_with_batch_size_two(resnet50_ilm):
    model = resnet50_ilm.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.tensor([3, 7])
    opt = torch.optim.SGD(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for m in model.modules():
            if isinstance(m, ILMGroupNorm):
                for p in m.parameters():
                    assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("channels,groups", [(64, 32), (24, 24), (40, 20), (96, 32), (7, 7)])
def test_group_count_is_32_or_the_largest_divisor_not_above(channels, groups):
    net = nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels))
    ilmconvert.convert(net, batchnorm="gn")
    layer = net[1]
    assert isinstance(layer, ILMGroupNorm) and layer.num_groups == groups


def test_bn_affine_becomes_b_omega_and_b_beta():
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    net = nn.Sequential(bn)
    ilmconvert.convert(net, batchnorm="gn")
    layer = net[0]
    x = torch.randn(2, 64, 4, 4)
    expected = nn.functional.group_norm(x, 32, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_timm_batchnormact_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(BatchNormAct2d(32, act_layer=nn.ReLU))
    report = ilmconvert.convert(net, batchnorm="gn")
    assert report.function_changing
    assert isinstance(net[0], ILMGroupNormAct) and isinstance(net[0].act, nn.ReLU)
    assert (net[0](torch.randn(2, 32, 4, 4)) >= 0).all()


def test_batchnorm_is_left_alone_without_opt_in():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8))
    report = ilmconvert.convert(net)
    assert isinstance(net[1], nn.BatchNorm2d) and not report.function_changing
    assert any("opt in" in s.reason for s in report.skipped)
