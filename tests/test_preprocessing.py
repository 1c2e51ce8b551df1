"""One preprocessing for a network: eval, export and config.json agree; finetune trains a
checkpoint at its own input size unless the recipe or --input-size says otherwise (issues 17, 21)."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from typer.testing import CliRunner

import ilmconvert
from helpers import TINY_MODEL, TINY_RECIPE, make_image_folder, tiny_converted_network
from ilmconvert.cli import app
from ilmconvert.exporting import preprocessing as export_preprocessing
from ilmconvert.io import load, read_config
from ilmconvert.models import ModelSource
from ilmconvert.preprocessing import IMAGENET_DEFAULTS
from ilmconvert.train.evaluation import checkpoint_settings
from ilmconvert.train.recipes import DataSettings, parse_recipe

runner = CliRunner()
KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


def _eval_view(settings: DataSettings) -> dict:
    """What eval does to a test image, in pretrained_cfg terms: the ``cifar`` pipeline resizes the
    shorter side to image_size (torchvision's bilinear resize) and center-crops it; the ``timm``
    pipeline resizes to image_size / crop_pct with its interpolation and center-crops."""
    timm_pipeline = settings.pipeline == "timm"
    return {
        "input_size": [3, settings.image_size, settings.image_size],
        "mean": list(settings.mean),
        "std": list(settings.std),
        "interpolation": settings.interpolation if timm_pipeline else "bilinear",
        "crop_pct": settings.crop_pct if timm_pipeline else 1.0,
    }


def _three_views(folder):
    config = read_config(folder)
    model = load(folder)
    written = {k: config["pretrained_cfg"][k] for k in KEYS}
    exported = {k: v for k, v in export_preprocessing(model, config["pretrained_cfg"]).items() if k in KEYS}
    evaluated = _eval_view(checkpoint_settings(folder, model, config))
    return written, exported, evaluated


def test_imagenet_defaults_are_timms():
    assert IMAGENET_DEFAULTS["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert IMAGENET_DEFAULTS["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert IMAGENET_DEFAULTS["crop_pct"] == timm.data.DEFAULT_CROP_PCT
    unknown = timm.data.resolve_data_config({}, pretrained_cfg={"num_classes": 1})  # nothing known: timm's defaults
    assert IMAGENET_DEFAULTS["interpolation"] == unknown["interpolation"] == "bicubic"
    assert tuple(unknown["input_size"]) == IMAGENET_DEFAULTS["input_size"]


def test_eval_export_and_config_json_agree_for_a_timm_network(tmp_path):
    model = ilmconvert.create_model("timm:convnext_atto", pretrained=False, num_classes=10)
    ilmconvert.convert(model)
    ilmconvert.save(model, tmp_path / "ck")
    written, exported, evaluated = _three_views(tmp_path / "ck")
    assert written == exported == evaluated
    reference = timm.data.resolve_data_config({}, model=model)  # timm's own answer for this network
    assert written["crop_pct"] == reference["crop_pct"] and written["interpolation"] == reference["interpolation"]
    assert written["input_size"] == list(reference["input_size"])


@pytest.mark.parametrize("tag", [None, "IMAGENET1K_V1"])
def test_eval_export_and_config_json_agree_for_a_torchvision_network(tmp_path, tag):
    import torchvision

    model = ilmconvert.create_model("torchvision:mobilenet_v3_small", pretrained=False, num_classes=1000)
    ilmconvert.convert(model, batchnorm="gn")
    source = ModelSource("torchvision", "mobilenet_v3_small", pretrained_tag=tag, kwargs={"num_classes": 1000})
    ilmconvert.save(model, tmp_path / "ck", source=source)
    written, exported, evaluated = _three_views(tmp_path / "ck")
    assert written == exported == evaluated
    if tag is None:  # no weights: timm's ImageNet defaults, bicubic like timm
        assert written["interpolation"] == "bicubic" and written["crop_pct"] == 0.875
    else:  # the weights' transforms: resize 256, crop 224, bilinear
        transform = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.transforms()
        assert written["input_size"] == [3, transform.crop_size[0], transform.crop_size[0]]
        assert written["crop_pct"] == pytest.approx(transform.crop_size[0] / transform.resize_size[0], abs=1e-4)
        assert written["interpolation"] == "bilinear"


@pytest.mark.parametrize("pipeline", ["cifar", "timm"])
def test_eval_export_and_config_json_agree_for_a_fine_tuned_checkpoint(tmp_path, pipeline):
    model = tiny_converted_network(num_classes=3)
    extra = {"crop_pct": 0.9, "interpolation": "bicubic"} if pipeline == "timm" else {}
    settings = DataSettings(image_size=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), pipeline=pipeline, **extra)
    data = {"name": "tiny", "classes": ["a", "b", "c"], "settings": settings.model_dump(mode="json")}
    ilmconvert.save(model, tmp_path / "ck", metadata={"data": data})
    written, exported, evaluated = _three_views(tmp_path / "ck")
    assert written == exported == evaluated
    assert written["input_size"] == [3, 40, 40] and written["mean"] == [0.5, 0.4, 0.3]
    assert read_config(tmp_path / "ck")["label_names"] == ["a", "b", "c"]


# ------------------------------------------------------------------ finetune: the checkpoint's own input size
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tiny"), n_train=8, n_test=4)


@pytest.fixture(scope="module")
def recorded_40(tmp_path_factory):
    """A checkpoint fine-tuned (on record) at 40 px with its own mean / std; the recipe says nothing (32)."""
    folder = tmp_path_factory.mktemp("ck") / "ck"
    settings = DataSettings(image_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    data = {"name": "tiny", "classes": ["checker", "horizontal", "vertical"], "settings": settings.model_dump()}
    ilmconvert.save(tiny_converted_network(num_classes=3), folder, metadata={"data": data})
    return folder


def _finetune(tmp_path, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "tiny.yaml"
    if not recipe.exists():
        recipe.write_text(TINY_RECIPE)
    run = tmp_path / "run"
    args = ["finetune", *map(str, args), "--recipe", str(recipe), "--out", str(run), "--epochs", "1", "--device", "cpu"]
    result = runner.invoke(app, args, terminal_width=400)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps the first line at the console's width
    first = text[: text.index("epoch 1/1")]  # what is said before training starts: the first print
    return first, parse_recipe((run / "recipe.yaml").read_text(), "run").data


def test_finetune_trains_a_checkpoint_at_its_own_input_size(tiny_data, recorded_40, tmp_path):
    first, data = _finetune(tmp_path, recorded_40, "--data", tiny_data)
    assert data.image_size == 40 and data.mean == (0.5, 0.5, 0.5) and data.std == (0.25, 0.25, 0.25)
    assert re.search(r"input 40 px, mean \(0\.5, 0\.5, 0\.5\) std \(0\.25, 0\.25, 0\.25\) from the checkpoint", first)


def test_input_size_and_the_recipe_override_the_checkpoints_size(tiny_data, recorded_40, tmp_path):
    first, data = _finetune(tmp_path / "a", recorded_40, "--data", tiny_data, "--input-size", "24")
    assert data.image_size == 24 and data.mean == (0.5, 0.5, 0.5)  # the size only: normalization stays the checkpoint's
    assert "input 24 px from --input-size, mean (0.5, 0.5, 0.5) std (0.25, 0.25, 0.25) from the checkpoint" in first
    first, data = _finetune(tmp_path / "b", recorded_40, "--data", tiny_data, "--set", "data.image_size=32")
    assert data.image_size == 32 and "input 32 px from the recipe" in first


def test_an_untrained_network_keeps_the_recipe_defaults(tiny_data, tmp_path):
    ilmconvert.save(tiny_converted_network(num_classes=3), tmp_path / "random")
    first, data = _finetune(tmp_path, tmp_path / "random", "--data", tiny_data)
    assert data.image_size == 32 and data.mean == DataSettings().mean  # CIFAR-10's statistics at 32 px
    assert "input 32 px" in first and "from the recipe defaults" in first


def test_a_checkpoint_of_224_px_pretrained_weights_is_prepared_at_224(tiny_data, tmp_path):
    from ilmconvert.train.run import prepare_finetune

    source = ModelSource("timm", "resnet18", pretrained_tag="a1_in1k", kwargs={**TINY_MODEL, "num_classes": 3})
    ilmconvert.save(tiny_converted_network(num_classes=3), tmp_path / "pre", source=source)
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    plan = prepare_finetune(
        data=str(tiny_data), run=tmp_path / "run", checkpoint=tmp_path / "pre", recipe=str(tmp_path / "r.yaml"),
        device="cpu",
    )
    plan.release()
    assert plan.recipe.data.image_size == 224 and plan.train[0][0].shape == torch.Size([3, 224, 224])
    assert plan.recipe.data.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert "input 224 px" in plan.input_note
