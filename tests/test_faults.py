"""Faults a long run meets, through the real command line in child processes: SIGTERM (what
schedulers send) at a random step of epoch 1 and 2, then `--resume`; a mid-epoch checkpoint
(`--checkpoint-interval`) after `kill -9`; SIGTERM during a `sweep` cell and under a 2-process
torchrun; a full disk (simulated at the write call sites, and on a real 2 MiB tmpfs where this
machine lets us mount one); damaged run folders. Every resumed run must reproduce the
uninterrupted run's metrics.jsonl exactly (every number but the timings).

A signal at a chosen training batch comes from the child itself: a small launcher script
(:data:`LAUNCHER`) wraps the per-batch input conversion of the training loop, sends the signal
(or simulates the full disk) and then runs the ordinary `ilmconvert` command line.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import ENV, Reference, finish, make_image_folder, numbers, run_to_end, start, write_recipe
from ilmconvert.train.run import LOCK_FILE, read_metrics

#: batches per epoch of the tiny data (120 training images, batch 16, last partial batch dropped)
STEPS = 7

LAUNCHER = r'''
"""python LAUNCHER ACTION N ilmconvert-args...: run `ilmconvert ARGS`, and at the N-th training
batch (of the process whose RANK is $FAULT_RANK, default every process) do ACTION: a signal name
(SIGTERM, SIGKILL) sent to itself, or ENOSPC: the N-th safetensors write fails as a full disk does."""
import os, signal, sys

action, at = sys.argv.pop(1), int(sys.argv.pop(1))
sys.argv[0] = "ilmconvert"
if action == "ENOSPC":
    import safetensors.torch
    from safetensors import SafetensorError

    real_save, calls = safetensors.torch.save_model, [0]

    def save_model(model, filename, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 1000)  # a part was written when the disk filled up
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(model, filename, *args, **kwargs)

    safetensors.torch.save_model = save_model
elif os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")):
    import torch
    from ilmconvert.train import loop

    real_to_input, seen = loop.to_input, [0]

    def to_input(*args, **kwargs):
        if torch.is_grad_enabled():  # a training batch (evaluation runs without grad)
            seen[0] += 1
            if seen[0] == at:
                os.kill(os.getpid(), getattr(signal, action))
        return real_to_input(*args, **kwargs)

    loop.to_input = to_input
from ilmconvert.cli import main

main()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[dict]:
    """The tiny data, the launcher and the uninterrupted reference run (3 epochs of 7 steps)."""
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "data", n_train=40, n_test=10)
    launcher = root / "launcher.py"
    launcher.write_text(LAUNCHER)
    reference = Reference(root, data)
    yield {"root": root, "data": data, "launcher": launcher, "reference": reference}
    if reference.proc.poll() is None:
        reference.proc.kill()
        reference.proc.wait()


def faulty(setup: dict, action: str, at: int) -> list[str]:
    return [sys.executable, str(setup["launcher"]), action, str(at)]


def one_error_line(out: str, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out + err, out + err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0][len("error: "):]


def trainer_state(run: Path) -> dict:
    from ilmconvert.io import load_trainer_state

    return load_trainer_state(run / "last")


# ------------------------------------------------------------------------------------------ SIGTERM
@pytest.mark.parametrize("epoch", [1, 2])
def test_sigterm_at_a_random_step_saves_the_step_and_resume_reproduces_the_run(setup, tmp_path, epoch):
    step = random.randint(1, STEPS - 1)  # inside the epoch (the last step ends it: tested below)
    data, run, log = setup["data"], tmp_path / "run", tmp_path / "first"
    recipe = write_recipe(tmp_path, 1, False)  # a loader worker: the signal must not reach it
    proc = start("--recipe", recipe, "--data", data, "--out", run, log=log,
                 launcher=faulty(setup, "SIGTERM", (epoch - 1) * STEPS + step))
    code, out, err = finish(proc, log)
    assert code == 143, out + err
    line = one_error_line(out, err)
    assert line.startswith("stopped by SIGTERM; resume with: ilmconvert finetune "), line
    printed = shlex.split(line.split("resume with: ", 1)[1])
    assert printed == ["ilmconvert", "finetune", "--out", str(run), "--resume", "--data", str(data), "--device", "cpu"]
    state = trainer_state(run)
    assert state["epoch"] == epoch - 1 and state["position"]["step"] == step, f"SIGTERM at step {step}"
    assert [row["epoch"] for row in read_metrics(run)] == list(range(1, epoch))
    assert not (run / LOCK_FILE).exists()

    run_to_end(*printed[2:], log=tmp_path / "resumed")
    assert numbers(run) == setup["reference"].numbers(), f"SIGTERM at step {step} of epoch {epoch}"
    assert "position" not in trainer_state(run)


def test_sigterm_at_the_last_step_of_an_epoch_stops_after_writing_the_epoch(setup, tmp_path):
    data, run, log = setup["data"], tmp_path / "run", tmp_path / "first"
    proc = start("--recipe", write_recipe(tmp_path, 0, True), "--data", data, "--out", run, log=log,
                 launcher=faulty(setup, "SIGTERM", STEPS))
    code, out, err = finish(proc, log)
    assert code == 143 and "epoch   1/3" in out and "epoch   2/3" not in out, out + err
    assert trainer_state(run)["epoch"] == 1 and "position" not in trainer_state(run)
    run_to_end("--out", run, "--resume", "--data", data, log=tmp_path / "resumed")
    assert numbers(run) == setup["reference"].numbers()


# ------------------------------------------------------------------------------------------ --checkpoint-interval
def test_a_mid_epoch_checkpoint_survives_kill_9_and_resume_reproduces_the_run(setup, tmp_path):
    """A checkpoint after every update (an interval of 6 ms), kill -9 inside epoch 2: last/ holds the
    update before it, and --resume from there reproduces the run (so the checkpoints themselves
    change no number either)."""
    step = random.randint(2, STEPS - 1)
    data, run, log = setup["data"], tmp_path / "run", tmp_path / "first"
    proc = start("--recipe", write_recipe(tmp_path, 0, True), "--data", data, "--out", run,
                 "--checkpoint-interval", "0.0001", log=log, launcher=faulty(setup, "SIGKILL", STEPS + step))
    code, out, err = finish(proc, log)
    assert code == -signal.SIGKILL, out + err
    state = trainer_state(run)
    assert state["epoch"] == 1 and state["position"]["step"] == step - 1, f"kill -9 at step {step}"
    run_to_end("--out", run, "--resume", "--data", data, log=tmp_path / "resumed")
    assert numbers(run) == setup["reference"].numbers(), f"kill -9 at step {step} of epoch 2"


def test_checkpoint_interval_is_a_recipe_key_that_resume_may_change(tmp_path):
    from ilmconvert.train.prepare import RESUMABLE
    from ilmconvert.train.recipes import RecipeError, load_recipe

    recipe = load_recipe("cifar10").with_overrides(settings=["train.checkpoint_interval=30"])
    assert recipe.train.checkpoint_interval == 30 and "train.checkpoint_interval" in RESUMABLE
    with pytest.raises(RecipeError):
        load_recipe("cifar10").with_overrides(settings=["train.checkpoint_interval=0"])


# ------------------------------------------------------------------------------------------ sweep, torchrun
def sweep_command(recipe: Path, data: Path, out: Path) -> list[str]:
    return ["sweep", "--recipe", str(recipe), "--data", str(data), "--out", str(out), "--variants", "gn",
            "--batch-sizes", "16", "--seeds", "0,1", "--epochs", "2", "--device", "cpu"]


def comparable_results(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def test_sigterm_during_a_sweep_cell_resumes_that_cell_exactly(setup, tmp_path):
    data, recipe = setup["data"], write_recipe(tmp_path, 0, True)
    step = random.randint(1, STEPS - 1)
    stopped, log = tmp_path / "stopped", tmp_path / "first"
    command = sweep_command(recipe, data, stopped)
    reference = subprocess.Popen([sys.executable, "-m", "ilmconvert", *sweep_command(recipe, data, tmp_path / "ref")],
                                 env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:  # the second cell, in its epoch 2
        proc = subprocess.Popen([*faulty(setup, "SIGTERM", 3 * STEPS + step), *command], env=ENV, stdout=out,
                                stderr=err)
    code, out, err = finish(proc, log, timeout=300)
    assert code == 143, out + err
    line = one_error_line(out, err)
    assert line.startswith("stopped by SIGTERM in cell gn-b16-s1; resume with the same `ilmconvert sweep`"), line
    cell = stopped / "cells" / "gn-b16-s1"
    assert trainer_state(cell)["position"]["step"] == step
    assert len(comparable_results(stopped)) == 1
    done = subprocess.run([sys.executable, "-m", "ilmconvert", *command], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert comparable_results(stopped) == comparable_results(tmp_path / "ref")


def torchrun(launcher: list[str], *args: object) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2` of ``launcher`` (a script and its arguments, or
    `-m ilmconvert`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher,
            "finetune", *map(str, args), "--device", "cpu"]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch was built without the Gloo backend",
)
def test_torchrun_sigterm_at_one_rank_stops_every_rank_and_resume_reproduces_the_run(setup, tmp_path):
    """2 Gloo processes, 3 steps per epoch each; SIGTERM reaches rank 1 alone (a scheduler's signal
    may reach the processes at different steps): both stop after the same update (the next one,
    or the epoch's end), rank 0 writes, and the resumed run (torchrun again) reproduces the
    uninterrupted torchrun run."""
    data, recipe = setup["data"], write_recipe(tmp_path, 0, True)
    env = {**ENV, "OMP_NUM_THREADS": "1", "FAULT_RANK": "1"}
    step = random.randint(1, 2)  # of epoch 2 (3 steps per process and epoch)
    script = [str(setup["launcher"]), "SIGTERM", str(3 + step)]
    with open(tmp_path / "ref.err", "w") as ref_err:  # a file, not a pipe that could fill up
        reference = subprocess.Popen(torchrun(["-m", "ilmconvert"], "--recipe", recipe, "--data", data, "--out",
                                              tmp_path / "ref"), env=env, stdout=subprocess.DEVNULL, stderr=ref_err)
    run = tmp_path / "run"
    first = subprocess.run(torchrun(script, "--recipe", recipe, "--data", data, "--out", run), env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode != 0, first.stdout[-3000:] + first.stderr[-3000:]
    # rank 0 alone says how to resume
    assert first.stderr.count("error: stopped by SIGTERM; resume with: torchrun --nproc_per_node 2 -m ilmconvert "
                              "finetune") == 1, first.stderr[-3000:]
    assert "/ilmconvert/train/" not in first.stderr, first.stderr[-3000:]  # no traceback of ours
    state = trainer_state(run)
    if step == 1:  # rank 0 learns of it one update later: after step 2
        assert state["epoch"] == 1 and state["position"]["step"] == 2 and state["position"]["sums"].shape == (2, 3)
    else:  # step 3 ends the epoch: both stop after writing it
        assert state["epoch"] == 2 and "position" not in state
    resumed = subprocess.run(torchrun(["-m", "ilmconvert"], "--out", run, "--resume", "--data", data), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, (tmp_path / "ref.err").read_text()[-3000:]
    assert numbers(run) == numbers(tmp_path / "ref") and len(numbers(run)) == 3


# ------------------------------------------------------------------------------------------ full disk
def test_a_full_disk_during_finetune_is_one_line_and_keeps_the_previous_last(setup, tmp_path):
    """The third checkpoint write (last/ after epoch 1; before it: last/ of epoch 0, best/) fails
    as a full disk fails: one line, exit 2, last/ of epoch 0 still loads, nothing half-written is
    left, and --resume once there is space reproduces the run."""
    from ilmconvert.io import load

    data, run, log = setup["data"], tmp_path / "run", tmp_path / "first"
    proc = start("--recipe", write_recipe(tmp_path, 0, True), "--data", data, "--out", run, log=log,
                 launcher=faulty(setup, "ENOSPC", 3))
    code, out, err = finish(proc, log)
    assert code == 2, out + err
    line = one_error_line(out, err)
    assert line.startswith(f"cannot write {run / 'last'}: No space left on device (needs about "), line
    assert f"resume with: ilmconvert finetune --out {run} --resume" in line, line
    load(run / "last")
    assert trainer_state(run)["epoch"] == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary folder, no lock
    run_to_end("--out", run, "--resume", "--data", data, log=tmp_path / "resumed")
    assert numbers(run) == setup["reference"].numbers()


def disk_errors() -> list[BaseException]:
    from safetensors import SafetensorError

    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    return [OSError(errno.ENOSPC, "No space left on device"),
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            wrapped, OSError(errno.EROFS, "Read-only file system")]


@pytest.mark.parametrize("index, reason", [(0, "No space left on device"), (1, "No space left on device"),
                                           (2, "Disk quota exceeded"), (3, "Read-only file system")])
def test_guard_names_the_path_and_the_need_for_each_disk_fault(tmp_path, index, reason):
    from ilmconvert.atomic import WriteError, guard

    with pytest.raises(WriteError) as caught:
        with guard(tmp_path / "x", 3 * 2**20):
            raise disk_errors()[index]
    assert str(caught.value).startswith(f"cannot write {tmp_path / 'x'}: {reason} (needs about 3.0 MiB")
    with pytest.raises(OSError, match="Permission denied"):  # other errors pass unchanged
        with guard(tmp_path / "x"):
            raise OSError(errno.EACCES, "Permission denied")


def full_disk(monkeypatch) -> None:
    """Every file that the package writes through Python fails as on a full disk."""
    from ilmconvert import atomic

    def write_bytes(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(atomic, "open", lambda *a, **k: write_bytes(None, None), raising=False)


def test_sweep_summaries_and_run_files_on_a_full_disk_keep_the_old_file(tmp_path, monkeypatch):
    from ilmconvert.atomic import WriteError
    from ilmconvert.train.run_folder import write_metrics
    from ilmconvert.train.sweep_results import write_json_atomic

    (tmp_path / "summary.json").write_text("{}\n")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    full_disk(monkeypatch)
    with pytest.raises(WriteError, match=r"summary.json: No space left on device \(needs about"):
        write_json_atomic(tmp_path / "summary.json", {"cells": 1})
    with pytest.raises(WriteError, match="metrics.jsonl: No space left on device"):
        write_metrics(tmp_path, [{"epoch": 1}, {"epoch": 2}])
    assert (tmp_path / "summary.json").read_text() == "{}\n"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]


def test_export_on_a_full_disk_is_one_write_error_and_leaves_nothing(tmp_path, monkeypatch):
    from ilmconvert import export
    from ilmconvert.atomic import WriteError

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    full_disk(monkeypatch)
    with pytest.raises(WriteError, match=r"model.pt2: No space left on device \(needs about"):
        export(model, tmp_path / "model.pt2", format="pt2", input_size=(8, 8), check=False)
    assert list(tmp_path.iterdir()) == []


def mount_tmpfs_and_run(folder: Path, size: str, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` with a fresh ``size`` tmpfs at ``folder``, in a private mount namespace (an
    unprivileged user namespace where the system allows one), then the tmpfs' listing."""
    script = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))} || exit 99; " \
             f"{shlex.join(command)}; code=$?; echo LEFT: $(ls -A {shlex.quote(str(folder))}); exit $code"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                          capture_output=True, text=True, timeout=600)


def tmpfs_allowed(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    (tmp_path / "probe").mkdir()
    return mount_tmpfs_and_run(tmp_path / "probe", "64k", ["true"]).returncode == 0


def test_swap_on_a_real_2_mib_tmpfs_is_one_line(tmp_path):
    """The reported case: `swap` onto a 2 MiB file system."""
    if not tmpfs_allowed(tmp_path):
        pytest.skip("this machine does not let an unprivileged process mount a tmpfs (unshare -rm)")
    small = tmp_path / "small"
    small.mkdir()
    done = mount_tmpfs_and_run(small, "2m", [sys.executable, "-m", "ilmconvert", "swap", "resnet50_gn",
                                             "--no-pretrained", "--out", str(small / "ckpt")])
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_error_line(done.stdout, done.stderr)
    assert line.startswith(f"cannot write {small / 'ckpt'}: No space left on device (needs about 97."), line
    assert "LEFT: \n" in done.stdout or done.stdout.rstrip().endswith("LEFT:")  # nothing half-written


# ------------------------------------------------------------------------------------------ damaged run folders
@pytest.fixture()
def finished(setup, tmp_path) -> Path:
    """A copy of the finished reference run (3 epochs)."""
    setup["reference"].numbers()
    run = tmp_path / "run"
    shutil.copytree(setup["reference"].run, run)
    return run


def resume_line(run: Path, data: Path, tmp_path: Path, *more: str) -> tuple[int, str]:
    log = tmp_path / "resume"
    code, out, err = finish(start("--out", run, "--resume", "--data", data, *more, log=log), log)
    return code, (one_error_line(out, err) if code else out)


def test_a_trainer_state_of_other_weights_is_refused(setup, finished, tmp_path):
    from helpers import tiny_converted_network
    from ilmconvert.io import save

    other = save(tiny_converted_network(), tmp_path / "other", trainer_state={"epoch": 1, "optimizer": {}})
    shutil.copy(other / "trainer_state.pt", finished / "last" / "trainer_state.pt")
    code, line = resume_line(finished, setup["data"], tmp_path, "--epochs", "4")
    assert code == 2
    assert line.startswith(f"{finished / 'last' / 'trainer_state.pt'} belongs to other weights than "), line
    assert "put back the trainer_state.pt saved with them, or start a new run" in line


def test_a_truncated_last_checkpoint_is_one_line(setup, finished, tmp_path):
    weights = finished / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, line = resume_line(finished, setup["data"], tmp_path, "--epochs", "4")
    assert code == 2
    assert line == (f"--resume: {weights} is corrupt or truncated: its sha256 does not match config.json; "
                    "the run cannot continue from it: start a new run"), line


def test_a_torn_line_after_last_is_dropped_and_the_run_goes_on(setup, finished, tmp_path):
    """The line being written when the process died (an epoch after last/'s) is repaired away."""
    before = numbers(finished)
    with open(finished / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "train_loss": 0.3')
    code, out = resume_line(finished, setup["data"], tmp_path, "--epochs", "4")
    assert code == 0, out
    after = numbers(finished)
    assert after[:3] == before and [row["epoch"] for row in after] == [1, 2, 3, 4]


def test_a_torn_line_that_last_holds_is_one_line(setup, finished, tmp_path):
    path = finished / "metrics.jsonl"
    path.write_text(path.read_text()[:-30])
    code, line = resume_line(finished, setup["data"], tmp_path, "--epochs", "4")
    assert code == 2
    assert line.startswith(f"{path} lacks the line of epoch 3 that {finished / 'last'} holds"), line
    assert "restore metrics.jsonl from a copy, or start a new run" in line


def test_a_metrics_line_that_is_not_json_is_one_line(setup, finished, tmp_path):
    path = finished / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "garbage\n" + "".join(lines[2:]))
    code, line = resume_line(finished, setup["data"], tmp_path, "--epochs", "4")
    assert code == 2 and line.startswith(f"{path} is damaged ("), line
    assert os.path.exists(finished / "last" / "trainer_state.pt")
