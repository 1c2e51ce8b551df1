"""Checkpoint format 2: the ILM ``weight`` reparametrization, version 1 reading, timm's Hub fields,
the model card, loading ``hf-hub:`` names from an offline Hub cache, and ``push`` (HfApi faked)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import ilmconvert
from helpers import randomize
from ilmconvert.cli import app
from ilmconvert.hub import HubError, parse_hub_spec
from ilmconvert.io import CheckpointError, upgrade_v1_state
from ilmconvert.models import ModelSource, sha256_of
from ilmconvert.nn import ILMGroupNorm

GN_SPEC = ("timm:resnet18", {"norm_layer": "groupnorm", "num_classes": 10})


def _gn_network() -> nn.Module:
    """timm's ResNet-18 with GroupNorm(32) norms, non-trivial norm affines, eval mode."""
    torch.manual_seed(0)
    model = ilmconvert.create_model(GN_SPEC[0], pretrained=False, **GN_SPEC[1])
    randomize(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def gn_checkpoint(tmp_path_factory):
    """(original network, its preserve-converted copy, checkpoint directory, input batch)."""
    original = _gn_network()
    converted = _gn_network()
    report = ilmconvert.convert(converted)
    assert len(report.converted) == 20 and isinstance(converted.bn1, ILMGroupNorm)
    directory = tmp_path_factory.mktemp("ck") / "resnet18-gn-ilm"
    ilmconvert.save(converted, directory)
    return original, converted, directory, torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """(converted convnext_atto with 10 classes, its checkpoint directory, input batch)."""
    torch.manual_seed(0)
    model = ilmconvert.create_model("timm:convnext_atto", pretrained=False, num_classes=10).eval()
    randomize(model, seed=2)
    ilmconvert.convert(model)
    directory = tmp_path_factory.mktemp("small") / "convnext-ilm"
    ilmconvert.save(model, directory)
    return model, directory, torch.randn(1, 3, 32, 32)


# ------------------------------------------------------------------ 1. the weight reparametrization
def test_plain_timm_model_loads_the_checkpoint_with_strict_false(gn_checkpoint):
    """The trap of format 1: a converted checkpoint loaded into the plain timm model with
    strict=False ran and was 50 % off. Now the norms' weights are the originals, bit for bit."""
    original, converted, directory, x = gn_checkpoint
    state = load_file(str(directory / "model.safetensors"))
    plain = timm.create_model("resnet18", pretrained=False, **GN_SPEC[1]).eval()
    result = plain.load_state_dict(state, strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(".encoder." in k or ".decoder_" in k for k in result.unexpected_keys)
    gn_weights = [k for k, m in original.named_modules() if isinstance(m, nn.GroupNorm)]
    assert len(gn_weights) == 20
    own = original.state_dict()
    for name in gn_weights:
        assert torch.equal(state[f"{name}.weight"], own[f"{name}.weight"]), name
        assert torch.equal(state[f"{name}.bias"], own[f"{name}.bias"]), name
    with torch.no_grad():
        expected = original(x)
        assert torch.equal(plain(x), expected)  # float32, bit for bit
        relative = ((converted(x) - expected).abs().max() / expected.abs().max()).item()
    # the converted network itself: the same function up to float32 rounding of the fused affine (§4)
    assert relative <= 1e-5


def test_weight_gradient_and_function_unchanged_by_the_reparametrization():
    """omega = up(D_gamma - 1/2) + weight is eq. 6 with B_omega = weight - 1/2: same outputs, and
    d omega / d weight = 1, so the gradient of weight is the one of B_omega (fast and reference)."""
    gn = nn.GroupNorm(2, 8)
    layer = ILMGroupNorm.from_norm(gn, init="paper", key_group_size=4).double()
    randomize(layer, seed=3)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    for fast in (False, "torch"):
        layer.fast = fast
        torch.autograd.gradcheck(
            lambda w, x=x: _with_weight(layer, w, x), (layer.weight.detach().clone().requires_grad_(),)
        )
    # the paper's from-scratch init: B_omega = 1 is weight = 1.5
    assert torch.equal(ILMGroupNorm.from_norm(gn, init="paper").weight, torch.full((8,), 1.5))


def _with_weight(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(layer, {"weight": weight}, (x,))


# ------------------------------------------------------------------ 2. reading format version 1
def _rewrite_as_v1(directory) -> None:
    """Give a v2 checkpoint the v1 layout: ILM weights stored as B_omega = weight - 1/2, version 1."""
    config = json.loads((directory / "config.json").read_text())
    state = load_file(str(directory / "model.safetensors"))
    ilm = {f"{row['name']}.weight" for row in config["conversion"]["converted"]}
    state = {k: (v - 0.5 if k in ilm else v).contiguous() for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "ilmconvert-checkpoint"})
    config["format_version"] = 1
    config["weights_sha256"] = sha256_of(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))


def test_version_1_checkpoint_is_read_with_half_added(gn_checkpoint, tmp_path):
    _, converted, directory, x = gn_checkpoint
    old = tmp_path / "v1"
    shutil.copytree(directory, old)
    _rewrite_as_v1(old)
    loaded = ilmconvert.load(old)
    expected = converted.state_dict()
    for key, value in loaded.state_dict().items():
        if key.endswith(".weight") and isinstance(loaded.get_submodule(key.rsplit(".", 1)[0]), ILMGroupNorm):
            torch.testing.assert_close(value, expected[key], rtol=0, atol=2**-23)  # w - 1/2 + 1/2
        else:
            assert torch.equal(value, expected[key]), key  # convs, head, ILM biases and W1..W3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="format version 1"):
        ilmconvert.push(old, "org/name")


def test_version_1_upgrade_touches_only_ilm_weights():
    from ilmconvert.nn.proxy import ProxyGroupNormAct

    shared = ILMGroupNorm(2, 8)
    model = nn.Sequential(shared, nn.Sequential(shared), ProxyGroupNormAct(2, 8), nn.GroupNorm(2, 8), nn.Linear(8, 8))
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    changed = upgrade_v1_state(model, state)
    assert changed == ["0.weight", "1.0.weight"]
    for key, value in state.items():
        assert torch.equal(value, torch.full_like(value, 0.5 if key in changed else 0.0)), key


# ------------------------------------------------------------------ 3. Hub fields and 4. the model card
def test_config_has_timm_hub_fields_and_the_card(gn_checkpoint):
    directory = gn_checkpoint[2]
    config = json.loads((directory / "config.json").read_text())
    assert config["format_version"] == 2 and config["format"] == "ilmconvert-checkpoint"
    assert (config["architecture"], config["num_classes"], config["num_features"]) == ("resnet18", 10, 512)
    assert config["global_pool"] == "avg" and config["defaulted"] == []
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 224, 224] and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.95
    assert cfg["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and cfg["num_classes"] == 10
    assert "label_names" not in config and "license" not in cfg  # random weights: no labels, no license
    card = (directory / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "ilmconvert" and {"ilm-norm", "timm", "image-classification"} <= set(front["tags"])
    assert "base_model" not in front and "license" not in front
    assert "20 x `GroupNorm` -> `ILMGroupNorm`" in card and 'ilmconvert.load("hf-hub:ORG/NAME")' in card


def test_pretrained_source_gives_base_model_license_and_imagenet_labels(tmp_path):
    model = ilmconvert.create_model("timm:convnext_atto", pretrained=False)
    ilmconvert.convert(model)
    source = ModelSource("timm", "convnext_atto", pretrained_tag="d2_in1k", kwargs={"num_classes": 1000})
    metadata = {"epoch": 3, "epochs": 3, "top1": 71.25, "top5": 90.5, "recipe": "cifar10-ilm", "data": {"name": "x"}}
    ilmconvert.save(model, tmp_path / "ck", source=source, metadata=metadata)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["base_model"] == "timm/convnext_atto.d2_in1k" and config["pretrained_cfg"]["license"] == "apache-2.0"
    assert len(config["label_names"]) == 1000 and config["label_names"][0] == "n01440764"
    assert config["pretrained_cfg"]["crop_pct"] == 0.875 and config["pretrained_cfg"]["interpolation"] == "bicubic"
    card = (tmp_path / "ck" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "timm/convnext_atto.d2_in1k" and front["license"] == "apache-2.0"
    assert "## Fine-tuning" in card and "top-1 (%): 71.25" in card and "recipe: cifar10-ilm" in card
    # overrides, and names of the wrong length refused before anything is written
    ilmconvert.save(
        model, tmp_path / "ck2", label_names=[f"c{i}" for i in range(1000)], pretrained_cfg={"crop_pct": 1.0}
    )
    config = json.loads((tmp_path / "ck2" / "config.json").read_text())
    assert config["label_names"][:2] == ["c0", "c1"] and config["pretrained_cfg"]["crop_pct"] == 1.0
    with pytest.raises(CheckpointError, match="label_names has 2 names but the network predicts 1000"):
        ilmconvert.save(model, tmp_path / "ck3", label_names=["a", "b"])
    assert not (tmp_path / "ck3").exists()


def test_torchvision_fields_from_weights_meta_or_flagged_defaults(tmp_path):
    model = ilmconvert.create_model("torchvision:mobilenet_v3_small", pretrained=False)
    ilmconvert.convert(model, batchnorm="gn")
    ilmconvert.save(model, tmp_path / "fresh")
    config = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert config["num_features"] == 1024 and "global_pool" not in config and "label_names" not in config
    assert "pretrained_cfg.mean" in config["defaulted"] and config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert "(default, not known for these weights)" in (tmp_path / "fresh" / "README.md").read_text()
    source = ModelSource("torchvision", "mobilenet_v3_small", pretrained_tag="default", kwargs={})
    ilmconvert.save(model, tmp_path / "weights", source=source)
    config = json.loads((tmp_path / "weights" / "config.json").read_text())
    assert config["defaulted"] == [] and config["label_names"][0] == "tench"
    assert config["pretrained_cfg"]["interpolation"] == "bilinear" and config["pretrained_cfg"]["crop_pct"] == 0.875


# ------------------------------------------------------------------ 5. hf-hub: names, offline
def _fake_cache(root, repo_id: str, snapshots: dict[str, object], refs: dict[str, str]) -> None:
    """A Hub cache as huggingface_hub lays it out: ``models--ORG--NAME/{refs,snapshots}``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    for sha, directory in snapshots.items():
        shutil.copytree(directory, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    for ref, sha in refs.items():
        (repo / "refs" / ref).write_text(sha)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_load_from_an_offline_hub_cache_with_and_without_revision(small_checkpoint, offline_cache, tmp_path):
    converted, directory, x = small_checkpoint
    other = ilmconvert.load(directory)
    with torch.no_grad():
        other.head.fc.weight.mul_(-1)
    ilmconvert.save(other, tmp_path / "other")
    main_sha, old_sha = "a" * 40, "b" * 40
    _fake_cache(
        offline_cache, "org/name", {main_sha: directory, old_sha: tmp_path / "other"}, {"main": main_sha, "v1": old_sha}
    )
    with torch.no_grad():
        assert torch.equal(ilmconvert.load("hf-hub:org/name")(x), converted(x))
        assert torch.equal(ilmconvert.load(f"hf-hub:org/name@{old_sha}")(x), other(x))
        assert torch.equal(ilmconvert.load("hf-hub:org/name@v1")(x), other(x))
    with pytest.raises(HubError, match=r"^HF_HUB_OFFLINE=1 is set and org/missing@dev is not in the Hub cache .*unset"):
        ilmconvert.load("hf-hub:org/missing@dev")
    with pytest.raises(HubError, match="is not a Hub model name"):
        ilmconvert.load("hf-hub:no-org")


def test_parse_hub_spec():
    assert parse_hub_spec("hf-hub:timm/resnet50.a1_in1k") == ("timm/resnet50.a1_in1k", None)
    assert parse_hub_spec("hf-hub:org/name@v2") == ("org/name", "v2")
    for bad in ("hf-hub:org/name@", "hf-hub:a/b/c", "hf-hub:org/name@x@y"):
        with pytest.raises(HubError):
            parse_hub_spec(bad)


# ------------------------------------------------------------------ push, HfApi faked
class FakeApi:
    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, **kwargs):
        if FakeApi.fail is not None:
            raise FakeApi.fail
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/123"})()


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr("ilmconvert.online.hub_unreachable", lambda: None)  # the fake Hub answers
    FakeApi.calls, FakeApi.fail = [], None
    return FakeApi


def test_push_creates_the_repo_and_branch_and_uploads_the_checkpoint_files(small_checkpoint, fake_hub, tmp_path):
    directory = tmp_path / "ck"
    shutil.copytree(small_checkpoint[1], directory)
    (directory / "trainer_state.pt").write_bytes(b"")
    url = ilmconvert.push(directory, "org/name", private=True, revision="dev")
    assert url == "https://huggingface.co/org/name/commit/123"
    (_, repo, create), (_, _, branch), (_, upload) = fake_hub.calls
    assert repo == "org/name" and create == {"private": True, "repo_type": "model", "exist_ok": True}
    assert branch == {"branch": "dev", "repo_type": "model", "exist_ok": True}
    assert upload["folder_path"] == str(directory) and upload["revision"] == "dev"
    assert sorted(upload["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]
    assert 'ilmconvert.load("hf-hub:org/name")' in (directory / "README.md").read_text()
    # the command line: thin over push
    fake_hub.calls = []
    result = CliRunner().invoke(app, ["push", str(directory), "org/name", "--branch", "main"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]  # main exists: no branch


def test_push_errors_are_one_line(small_checkpoint, fake_hub, monkeypatch, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    fake_hub.fail = LocalTokenNotFoundError("Token is required")
    with pytest.raises(
        HubError, match=r"^not logged in to the Hub, so org/name cannot be written: run `hf auth login`"
    ):
        ilmconvert.push(small_checkpoint[1], "org/name")
    result = CliRunner().invoke(app, ["push", str(small_checkpoint[1]), "org/name"])
    assert result.exit_code == 2 and "error: not logged in to the Hub" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set, so nothing can be pushed"):
        ilmconvert.push(small_checkpoint[1], "org/name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ilmconvert.push(tmp_path / "empty", "org/name")
