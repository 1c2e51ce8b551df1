"""``method="none"``: the unconverted baseline goes through the same convert / save / load / finetune
code as a converted network, and changes nothing in it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ilmconvert
from helpers import TINY_MODEL, TINY_RECIPE, make_image_folder
from ilmconvert.train import recipes as R


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ilmconvert.create_model("timm:resnet18", pretrained=False, num_classes=3, **TINY_MODEL)


def test_method_none_replaces_nothing_and_round_trips(tmp_path):
    network = _tiny()
    modules = dict(network.named_modules())
    report = ilmconvert.convert(network, method="none")
    assert report.converted == [] and report.settings["method"] == "none"
    assert report.params_after == report.params_before
    assert all(modules[name] is m for name, m in network.named_modules())  # the same module objects
    norms = sum(isinstance(m, nn.GroupNorm) for m in network.modules())
    assert norms > 0
    ilmconvert.save(network, tmp_path / "baseline")
    loaded = ilmconvert.load(tmp_path / "baseline")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), network.eval()(x))
    assert sum(isinstance(m, nn.GroupNorm) for m in loaded.modules()) == norms


def test_method_override_is_validated():
    recipe = R.parse_recipe(TINY_RECIPE, "tiny", "tiny")
    assert recipe.with_overrides(method="none").conversion.method == "none"
    assert recipe.conversion.method == "ilm"
    with pytest.raises(R.RecipeError, match="conversion.method"):
        recipe.with_overrides(method="bn")


def test_finetune_method_none_trains_the_unconverted_network(tmp_path):
    from ilmconvert.nn import ILMNorm
    from ilmconvert.train.run import RunError, prepare_finetune, run_finetune

    data = make_image_folder(tmp_path / "data", n_train=16, n_test=4)
    (tmp_path / "r.yaml").write_text(TINY_RECIPE.replace("epochs: 2", "epochs: 1"))
    plan = prepare_finetune(
        data=str(data), run=tmp_path / "run", recipe=str(tmp_path / "r.yaml"), method="none", device="cpu"
    )
    before = {k: v.clone() for k, v in plan.network.state_dict().items()}
    run_finetune(plan)
    trained = ilmconvert.load(tmp_path / "run" / "last")
    assert not any(isinstance(m, ILMNorm) for m in trained.modules())
    assert trained.ilm_conversion.settings["method"] == "none"
    assert not torch.equal(trained.state_dict()["conv1.weight"], before["conv1.weight"])  # it trained
    assert "method: none" in (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(RunError, match="--method applies to the recipe's network"):
        prepare_finetune(
            data=str(data), run=tmp_path / "run2", checkpoint=tmp_path / "run" / "last", method="ilm", device="cpu"
        )
