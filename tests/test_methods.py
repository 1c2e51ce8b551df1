"""The method registry (ilmconvert.methods), register() for every method, a toy method defined here,
and the library swap() with its preservation error."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

import ilmconvert
from ilmconvert import methods
from ilmconvert.methods import Method, NormAdapter
from ilmconvert.nn import ILMProxyGroupNormAct, ProxyGroupNormAct
from ilmconvert.nn.from_norm import FromNorm, group_norm_settings
from ilmconvert.swapping import PreservationError


class MyGroupNorm(nn.GroupNorm):
    """A user's GroupNorm class: no built-in mapping knows it."""


def _net(norm: type[nn.Module] = MyGroupNorm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), norm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), norm(2, 16), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def test_the_built_in_methods_and_what_the_package_generates_from_them():
    assert methods.names()[:4] == (methods.ILM, methods.PROXY, methods.ILM_PROXY, methods.NONE)
    assert methods.DEFAULT == methods.ILM and not methods.get_method(methods.NONE).converts
    from ilmconvert.cli.convert import MethodOpt
    from ilmconvert.train.recipes import ConversionSettings, RecipeError  # noqa: F401

    option = MethodOpt.__metadata__[0]
    assert option.metavar == "ilm|proxy|ilm+proxy|none" and "ilm+proxy: GN + activation pairs" in option.help
    assert ConversionSettings(method=methods.ILM_PROXY).method == methods.ILM_PROXY
    with pytest.raises(ValueError, match="'ilm', 'proxy', 'ilm\\+proxy', 'none'"):
        ConversionSettings(method="bn")
    from ilmconvert.cli.train import _conversion_label

    labels = [_conversion_label(ConversionSettings(method=m, init="paper")) for m in methods.names()[:4]]
    assert labels == ["ILM init=paper", "Proxy Norm init=paper", "ILM + Proxy Norm init=paper", "unconverted"]


@pytest.mark.parametrize(
    ("method", "target"), [(methods.PROXY, ProxyGroupNormAct), (methods.ILM_PROXY, ILMProxyGroupNormAct)]
)
def test_a_registered_user_class_converts_saves_and_loads_under_the_proxy_methods(method, target, tmp_path):
    with methods.isolated():
        with pytest.raises(ilmconvert.ConversionError, match="MyGroupNorm is not in the mapping"):
            ilmconvert.convert(_net(), method=method)
        adapter = ilmconvert.register(MyGroupNorm, "gn", method=method)  # target=None: the standard one
        assert adapter.target is target and adapter.needs_activation
        torch.manual_seed(0)
        model = _net().eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            before = model(x)
        report = ilmconvert.convert(model, method=method)
        assert [(c.name, c.target, c.activation, c.absorbed) for c in report.converted] == [
            ("1", target.__name__, "ReLU", ["2"]),
            ("4", target.__name__, "SiLU", ["5"]),
        ]
        assert type(model[2]) is nn.Identity and isinstance(model[1], target)
        with torch.no_grad():
            after = model(x)
        assert float((after - before).abs().max() / before.abs().max()) <= 1e-5  # preserve init, float32
        ilmconvert.save(model, tmp_path / "ck", source="torchvision:resnet18")
        loaded = ilmconvert.load(tmp_path / "ck", model=_net())
        with torch.no_grad():
            assert torch.equal(loaded(x), after)
    # the registration was undone: the user class is unknown again
    assert MyGroupNorm not in methods.mapping(method) and MyGroupNorm not in ilmconvert.default_mapping()


def test_register_needs_a_standard_target_or_one_given():
    with methods.isolated():
        with pytest.raises(ValueError, match="no standard target for kind 'in'"):
            ilmconvert.register(MyGroupNorm, "in", method=methods.PROXY)
        with pytest.raises(ValueError, match="converts nothing"):
            ilmconvert.register(MyGroupNorm, "gn", method=methods.NONE)
        with pytest.raises(ValueError, match="method must be one of"):
            ilmconvert.register(MyGroupNorm, "gn", method="batch")
        own = ilmconvert.register(MyGroupNorm, "gn", ProxyGroupNormAct, method=methods.PROXY, needs_activation=False)
        assert own == NormAdapter("gn", ProxyGroupNormAct)


class GainGroupNorm(FromNorm, nn.Module):
    """A toy target: ``GN(x) * (1 + gain)`` with a per-channel ``gain`` (0 at preserve init)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, num_channels, eps, device=device, dtype=dtype)
        self.gain = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        self.num_channels, self.num_norm_groups = num_channels, num_groups

    @classmethod
    def _settings_of(cls, norm: nn.Module, **layout: Any) -> dict[str, Any]:
        return group_norm_settings(norm, **layout)

    @torch.no_grad()
    def init_preserve(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        self.norm.weight.copy_(weight)
        self.norm.bias.copy_(bias)
        self.gain.zero_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.gain.fill_(1.0)  # the toy's from-scratch init doubles the output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + self.gain)[:, None, None]


TOY = Method(
    "toy-gain",
    label="Toy gain",
    title="a toy gain",
    description="GroupNorm times a learned per-channel gain (a test's toy method)",
    summary="GroupNorm times a learned gain",
    built_in=lambda: {nn.GroupNorm: NormAdapter("gn", GainGroupNorm)},
    standard={"gn": NormAdapter("gn", GainGroupNorm)},
    counterpart="toy gain counterpart (GroupNorm only)",
)


def test_a_toy_method_is_one_registration(tmp_path):
    with methods.isolated():
        methods.add_method(TOY)
        with pytest.raises(ValueError, match="already registered"):
            methods.add_method(TOY)
        torch.manual_seed(0)
        model = _net(nn.GroupNorm)
        model.insert(1, nn.LayerNorm([16, 8, 8]))  # known to ILM, not to the toy: skipped with its reason
        result = ilmconvert.swap(model, method="toy-gain", x=torch.randn(2, 3, 8, 8))  # checked: raises if not kept
        report = result.report
        assert result.preserved and result.difference.relative <= 1e-6 and report.settings["method"] == "toy-gain"
        assert [(c.name, c.target, c.channels, c.norm_groups, c.key_group_size) for c in report.converted] == [
            ("2", "GainGroupNorm", 16, 4, 0),
            ("5", "GainGroupNorm", 16, 2, 0),
        ]
        assert [s.reason for s in report.skipped] == ["LayerNorm has no toy gain counterpart (GroupNorm only)"]
        assert report.params_added == 32
        ilmconvert.save(model, tmp_path / "toy", source="torchvision:resnet18")
        card = (tmp_path / "toy" / "README.md").read_text()
        assert "with a toy gain" in card and "- method: `toy-gain`, GroupNorm times a learned" in card
        fresh = _net(nn.GroupNorm)
        fresh.insert(1, nn.LayerNorm([16, 8, 8]))
        loaded = ilmconvert.load(tmp_path / "toy", model=fresh)
        x = torch.randn(3, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(loaded(x), model.eval()(x))
    # gone with the isolation: the name is unknown, nothing leaks into other tests
    assert methods.find_method("toy-gain") is None
    with pytest.raises(ilmconvert.ConversionError, match="method must be one of .*; got 'toy-gain'"):
        ilmconvert.convert(_net(nn.GroupNorm), method="toy-gain")


def test_swap_raises_when_a_preserving_conversion_changes_the_function():
    with methods.isolated():
        broken = replace(TOY, name="toy-broken")
        methods.add_method(broken)
        with pytest.MonkeyPatch.context() as patch:  # a defect: preserve init doubles the output
            patch.setattr(GainGroupNorm, "init_preserve", lambda self, w, b: self.gain.data.fill_(1.0))
            with pytest.raises(PreservationError, match="does not compute what the original did") as caught:
                ilmconvert.swap(_net(nn.GroupNorm), method="toy-broken")
            result = caught.value.result
            assert not result.preserved and result.expected_to_preserve and caught.value.exit_code == 1
            assert result.difference.shape == (2, 3, 224, 224) and result.difference.relative > 0.1
            unchecked = ilmconvert.swap(_net(nn.GroupNorm), method="toy-broken", check=False)
            assert not unchecked.preserved
        # the paper init changes the function by design: measured, not raised
        paper = ilmconvert.swap(_net(nn.GroupNorm), method="toy-broken", init="paper", x=torch.randn(2, 3, 8, 8))
        assert not paper.expected_to_preserve and paper.why_changed == "init=paper"


def test_swap_builds_a_network_from_a_spec():
    x = torch.randn(1, 3, 32, 32)
    result = ilmconvert.swap("torchvision:resnet18", pretrained=False, num_classes=3, batchnorm="gn", x=x)
    assert result.why_changed == "BatchNorm was converted" and len(result.report.converted) == 20
    with pytest.raises(TypeError, match="apply to a model spec"):
        ilmconvert.swap(_net(nn.GroupNorm), num_classes=3)


def test_the_cli_swap_fails_with_exit_code_1_and_writes_nothing_when_the_check_fails(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ilmconvert import check, swapping
    from ilmconvert.cli import app

    def off_by_half(model, convert_fn, x=None):  # a defect stand-in: the outputs moved by half their scale
        report, diff = check.check_conversion(model, convert_fn, x)
        return report, check.OutputDifference(diff.max_abs + 1.0, 0.5, diff.shape, diff.dtype, True)

    monkeypatch.setattr(swapping, "check_conversion", off_by_half)
    out = tmp_path / "ck"
    result = CliRunner().invoke(app, ["swap", "convnext_atto", "--no-pretrained", "-q", "--out", str(out)])
    assert result.exit_code == 1
    assert "FAIL preservation check on a random batch 2x3x224x224 (float32)" in result.output
    assert "relative = 0.5 (target <= 1e-4)" in result.output
    assert not out.exists() or not any(out.iterdir())
