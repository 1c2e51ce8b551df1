"""The conversion API in the style of torch.ao.quantization: mappings, swap_module, never half-converted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ilmconvert
from ilmconvert import NormAdapter, default_mapping, swap_module
from ilmconvert.nn import ILMGroupNorm


class MyGroupNorm(nn.GroupNorm):
    """A GroupNorm subclass the default mapping deliberately does not know."""


def _net() -> nn.Sequential:
    norms = [nn.GroupNorm(4, 32), MyGroupNorm(8, 32), nn.GroupNorm(2, 32), nn.LayerNorm(7), nn.GroupNorm(4, 32)]
    return nn.Sequential(nn.Conv2d(3, 32, 1), *norms)


def test_default_mapping_is_a_fresh_copy():
    first = default_mapping()
    assert first[nn.GroupNorm].target is ILMGroupNorm and first[nn.BatchNorm2d].kind == "bn"
    first[MyGroupNorm] = NormAdapter("gn", ILMGroupNorm)
    del first[nn.GroupNorm]
    second = default_mapping()
    assert MyGroupNorm not in second and nn.GroupNorm in second and second is not first


def test_a_user_mapping_converts_more_or_less_without_global_state():
    mapping = default_mapping()
    mapping[MyGroupNorm] = NormAdapter("gn", ILMGroupNorm)
    del mapping[nn.LayerNorm]
    model = _net()
    report = ilmconvert.convert(model, mapping)
    assert [c.name for c in report.converted] == ["1", "2", "3", "5"]
    assert [s.name for s in report.skipped] == ["4"] and "not in the mapping" in report.skipped[0].reason
    assert isinstance(model[2], ILMGroupNorm) and model[2].num_groups == 8 and type(model[4]) is nn.LayerNorm
    # the default mapping did not change: a plain convert skips MyGroupNorm and converts LayerNorm
    other = _net()
    report = ilmconvert.convert(other)
    assert [c.name for c in report.converted] == ["1", "3", "4", "5"] and type(other[2]) is MyGroupNorm


class PlainGroupNorm(nn.Module):
    """A group norm that is no torch norm subclass: only a mapping entry makes it a candidate."""

    def __init__(self, num_groups: int, num_channels: int) -> None:
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, 1e-5
        self.weight = nn.Parameter(torch.rand(num_channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(num_channels))

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def test_any_class_in_the_mapping_is_a_candidate():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), PlainGroupNorm(4, 32)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    before = model(x)
    with pytest.raises(ilmconvert.ConversionError, match="has no GroupNorm"):
        ilmconvert.convert(model)  # not a candidate for the default mapping
    report = ilmconvert.convert(model, {PlainGroupNorm: NormAdapter("gn", ILMGroupNorm)})
    assert [c.name for c in report.converted] == ["1"] and isinstance(model[1], ILMGroupNorm)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)


def test_register_adds_to_the_default_mapping(isolated_registry):
    ilmconvert.register(MyGroupNorm, "gn", ILMGroupNorm)
    assert default_mapping()[MyGroupNorm] == NormAdapter("gn", ILMGroupNorm)
    assert [c.name for c in ilmconvert.convert(_net()).converted] == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match="kind must be one of"):
        ilmconvert.register(MyGroupNorm, "xx", ILMGroupNorm)
    with pytest.raises(ValueError, match="no from_norm"):
        NormAdapter("gn", nn.ReLU)


class FailsOnThird(ILMGroupNorm):
    """An adapter target whose from_norm raises on the third module it builds."""

    calls = 0

    @classmethod
    def from_norm(cls, norm, **kwargs):
        FailsOnThird.calls += 1
        if FailsOnThird.calls == 3:
            raise RuntimeError("injected failure while building the third replacement")
        return super().from_norm(norm, **kwargs)


def test_a_failure_while_building_leaves_the_model_exactly_as_it_was():
    model = nn.Sequential(*[nn.GroupNorm(4, 32) for _ in range(5)])
    modules = list(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters()]
    mapping = {nn.GroupNorm: NormAdapter("gn", FailsOnThird)}
    FailsOnThird.calls = 0
    with pytest.raises(RuntimeError, match="injected failure"):
        ilmconvert.convert(model, mapping)
    assert FailsOnThird.calls == 3
    assert all(a is b for a, b in zip(model, modules)) and len(model) == 5  # same module objects
    assert all(a is b for a, b in zip(model.parameters(), params))  # same parameter objects
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # same values
    assert not hasattr(model, "ilm_conversion")
    FailsOnThird.calls = 0
    ilmconvert.convert(model, {nn.GroupNorm: NormAdapter("gn", FailsOnThird)}, include=["0", "1"])
    assert [type(m) for m in model] == [FailsOnThird, FailsOnThird, nn.GroupNorm, nn.GroupNorm, nn.GroupNorm]


def test_swap_module_builds_without_touching_the_parent():
    parent = nn.Sequential(nn.GroupNorm(4, 32, dtype=torch.float64)).eval()
    norm = parent[0]
    pre, post = [], []
    norm.register_forward_pre_hook(lambda m, args: pre.append(1))
    norm.register_forward_hook(lambda m, args, kwargs, out: post.append(out.shape), with_kwargs=True)
    new, row = swap_module(norm, default_mapping()[nn.GroupNorm], key_group_size=16, name="0")
    assert parent[0] is norm  # the caller assigns
    assert isinstance(new, ILMGroupNorm) and not new.training and new.weight.dtype == torch.float64
    assert (row.name, row.target, row.channels, row.num_key_groups) == ("0", "ILMGroupNorm", 32, 2)
    assert row.params_added == 3 * 2 * 2  # W1, W2, W3 with N = 2, M = 2
    x = torch.randn(2, 32, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(new(x), norm(x), rtol=0, atol=1e-12)
    assert pre == [1, 1] and post == [x.shape, x.shape]
