"""Checkpoints: save -> load round trips bit for bit; bad files give one-line errors; writes are atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import ilmconvert
from ilmconvert.io import CheckpointError
from ilmconvert.models import ModelSourceError


def _converted(spec: str = "timm:convnext_atto", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = ilmconvert.create_model(spec, pretrained=False, **kwargs)
    ilmconvert.convert(model)
    with torch.no_grad():  # make the ILM parameters non-trivial, as after training
        for m in model.modules():
            if isinstance(m, ilmconvert.nn.ILMNorm):
                m.decoder_mu.weight.normal_()
                m.decoder_gamma.weight.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, nn.Module, torch.Tensor, torch.Tensor]:
    model = _converted(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    directory = tmp_path_factory.mktemp("ckpt") / "convnext_atto-ilm"
    ilmconvert.save(model, directory)
    return directory, model, x, y


def test_round_trip_is_bit_exact(saved):
    directory, _, x, y = saved
    loaded = ilmconvert.load(directory)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert not loaded.training
    assert loaded.ilm_source.architecture == "convnext_atto" and loaded.ilm_source.kwargs == {"num_classes": 10}


def test_config_records_source_conversion_and_versions(saved):
    directory = saved[0]
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["source"]["library"] == "timm" and config["source"]["architecture"] == "convnext_atto"
    assert config["conversion"]["settings"]["key_group_size"] == 16
    assert len(config["conversion"]["converted"]) == 17
    assert set(config["versions"]) == {"ilmconvert", "torch", "torchvision", "timm"}
    assert len(config["weights_sha256"]) == 64


def test_torchvision_model_and_adaptations_round_trip(tmp_path):
    model = ilmconvert.create_model("torchvision:resnet18", pretrained=False, num_classes=10, norm_layer=None)
    ilmconvert.models.adapt(model, "cifar_stem")
    ilmconvert.convert(model, batchnorm="gn")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    ilmconvert.save(model, tmp_path / "ck")
    loaded = ilmconvert.load(tmp_path / "ck")
    assert loaded.conv1.kernel_size == (3, 3) and isinstance(loaded.maxpool, nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_module_versions_are_restored_on_load(tmp_path):
    """torchvision's MNASNet refuses a state dict without its module version (``_metadata``), which
    safetensors does not store: load gives it the freshly built network's."""
    model = ilmconvert.create_model("torchvision:mnasnet0_5", pretrained=False, num_classes=3).eval()
    ilmconvert.convert(model, batchnorm="gn")
    ilmconvert.save(model, tmp_path / "ck")
    loaded = ilmconvert.load(tmp_path / "ck")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_model_converted_from_python_needs_a_source(tmp_path):
    model = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
    ilmconvert.convert(model)
    with pytest.raises(CheckpointError, match="pass source="):
        ilmconvert.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # a spec is enough to record it; an architecture built with a callable loads into a given instance
    ilmconvert.save(model, tmp_path / "a", source="torchvision:resnet18")
    fresh = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
    loaded = ilmconvert.load(tmp_path / "a", model=fresh)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_timm_model_from_python_is_described_by_its_pretrained_cfg(tmp_path):
    import timm

    model = timm.create_model("resnet50_gn", pretrained=False, num_classes=7)
    ilmconvert.convert(model)
    ilmconvert.save(model, tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["source"]["architecture"] == "resnet50_gn" and config["source"]["kwargs"] == {"num_classes": 7}
    assert ilmconvert.load(tmp_path / "r").fc.out_features == 7


def test_save_requires_a_converted_model_and_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="has not been converted"):
        ilmconvert.save(nn.Linear(2, 2), tmp_path / "x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not an ilmconvert checkpoint"):
        ilmconvert.save(_converted(), other)
    assert (other / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_checkpoint_and_leaves_no_temporaries(saved, tmp_path):
    directory = tmp_path / "ck"
    model = _converted()
    ilmconvert.save(model, directory)
    first = (directory / "config.json").read_text()
    with torch.no_grad():
        model.head.fc.weight.add_(1)
    ilmconvert.save(model, directory)
    assert (directory / "config.json").read_text() != first
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(ilmconvert.load(directory)(x), model(x))


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "ck"
    model = _converted()
    ilmconvert.save(model, directory)
    before = (directory / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ilmconvert.io._fsync_dir_files", crash)
    with pytest.raises(CheckpointError, match="No space left on device"):
        ilmconvert.save(model, directory)
    assert (directory / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_reported(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        ilmconvert.load(bad)
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read"):
        ilmconvert.load(bad, verify=False)


def test_corrupt_config_is_reported(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is unreadable or not valid JSON"):
        ilmconvert.load(bad)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        ilmconvert.load(bad)
    with pytest.raises(CheckpointError, match="is not a directory"):
        ilmconvert.load(tmp_path / "nowhere")


def test_mismatching_weights_are_reported(saved, tmp_path):
    bad = _copy(saved[0], tmp_path / "bad")
    save_file({"weight": torch.zeros(3)}, str(bad / "model.safetensors"))
    config = json.loads((bad / "config.json").read_text())
    config["weights_sha256"] = ilmconvert.models.sha256_of(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match timm:convnext_atto: \d+ missing key\(s\)") as info:
        ilmconvert.load(bad)
    assert "\n" not in str(info.value)


def test_weights_file_and_class_resize(tmp_path):
    import timm

    src = timm.create_model("resnet50_gn", pretrained=False)
    weights = tmp_path / "r50gn.safetensors"
    save_file(src.state_dict(), str(weights))
    model = ilmconvert.create_model("timm:resnet50_gn", weights=weights, num_classes=10)
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight, rtol=0, atol=0)
    assert model.ilm_source.weights_sha256 == ilmconvert.models.sha256_of(weights)
    tuned = timm.create_model("resnet50_gn", pretrained=False, num_classes=10)  # a fine-tuned head is kept
    save_file(tuned.state_dict(), str(tmp_path / "tuned.safetensors"))
    model = ilmconvert.create_model("timm:resnet50_gn", weights=tmp_path / "tuned.safetensors", num_classes=10)
    assert torch.equal(model.fc.weight, tuned.fc.weight) and model.ilm_source.kwargs == {"num_classes": 10}
    torch.save({"state_dict": src.state_dict()}, tmp_path / "r.pth")
    ilmconvert.create_model("timm:resnet50_gn", weights=tmp_path / "r.pth")
    with pytest.raises(ModelSourceError, match="does not fit timm:resnet18"):
        ilmconvert.create_model("timm:resnet18", weights=weights)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ModelSourceError, match="cannot read weights file"):
        ilmconvert.create_model("timm:resnet50_gn", weights=tmp_path / "junk.pth")


def test_model_names_and_offline_pretrained(monkeypatch):
    with pytest.raises(ModelSourceError, match="did you mean resnet50_gn"):
        ilmconvert.create_model("resnet50gn", pretrained=False)
    with pytest.raises(ModelSourceError, match="unknown model library"):
        ilmconvert.create_model("keras:resnet50")
    with pytest.raises(ModelSourceError, match="--weights FILE .* or --no-pretrained"):
        ilmconvert.create_model("timm:convnext_atto")


def test_preprocessing_follows_the_pretrained_weights():
    from ilmconvert.models import ModelSource, build, preprocessing

    def of(library, arch, tag=None, adaptations=()):
        return preprocessing(
            build(ModelSource(library, arch, pretrained_tag=tag, adaptations=list(adaptations)), device="meta")
        )

    # timm's pretrained_cfg of the recorded tag: 384 px, mean = std = 0.5 for this AugReg ViT
    assert of("timm", "vit_base_patch16_384", "augreg_in21k_ft_in1k") == {
        "image_size": 384,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    assert of("timm", "convnext_base", "fb_in22k_ft_in1k_384")["image_size"] == 384
    assert of("timm", "convnext_base")["image_size"] == 224
    # torchvision's weights transforms: SWAG ViT-H/14 is evaluated at 518 px; no weights: ImageNet at 224
    assert of("torchvision", "vit_h_14", "IMAGENET1K_SWAG_E2E_V1")["image_size"] == 518
    assert of("torchvision", "resnet50") == {
        "image_size": 224,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    # a CIFAR stem no longer takes the pretrained input: the recipe defaults apply
    assert of("torchvision", "resnet50", "default", ["cifar_stem"]) is None


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path, monkeypatch):
    """Replacing a checkpoint moves the old one aside, then the new one in; a kill in between
    leaves only `.NAME.old-*`, which recover_checkpoint puts back (resume calls it)."""
    from ilmconvert import io

    model = _converted("timm:test_convnext")
    ilmconvert.save(model, tmp_path / "last")
    real_replace = os.replace
    calls = []

    def killed_after_the_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        ilmconvert.save(model, tmp_path / "last")
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not (tmp_path / "last").exists() and len(list(tmp_path.glob(".last.old-*"))) == 1
    assert io.recover_checkpoint(tmp_path / "last") and io.is_checkpoint(tmp_path / "last")
    assert not io.recover_checkpoint(tmp_path / "last")  # nothing to do any more
    ilmconvert.load(tmp_path / "last")
