"""The timm-style fine-tuning options (issue 13): each option's effect, on tiny networks and data, CPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ilmconvert
from helpers import TINY_RECIPE, make_image_folder, relative_difference, tiny_converted_network
from ilmconvert.cli import app
from ilmconvert.train import loop as L
from ilmconvert.train.data import ImageSet
from ilmconvert.train.loader import make_loader
from ilmconvert.train.recipes import DataSettings, TrainSettings, load_recipe, parse_recipe
from ilmconvert.train.run import prepare_finetune, read_metrics, run_finetune

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"), n_train=12, n_test=4)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def recipe_file(tmp_path: Path, extra_train: str = "", extra_data: str = "") -> Path:
    text = TINY_RECIPE.replace("epochs: 2", "epochs: 1").replace("cpu_threads: 1}", f"cpu_threads: 1{extra_train}}}")
    text = text.replace("{eval_batch_size: 64}", f"{{eval_batch_size: 64{extra_data}}}")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def random_images(n: int = 32, size: int = 16) -> ImageSet:
    rng = np.random.default_rng(0)
    items = list(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8))
    return ImageSet(items, [i % 3 for i in range(n)], ["a", "b", "c"], size, cache=True)


def first_step_gradients(batch_size: int, accum: int, clip: float | None = None) -> dict[str, torch.Tensor]:
    """The gradients the optimizer's first step sees, on 32 random images, in float64 (so that the
    comparison sees the accumulation, not float32's batch-size-dependent reduction order)."""
    torch.manual_seed(0)
    network = tiny_converted_network().double()
    train = TrainSettings(batch_size=batch_size, grad_accum_steps=accum, lr=0.1, clip_grad=clip, epochs=1)
    data = DataSettings(augment="none", image_size=16)
    optimizer = L.create_optimizer(network, train)
    seen: dict[str, torch.Tensor] = {}
    step = optimizer.step

    def record(*args, **kwargs):
        step(*args, **kwargs)  # after the clipping, which runs before the step
        seen.update({n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None})
        raise StopIteration  # the first update is all this needs


    optimizer.step = record
    loader = make_loader(random_images(), batch_size, train=True, seed=0)
    as_float64 = L.to_input
    L.to_input = lambda *args, **kwargs: as_float64(*args, **kwargs).double()
    L.seed_epoch(loader, 0, 0)
    try:
        L.train_one_epoch(network, loader, optimizer, None, train, data, L.Precision(torch.device("cpu")), 0)
    except StopIteration:
        pass
    finally:
        L.to_input = as_float64
    return seen


def test_accumulating_4_batches_of_8_gives_the_gradients_of_one_batch_of_32():
    big, small = first_step_gradients(32, 1), first_step_gradients(8, 4)
    assert big.keys() == small.keys() and len(big) > 10
    worst = max(relative_difference(small[n], big[n]) for n in big if big[n].abs().max() > 0)
    assert worst <= 1e-6, worst
    one_batch = first_step_gradients(8, 1)["fc.weight"]
    assert relative_difference(one_batch, big["fc.weight"]) > 1e-3  # a single batch of 8 differs


def test_clipping_bounds_the_gradient_norm():
    def norm(grads):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()

    assert norm(first_step_gradients(32, 1)) > 0.05
    assert norm(first_step_gradients(32, 1, clip=0.05)) <= 0.05 * (1 + 1e-5)


def test_mixup_mixes_the_targets_reproducibly():
    data = DataSettings(mixup=0.8, cutmix=1.0)
    train = TrainSettings(smoothing=0.1)
    extras = L.create_extras(torch.nn.Linear(2, 3), train, data, L.Precision(torch.device("cpu")), 3)
    assert isinstance(L.criterion_for(train, data), __import__("timm").loss.SoftTargetCrossEntropy)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed_x, target = L._mixed(extras, x.clone(), y, 0.1, seed=7)
    assert target.shape == (4, 3) and not torch.equal(mixed_x, x)
    from timm.data.mixup import mixup_target

    assert (target - mixup_target(y, 3, 1.0, 0.1)).abs().max() > 0.05  # mixed, not merely smoothed
    again_x, again = L._mixed(extras, x.clone(), y, 0.1, seed=7)
    assert torch.equal(again, target) and torch.equal(again_x, mixed_x)


def test_layer_decay_scales_the_learning_rate_by_depth():
    network = tiny_converted_network()
    optimizer = L.create_optimizer(network, TrainSettings(opt="adamw", lr=1e-3, layer_decay=0.5, opt_betas=(0.8, 0.9)))
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.1
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in optimizer.param_groups)
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["betas"] == (0.8, 0.9)
    with pytest.raises(L.TrainError, match="no-such-opt"):
        L.check_optimizer(TrainSettings(opt="no-such-opt"))


def test_ema_is_tested_saved_and_kept_for_resume_with_logs(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    recipe = recipe_file(tmp_path, ", model_ema: true, model_ema_decay: 0.5, checkpoint_hist: 1")
    plan = prepare_finetune(data=str(tiny_data), run=tmp_path / "run", recipe=str(recipe), device="cpu",
                            log=["tensorboard"], overrides={"train.epochs": 2})
    run_finetune(plan)
    run = tmp_path / "run"
    rows = read_metrics(run)
    assert {"ema_top1", "ema_top5", "ema_test_loss"} <= set(rows[-1])
    ema, raw = ilmconvert.load(run / "best_ema"), ilmconvert.load(run / "last")
    differs = [n for n, t in raw.state_dict().items() if not torch.equal(t, ema.state_dict()[n])]
    assert differs and ema.state_dict().keys() == raw.state_dict().keys()
    state = torch.load(run / "last" / "trainer_state.pt", weights_only=True)
    assert state["model_ema"].keys() == raw.state_dict().keys() and "best_ema_top1" in state
    header = (run / "summary.csv").read_text().splitlines()
    assert header[0].startswith("epoch,train_loss,train_top1,eval_loss,eval_top1,eval_top5") and len(header) == 3
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    best = max(rows, key=lambda r: (r["top1"], r["epoch"]))["epoch"]
    assert [p.name for p in run.glob("checkpoint-*")] == [f"checkpoint-{best}"]


def test_trainable_norms_leaves_the_backbone_bit_identical(tiny_data, tmp_path):
    recipe = recipe_file(tmp_path, ", trainable: norms")
    plan = prepare_finetune(data=str(tiny_data), run=tmp_path / "run", recipe=str(recipe), device="cpu")
    before = copy.deepcopy(plan.network.state_dict())
    run_finetune(plan)
    after = ilmconvert.load(tmp_path / "run" / "last").state_dict()
    from ilmconvert.nn import ILMNorm

    norms = {f"{m}.{p}" for m, module in plan.network.named_modules() if isinstance(module, ILMNorm)
             for p, _ in module.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= norms, changed - norms
    assert len(before) - len(norms) > 10  # the convolutions and the classifier, all unchanged


def test_fp16_autocast_trains_on_cpu_with_a_grad_scaler_and_compiled_keys_stay_clean(tiny_data, tmp_path):
    recipe = recipe_file(tmp_path, ", amp_dtype: fp16, compile: eager")
    plan = prepare_finetune(data=str(tiny_data), run=tmp_path / "run", recipe=str(recipe), device="cpu")
    precision = L.Precision.of(plan.device, plan.recipe.train)
    assert precision.autocast and precision.dtype == torch.float16 and precision.scaler() is not None
    summary = run_finetune(plan)
    assert np.isfinite(summary["last"]["train_loss"])
    state = torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)
    assert state["amp_scaler"]["scale"] > 0
    keys = ilmconvert.load(tmp_path / "run" / "last").state_dict().keys()
    assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)


def test_set_overrides_any_key_and_a_typo_is_one_line(tiny_data, tmp_path):
    recipe = load_recipe("cifar10").with_overrides(settings=["train.opt=adamw", "data.mixup=0.2", "train.lr=1e-3"])
    assert (recipe.train.opt, recipe.data.mixup, recipe.train.lr) == ("adamw", 0.2, 1e-3)
    args = ["finetune", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--device", "cpu"]
    line = one_error_line(runner.invoke(app, [*args, "--set", "train.lrr=0.1"]))
    assert "unknown key 'train.lrr'" in line and "did you mean 'lr'" in line
    assert "train.lr" in one_error_line(runner.invoke(app, [*args, "--set", "train.lr=-1"]))
    assert "KEY=VALUE" in one_error_line(runner.invoke(app, [*args, "--set", "train.lr"]))
    assert "--amp-dtype" in one_error_line(runner.invoke(app, [*args, "--amp-dtype", "fp8"]))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_changes_that_break_exactness(tiny_data, tmp_path):
    recipe = recipe_file(tmp_path)
    run_finetune(prepare_finetune(data=str(tiny_data), run=tmp_path / "run", recipe=str(recipe), device="cpu"))
    base = ["finetune", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--device", "cpu", "--resume"]
    line = one_error_line(runner.invoke(app, [*base, "--epochs", "2", "--set", "train.lr=0.5", "--mixup", "0.2"]))
    assert "cannot change data.mixup, train.lr" in line
    result = runner.invoke(app, [*base, "--epochs", "2", "--workers", "0", "--checkpoint-hist", "1"])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_label_smoothing_is_still_accepted():
    recipe = parse_recipe("model: {name: timm:resnet18}\ntrain: {label_smoothing: 0.1}\n", "old")
    assert recipe.train.smoothing == 0.1 and "label_smoothing" not in recipe.to_yaml()


def test_timm_pipeline_follows_the_networks_data_config(tiny_data, tmp_path):
    recipe = recipe_file(tmp_path, extra_data=", pipeline: timm, image_size: 24, aa: rand-m9-mstd0.5")
    plan = prepare_finetune(data=str(tiny_data), run=tmp_path / "run", recipe=str(recipe), device="cpu")
    settings = plan.recipe.data
    from timm.data import resolve_data_config

    expected = resolve_data_config({}, model=plan.network)
    assert (settings.crop_pct, settings.interpolation) == (expected["crop_pct"], expected["interpolation"])
    assert settings.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's ImageNet default, not CIFAR's
    image, _ = plan.train[(0, 123)]
    again, _ = plan.train[(0, 123)]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and torch.equal(image, again)
    assert plan.test[0][0].shape == (3, 24, 24)
    run_finetune(plan)
    assert "pipeline: timm" in (tmp_path / "run" / "recipe.yaml").read_text()
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--data", str(tiny_data), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 12


SMALL_RESNET = "channels: [32, 64, 128, 256], stem_width: 32, layers: [1, 1, 1, 1]"
#: per recipe, a small network of the same family (the full ones are too slow for CI)
TINY_OVERRIDES = {
    "resnet50-gn-finetune": ["model.name=timm:resnet18", f"model.kwargs={{norm_layer: groupnorm, {SMALL_RESNET}}}"],
    "bn-to-ilm-smallbatch": ["model.name=timm:resnet18", f"model.kwargs={{{SMALL_RESNET}}}"],
    "convnext-finetune": [
        "model.name=timm:convnext_atto",
        "model.kwargs={depths: [1, 1, 1, 1], dims: [16, 32, 48, 64]}",
    ],
    "vit-finetune": [
        "model.name=timm:vit_tiny_patch16_224",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}",
    ],
    "cifar10": ["model.name=timm:resnet18", f"model.kwargs={{norm_layer: groupnorm, {SMALL_RESNET}}}"],
    "cifar10-smoke": [],
}


@pytest.mark.parametrize("name", sorted(TINY_OVERRIDES))
def test_each_bundled_recipe_runs_a_short_epoch(name, tiny_data, tmp_path):
    settings = [*TINY_OVERRIDES[name], "model.pretrained=false", "train.epochs=1", "train.batch_size=8",
                "train.cpu_threads=1", "data.num_workers=0", "data.image_size=32", "data.train_subset=16",
                "data.eval_batch_size=16", "train.warmup_epochs=0"]
    recipe = load_recipe(name)
    assert recipe.description
    plan = prepare_finetune(data=str(tiny_data), run=tmp_path / "run", recipe=name, device="cpu", settings=settings)
    summary = run_finetune(plan)
    assert np.isfinite(summary["last"]["train_loss"])
    if recipe.model.pretrained:  # offline, the real recipe stops at once and points at --weights
        args = ["finetune", "--recipe", name, "--data", str(tiny_data), "--out", str(tmp_path / "r2")]
        assert "--weights" in one_error_line(runner.invoke(app, [*args, "--device", "cpu"]))
        assert not (tmp_path / "r2").exists()


def test_cli_polish():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("ilmconvert ")
    shown = runner.invoke(app, ["recipes", "show", "vit-finetune"])
    assert shown.exit_code == 0 and "mixup: 0.8" in shown.output
    helped = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    assert "auto|bf16|fp16|none" in helped and "ilm|proxy|ilm+proxy|none" in helped and "-b" in helped
