"""Proxy Normalization: the layer against an independent transcription, gradients, conversion, checkpoints."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from timm.layers.norm_act import BatchNormAct2d, GroupNormAct, LayerNormAct, LayerNormAct2d
from torch import nn

import ilmconvert
from helpers import ACTIVATIONS, randomize, reference_pn, relative_difference, run_layer
from ilmconvert.nn import ProxyGroupNormAct, ProxyLayerNormAct, ProxyNormAct, proxy_points


def test_proxy_points_are_gaussian_quantiles():
    q = proxy_points(200, torch.float64)
    expected = [NormalDist().inv_cdf((i + 0.5) / 200) for i in range(200)]
    assert q.dtype == torch.float64 and np.allclose(q.numpy(), expected, rtol=0, atol=1e-12)
    assert abs(float(q.mean())) < 1e-14 and torch.allclose(q, -q.flip(0), rtol=0, atol=1e-13)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("channels_first", [True, False])
def test_layer_matches_an_independent_transcription(act, channels_first):
    layer = ProxyNormAct(12, act, num_proxy=50, eps=0.05, channels_first=channels_first).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.weight.add_(1.0)
    x = torch.randn(3, 12, 4, 5, dtype=torch.float64, generator=g)
    if not channels_first:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    y = layer(x)
    params = [t.detach().numpy() for t in (layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias)]
    x_last = x.numpy() if not channels_first else x.permute(0, 2, 3, 1).numpy()
    expected = reference_pn(x_last, *params, act=act, n=50, eps=0.05)
    got = y.detach().numpy() if not channels_first else y.detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "mish"])  # mish: no aten kernel pair, autograd inside
def test_gradients_flow_through_the_proxy_statistics(act):
    layer = ProxyNormAct(4, act, num_proxy=16, output_affine=True).double()
    randomize(layer, seed=5)
    with torch.no_grad():
        for p in (layer.proxy_weight, layer.proxy_bias, layer.output_weight, layer.output_bias):
            p.normal_(0, 0.3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    names = [n for n, _ in layer.named_parameters()]

    def of_parameters(*values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x.detach(),))

    assert torch.autograd.gradcheck(of_parameters, tuple(p.detach().requires_grad_() for p in layer.parameters()))


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "mish", "tanh"])
@pytest.mark.parametrize("affine", [True, False])
def test_hand_written_backward_matches_autograd_of_the_composed_formula(act, affine):
    """The eager path's one autograd node against the torch-op formula that compile / export use."""
    layer = ProxyNormAct(6, act, num_proxy=40, output_affine=affine).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.weight.add_(1.0)
        if affine:
            layer.output_weight.add_(1.0)
    weights = torch.randn(2, 6, dtype=torch.float64, generator=g)
    answers = []
    for coefficients in (layer.output_coefficients, layer._composed_output_coefficients):
        layer.zero_grad()
        scale, shift = coefficients(torch.float64)
        (weights[0] @ scale + weights[1] @ shift.exp()).backward()
        answers.append([scale.detach(), shift.detach()] + [p.grad.clone() for p in layer.parameters()])
    assert len(answers[0]) == (8 if affine else 6)
    for got, expected in zip(*answers):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_torch_func_transforms_take_the_composed_formula():
    layer = ProxyNormAct(4, "gelu", output_affine=True).double()
    randomize(layer, seed=2)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    params = dict(layer.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14)
    per_sample = torch.func.vmap(lambda xi: layer(xi[None])[0])(x)
    torch.testing.assert_close(per_sample, layer(x), rtol=1e-12, atol=1e-14)


def test_autocast_and_channels_last():
    layer = ProxyNormAct(16, "gelu")
    randomize(layer, seed=7)
    x = torch.randn(2, 16, 6, 6)
    y = layer(x)
    y_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf = layer(x.bfloat16())
    assert y_bf.dtype == torch.bfloat16
    assert relative_difference(y_bf, layer.double()(x.double())) < 2e-2


def test_compiles_without_graph_breaks():
    layer = ProxyGroupNormAct(4, 16, act_layer=nn.SiLU(), output_affine=True)
    x = torch.randn(2, 16, 5, 5)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def _pairs_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        GroupNormAct(16, 4, act_layer=nn.GELU),
        nn.Conv2d(16, 16, 3, padding=1),
        LayerNormAct2d(16, act_layer=nn.SiLU),
        nn.Conv2d(16, 8, 1),
        BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Flatten(2),
        nn.Unflatten(2, (5, 5)),
    )


def test_preserve_keeps_the_function_and_reports_the_activations():
    torch.manual_seed(0)
    model = _pairs_net().double().eval()
    randomize(model, seed=2)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    report = ilmconvert.convert(model, method="proxy")
    assert [(c.name, c.target, c.activation) for c in report.converted] == [
        ("1", "ProxyGroupNormAct", "GELU"),
        ("3", "ProxyLayerNormAct", "SiLU"),
    ]
    assert [s.name for s in report.skipped] == ["5"] and "include-batchnorm" in report.skipped[0].reason
    assert report.converted[0].params_added == 4 * 16 and report.settings["method"] == "proxy"
    with torch.no_grad():
        assert relative_difference(model(x), before) <= 1e-10


def test_layer_norm_act_tokens_preserve():
    model = nn.Sequential(nn.Linear(6, 32), LayerNormAct(32, act_layer=nn.GELU), nn.Linear(32, 4)).double()
    randomize(model, seed=4)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    before = model(x)
    ilmconvert.convert(model, method="proxy")
    assert isinstance(model[1], ProxyLayerNormAct) and not model[1].channels_first
    assert relative_difference(model(x), before) <= 1e-10


def test_resnetv2_bit_group_norm_act_preserved_in_float64():
    model = ilmconvert.create_model("timm:resnetv2_50x1_bit", pretrained=False).double().eval()
    randomize(model, seed=1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        report = ilmconvert.convert(model, method="proxy")
        after = model(x)
    assert len(report.converted) == 49 and all(c.activation == "ReLU" for c in report.converted)
    assert relative_difference(after, before) <= 1e-10


def test_batchnorm_opt_in_removes_the_batch_dependence():
    """efficientnet_b0's BatchNormAct2d -> GN + PN: in training mode a sample's output no longer
    depends on the other samples of the batch."""
    torch.manual_seed(0)
    model = ilmconvert.create_model("timm:efficientnet_b0", pretrained=False, num_classes=5).train()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert relative_difference(model(x)[:1], model(x[:1].expand(2, -1, -1, -1))[:1]) > 1e-3  # BN: depends
    report = ilmconvert.convert(model, method="proxy", batchnorm="gn")
    targets = {c.target: c.activation for c in report.converted}
    assert report.function_changing and targets == {"ProxyGroupNormAct": "SiLU", "GroupNorm": ""}
    with torch.no_grad():
        alone, together = model(x[:1]), model(x)[:1]
    assert relative_difference(alone, together) < 1e-5


def test_plain_norms_pair_with_the_activation_module_after_them():
    """timm's resnet50_gn: GroupNorm -> act modules. fx proves bn1 -> act1 and bn2 -> act2 (33 pairs);
    bn3 and the downsample norms feed the residual add and are skipped with that reason."""
    model = ilmconvert.create_model("timm:resnet50_gn", pretrained=False).double().eval()
    randomize(model, seed=6)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        report = ilmconvert.convert(model, method="proxy")
        after = model(x)
    assert len(report.converted) == 33 and len(report.skipped) == 20
    assert all("goes to add" in s.reason for s in report.skipped)
    row = next(c for c in report.converted if c.name == "layer1.0.bn2")
    assert row.activation == "ReLU" and row.absorbed == ["layer1.0.act2"]
    assert isinstance(model.layer1[0].act2, nn.Identity) and isinstance(model.layer1[0].bn2.act, nn.ReLU)
    assert relative_difference(after, before) <= 1e-10


class SharedActivation(nn.Module):
    """One ReLU module called after two norms (as torchvision's ResNet blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1, self.gn2 = nn.GroupNorm(4, 16), nn.GroupNorm(4, 16)
        self.relu = nn.ReLU()
        self.gn3, self.drop, self.act3 = nn.GroupNorm(4, 16), nn.Identity(), nn.SiLU()

    def forward(self, x):
        x = self.relu(self.gn1(self.conv(x)))
        x = self.relu(self.gn2(x))
        return self.act3(self.drop(self.gn3(x)))


def test_a_shared_activation_is_not_moved_and_the_pair_is_reported():
    model = SharedActivation().double()
    randomize(model, seed=8)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model(x)
    report = ilmconvert.convert(model, method="proxy")
    assert [c.name for c in report.converted] == ["gn3"] and report.converted[0].absorbed == ["act3"]
    assert [s.name for s in report.skipped] == ["gn1", "gn2"]
    assert all("relu (ReLU) is shared: called at 2 places" in s.reason for s in report.skipped)
    assert relative_difference(model(x), before) <= 1e-10


def test_torchvision_resnet_batchnorm_opt_in_is_batch_independent():
    """torchvision's resnet50: each block is re-traced so that its three ReLU calls have a module
    each; the stem and every bn1 / bn2 -> ReLU become GN + PN, the norms before the residual
    addition plain GroupNorm with a note; in training mode no output depends on the batch."""
    model = ilmconvert.create_model("torchvision:resnet50", pretrained=False, num_classes=4).train()
    report = ilmconvert.convert(model, method="proxy", batchnorm="gn")
    proxy = [c for c in report.converted if c.target == "ProxyGroupNormAct"]
    plain = [c for c in report.converted if c.target == "GroupNorm"]
    assert len(proxy) == 1 + 2 * 16 and len(plain) == 16 + 4
    assert [c.name for c in proxy[:3]] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    assert [c.absorbed for c in proxy[:3]] == [["relu"], ["layer1.0.relu"], ["layer1.0.relu_1"]]
    assert "layer1.0 re-traced with torch.fx" in proxy[1].note and "relu -> relu, relu_1, relu_2" in proxy[1].note
    assert all("no activation module follows (its output goes to add" in c.note for c in plain if "bn3" in c.name)
    block = model.layer1[0]
    assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == "Bottleneck"
    assert isinstance(block.relu, nn.Identity) and isinstance(block.relu_1, nn.Identity)
    assert isinstance(block.relu_2, nn.ReLU)  # after the residual addition
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert relative_difference(model(x[:1]), model(x)[:1]) < 1e-5


class Blocks(nn.Sequential):
    """Two blocks whose ReLU is shared (as in torchvision's ResNet), below the root."""

    def __init__(self) -> None:
        super().__init__(SharedActivation(), nn.Conv2d(16, 16, 1), SharedActivation())

    @staticmethod
    def make() -> Blocks:
        blocks = Blocks()
        blocks[2].conv = nn.Conv2d(16, 16, 3, padding=1)
        return blocks


def test_a_shared_activation_below_the_root_is_unshared_and_the_function_kept():
    model = Blocks.make().double()
    randomize(model, seed=9)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model(x)
    keys = sorted(model.state_dict())
    report = ilmconvert.convert(model, method="proxy")
    assert [c.name for c in report.converted] == ["0.gn1", "0.gn2", "0.gn3", "2.gn1", "2.gn2", "2.gn3"]
    assert [c.absorbed for c in report.converted[:2]] == [["0.relu"], ["0.relu_1"]]
    assert report.skipped == []
    assert relative_difference(model(x), before) <= 1e-10
    assert isinstance(model[0], torch.fx.GraphModule) and type(model[1]) is nn.Conv2d
    new_keys = sorted(model.state_dict())
    assert [k for k in keys if k not in new_keys] == []  # the original tensors keep their names


def test_a_re_traced_torchvision_network_reloads_bit_exactly(tmp_path):
    model = ilmconvert.create_model("torchvision:resnet18", pretrained=False, num_classes=4).eval()
    report = ilmconvert.convert(model, method="proxy", batchnorm="gn")
    assert sum(c.target == "ProxyGroupNormAct" for c in report.converted) == 1 + 8  # stem + bn1 of each block
    randomize(model, seed=4)
    ilmconvert.save(model, tmp_path / "ck")
    reloaded = ilmconvert.load(tmp_path / "ck")
    assert isinstance(reloaded.layer1[0], torch.fx.GraphModule)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_unsharing_is_undone_where_nothing_takes_the_activation_or_the_conversion_fails():
    model = Blocks.make()
    ilmconvert.convert(model, method="proxy", include=["2.*"])
    assert type(model[0]) is SharedActivation and isinstance(model[2], torch.fx.GraphModule)

    model = Blocks.make()
    blocks = list(model)

    class Boom(ProxyGroupNormAct):
        @classmethod
        def from_norm(cls, norm, **kwargs):
            raise RuntimeError("boom")

    mapping = {nn.GroupNorm: ilmconvert.NormAdapter("gn", Boom, needs_activation=True)}
    with pytest.raises(RuntimeError, match="boom"):
        ilmconvert.convert(model, mapping, method="proxy")
    assert list(model) == blocks and type(model[0]) is SharedActivation


def test_unknown_method_and_nothing_to_pair():
    with pytest.raises(ilmconvert.ConversionError, match="method must be one of ilm, proxy"):
        ilmconvert.convert(_pairs_net(), method="batch")
    lonely = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1))
    with pytest.raises(ilmconvert.ConversionError, match="not paired with an activation.*goes to Conv2d"):
        ilmconvert.convert(lonely, method="proxy")


def test_paper_init_is_the_authors_layer():
    model = _pairs_net()
    ilmconvert.convert(model, method="proxy", init="paper")
    layer = model[1]
    assert layer.output_weight is None and torch.equal(layer.weight, torch.ones(16))
    assert not layer.proxy_weight.any() and not layer.proxy_bias.any()
    with torch.no_grad():
        y = layer(torch.randn(64, 16, 8, 8))
    # N(0, 1) input: the proxy is exactly the input's distribution, so the output is nearly standardized
    assert abs(float(y.mean())) < 0.05 and abs(float(y.var()) - 1.0) < 0.1


@pytest.mark.parametrize("spec", ["timm:test_efficientnet_gn", "timm:resnet50_gn"])
def test_checkpoint_round_trip_is_bit_exact(spec, tmp_path):
    model = ilmconvert.create_model(spec, pretrained=False)
    randomize(model, seed=3)
    ilmconvert.convert(model, method="proxy")
    ilmconvert.save(model, tmp_path / "ckpt")
    loaded = ilmconvert.load(tmp_path / "ckpt")
    assert loaded.ilm_conversion.settings["method"] == "proxy"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert {"bn1.weight", "bn1.proxy_weight", "bn1.output_bias"} <= set(loaded.state_dict())  # names stay


def test_the_proxy_shift_and_scale_are_decayed_and_nothing_else_of_pn():
    from ilmconvert.train.loop import create_optimizer
    from ilmconvert.train.recipes import TrainSettings

    model = _pairs_net()
    ilmconvert.convert(model, method="proxy")
    optimizer = create_optimizer(model, TrainSettings(weight_decay=5e-4))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = {n: decay[id(p)] for n, p in model.named_parameters()}
    assert names["1.proxy_weight"] == names["1.proxy_bias"] == 5e-4 and names["0.weight"] == 5e-4
    assert names["1.weight"] == names["1.bias"] == names["1.output_weight"] == names["0.bias"] == 0.0


def test_a_recipe_can_pick_proxy_norm():
    from ilmconvert.train import loop, recipes

    recipe = recipes.parse_recipe(
        "model: {name: 'timm:test_efficientnet_gn'}\nconversion: {method: proxy, init: preserve}\n", "pn"
    )
    network = loop.build_network(recipe.model, recipe.conversion, num_classes=3)
    assert network.ilm_conversion.settings["method"] == "proxy"
    assert {c.target for c in network.ilm_conversion.converted} == {"ProxyGroupNormAct"}
    with pytest.raises(recipes.RecipeError, match="conversion.method"):
        recipes.parse_recipe("model: {name: x}\nconversion: {method: batch}\n", "bad")


def test_relu_folded_into_the_standardization_is_the_same_function_and_gradient(monkeypatch):
    """CPU + ReLU: relu(u) * s + t runs as relu(GN(x; gamma s, beta s)) + t; values and gradients
    equal the general path, and a negative output scale takes the general path."""
    layer = ProxyGroupNormAct(4, 16, act_layer=nn.ReLU(), output_affine=True).double()
    randomize(layer, seed=9)
    with torch.no_grad():
        layer.proxy_weight.normal_(0, 0.3)
        layer.output_weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert layer._folded_into_standardization(x) is not None
    assert torch.autograd.gradcheck(layer, (x,))
    dy = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    folded, folded_grads = run_layer(layer, x, dy, fast_choice=None)
    monkeypatch.setattr(ProxyGroupNormAct, "_folded_into_standardization", lambda self, x: None)
    general, general_grads = run_layer(layer, x, dy, fast_choice=None)
    assert relative_difference(folded, general) < 1e-12
    assert all(relative_difference(a, b) < 1e-12 for a, b in zip(folded_grads, general_grads) if a is not None)
    monkeypatch.undo()
    with torch.no_grad():
        layer.output_weight[0] = -1.0
    assert layer._folded_into_standardization(x) is None


def test_a_proxy_converted_network_traces_with_torch_fx():
    model = ilmconvert.create_model("timm:resnet50_gn", pretrained=False).eval()
    report = ilmconvert.convert(model, method="proxy")
    traced = torch.fx.symbolic_trace(model)
    calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target.__name__ == "proxy_forward"]
    assert len(calls) == len(report.converted) == 33
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


class Untraceable(nn.Module):
    """Data-dependent control flow at the top (torch.fx cannot trace it); a traceable block below."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.gn = nn.GroupNorm(4, 16)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:  # a value decides the path: not traceable
            y = y * 2
        return self.act(self.gn(y))


def test_an_untraceable_network_still_pairs_inside_its_traceable_children():
    model = Untraceable().double()
    randomize(model, seed=10)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    before = model(x)
    report = ilmconvert.convert(model, method="proxy")
    assert [c.name for c in report.converted] == ["block.1"] and report.converted[0].absorbed == ["block.2"]
    assert [s.name for s in report.skipped] == ["gn"] and "cannot trace Untraceable" in report.skipped[0].reason
    assert relative_difference(model(x), before) <= 1e-10
