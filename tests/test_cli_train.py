"""CLI tests for `ilmconvert finetune`, `eval` and `recipes` (typer's CliRunner, CPU, tiny data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ilmconvert
from helpers import TINY_RECIPE, make_image_folder, tiny_converted_network
from ilmconvert.cli import app
from ilmconvert.train import run as run_module
from ilmconvert.train.run import METRIC_KEYS, read_metrics

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """3 classes (noisy stripe patterns), 24 train and 12 test PNGs per class."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def finetune(*args: str):
    args = [str(a) for a in args]
    return runner.invoke(app, ["finetune", *args, *([] if "--device" in args else ["--device", "cpu"])])


def one_error_line(result) -> str:
    """The single `error: ...` line of a failed command (asserts exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tiny_data, tiny_recipe, tmp_path_factory) -> Path:
    """A complete 2-epoch run on the tiny data."""
    run = tmp_path_factory.mktemp("runs") / "run"
    result = finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_recipes_lists_the_bundled_recipes():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert "cifar10-smoke" in result.output and "timm:resnet50_gn" in result.output
    assert re.search(r"cifar10 .*200", result.output)


def test_finetune_writes_metrics_and_loadable_checkpoints(finished_run):
    metrics = read_metrics(finished_run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(set(METRIC_KEYS) <= set(m) for m in metrics)
    assert all(0 <= m["top1"] <= m["top5"] <= 100 and m["images_per_s"] > 0 for m in metrics)
    assert metrics[-1]["lr"] < metrics[0]["lr"]  # cosine decay
    assert (finished_run / "recipe.yaml").is_file()
    assert (finished_run / "last" / "trainer_state.pt").is_file()
    best = ilmconvert.load(finished_run / "best")
    assert best.ilm_source.kwargs["num_classes"] == 3 and len(best.ilm_conversion.converted) > 0
    assert best(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    config = json.loads((finished_run / "best" / "config.json").read_text())
    best_epoch = max(metrics, key=lambda m: m["top1"])
    assert config["metadata"]["top1"] == best_epoch["top1"] and config["metadata"]["data"]["classes"] == [
        "checker",
        "horizontal",
        "vertical",
    ]
    # the patterns are easy: two short epochs must beat chance (33 %)
    assert best_epoch["top1"] > 50, metrics


def test_eval_prints_the_runs_best_top1(finished_run, tiny_data):
    result = runner.invoke(app, ["eval", str(finished_run), "--data", str(tiny_data), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    match = re.search(r"top-1 ([\d.]+) % top-5 ([\d.]+) % loss ([\d.]+)", text)
    assert match, result.output
    assert str(finished_run / "best") in text and "36 images" in text
    best = max(read_metrics(finished_run), key=lambda m: m["top1"])
    assert float(match.group(1)) == pytest.approx(best["top1"], abs=0.01)
    assert float(match.group(3)) == pytest.approx(best["test_loss"], abs=1e-3)


def test_resume_continues_where_an_interrupted_run_stopped(tiny_data, tiny_recipe, finished_run, tmp_path, monkeypatch):
    real = run_module.train_one_epoch
    calls = []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(run_module, "train_one_epoch", interrupt_second_epoch)
    result = finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", run)
    assert result.exit_code == 130 and "interrupted" in result.output
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    monkeypatch.setattr(run_module, "train_one_epoch", real)

    result = finetune("--data", tiny_data, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in " ".join(result.output.split())
    resumed, uninterrupted = read_metrics(run), read_metrics(finished_run)
    assert [m["epoch"] for m in resumed] == [1, 2]
    # optimizer, scheduler, data order and augmentation are restored: epoch 2 is replayed exactly
    for key in ("train_loss", "test_loss", "top1", "lr"):
        assert resumed[1][key] == pytest.approx(uninterrupted[1][key], rel=1e-4, abs=1e-6), key
    state = ilmconvert.io.load_trainer_state(run / "last")
    assert state["epoch"] == 2 and state["num_updates"] == 2 * 4

    # a finished run only goes on with more epochs
    assert "already finished 2 of 2 epochs" in one_error_line(finetune("--data", tiny_data, "--out", run, "--resume"))
    result = finetune("--data", tiny_data, "--out", run, "--resume", "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]


def test_finetune_a_converted_checkpoint_resizes_its_head(tiny_data, tiny_recipe, tmp_path):
    network = tiny_converted_network(num_classes=10)
    ilmconvert.save(network, tmp_path / "swapped")
    run = tmp_path / "run"
    result = finetune(tmp_path / "swapped", "--recipe", tiny_recipe, "--data", tiny_data, "--out", run, "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "classifier resized to 3 classes" in " ".join(result.output.split())
    best = ilmconvert.load(run / "best")
    assert best.ilm_source.kwargs["num_classes"] == 3 and best.fc.out_features == 3


def test_expected_mistakes_are_one_line_and_write_nothing(tiny_data, tiny_recipe, tmp_path, monkeypatch):
    run = tmp_path / "run"
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_RECIPE.replace("epochs: 2", "epochz: 2"))
    cases = [
        (["--recipe", tiny_recipe, "--data", tmp_path / "missing", "--out", run], "does not exist"),
        (["--recipe", bad, "--data", tiny_data, "--out", run], "unknown key 'train.epochz'"),
        (["--recipe", "no-such-recipe", "--data", tiny_data, "--out", run], "unknown recipe 'no-such-recipe'"),
        (["--data", tiny_data, "--out", run, "--resume"], "not a run folder"),
        ([tmp_path / "ck", "--data", tiny_data, "--out", run, "--resume"], "only --epochs may change"),
        (["--recipe", tiny_recipe, "--data", tiny_data, "--out", run, "--lr", "0"], "train.lr"),
        (["--recipe", tiny_recipe, "--data", tiny_data, "--out", run, "--device", "tpu"], "--device"),
        (
            [tmp_path / "nockpt", "--recipe", tiny_recipe, "--data", tiny_data, "--out", run],
            "not an ilmconvert checkpoint",
        ),
    ]
    for args, expected in cases:
        line = one_error_line(finetune(*args))
        assert expected in line, (args, line)
    assert str(bad) in one_error_line(finetune("--recipe", bad, "--data", tiny_data, "--out", run))
    assert not run.exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "not a writable directory" in one_error_line(
        finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", blocker / "run")
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "--resume" in one_error_line(finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", full))
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]

    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    line = one_error_line(
        finetune("--recipe", tiny_recipe, "--data", "cifar10", "--data-root", tmp_path / "dl", "--out", run)
    )
    assert "cannot download cifar10" in line and "ImageFolder" in line
    assert not run.exists()


def test_eval_errors_are_one_line(finished_run, tiny_data, tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path), "--data", str(tiny_data), "--device", "cpu"])
    assert "neither a checkpoint" in one_error_line(result)
    other = make_image_folder(tmp_path / "five", classes=("a", "b", "c", "d", "e"), n_train=1, n_test=1)
    result = runner.invoke(app, ["eval", str(finished_run), "--data", str(other), "--device", "cpu"])
    assert "predicts 3 classes but" in one_error_line(result)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch was built without the Gloo backend",
)
def test_finetune_under_torchrun_with_two_cpu_processes(tiny_data, tiny_recipe, tmp_path):
    """`torchrun --nproc_per_node 2 -m ilmconvert finetune` on CPU (Gloo): rank 0 alone reports and
    writes, and the test metrics summed over the two disjoint test slices are those of the whole
    test split evaluated by one process from the saved weights (which also shows that both
    processes held the same weights)."""
    from ilmconvert.train.run import evaluate_checkpoint

    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ilmconvert",
        "finetune",
        "--recipe",
        str(tiny_recipe),
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("epoch   2/2") == 1
    assert "2 processes: batch 16 per process, 32 per update" in done.stdout
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    best = max(metrics, key=lambda m: m["top1"])
    alone = evaluate_checkpoint(run, str(tiny_data), device="cpu")
    assert alone["images"] == 36
    assert alone["top1"] == pytest.approx(best["top1"]) and alone["top5"] == pytest.approx(best["top5"])
    assert alone["loss"] == pytest.approx(best["test_loss"], rel=1e-5)
    # 72 training images over 2 processes: 2 full batches of 16 each, so 64 images per epoch
    assert all(abs(m["train_top1"] * 64 / 100 - round(m["train_top1"] * 64 / 100)) < 1e-9 for m in metrics)


@pytest.mark.parametrize("module", ["ilmconvert", "ilmconvert.cli"])
def test_python_dash_m_knows_the_fine_tuning_commands(module):
    """`python -m ilmconvert.cli` once ran a second copy of the app without finetune / eval."""
    done = subprocess.run(
        [sys.executable, "-m", module, "recipes"],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cifar10-smoke" in done.stdout


def test_world_size_without_torchrun_is_one_line(tiny_data, tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    line = one_error_line(finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", tmp_path / "run"))
    assert "joining the process group failed" in line and "torchrun" in line
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert "must be integers" in one_error_line(
        finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", tmp_path / "run")
    )


def test_resume_accepts_the_original_command_and_names_a_changed_value(tiny_data, tiny_recipe, tmp_path):
    """Issue 21: the first command given again with --resume (its --recipe, --set and data flags
    unchanged) continues the run; a changed value is refused with the key and both values."""
    import yaml

    run = tmp_path / "run"
    original = ["--recipe", tiny_recipe, "--data", tiny_data, "--out", run, "--train-subset", "30"]
    original += ["--set", "data.test_subset=20"]
    result = finetune(*original, "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert "30 train / 20 test images, 3 classes; 1 epoch," in " ".join(result.output.split())
    data = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
    assert (data["train_subset"], data["test_subset"]) == (30, 20)
    result = finetune(*original, "--epochs", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    changed = [*original[:-1], "data.test_subset=10", "--epochs", "3", "--resume"]
    line = one_error_line(finetune(*changed))
    assert "cannot change data.test_subset (data.test_subset: 20 in the run, 10 now)" in line
    other = tmp_path / "other.yaml"
    other.write_text(TINY_RECIPE.replace("lr: 0.05", "lr: 0.5"))
    line = one_error_line(finetune("--recipe", other, *original[2:], "--epochs", "3", "--resume"))
    assert "cannot change train.lr (train.lr: 0.05 in the run, 0.5 now)" in line
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


def test_the_cpu_kernel_is_compiled_in_a_reported_start_up_step(tiny_data, tiny_recipe, tmp_path, monkeypatch):
    """The GN + Proxy Norm C++ operator (~20 s to compile, once per machine) is built before training,
    as a start-up step the log reports, when the network has GN + PN layers and it is not cached;
    never for a network without them."""
    import time

    from ilmconvert.cli import output
    from ilmconvert.nn import cpu_op
    from ilmconvert.train.prepare import COMPILING

    assert COMPILING == "compiling the GN + Proxy Norm CPU kernel (once per machine)"
    monkeypatch.setattr(output, "QUIET_S", 0.01)
    monkeypatch.setattr(cpu_op, "is_cached", lambda directory=None: False)
    calls, real = [], cpu_op.operator

    def compiling():
        calls.append(1)
        time.sleep(0.1)  # a build outlasts QUIET_S
        return real()

    monkeypatch.setattr(cpu_op, "operator", compiling)
    args = ("--recipe", tiny_recipe, "--data", tiny_data, "--epochs", "1")
    result = finetune(*args, "--out", tmp_path / "proxy", "--method", "proxy")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    step = re.escape(COMPILING)
    done = next(i for i, line in enumerate(lines) if re.fullmatch(step + r": done in \d+\.\d s", line))
    assert done < next(i for i, line in enumerate(lines) if " train / " in line) and calls
    calls.clear()
    result = finetune(*args, "--out", tmp_path / "ilm", "--method", "ilm")
    assert result.exit_code == 0, result.output
    assert "compiling" not in result.output and not calls


def test_long_start_up_steps_are_reported_off_a_terminal(tiny_data, tiny_recipe, tmp_path, monkeypatch):
    """Issue 21: reading the images and building the network print plain lines in a log once they
    run longer than output.QUIET_S (10 s; here 10 ms), and their time when they end."""
    import time

    from ilmconvert.cli import output
    from ilmconvert.train import data, prepare

    monkeypatch.setattr(output, "QUIET_S", 0.01)

    def slowly(function, seconds):  # both steps outlast QUIET_S on any machine, however fast or loaded
        def wrapped(*args, **kwargs):
            time.sleep(seconds)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(data, "_decode", slowly(data._decode, 0.02))
    monkeypatch.setattr(prepare, "_network", slowly(prepare._network, 0.1))
    result = finetune("--recipe", tiny_recipe, "--data", tiny_data, "--out", tmp_path / "run", "--epochs", "1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(re.fullmatch(r"building the network after \d+ s", line) for line in lines), result.output
    assert any(re.fullmatch(r"building the network: done in \d+\.\d s", line) for line in lines)
    assert any(re.fullmatch(r"reading 72 train images: \d+/72 after \d+ s", line) for line in lines)
    assert any(re.fullmatch(r"reading 72 train images: done in \d+\.\d s", line) for line in lines)
    first = next(i for i, line in enumerate(lines) if " train / " in line)
    assert all("after" not in line for line in lines[first:])  # all steps ended before training
