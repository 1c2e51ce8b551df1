"""``ilmconvert sweep --checkpoint``: variants that are conversions of a pretrained checkpoint
(issue 19). A tiny BN ResNet saved with ``ilmconvert.save`` stands in for the pretrained network;
CPU, offline."""

from __future__ import annotations

import json
import re
import shutil
import threading

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import ilmconvert
from helpers import make_image_folder
from ilmconvert.train import sweep as S
from ilmconvert.train import sweep_networks as N

RECIPE = """
name: tiny-pretrained
model: {name: timm:resnet18}
train: {epochs: 1, batch_size: 8, lr: 0.02, cpu_threads: 1}
data: {eval_batch_size: 64}
"""
TINY_BN = {"channels": [32, 32, 64, 64], "stem_width": 32, "layers": [1, 1, 1, 1]}


def _pretrained(folder, size=32, classes=5):
    """A BN network whose running statistics differ from any one image's (so GN changes the
    function and calibration has something to fit), saved as an unconverted checkpoint that says
    it was pretrained at ``size`` px."""
    torch.manual_seed(0)
    net = ilmconvert.create_model("timm:resnet18", pretrained=False, num_classes=classes, **TINY_BN)
    net.train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.momentum = None  # cumulative average
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            net(torch.randn(16, 3, 32, 32, generator=gen) * torch.rand(16, 1, 1, 1, generator=gen) * 3)
    net.eval()
    ilmconvert.convert(net, method="none")
    ilmconvert.save(net, folder, pretrained_cfg={"input_size": [3, size, size]})
    return folder


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    data = make_image_folder(root / "data", n_train=12, n_test=4)
    (root / "r.yaml").write_text(RECIPE)
    return root, data, _pretrained(root / "base")


def _plan(setting, out, **kwargs):
    root, data, base = setting
    options = {"variants": "bn,bn-frozen", "batch_sizes": "8", "seeds": "0", "device": "cpu", "checkpoint": base}
    options |= {"calibration_images": 16, "calibration_time": 1.0}
    return S.plan_sweep(recipe=kwargs.pop("recipe", root / "r.yaml"), data=str(data), out=out, **(options | kwargs))


def _outputs(net, x, train=False):
    net.train(train)
    with torch.no_grad():
        return net(x)


def test_networks_are_made_once_reused_and_keep_what_they_promise(setting, tmp_path):
    root, data, base = setting
    out = tmp_path / "s"
    ready = []
    hooks = N.PrepareHooks(ready=ready.append)
    S.run_sweep(_plan(setting, out, variants="bn,gn-cal"), S.SweepHooks(networks=hooks))
    assert [(r.variant, r.reused) for r in ready] == [("bn", True), ("gn-cal", False)]
    assert ready[0].path == base.resolve()  # bn fine-tunes the checkpoint itself
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    cell = ilmconvert.load(out / "cells" / "gn-cal-b8-s0" / "last")  # the cell fine-tuned the variant's network
    assert cell.ilm_conversion.settings["batchnorm"] == "gn" and len(cell.ilm_conversion.converted) == 13
    recorded = json.loads((out / "sweep.json").read_text())["checkpoint"]
    assert recorded["weights_sha256"] == json.loads((base / "config.json").read_text())["weights_sha256"]

    # the grid grows: gn-cal is reused, the new variants are made; then all are reused, untouched
    grown = _plan(setting, out, variants="bn,bn-frozen,gn,gn-cal,ilm+frozen")
    ready.clear()
    N.prepare_networks(grown, hooks)
    assert [(r.variant, r.reused) for r in ready] == [
        ("bn", True), ("bn-frozen", False), ("gn", False), ("gn-cal", True), ("ilm+frozen", False),
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "networks").glob("[!.]*")) == ["bn-frozen", "gn", "gn-cal", "ilm+frozen"]
    stamps = {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in (out / "networks").glob("[!.]*")}
    assert all(p.reused for p in N.prepare_networks(grown).values())
    assert stamps == {p.name: (p / "model.safetensors").stat().st_mtime_ns for p in (out / "networks").glob("[!.]*")}

    original = ilmconvert.load(base)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # bn-frozen: no BatchNorm left that uses batch statistics; in train mode an image's output
    # does not depend on the rest of its batch
    frozen = ilmconvert.load(out / "networks" / "bn-frozen")
    assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
    assert type(frozen.bn1).__name__ == "FrozenBatchNorm2d"  # timm's freeze_batch_norm_2d
    torch.testing.assert_close(_outputs(frozen, x, train=True)[:2], _outputs(frozen, x[:2], train=True))
    # ilm+frozen: the original's function at step 0, to the last bit (BatchNorm's own kernel)
    ilm_frozen = ilmconvert.load(out / "networks" / "ilm+frozen")
    assert ilm_frozen.ilm_conversion.settings["method"] == "ilm"
    reference = _outputs(original, x)
    assert torch.equal(_outputs(ilm_frozen, x), reference)
    # gn changes the function; gn-cal's config.json holds the calibration report, whose held-out
    # agreement is at least the uncalibrated network's and whose output change is smaller
    gn = ilmconvert.load(out / "networks" / "gn")
    assert ((_outputs(gn, x) - reference).abs().max() / reference.abs().max()).item() > 0.05
    config = json.loads((out / "networks" / "gn-cal" / "config.json").read_text())
    stages = config["metadata"]["calibration"]["stages"]
    assert config["metadata"]["calibration"]["images_fit"] + config["metadata"]["calibration"]["images_heldout"] == 16
    assert stages["distilled"]["top1_agreement"] >= stages["before"]["top1_agreement"]
    assert stages["distilled"]["relative_change"] < stages["before"]["relative_change"]
    assert ready[3].calibration == stages  # what the front-end shows
    assert config["metadata"]["sweep"]["calibration_input"]["image_size"] == 32  # the cells' input size
    assert "calibration" not in json.loads((out / "networks" / "gn" / "config.json").read_text())["metadata"]


def test_two_processes_on_one_folder_make_each_network_once(setting, tmp_path):
    """Disjoint grids on one --out: the variant's lock makes the second wait and reuse."""
    out = tmp_path / "s"
    plans = [_plan(setting, out, variants="gn-cal", batch_sizes=b) for b in ("8", "4")]
    reports, waited = [], []
    hooks = N.PrepareHooks(waiting=waited.append)
    threads = [threading.Thread(target=lambda p=p: reports.append(S.prepare_sweep(p, S.SweepHooks(networks=hooks))))
               for p in plans]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["gn-cal"].reused for r in reports) == [False, True]
    assert json.loads((out / "sweep.json").read_text())["batch_sizes"] in ([8, 4], [4, 8])  # both grids recorded


def test_input_size_is_the_recipes_when_set_else_the_checkpoints(setting, tmp_path):
    """A checkpoint saved without weights provenance says 240 px in its config.json: its cells
    train at the recipe's 64 px when the recipe sets it, at 240 px when not, never at 32 px."""
    from ilmconvert.train.prepare import prepare_finetune

    root, data, _ = setting
    base = _pretrained(tmp_path / "base240", size=240)
    (tmp_path / "r64.yaml").write_text(RECIPE.replace("eval_batch_size: 64", "eval_batch_size: 64, image_size: 64"))
    set64 = _plan(setting, tmp_path / "a", checkpoint=base, recipe=tmp_path / "r64.yaml")
    unset = _plan(setting, tmp_path / "b", checkpoint=base)
    assert {set64.cell_recipe(c).data.image_size for c in set64.cells} == {64}
    assert {unset.cell_recipe(c).data.image_size for c in unset.cells} == {240}
    recipe = tmp_path / "cell.yaml"
    recipe.write_text(unset.cell_recipe(unset.cells[0]).to_yaml())
    plans = []
    for run in ("run", "again"):  # the new head (5 -> 3 classes) depends on the seed only
        plans.append(prepare_finetune(data=str(data), run=tmp_path / run, recipe=recipe, checkpoint=base, device="cpu"))
        plans[-1].release()
    plan = plans[0]
    assert plan.network.fc.out_features == 3 and torch.equal(plan.network.fc.weight, plans[1].network.fc.weight)
    assert plan.recipe.data.image_size == 240 and tuple(plan.train[0][0].shape) == (3, 240, 240)
    assert plan.recipe.data.mean == pytest.approx((0.485, 0.456, 0.406))  # the checkpoint's, not CIFAR's


def test_a_recipe_defines_more_conversions_and_a_folder_keeps_its_checkpoint(setting, tmp_path):
    root, data, base = setting
    (tmp_path / "r.yaml").write_text(
        RECIPE + "variants:\n  gn-g8: {swap: {method: none, batchnorm: gn, key_group_size: 8}}\n"
    )
    sweep = _plan(setting, tmp_path / "s", variants="gn-g8", recipe=tmp_path / "r.yaml")
    assert sweep.variants["gn-g8"]["swap"]["key_group_size"] == 8 and sweep.reference == "gn-g8"
    assert _plan(setting, tmp_path / "t", variants="gn,bn-frozen").reference == "bn-frozen"
    S.record_sweep(sweep)
    other = _pretrained(tmp_path / "other", classes=4)  # other weights
    with pytest.raises(S.SweepError, match="another checkpoint"):
        _plan(setting, tmp_path / "s", variants="gn-g8", recipe=tmp_path / "r.yaml", checkpoint=other)
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)  # the same weights elsewhere: accepted
    _plan(setting, tmp_path / "s", variants="gn-g8", recipe=tmp_path / "r.yaml", checkpoint=moved)


@pytest.mark.parametrize(
    "args, variants, message",
    [
        ([], "bn-frozen", "variant 'bn-frozen' is a conversion of a pretrained checkpoint: pass --checkpoint DIR"),
        ([], "mine", "variant 'mine' is a conversion of a pretrained checkpoint: pass --checkpoint DIR"),
        (["--checkpoint", "{data}"], "gn", "--checkpoint .* is not a checkpoint folder"),
        (["--checkpoint", "{base}"], "bad-key", "variant 'bad-key': unknown swap key 'batchnrom'; known: method,"),
        (["--checkpoint", "{base}"], "bad-value", "variant 'bad-value': bad swap key 'batchnorm'"),
        (["--checkpoint", "{base}"], "bad-cal", "variant 'bad-cal': bad swap: calibrate fits the layers"),
        (["--checkpoint", "{base}", "--calibration-images", "40"], "gn-cal",
         "--calibration-images 40 is more than the 36 training images"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_exit_2_and_write_nothing(setting, tmp_path, args, variants, message):
    from typer.testing import CliRunner

    from ilmconvert.cli import app

    root, data, base = setting
    (tmp_path / "r.yaml").write_text(
        RECIPE + "variants:\n  mine: {swap: {method: ilm, batchnorm: frozen}}\n"
        "  bad-key: {swap: {batchnrom: gn}}\n  bad-value: {swap: {batchnorm: layernorm}}\n"
        "  bad-cal: {swap: {batchnorm: frozen, calibrate: true}}\n"
    )
    args = [a.format(data=data, base=base) for a in args]
    command = ["sweep", "--recipe", str(tmp_path / "r.yaml"), "--data", str(data), "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(app, [*command, "--variants", variants, "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "s").exists()
