"""``ilmconvert sweep`` and ``ilmconvert plot``: the files of a tiny sweep on real CIFAR-10, the
interval arithmetic against a hand computation, exact resume of an interrupted sweep, bad input."""

from __future__ import annotations

import json
import math

import pytest

from helpers import make_image_folder
from ilmconvert.train import sweep as S
from ilmconvert.train.run import Progress, RunInterrupted

# a small GN ResNet (widths divisible by GN's 32 groups), one epoch, a few hundred images
SWEEP_RECIPE = """
name: tiny-sweep
model:
  name: timm:resnet18
  kwargs: {channels: [32, 32, 64, 64], stem_width: 32, layers: [1, 1, 1, 1]}
train: {epochs: 1, batch_size: 16, lr: 0.05, cpu_threads: 1}
data: {train_subset: 192, test_subset: 96, eval_batch_size: 96}
variants:
  ilm+gn-preserve: {model: {kwargs: {norm_layer: groupnorm}}, conversion: {method: ilm, init: preserve}}
"""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(tmp_path, data, **kwargs):
    (tmp_path / "r.yaml").write_text(kwargs.pop("text", SWEEP_RECIPE))
    options = {"variants": "gn,ilm+gn", "batch_sizes": "16", "seeds": "0,1", "device": "cpu"}
    return S.plan_sweep(recipe=tmp_path / "r.yaml", data=str(data), out=tmp_path / "sweep", **(options | kwargs))


def test_tiny_sweep_on_real_cifar10_writes_every_file(cifar10_root, tmp_path):
    sweep = _plan(tmp_path, cifar10_root)
    summary = S.run_sweep(sweep)
    out = tmp_path / "sweep"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == ["gn-b16-s0", "ilm+gn-b16-s0", "gn-b16-s1", "ilm+gn-b16-s1"]
    for r in rows:
        assert 0 <= r["final_error"] <= 100 and r["best_error"] <= r["final_error"]
        assert len(r["curve"]) == 1 and r["seconds"] > 0 and r["images_per_s"] > 0
        assert (out / "cells" / r["cell"] / "best" / "model.safetensors").is_file()  # an ordinary run folder
    assert summary["cells_finished"] == 4 and summary["reference"] == "gn"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["table"] == json.loads(json.dumps(summary["table"]))
    # the interval of the table against a hand computation: n = 2, t_{0.975, 1} = 12.7062047
    gn = [r["final_error"] for r in rows if r["variant"] == "gn"]
    row = next(t for t in summary["table"] if t["variant"] == "gn")
    mean, sd = sum(gn) / 2, abs(gn[0] - gn[1]) / math.sqrt(2)
    assert row["final_error_mean"] == pytest.approx(mean)
    assert row["final_error_ci95"] == pytest.approx(12.7062047 * sd / math.sqrt(2), rel=1e-6)
    diff = next(d for d in summary["paired"] if d["variant"] == "ilm+gn")
    ilm = [r["final_error"] for r in rows if r["variant"] == "ilm+gn"]
    assert diff["final_error_diff_mean"] == pytest.approx((ilm[0] - gn[0] + ilm[1] - gn[1]) / 2)
    for name in ("error_vs_batch.png", "curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    text = (out / "summary.md").read_text()
    assert "Final-epoch test error (headline)" in text and "| ilm+gn |" in text and "linear" in text


def test_the_variants_differ_only_in_norm_and_method(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=8, n_test=4)
    sweep = _plan(tmp_path, data, variants="bn,gn,ilm+gn,gn+pn,ilm+gn-preserve", batch_sizes="16,4")
    recipes = {c.name: S.Sweep.cell_recipe(sweep, c) for c in sweep.cells}
    base = recipes["gn-b16-s0"].model_dump()
    for name, recipe in recipes.items():
        r = recipe.model_dump()
        assert {k: v for k, v in r["model"].items() if k != "kwargs"} == {
            k: v for k, v in base["model"].items() if k != "kwargs"
        }
        assert r["data"] == base["data"] and r["train"]["epochs"] == 1
    assert recipes["bn-b16-s0"].model.kwargs["norm_layer"] == "batchnorm"
    assert recipes["gn+pn-b16-s0"].conversion.method == "proxy"
    assert recipes["ilm+gn-preserve-b16-s0"].conversion.init == "preserve"
    assert recipes["gn-b4-s1"].train.lr == pytest.approx(0.05 * 4 / 16)  # linear scaling
    assert recipes["gn-b4-s1"].train.seed == 1 and recipes["gn-b4-s1"].train.batch_size == 4
    unscaled = _plan(tmp_path, data, batch_sizes="4", lr_scaling="none")
    assert unscaled.cell_recipe(unscaled.cells[0]).train.lr == 0.05


def test_an_interrupted_sweep_resumes_exactly_and_skips_finished_cells(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=16, n_test=8)
    text = SWEEP_RECIPE.replace("epochs: 1", "epochs: 2").replace("train_subset: 192, test_subset: 96, ", "")
    (tmp_path / "a").mkdir()
    S.run_sweep(_plan(tmp_path / "a", data, text=text, seeds="0"))

    def interrupt_second_cell_after_one_epoch(cell, index, total):
        def epoch_done(metrics, best):
            if index == 1 and metrics["epoch"] == 1:
                raise KeyboardInterrupt
        return Progress(epoch_done=epoch_done)

    (tmp_path / "b").mkdir()
    sweep = _plan(tmp_path / "b", data, text=text, seeds="0")
    with pytest.raises(RunInterrupted, match="resume with"):
        S.run_sweep(sweep, S.SweepHooks(start=interrupt_second_cell_after_one_epoch))
    first = tmp_path / "b" / "sweep" / "cells" / "gn-b16-s0" / "metrics.jsonl"
    stamp = first.stat().st_mtime_ns
    skipped = []
    S.run_sweep(_plan(tmp_path / "b", data, text=text, seeds="0"), S.SweepHooks(skipped=skipped.append))
    assert [c.name for c in skipped] == ["gn-b16-s0"] and first.stat().st_mtime_ns == stamp

    def comparable(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]

    a, b = (comparable(tmp_path / x / "sweep" / "results.jsonl") for x in "ab")
    assert a == b and len(a) == 2  # the resumed cell's curve equals the uninterrupted one's


def test_a_sweep_folder_keeps_its_settings(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=8, n_test=4)
    text = SWEEP_RECIPE.replace("train_subset: 192, test_subset: 96, ", "")
    S.run_sweep(_plan(tmp_path, data, text=text, variants="gn", seeds="0"))
    with pytest.raises(S.SweepError, match="another epochs"):
        _plan(tmp_path, data, text=text, epochs=3)
    with pytest.raises(S.SweepError, match="another lr scaling"):
        _plan(tmp_path, data, text=text, lr_scaling="none")
    grown = _plan(tmp_path, data, text=text, variants="gn", seeds="0,1")  # the grid may grow
    assert len(grown.cells) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variants": "gn,layernorm"}, "unknown variant 'layernorm'; known: bn, gn, ilm\\+gn, gn\\+pn"),
        ({"batch_sizes": "16,x"}, "--batch-sizes: '16,x' is not a comma-separated list of ints"),
        ({"seeds": "0,0"}, "names a value twice"),
        ({"batch_sizes": "0"}, "must be positive"),
        ({"lr_scaling": "sqrt"}, "--lr-scaling must be one of linear, none"),
        ({"reference": "bn"}, "--reference 'bn' is not one of the swept variants"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(S.SweepError, match=message) as err:
        _plan(tmp_path, tmp_path, **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_cli_plot_and_sweep_errors(tmp_path):
    from typer.testing import CliRunner

    from ilmconvert.cli import app

    data = make_image_folder(tmp_path / "data", n_train=8, n_test=4)
    (tmp_path / "r.yaml").write_text(SWEEP_RECIPE.replace("train_subset: 192, test_subset: 96, ", ""))
    runner = CliRunner()
    args = ["sweep", "--recipe", str(tmp_path / "r.yaml"), "--data", str(data), "--out", str(tmp_path / "s")]
    result = runner.invoke(app, [*args, "--variants", "gn", "--batch-sizes", "16", "--seeds", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cell = tmp_path / "s" / "cells" / "gn-b16-s0"
    result = runner.invoke(app, ["plot", str(cell), str(cell), "--out", str(tmp_path / "c.png"), "--labels", "a,b"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)
    result = runner.invoke(app, ["plot", str(tmp_path / "data"), "--out", str(tmp_path / "d.png")])
    assert result.exit_code == 2 and "has no finished epoch" in result.output
    assert not (tmp_path / "d.png").exists()
    result = runner.invoke(app, [*args, "--variants", "gn,nope"])
    assert result.exit_code == 2 and "unknown variant 'nope'" in result.output


def test_a_variant_can_fine_tune_a_checkpoint(tmp_path):
    import torch

    import ilmconvert
    from helpers import tiny_converted_network

    data = make_image_folder(tmp_path / "data", n_train=8, n_test=4)
    torch.manual_seed(0)
    ilmconvert.save(tiny_converted_network(num_classes=3), tmp_path / "ckpt")
    text = SWEEP_RECIPE.replace("train_subset: 192, test_subset: 96, ", "") + (
        f"  converted: {{checkpoint: {tmp_path / 'ckpt'}}}\n"
    )
    sweep = _plan(tmp_path, data, text=text, variants="converted", seeds="0")
    S.run_sweep(sweep)
    trained = ilmconvert.load(tmp_path / "sweep" / "cells" / "converted-b16-s0" / "last")
    assert trained.ilm_conversion.settings["method"] == "ilm" and len(trained.ilm_conversion.converted) > 0
    (tmp_path / "other").mkdir()
    with pytest.raises(S.SweepError, match="is not a checkpoint folder"):
        _plan(tmp_path / "other", data, text=text.replace(str(tmp_path / "ckpt"), str(tmp_path)), variants="converted")


def test_cli_sweep_takes_set_and_the_data_flags_and_counts_in_the_singular(tmp_path):
    """Issue 21: sweep --set / --train-subset / --test-subset reach every cell's recipe; one of
    each reads '1 variant x 1 batch size x 1 seed = 1 cell of 1 epoch'."""
    import yaml
    from typer.testing import CliRunner

    from ilmconvert.cli import app

    data = make_image_folder(tmp_path / "data", n_train=8, n_test=4)
    (tmp_path / "r.yaml").write_text(SWEEP_RECIPE.replace("train_subset: 192, test_subset: 96, ", ""))
    args = ["sweep", "--recipe", str(tmp_path / "r.yaml"), "--data", str(data), "--out", str(tmp_path / "s")]
    args += ["--variants", "gn", "--batch-sizes", "4", "--seeds", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--train-subset", "12", "--test-subset", "6", "--set", "train.lr=0.02"])
    assert result.exit_code == 0, result.output
    assert "1 variant x 1 batch size x 1 seed = 1 cell of 1 epoch;" in " ".join(result.output.split())
    cell = yaml.safe_load((tmp_path / "s" / "cells" / "gn-b4-s0" / "recipe.yaml").read_text())
    assert (cell["data"]["train_subset"], cell["data"]["test_subset"]) == (12, 6)
    assert cell["train"]["lr"] == pytest.approx(0.02 * 4 / 16)  # --set, then the linear lr scaling


def test_plot_labels_a_narrow_error_axis_with_plain_numbers(tmp_path, monkeypatch):
    """Issue 21: the log error axis of `ilmconvert plot` reads 76.5, not 7.65×10^1."""
    import matplotlib
    from typer.testing import CliRunner

    from ilmconvert.cli import app

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"epoch": e, "train_loss": 2.0, "test_loss": 2.1, "top1": top1, "top5": 80.0, "lr": 0.1, "train_top1": 20.0}
        for e, top1 in ((1, 23.40), (2, 23.52), (3, 23.55))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # labels as <text>, not glyph paths
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "c.svg")])
    assert result.exit_code == 0, result.output
    svg = (tmp_path / "c.svg").read_text()
    assert "76.5" in svg and "times" not in svg and "×" not in svg
