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
from pathlib import Path

import pytest

from helpers import make_image_folder
from ilmconvert.train.run import LOCK_FILE, read_metrics

TIMINGS = {"images_per_s", "epoch_s"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}

RECIPE = """
description: tiny GN ResNet with dropout and drop-path
model:
  name: timm:resnet18
  kwargs:
    norm_layer: groupnorm
    channels: [32, 64, 128, 256]
    stem_width: 32
    layers: [1, 1, 1, 1]
    drop_rate: 0.2
    drop_path_rate: 0.1
conversion: {{norms: gn, init: preserve}}
train: {{epochs: 3, batch_size: 16, lr: 0.05, cpu_threads: 1, seed: 7}}
data: {{eval_batch_size: 64, num_workers: {workers}, cache: {cache}}}
"""


def write_recipe(folder: Path, workers: int, cache: bool) -> Path:
    path = folder / f"tiny-w{workers}-{'cache' if cache else 'nocache'}.yaml"
    path.write_text(RECIPE.format(workers=workers, cache=str(cache).lower()))
    return path


def start(*args: object, log: Path) -> subprocess.Popen:
    """`python -m ilmconvert finetune ARGS` in its own process group (as a shell job does), its
    output in files (``log``.out / .err): a loader worker that outlives a killed parent keeps
    pipes open, and nothing must wait for it."""
    command = [sys.executable, "-m", "ilmconvert", "finetune", *map(str, args)]
    if "--device" not in command:
        command += ["--device", "cpu"]
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(
            command, stdout=out, stderr=err, text=True, env=ENV, start_new_session=True, preexec_fn=_default_sigint
        )


def _default_sigint() -> None:
    """In the child before exec: SIGINT to its default, as in a terminal. A test suite started in the
    background from a script (``pytest &``) ignores SIGINT, its children would inherit that, and
    Python then installs no KeyboardInterrupt handler: the Ctrl-C case would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 180) -> tuple[int, str, str]:
    """Wait for ``proc``: (exit code, stdout, stderr)."""
    code = proc.wait(timeout=timeout)
    return code, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def run_to_end(*args: object, log: Path) -> None:
    code, out, err = finish(start(*args, log=log), log)
    assert code == 0, out + err


def wait_for_epoch(run: Path, epoch: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll RUN/metrics.jsonl until it has epoch ``epoch``'s line (the file is replaced atomically)."""
    deadline = time.monotonic() + timeout
    while not any(row["epoch"] == epoch for row in read_metrics(run)):
        if proc.poll() is not None:
            pytest.fail(f"finetune ended (exit {proc.returncode}) before epoch {epoch}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no epoch {epoch} after {timeout} s")
        time.sleep(0.01)


def numbers(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(run)]


class Reference:
    """The uninterrupted run (no loader workers, image cache on), started at once in the background
    so that it overlaps the first test's runs; :meth:`numbers` waits for it."""

    def __init__(self, root: Path, data: Path) -> None:
        self.run, self.log = root / "reference", root / "reference"
        self.proc = start("--recipe", write_recipe(root, 0, True), "--data", data, "--out", self.run, log=self.log)
        self._numbers: list[dict] | None = None

    def numbers(self) -> list[dict]:
        if self._numbers is None:
            code, out, err = finish(self.proc, self.log)
            assert code == 0, out + err
            self._numbers = numbers(self.run)
            assert [row["epoch"] for row in self._numbers] == [1, 2, 3]
        return self._numbers


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
from ilmconvert.train import data
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
