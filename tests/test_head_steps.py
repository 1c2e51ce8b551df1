"""``train.head_steps``: linear probing before fine-tuning (LP-FT). The head-only phase changes the
classifier and nothing else (BatchNorm's running statistics included), is the same bit for bit for
a seed, is tested as the run's epoch-0 line, is never repeated by ``--resume``, and reaches the
sweep's results as the step-0 column."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import ilmconvert
from helpers import TINY_MODEL, TINY_RECIPE, make_image_folder, numbers
from ilmconvert.train import loop as L
from ilmconvert.train.data import ImageSet
from ilmconvert.train.head_probe import probe_head
from ilmconvert.train.loader import make_loader
from ilmconvert.train.recipes import DataSettings, TrainSettings, parse_recipe
from ilmconvert.train.run import Progress, prepare_finetune, read_metrics, run_finetune


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"), n_train=12, n_test=4)


def bn_network() -> torch.nn.Module:
    """The tiny ResNet with BatchNorm (unconverted), its running statistics moved off their defaults."""
    torch.manual_seed(0)
    network = ilmconvert.create_model("timm:resnet18", pretrained=False, num_classes=3,
                                      **{**TINY_MODEL, "norm_layer": "batchnorm"})
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return network


def probed(network: torch.nn.Module, seed: int = 0, steps: int = 4, opt: str = "momentum") -> torch.nn.Module:
    import numpy as np

    rng = np.random.default_rng(0)
    images = ImageSet(list(rng.integers(0, 255, (24, 16, 16, 3), dtype=np.uint8)), [i % 3 for i in range(24)],
                      ["a", "b", "c"], 16, cache=True)
    data = DataSettings(image_size=16)  # the cifar augmentation: random crops and flips
    train = TrainSettings(batch_size=8, lr=0.1, head_steps=steps, seed=seed, opt=opt)
    loader = make_loader(images, 8, train=True, seed=seed)
    numbers = probe_head(network, loader, train, data, L.Precision(torch.device("cpu"), "none"))
    assert numbers["images"] == 8 * steps and 0 <= numbers["train_top1"] <= 100
    return network


@pytest.mark.parametrize("trainable", ["all", "norms", "norms+head"])
def test_the_head_only_phase_changes_the_classifier_and_nothing_else(trainable):
    network = bn_network()
    L.set_trainable(network, trainable)
    flags = [p.requires_grad for p in network.parameters()]
    before = copy.deepcopy(network.state_dict())
    after = probed(network, steps=5).state_dict()  # 5 steps of 8 images: into the second epoch's order
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"fc.weight", "fc.bias"}  # every other parameter and buffer (BN's included) bit-identical
    assert [p.requires_grad for p in network.parameters()] == flags


def test_the_same_seed_gives_the_same_head_bit_for_bit_and_another_seed_another():
    start = bn_network()
    a, b, c = (probed(copy.deepcopy(start), seed=s, opt="adamw").state_dict() for s in (0, 0, 1))
    assert torch.equal(a["fc.weight"], b["fc.weight"]) and torch.equal(a["fc.bias"], b["fc.bias"])
    assert not torch.equal(a["fc.weight"], c["fc.weight"])  # the data order and augmentation follow the seed


def test_a_network_without_classifier_is_one_line():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Flatten())
    with pytest.raises(L.TrainError, match="train.head_steps: the network has no classifier layer; set"):
        probed(network)


class StopAfterEpoch(Exception):
    pass


def stop_after(epoch: int) -> Progress:
    def epoch_done(metrics, best):
        if metrics["epoch"] == epoch:
            raise StopAfterEpoch

    return Progress(epoch_done=epoch_done)


def independent_top1(network: torch.nn.Module, folder: Path) -> float:
    """Test top-1 (%) of ``network`` on ``folder/test`` with torchvision's ImageFolder, outside the loop."""
    from torchvision import datasets, transforms

    recipe_data = DataSettings()
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(recipe_data.mean, recipe_data.std)])
    dataset = datasets.ImageFolder(str(folder / "test"), transform=tf)
    network.eval()
    with torch.no_grad():
        hits = sum(int(network(x[None]).argmax(1).item() == y) for x, y in dataset)
    return 100.0 * hits / len(dataset)


def test_the_epoch_0_line_is_the_test_after_the_head_phase_and_resume_does_not_redo_it(tiny_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("cpu_threads: 1}", "cpu_threads: 1, head_steps: 2}"))
    options = {"data": str(tiny_data), "recipe": str(recipe), "device": "cpu"}

    run_finetune(prepare_finetune(run=tmp_path / "a", **options))  # uninterrupted
    rows = read_metrics(tmp_path / "a")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[0]["head_steps"] == 2
    assert all("head_steps" not in r for r in rows[1:])
    state = torch.load(tmp_path / "a" / "last" / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["best_epoch"] in (1, 2)  # epoch 0 is no trained epoch

    plan = prepare_finetune(run=tmp_path / "b", **options)
    start = copy.deepcopy(plan.network.state_dict())
    with pytest.raises(StopAfterEpoch):
        run_finetune(plan, stop_after(0))
    after = ilmconvert.load(tmp_path / "b" / "last")
    changed = {n for n, t in after.state_dict().items() if not torch.equal(t, start[n])}
    assert changed == {"fc.weight", "fc.bias"}
    (row,) = read_metrics(tmp_path / "b")
    assert row == {**row, "epoch": 0, "head_steps": 2}
    assert row["top1"] == pytest.approx(independent_top1(after, tiny_data), abs=1e-9)
    assert not (tmp_path / "b" / "best").exists()  # epoch 0 is never "best"

    # resumed from epoch 0: no second head phase (a repeated one would change every later number)
    resumed = prepare_finetune(run=tmp_path / "b", resume=True, data=str(tiny_data), device="cpu")
    assert resumed.start_epoch == 0 and resumed.trainer_state is not None
    run_finetune(resumed)
    assert numbers(tmp_path / "b") == numbers(tmp_path / "a")
    for name in ("last", "best"):
        a, b = (ilmconvert.load(tmp_path / x / name).state_dict() for x in "ab")
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_resumed_after_epoch_1_the_run_ends_as_the_uninterrupted_one(tiny_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.replace("cpu_threads: 1}", "cpu_threads: 1, head_steps: 3, trainable: norms+head}"))
    options = {"data": str(tiny_data), "recipe": str(recipe), "device": "cpu"}
    run_finetune(prepare_finetune(run=tmp_path / "a", **options))
    with pytest.raises(StopAfterEpoch):
        run_finetune(prepare_finetune(run=tmp_path / "b", **options), stop_after(1))
    from ilmconvert.train.run import RunError

    with pytest.raises(RunError, match="cannot change train.head_steps"):  # it would change every number
        prepare_finetune(run=tmp_path / "b", resume=True, data=str(tiny_data), device="cpu",
                         overrides={"train.head_steps": 5})
    run_finetune(prepare_finetune(run=tmp_path / "b", resume=True, data=str(tiny_data), device="cpu"))
    assert numbers(tmp_path / "b") == numbers(tmp_path / "a") and numbers(tmp_path / "a")[0]["head_steps"] == 3
    a, b = (ilmconvert.load(tmp_path / x / "last").state_dict() for x in "ab")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_head_steps_is_a_validated_recipe_key():
    recipe = parse_recipe(TINY_RECIPE, "tiny")
    assert recipe.train.head_steps == 0
    assert recipe.with_overrides(settings=["train.head_steps=7"]).train.head_steps == 7
    from ilmconvert.train.recipes import RecipeError

    with pytest.raises(RecipeError, match="head_steps"):
        recipe.with_overrides(settings=["train.head_steps=-1"])


def test_the_sweep_reports_the_step_0_error(tmp_path):
    from ilmconvert.train import sweep as S
    from ilmconvert.train.sweep_results import summarize, summary_markdown

    data = make_image_folder(tmp_path / "data", n_train=8, n_test=4)
    (tmp_path / "r.yaml").write_text("""
name: tiny-sweep
model:
  name: timm:resnet18
  kwargs: {channels: [32, 32, 64, 64], stem_width: 32, layers: [1, 1, 1, 1]}
train: {epochs: 1, batch_size: 8, lr: 0.05, cpu_threads: 1, head_steps: 1}
data: {eval_batch_size: 96}
""")
    sweep = S.plan_sweep(recipe=tmp_path / "r.yaml", data=str(data), out=tmp_path / "sweep", variants="gn",
                         batch_sizes="8", seeds="0,1", device="cpu")
    S.run_sweep(sweep)
    results = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    for cell in results:
        rows = read_metrics(tmp_path / "sweep" / "cells" / cell["cell"])
        assert cell["step0_error"] == 100.0 - rows[0]["top1"] and rows[0]["epoch"] == 0
        assert cell["final_error"] == 100.0 - rows[-1]["top1"] and cell["best_epoch"] == 1
        assert [p["epoch"] for p in cell["curve"]] == [0, 1]
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    (row,) = summary["table"]
    assert row["step0_n"] == 2
    assert row["step0_error_mean"] == pytest.approx(sum(c["step0_error"] for c in results) / 2)
    assert "## Step 0 (head only, before fine-tuning)" in (tmp_path / "sweep" / "summary.md").read_text()
    # cells without the phase: None, and no step-0 table
    plain = [{**c, "step0_error": None} for c in results]
    table = summarize(sweep, plain)
    assert table["table"][0]["step0_error_mean"] is None
    assert "Step 0" not in summary_markdown(table)


def test_finetune_prints_the_head_only_line_and_eval_and_plot_take_the_run(tiny_data, tmp_path):
    from typer.testing import CliRunner

    from ilmconvert.cli import app

    recipe, run = tmp_path / "r.yaml", tmp_path / "run"
    recipe.write_text(TINY_RECIPE)
    runner = CliRunner()
    args = ["finetune", "--recipe", str(recipe), "--data", str(tiny_data), "--out", str(run), "--device", "cpu",
            "--epochs", "1", "--head-steps", "1"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "epoch   0/1  head only (1 step)  train loss" in result.output
    assert "epoch   1/1  train loss" in result.output and (run / "curves.png").is_file()
    for command in (["eval", str(run), "--data", str(tiny_data), "--device", "cpu"],
                    ["plot", str(run), "--out", str(tmp_path / "c.png")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output


_RANKS = """
import torch
import torch.distributed as dist
import test_head_steps as T
from ilmconvert.train.distributed import destroy_process_group, from_environment, init_process_group
from ilmconvert.train import loop as L
from ilmconvert.train.data import ImageSet
from ilmconvert.train.head_probe import probe_head
from ilmconvert.train.loader import make_loader
from ilmconvert.train.recipes import DataSettings, TrainSettings
import numpy as np

processes = from_environment()
init_process_group(processes, torch.device("cpu"))
network = T.bn_network()  # the same start on both ranks (seeded)
rng = np.random.default_rng(0)
images = ImageSet(list(rng.integers(0, 255, (32, 16, 16, 3), dtype=np.uint8)), [i % 3 for i in range(32)],
                  ["a", "b", "c"], 16, cache=True)
loader = make_loader(images, 8, train=True, seed=0, processes=processes)
first = [int(i) for i, _ in loader.sampler]
out = probe_head(network, loader, TrainSettings(batch_size=8, lr=0.1, head_steps=3), DataSettings(image_size=16),
                 L.Precision(torch.device("cpu"), "none"), processes=processes)
heads = [torch.zeros_like(network.fc.weight) for _ in range(2)]
dist.all_gather(heads, network.fc.weight.detach())
orders = [None, None]
dist.all_gather_object(orders, first)
if processes.rank == 0:
    assert set(orders[0]).isdisjoint(orders[1]), orders  # each rank trains on its own shard
    assert torch.equal(heads[0], heads[1]), "the ranks' heads differ"
    assert not torch.equal(heads[0], T.bn_network().fc.weight)
    assert out["images"] == 2 * 3 * 8, out
    print("same head on both ranks")
destroy_process_group()  # not dist.destroy_process_group(): see its docstring
"""


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch was built without the Gloo backend",
)
def test_under_torchrun_every_process_ends_with_the_same_head(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    tests = Path(__file__).parent
    path = os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same head on both ranks" in done.stdout


def test_ctrl_c_during_the_head_phase_leaves_nothing_and_the_run_starts_anew(tiny_data, tmp_path):
    import os
    import signal

    from ilmconvert.train.loop import Batches
    from ilmconvert.train.run import RunInterrupted

    recipe, run = tmp_path / "r.yaml", tmp_path / "run"
    text = TINY_RECIPE.replace("cpu_threads: 1}", "cpu_threads: 1, head_steps: 3}").replace("epochs: 2", "epochs: 1")
    recipe.write_text(text)
    steps = []

    def head_batches(epoch):
        def advance(loss):
            steps.append(epoch)
            if len(steps) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the first head-only step

        return Batches(advance=advance)

    plan = prepare_finetune(data=str(tiny_data), run=run, recipe=str(recipe), device="cpu")
    # SIGINT as in a terminal: a suite started in the background (`pytest &`, nohup) ignores it, and
    # the run then rightly installs no handler (tests/helpers.py _default_sigint)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(RunInterrupted, match="nothing was written"):
            run_finetune(plan, Progress(train=head_batches))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert steps == [0] and not run.exists()
    run_finetune(prepare_finetune(data=str(tiny_data), run=run, recipe=str(recipe), device="cpu"))
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1]
