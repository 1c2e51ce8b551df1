"""Library tests for ilmconvert.train: recipes, data, loop pieces, and a short real CIFAR-10 fine-tune."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_RECIPE, make_image_folder
from ilmconvert.errors import IlmconvertError
from ilmconvert.models import adapt, create_model
from ilmconvert.train import data as D
from ilmconvert.train import loader as LD
from ilmconvert.train import loop as L
from ilmconvert.train import recipes as R


# ------------------------------------------------------------------------------------------ recipes
def test_bundled_recipes_come_from_package_resources():
    files = {p.name for p in resources.files("ilmconvert.recipes").iterdir()}
    assert {"cifar10.yaml", "cifar10-smoke.yaml"} <= files
    names = [r.name for r in R.list_recipes()]
    assert names == sorted(names) and {"cifar10", "cifar10-smoke"} <= set(names)


def test_cifar10_recipe_is_the_papers_setup():
    recipe = R.load_recipe("cifar10")
    assert recipe.model.name == "timm:resnet50_gn" and recipe.model.pretrained is False
    assert recipe.model.adaptations == ["cifar_stem"]
    assert recipe.conversion.init == "paper" and recipe.conversion.key_group_size == 16
    assert (recipe.train.momentum, recipe.train.weight_decay, recipe.train.lr) == (0.9, 5e-4, 0.1)
    assert recipe.train.epochs >= 100 and recipe.data.augment == "cifar"


def test_smoke_recipe_is_small_and_not_pretrained():
    recipe = R.load_recipe("cifar10-smoke")
    assert recipe.model.pretrained is False
    assert recipe.train.cpu_threads == 1
    network = L.build_network(recipe.model, recipe.conversion, 10)
    assert sum(p.numel() for p in network.parameters()) < 3_000_000
    assert len(network.ilm_conversion.converted) > 0


def test_bad_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_RECIPE.replace("lr: 0.05", "lrr: 0.05"))
    with pytest.raises(R.RecipeError) as info:
        R.load_recipe(path)
    message = str(info.value)
    assert "train.lrr" in message and str(path) in message and "\n" not in message
    assert isinstance(info.value, IlmconvertError)


@pytest.mark.parametrize(
    "text, expected",
    [
        (TINY_RECIPE.replace("lr: 0.05", "lr: -1"), "train.lr"),
        (TINY_RECIPE.replace("init: preserve", "init: zeros"), "conversion.init"),
        ("train: {epochs: 2}\n", "missing key 'model'"),
        ("model: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_invalid_recipes_give_one_line(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(R.RecipeError, match=expected) as info:
        R.load_recipe(path)
    assert "\n" not in str(info.value)


def test_unknown_recipe_name_lists_the_bundled_ones():
    with pytest.raises(R.RecipeError, match="unknown recipe 'cifar11'.*cifar10, cifar10-smoke"):
        R.load_recipe("cifar11")


def test_overrides_are_validated_and_round_trip(tmp_path):
    recipe = R.parse_recipe(TINY_RECIPE, "tiny", "tiny")
    changed = recipe.with_overrides(epochs=7, lr=0.3)
    assert (changed.train.epochs, changed.train.lr, changed.train.batch_size) == (7, 0.3, 16)
    assert recipe.train.epochs == 2  # the original is untouched
    with pytest.raises(R.RecipeError, match="train.lr"):
        recipe.with_overrides(lr=0.0)
    again = R.parse_recipe(changed.to_yaml(), "round trip")
    assert again == changed


# ------------------------------------------------------------------------------------------ data
def test_resolve_data_checks_the_layout(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.resolve_data(str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    with pytest.raises(D.DataError, match=r"no test/ \(or val/\)"):
        D.resolve_data(str(tmp_path))
    (tmp_path / "val").mkdir()
    source = D.resolve_data(str(tmp_path))
    assert source.kind == "imagefolder" and source.splits["test"] == tmp_path / "val"
    assert D.resolve_data("CIFAR10", tmp_path).kind == "cifar10"


def test_cifar_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    source = D.resolve_data("cifar10", tmp_path)
    with pytest.raises(D.DataError, match="cannot download cifar10.*ImageFolder") as info:
        D.open_split(source, "test", R.DataSettings())
    assert "\n" not in str(info.value)


def test_failed_cifar_download_leaves_nothing_behind(tmp_path, monkeypatch):
    """A download cut off mid-way (as torchvision's urlretrieve leaves it) must not leave a partial
    archive or empty folders that look like a data root."""
    import urllib.error

    import torchvision.datasets.cifar as cifar

    def cut_off(url, download_root, extract_root=None, filename=None, md5=None, **kwargs):
        Path(download_root).mkdir(parents=True, exist_ok=True)
        (Path(download_root) / filename).write_bytes(b"\x1f\x8b partial")
        raise urllib.error.URLError("Connection reset by peer")

    monkeypatch.setattr(cifar, "download_and_extract_archive", cut_off)
    root = tmp_path / "cache" / "data"
    with pytest.raises(D.DataError, match="cannot download cifar10"):
        D.open_split(D.resolve_data("cifar10", root), "train", R.DataSettings())
    assert list(tmp_path.iterdir()) == []


def test_loaders_of_several_processes_split_the_data(tmp_path):
    """torchrun shards: training shards are disjoint, equal in size and reshuffled per epoch; the
    test slices cover every test image exactly once (so summed metrics count each image once)."""
    from ilmconvert.train.distributed import Distributed

    source = D.resolve_data(str(make_image_folder(tmp_path, n_train=10, n_test=5)))
    settings = R.DataSettings(augment="none")
    train, test = D.open_split(source, "train", settings), D.open_split(source, "test", settings)
    world = 3
    shards, slices = [], []
    for rank in range(world):
        processes = Distributed(rank, world, rank)
        loader = LD.make_loader(train, 4, train=True, seed=0, processes=processes)
        L.seed_epoch(loader, 0, 1, rank)
        shards.append(list(loader.sampler))
        L.seed_epoch(loader, 0, 2, rank)
        assert list(loader.sampler) != shards[-1]  # another order in another epoch
        test_loader = LD.make_loader(test, 4, train=False, processes=processes)
        slices.append([int(i) for i in test_loader.dataset.indices])
    assert {len(s) for s in shards} == {30 // world}
    assert len(set().union(*map(set, shards))) == 30  # disjoint, and together the whole set
    assert sorted(sum(slices, [])) == list(range(15))


def test_cached_and_lazy_images_agree_and_subsets_are_fixed(tmp_path):
    source = D.resolve_data(str(make_image_folder(tmp_path, n_train=10, n_test=4)))
    settings = R.DataSettings()
    cached = D.open_split(source, "train", settings, subset=12, seed=3)
    lazy = D.open_split(source, "train", settings.model_copy(update={"cache": False}), subset=12, seed=3)
    assert cached.images is not None and cached.images.shape == (12, 3, 32, 32) and cached.images.dtype == torch.uint8
    assert lazy.images is None and len(lazy) == 12
    for i in (0, 5, 11):
        assert torch.equal(cached[i][0], lazy[i][0]) and cached[i][1] == lazy[i][1]
    assert D.subset_indices(30, 12, 3) == D.subset_indices(30, 12, 3) != D.subset_indices(30, 12, 4)
    assert D.subset_indices(5, None, 0) == list(range(5))


def test_images_of_other_sizes_are_resized(tmp_path):
    """A 64x48 image (dark left half, bright right half) becomes 32x32: the shorter side is resized
    to 32, the center cropped, and the halves stay where they were."""
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[:, 32:] = 255
        Image.fromarray(pixels).save(tmp_path / split / "a" / "0.png")
    ds = D.open_split(D.resolve_data(str(tmp_path)), "test", R.DataSettings())
    image = ds[0][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert image[:, :, :14].max() < 10 and image[:, :, 18:].min() > 245  # 64x48 -> 42x32 -> center 32


def test_augmentation_and_normalization():
    settings = R.DataSettings()
    image = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 32, 32)
    torch.manual_seed(0)
    outs = [D.train_transform(settings)(image) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, image) for o in outs)  # crops / flips happen
    assert D.train_transform(settings.model_copy(update={"augment": "none"})) is None
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = LD.to_input(batch, settings.mean, settings.std, torch.device("cpu"))
    expected = (1 - torch.tensor(settings.mean)) / torch.tensor(settings.std)
    assert x.dtype == torch.float32 and torch.allclose(x[0, :, 0, 0], expected)


# ------------------------------------------------------------------------------------------ loop pieces
def test_accuracy_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    top1, top2 = L.accuracy_counts(logits, target, (1, 2))
    assert (int(top1), int(top2)) == (1, 2)
    (top5,) = L.accuracy_counts(logits, target, (5,))  # capped at 3 classes
    assert int(top5) == 3


def test_select_device():
    assert L.select_device("cpu").type == "cpu"
    with pytest.raises(L.TrainError):
        L.select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(L.TrainError, match="no CUDA"):
            L.select_device("cuda")


def test_optimizer_and_scheduler_come_from_timm():
    network = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    train = R.TrainSettings(epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=0.01)
    optimizer = L.create_optimizer(network, train)
    assert isinstance(optimizer, torch.optim.SGD)
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == [0.0, 5e-4] and all(g["momentum"] == 0.9 for g in optimizer.param_groups)
    scheduler = L.create_scheduler(optimizer, train, updates_per_epoch=10)
    lrs = []
    for update in range(1, 41):
        scheduler.step_update(num_updates=update)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] < 0.02 and 0.09 < max(lrs) <= 0.1 and lrs[-1] < 0.01  # warm-up, peak, cosine decay
    with pytest.raises(L.TrainError):
        L.create_scheduler(optimizer, train.model_copy(update={"sched": "nonsense"}), 10)


def test_build_network_applies_the_cifar_stem_and_records_it():
    recipe = R.parse_recipe(TINY_RECIPE, "tiny")
    recipe.model.adaptations = ["cifar_stem"]
    network = L.build_network(recipe.model, recipe.conversion, num_classes=3)
    assert network.conv1.kernel_size == (3, 3) and network.conv1.stride == (1, 1)
    assert network.ilm_source.adaptations == ["cifar_stem"] and network.ilm_source.kwargs["num_classes"] == 3
    # init: preserve, same seed: the converted network computes what the adapted original does
    torch.manual_seed(0)
    original = create_model(recipe.model.name, pretrained=False, num_classes=3, **recipe.model.kwargs)
    adapt(original, "cifar_stem")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x), original.eval()(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ real data
# cifar10_root: session fixture in tests/conftest.py (unpacks ../shared/data/cifar10-jpeg.tgz, skips when absent)
@pytest.mark.slow
def test_short_finetune_on_real_cifar10_beats_chance(cifar10_root, tmp_path):
    """About a minute of CPU training from scratch (24k augmented images) must be well above 10 %."""
    from ilmconvert import load
    from ilmconvert.train.run import evaluate_checkpoint, prepare_finetune, read_metrics, run_finetune

    recipe = R.load_recipe("cifar10-smoke")
    recipe = recipe.model_copy(
        update={"data": recipe.data.model_copy(update={"train_subset": 12000, "test_subset": 1000})}
    )
    recipe = recipe.with_overrides(epochs=2)
    path = tmp_path / "short.yaml"
    path.write_text(recipe.to_yaml())
    plan = prepare_finetune(data=str(cifar10_root), run=tmp_path / "run", recipe=str(path), device="cpu")
    assert len(plan.train) == 12000 and len(plan.test) == 1000 and plan.train.classes[0] == "airplane"
    summary = run_finetune(plan)
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert summary["best_top1"] > 25.0, metrics
    result = evaluate_checkpoint(tmp_path / "run", str(cifar10_root), device="cpu", subset=2000)
    assert result["images"] == 2000 and result["top1"] > 25.0
    assert load(tmp_path / "run" / "best").ilm_source.kwargs["num_classes"] == 10


def test_gpu_style_precision_path_trains_and_saves(tmp_path, monkeypatch):
    """The CUDA path (channels-last weights, bf16 autocast) exercised on CPU: it trains, and its
    non-contiguous channels-last weights are saved and reloaded exactly."""
    import ilmconvert
    from ilmconvert.train.run import prepare_finetune, run_finetune

    monkeypatch.setattr(L.Precision, "autocast", property(lambda self: True))
    monkeypatch.setattr(L.Precision, "channels_last", property(lambda self: True))
    data = make_image_folder(tmp_path / "data", n_train=16, n_test=4)
    (tmp_path / "r.yaml").write_text(TINY_RECIPE.replace("epochs: 2", "epochs: 1"))
    plan = prepare_finetune(data=str(data), run=tmp_path / "run", recipe=str(tmp_path / "r.yaml"), device="cpu")
    summary = run_finetune(plan)
    assert plan.network.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.isfinite(summary["last"]["train_loss"])
    loaded = ilmconvert.load(tmp_path / "run" / "last")
    for (name, a), b in zip(plan.network.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b), name


def test_a_failure_before_the_run_folder_is_written_leaves_nothing(tmp_path, monkeypatch):
    """The lock creates RUN; an error in run_finetune before last/ exists removes it again."""
    from ilmconvert.train import run as R_run

    data = make_image_folder(tmp_path / "data", n_train=4, n_test=2)
    (tmp_path / "r.yaml").write_text(TINY_RECIPE)
    plan = R_run.prepare_finetune(
        data=str(data), run=tmp_path / "out" / "run", recipe=str(tmp_path / "r.yaml"), device="cpu"
    )
    assert (tmp_path / "out" / "run" / R_run.LOCK_FILE).is_file()

    def broken(*args, **kwargs):
        raise L.TrainError("injected: the optimizer cannot be built")

    monkeypatch.setattr(R_run, "create_optimizer", broken)
    with pytest.raises(L.TrainError, match="injected"):
        R_run.run_finetune(plan)
    assert not (tmp_path / "out").exists()


def test_a_new_head_is_the_same_for_every_network_with_the_same_seed():
    """The study's arms (a pretrained network and its conversions) must start from the same head."""
    import copy

    from ilmconvert import convert

    plain = create_model("timm:resnet10t", pretrained=False, num_classes=5)
    converted = copy.deepcopy(plain)
    convert(converted, batchnorm="gn")  # more parameters, other modules: the head must not care
    state = torch.random.get_rng_state()
    assert L.fit_classifier(plain, 3, seed=7) and L.fit_classifier(converted, 3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left as it was
    head, other = plain.get_classifier(), converted.get_classifier()
    assert torch.equal(head.weight, other.weight) and torch.equal(head.bias, other.bias)
    again = create_model("timm:resnet10t", pretrained=False, num_classes=5)
    L.fit_classifier(again, 3, seed=8)
    assert not torch.equal(again.get_classifier().weight, head.weight)
    assert not L.fit_classifier(again, 3, seed=8)  # already 3 classes: left alone
