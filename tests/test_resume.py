"""`finetune` stopped for real and resumed: `kill -9` and Ctrl-C (SIGINT) during epoch 2, then
`--resume` in a new process, must reproduce the uninterrupted run's metrics.jsonl exactly (every
number but the timings); and a second `finetune` on a run folder in use is refused.

Every run here is a real `python -m ilmconvert finetune` subprocess on CPU with one torch thread,
on a tiny learnable image folder, with a network that uses dropout and drop-path (so the global
random state at each epoch's start matters too). One uninterrupted run is the reference for every
case: an epoch's randomness depends only on (seed, epoch, rank), not on the loader's worker count
or the image cache, so all cases must reproduce the very same numbers.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from helpers import Reference, finish, make_image_folder, numbers, run_to_end, start, wait_for_epoch, write_recipe
from ilmconvert.train.run import LOCK_FILE, read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[dict]:
    """The tiny data and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("resume")
    data = make_image_folder(root / "data", n_train=40, n_test=10)  # 7 steps per epoch
    reference = Reference(root, data)
    yield {"data": data, "reference": reference}
    if reference.proc.poll() is None:
        reference.proc.kill()
        reference.proc.wait()


# kill -9 with and without loader workers and image cache; Ctrl-C with a loader worker (which a
# terminal's Ctrl-C reaches too). The delay after epoch 1's line appears places the stop: at 0 s
# it lands while epoch 1's checkpoint is being written (kill -9 then resumes from epoch 0 or 1),
# later ones in epoch 2's training.
@pytest.mark.parametrize(
    "stop, workers, cache, delay",
    [
        pytest.param(signal.SIGKILL, 1, True, 0.0, id="kill-9-workers1-cache"),  # the reported setting
        pytest.param(signal.SIGKILL, 0, False, 0.2, id="kill-9-workers0-nocache"),
        pytest.param(signal.SIGINT, 1, False, 0.1, id="ctrl-c-workers1-nocache"),
    ],
)
def test_stopped_during_epoch_2_then_resumed_reproduces_the_run(setup, tmp_path, stop, workers, cache, delay):
    data, run, log = setup["data"], tmp_path / "run", tmp_path / "first"
    proc = start("--recipe", write_recipe(tmp_path, workers, cache), "--data", data, "--out", run, log=log)
    wait_for_epoch(run, 1, proc)
    time.sleep(delay)
    if stop == signal.SIGKILL:
        os.kill(proc.pid, signal.SIGKILL)  # `kill -9 PID`: the main process only; its workers notice later
    else:
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the loader workers too
    code, out, err = finish(proc, log)
    assert len(read_metrics(run)) < 3, "the run had finished before it was stopped; nothing was tested"
    assert (run / "last" / "trainer_state.pt").is_file()
    resume = ["--out", run, "--resume", "--data", data]
    if stop == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 130, out + err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in out + err, out + err
        assert lines[0].startswith("error: interrupted; resume with: ilmconvert finetune ") and "--resume" in lines[0]
        printed = shlex.split(lines[0].split("resume with: ", 1)[1])
        assert printed == ["ilmconvert", "finetune", *map(str, resume), "--device", "cpu"]
        resume = printed[2:]  # the command as printed
        assert not (run / LOCK_FILE).exists()

    # resumed at once (after kill -9, a loader worker of the killed process may still be alive: it
    # must not hold the run's lock)
    run_to_end(*resume, log=tmp_path / "resumed")
    assert numbers(run) == setup["reference"].numbers()
    assert not (run / LOCK_FILE).exists()


def test_a_second_finetune_on_a_run_in_use_is_refused_and_changes_nothing(setup, tmp_path):
    from ilmconvert.train.run import RunInUse, prepare_finetune

    recipe, data, run = write_recipe(tmp_path, 0, True), setup["data"], tmp_path / "run"
    holder = start("--recipe", recipe, "--data", data, "--out", run, log=tmp_path / "holder")
    wait_for_epoch(run, 1, holder)
    os.killpg(holder.pid, signal.SIGSTOP)  # hold it still while the others try
    try:
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
        log = tmp_path / "second"
        code, out, err = finish(start("--recipe", recipe, "--data", data, "--out", run, log=log), log)
        assert code == 2, out + err
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), out + err
        assert f"--out {run} is in use by another finetune (pid {holder.pid})" in lines[0]
        with pytest.raises(RunInUse, match="in use by another finetune"):  # so is --resume
            prepare_finetune(data=str(data), run=run, resume=True, device="cpu")
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    finally:
        os.killpg(holder.pid, signal.SIGCONT)
    code, out, err = finish(holder, tmp_path / "holder")
    assert code == 0, out + err
    assert numbers(run) == setup["reference"].numbers()
    assert not (run / LOCK_FILE).exists()


# The loader worker's side of a Ctrl-C that lands while the main process receives a batch: the
# worker's resource_sharer thread loses its peer mid-handshake and reports EOFError through
# sys.excepthook (the CI failure of session 4). A child process plays the worker: it shares a file
# descriptor (which starts the serving thread), and a client connects and hangs up at once.
_HANG_UP = """
import os, socket, sys, time
from multiprocessing import resource_sharer
from ilmconvert.train import loader as data
if sys.argv[1] == "worker":
    data._init_worker(0)
address, _ = resource_sharer.DupFd(0)._id
client = socket.socket(socket.AF_UNIX)
client.connect(address)
client.recv(1024)  # the challenge; then hang up instead of answering it
client.close()
time.sleep(0.5)
print("done")
"""


@pytest.mark.parametrize("process", ["worker", "plain"])
def test_a_worker_prints_no_traceback_when_the_main_process_hangs_up(process):
    result = subprocess.run([sys.executable, "-c", _HANG_UP, process], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    if process == "worker":
        assert result.stderr == ""
    else:  # the same hang-up without the worker's hook: the traceback the hook exists to drop
        assert "EOFError" in result.stderr and "resource_sharer" in result.stderr
