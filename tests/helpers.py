"""Helpers shared by the test modules: one randomizer, one relative difference, tiny data and recipe.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from benchmarks.zoo.checks import randomize_norm_affines, reinit_zero_linears  # noqa: F401 (re-exported)
from ilmconvert.nn import ILMNorm

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, _InstanceNorm, _BatchNorm, ILMNorm)
#: the parameters of an ILM layer, in the order gradients are compared
ILM_PARAMS = ("weight", "bias", "encoder.weight", "decoder_mu.weight", "decoder_gamma.weight")


# ------------------------------------------------------------------------------------------ Proxy Norm
#: float64 NumPy activations for :func:`reference_pn`.
ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0.0),
    "gelu": lambda v: 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0))),
    "silu": lambda v: v / (1.0 + np.exp(-v)),
}


def reference_pn(x: np.ndarray, gamma, beta, proxy_gamma, proxy_beta, act: str, n: int, eps: float) -> np.ndarray:
    """Proxy Norm's PN-Act in float64 NumPy, channels last: ``x`` is ``(..., C)``.

    z = phi(gamma x + beta); proxy y~_i = (1 + gamma~) q_i + beta~ with q_i the (i + 1/2) / n quantile
    of N(0, 1) (``statistics.NormalDist``, independent of erfinv); m, v = mean and biased variance of
    phi(gamma y~ + beta) over i; output (z - m) / sqrt(v + eps).
    """
    phi = ACTIVATIONS[act]
    q = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    proxy = (1.0 + proxy_gamma)[:, None] * q[None, :] + proxy_beta[:, None]  # (C, n)
    p = phi(gamma[:, None] * proxy + beta[:, None])
    m, v = p.mean(axis=1), p.var(axis=1)
    return (phi(gamma * x + beta) - m) / np.sqrt(v + eps)


def randomize(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Random norm parameters, so that every term of eqs. 2-6 matters and nothing is ``1 * x + 0``.

    For every norm (GN / LN / IN / BN, timm's subclasses) and ILM layer in ``module`` (``module``
    itself included): ``weight ~ 1 + scale * N(0, 1)``, ``bias ~ scale * N(0, 1)``; for ILM layers
    also the encoder / decoder weights W1, W2, W3 ``~ scale * N(0, 1)``. Other modules (convs,
    linears) keep their values. Deterministic in ``seed``; works in any dtype. This is the zoo
    sweep's ``randomize_norm_affines`` (benchmarks/zoo/checks.py) with BatchNorms and ILM weights added.
    """

    def ilm_weights(m: nn.Module) -> list[torch.Tensor]:
        return [fc.weight for fc in (m.encoder, m.decoder_mu, m.decoder_gamma)] if isinstance(m, ILMNorm) else []

    randomize_norm_affines(module, seed, scale, types=NORM_TYPES, extra=ilm_weights)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` computed in float64 (``inf`` when ``a`` has a NaN or infinity)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_layer(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, *, fast_choice) -> tuple[torch.Tensor, list]:
    """Output and gradients (of x, then :data:`ILM_PARAMS`) of a copy of ``layer`` on ``x``, with
    upstream gradient ``dy`` and ``layer.fast = fast_choice`` (False: the reference path)."""
    layer = copy.deepcopy(layer)
    layer.fast = fast_choice
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    params = dict(layer.named_parameters())
    return y.detach(), [x.grad] + [params[n].grad if n in params else None for n in ILM_PARAMS]


def compare_fast_path(layer: nn.Module, x: torch.Tensor, *, tol: float, fast_choice="torch", seed: int = 0) -> None:
    """Assert that ``layer``'s fast path matches the exact reference: output and every gradient.

    The oracle is the reference path on float64 copies of ``layer`` and ``x``; in float32 the fast
    path must also agree with the float32 reference path (in bfloat16 / float16 the reference path
    itself rounds, so only the exact oracle is a fair judge). ``tol`` is a relative bound
    (:func:`relative_difference`).
    """
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(layer(x).shape, generator=g).to(x.dtype)
    y_f, g_f = run_layer(layer, x, dy, fast_choice=fast_choice)
    y_r, g_r = run_layer(layer, x, dy, fast_choice=False)
    y_o, g_o = run_layer(copy.deepcopy(layer).double(), x.double(), dy.double(), fast_choice=False)
    assert y_f.dtype == y_r.dtype and y_f.shape == y_r.shape
    checks = [("oracle", y_o, g_o)] + ([("reference", y_r, g_r)] if x.dtype == torch.float32 else [])
    for what, y_b, g_b in checks:
        for name, a, b, r, o in zip(("output", "x") + ILM_PARAMS, [y_f] + g_f, [y_b] + g_b, [y_r] + g_r, [y_o] + g_o):
            assert (a is None) == (b is None), name
            if a is None:
                continue
            assert a.dtype == r.dtype, name
            # Against the float32 reference, allow the reference's own rounding error as well (triangle
            # inequality): two float32 answers that are each within ``tol`` of the oracle may differ by
            # more than ``tol``, and by how much depends on the CPU's vector width.
            bound = tol if what == "oracle" else tol + relative_difference(r, o)
            assert relative_difference(a, b) < bound, (what, name, relative_difference(a, b), bound)


# ------------------------------------------------------------------------------------------ Triton
def run_under_triton_interpreter(test_file: str) -> None:
    """Run the pytest file ``test_file`` in a child process with ``TRITON_INTERPRET=1``; assert it passed.

    ``TRITON_INTERPRET=1`` must be in the environment before Triton is imported, and recent PyTorch
    imports Triton with ``import torch``, so the Triton kernel tests run in a fresh process; there
    their launcher test skips itself (hence the expected "skipped").
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" in proc.stdout


def count_calls(monkeypatch, module, names, calls: dict[str, int] | None = None) -> dict[str, int]:
    """Replace each function ``module.<name>`` by a wrapper counting its calls into ``calls``
    (a new dict unless given), undone with ``monkeypatch``; returns ``calls``."""
    calls = {} if calls is None else calls
    for name in names:
        calls.setdefault(name, 0)
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(module, name, counted)
    return calls


# ------------------------------------------------------------------------------------------ training
#: A small GroupNorm ResNet (timm ``resnet18`` kwargs, 1.25 M parameters): the tests' network.
TINY_MODEL = {
    "norm_layer": "groupnorm",
    "channels": [32, 64, 128, 256],
    "stem_width": 32,
    "layers": [1, 1, 1, 1],
}


def tiny_converted_network(num_classes: int = 3) -> nn.Module:
    """:data:`TINY_MODEL` with ``num_classes`` outputs, converted to ILM (preserve init)."""
    import ilmconvert

    network = ilmconvert.create_model("timm:resnet18", pretrained=False, num_classes=num_classes, **TINY_MODEL)
    ilmconvert.convert(network)
    return network


TINY_RECIPE = """
description: tiny test network
model:
  name: timm:resnet18
  kwargs: {norm_layer: groupnorm, channels: [32, 64, 128, 256], stem_width: 32, layers: [1, 1, 1, 1]}
conversion: {norms: gn, init: preserve}
train: {epochs: 2, batch_size: 16, lr: 0.05, cpu_threads: 1}
data: {eval_batch_size: 64}
"""


def make_image_folder(
    root: Path, classes=("horizontal", "vertical", "checker"), n_train=24, n_test=12, size=32, test_name="test"
) -> Path:
    """A small learnable ImageFolder of PNGs under ``root`` (``train/``, ``test_name/``).

    Class k is a noisy stripe pattern (horizontal, vertical, checkerboard, ...) with a random
    phase. Patterns, not colors: instance-level norms remove per-image channel means, so a
    color-coded toy set would be unlearnable by design.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", n_train), (test_name, n_test)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                phase = rng.integers(0, 8)
                coordinate = [yy, xx, yy + xx, yy - xx, yy * 0][k % 5] + phase
                pattern = ((coordinate // 4) % 2) * 120 + (k // 5) * 60
                pixels = rng.integers(0, 100, (size, size, 3)) + pattern[..., None]
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------ finetune in a child process

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


def start(*args: object, log: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    """`python -m ilmconvert finetune ARGS` in its own process group (as a shell job does), its
    output in files (``log``.out / .err): a loader worker that outlives a killed parent keeps
    pipes open, and nothing must wait for it. ``launcher`` replaces `python -m ilmconvert`
    (e.g. a script that runs the same command line, or torchrun)."""
    command = [*(launcher or [sys.executable, "-m", "ilmconvert"]), "finetune", *map(str, args)]
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
    from ilmconvert.train.run import read_metrics

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
    from ilmconvert.train.run import read_metrics

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


def module_gradcheck(layer: nn.Module, x: torch.Tensor) -> bool:
    """``torch.autograd.gradcheck`` of ``layer`` (float64) with respect to ``x`` and every parameter."""
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    return torch.autograd.gradcheck(fn, (x.detach().requires_grad_(True), *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def forward_backward(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A copy of ``layer``'s output ``y`` for a copy of ``x`` (with its graph) and, after ``y.backward(dy)``, the
    gradients of ``x`` and of every parameter (in ``parameters()`` order)."""
    layer = copy.deepcopy(layer)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y, [x.grad] + [p.grad for p in layer.parameters()]
