"""The bad-input catalogue: every expected mistake, through the real command line.

Each case runs ``python -m ilmconvert ARGS`` (offline, CPU only) in a folder of its own and must
print exactly one non-empty line on stderr, ``error: ...``, naming the problem (and the fix where
there is one), exit with code 2, show no traceback, and leave the disk as it found it: no output
folder, no half-written file, no change to the shared inputs (checkpoint, data, recipe).

Speed: importing torch + timm costs ~4 s of CPU per process, which 80 cases on a 2-core machine
cannot afford. The cases therefore run in children forked from one "zygote" interpreter that has
already imported them; each child runs the package's real ``__main__`` (``runpy``, as
``python -m ilmconvert`` does) with its own argv, working directory and stdout / stderr files, and
exits with the CLI's status. A few cases also run as plain ``python -m ilmconvert`` subprocesses
and must give the same result (:func:`test_plain_subprocess_agrees_with_the_zygote`).
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_converted_network

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

TINY_RECIPE = """\
description: tiny test network
model:
  name: timm:resnet18
  kwargs: {norm_layer: groupnorm, channels: [32, 64, 128, 256], stem_width: 32, layers: [1, 1, 1, 1]}
conversion: {norms: gn, init: preserve}
train: {epochs: 1, batch_size: 4, lr: 0.05, cpu_threads: 1}
data: {eval_batch_size: 8}
"""


# ------------------------------------------------------------------------------------------ inputs
RANDOM_BYTES = np.random.default_rng(0).bytes(4096)


def write_images(root: Path, classes: tuple[str, ...], n: int = 2, size: int = 8) -> None:
    """``n`` small random PNGs in ``root/<class>/`` for each class."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def image_folder(root: Path, train: tuple[str, ...] = ("a", "b", "c"), test: tuple[str, ...] = ("a", "b", "c")) -> Path:
    write_images(root / "train", train)
    write_images(root / "test", test, n=1)
    return root


class Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious ``.pt`` file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def build_shared(shared: Path) -> None:
    """The inputs many cases read (and none may change): data, recipe, checkpoint, weights files."""
    import torch
    from safetensors.torch import save_file

    import ilmconvert

    image_folder(shared / "data")
    (shared / "recipe.yaml").write_text(TINY_RECIPE)
    network = tiny_converted_network(num_classes=3)
    ilmconvert.save(network, shared / "ckpt")
    for name in ("convnext_femto", "resnet10t"):  # another width of convnext_atto, another architecture
        other = ilmconvert.create_model(f"timm:{name}", pretrained=False)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(shared / f"{name}.safetensors"))
    torch.save([torch.zeros(2)], shared / "a-list.pt")


def copy_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ------------------------------------------------------------------------------------------ set-ups
# Each takes (d, s): the case's own folder (its working directory) and the shared inputs.
def ckpt_copy(d: Path, s: Path) -> Path:
    return copy_tree(s / "ckpt", d / "ck")


def flip_byte(d: Path, s: Path) -> None:
    weights = ckpt_copy(d, s) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def truncate_weights(d: Path, s: Path) -> None:
    weights = ckpt_copy(d, s) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def remove(name: str) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        (ckpt_copy(d, s) / name).unlink()

    return setup


def config_text(text: str) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        (ckpt_copy(d, s) / "config.json").write_text(text)

    return setup


def config_edit(**changes: Any) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        path = ckpt_copy(d, s) / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return setup


def file(name: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def truncated_safetensors(d: Path, s: Path) -> None:
    data = (s / "resnet10t.safetensors").read_bytes()
    (d / "w.safetensors").write_bytes(data[: len(data) // 3])


def pickled_payload(zip_format: bool) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        import torch

        state = {"stem.0.weight": Payload(d / "MARKER")}
        if zip_format:
            torch.save(state, d / "w.pt")
        else:
            (d / "w.pt").write_bytes(pickle.dumps(state))

    return setup


def resume_with_pickled_trainer_state(d: Path, s: Path) -> None:
    run = d / "run"
    copy_tree(s / "ckpt", run / "last")
    (run / "recipe.yaml").write_text(TINY_RECIPE)
    (run / "metrics.jsonl").write_text("")
    (run / "last" / "trainer_state.pt").write_bytes(pickle.dumps({"epoch": 1, "optimizer": Payload(d / "MARKER")}))


def run_with_recipe(d: Path, s: Path) -> None:
    """A run folder as finetune leaves it after an epoch (last/, recipe.yaml, metrics.jsonl)."""
    copy_tree(s / "ckpt", d / "run" / "last")
    (d / "run" / "recipe.yaml").write_text(TINY_RECIPE)
    (d / "run" / "metrics.jsonl").write_text("")


def run_folder(d: Path, s: Path) -> None:
    copy_tree(s / "ckpt", d / "run" / "best")
    (d / "run" / "metrics.jsonl").write_text("")


def run_config_text(which: str, text: str) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        copy_tree(s / "ckpt", d / "run" / which)
        (d / "run" / "recipe.yaml").write_text(TINY_RECIPE)
        (d / "run" / "metrics.jsonl").write_text("")
        (d / "run" / which / "config.json").write_text(text)

    return setup


def nonempty_folder(d: Path, s: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine")


def data_folder(
    train: tuple[str, ...] | None = ("a", "b", "c"),
    test: tuple[str, ...] | None = ("a", "b", "c"),
    empty_train: bool = False,
) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        (d / "data").mkdir()
        if train is not None:
            (d / "data" / "train").mkdir()
            if empty_train:
                for name in train:
                    (d / "data" / "train" / name).mkdir(parents=True)
            else:
                write_images(d / "data" / "train", train)
        if test is not None:
            write_images(d / "data" / "test", test, n=1)

    return setup


def junk_image(split: str, suffix: str, cache: bool = True) -> Callable[[Path, Path], None]:
    def setup(d: Path, s: Path) -> None:
        image_folder(d / "data")
        (d / "data" / split / "b" / f"broken{suffix}").write_bytes(b"this is not an image\n" * 10)
        (d / "r.yaml").write_text(TINY_RECIPE if cache else TINY_RECIPE.replace("data: {", "data: {cache: false, "))

    return setup


def truncated_image(d: Path, s: Path) -> None:
    """A PNG whose header is fine but whose pixels are cut off: found only when decoded, which a
    DataLoader worker does during training when the recipe does not cache the images."""
    image_folder(d / "data")
    path = d / "data" / "train" / "b" / "0.png"
    path.write_bytes(path.read_bytes()[:60])
    (d / "r.yaml").write_text(TINY_RECIPE.replace("data: {", "data: {cache: false, num_workers: 1, "))


def recipe(text: str) -> Callable[[Path, Path], None]:
    return file("r.yaml", text)


def calibration_folder(images: int = 0, broken: bool = False, other: bool = False) -> Callable[[Path, Path], None]:
    """``{d}/imgs`` with ``images`` PNGs (in a class folder), a broken ``.jpg`` and / or a text file."""

    def setup(d: Path, s: Path) -> None:
        (d / "imgs").mkdir()
        if images:
            write_images(d / "imgs", ("a",), n=images)
        if broken:
            (d / "imgs" / "broken.jpg").write_bytes(b"this is not an image\n" * 10)
        if other:
            (d / "imgs" / "notes.txt").write_text("no image here\n")

    return setup


def renamed_weights(d: Path, s: Path) -> None:
    """resnet10t's weights with foreign names and one tensor fewer: they cannot match by position."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(s / "resnet10t.safetensors"))
    save_file({f"port.{i}": v for i, v in enumerate(list(state.values())[:-1])}, str(d / "w.safetensors"))


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """``args`` and ``expect`` may use ``{d}`` (the case's folder) and ``{s}`` (shared inputs).

    ``usage``: a click usage error (option out of range, unknown / missing option), whose one-line
    form comes from the CLI's own error handler rather than the library. ``writes_run``: the
    mistake can only show once training has started (the run folder then stays, resumable).
    """

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    setup: Optional[Callable[[Path, Path], None]] = None
    usage: bool = False
    writes_run: bool = False
    env: tuple[tuple[str, str], ...] = ()


OUT = ("--out", "{d}/out")
ATTO = ("swap", "timm:convnext_atto", "--no-pretrained", *OUT)
R10 = ("swap", "timm:resnet10t", "--no-pretrained", *OUT)
FT = ("finetune", "--recipe", "{s}/recipe.yaml", "--data", "{s}/data", "--out", "{d}/run", "--device", "cpu")
FT_R = ("finetune", "--recipe", "{d}/r.yaml", "--data", "{s}/data", "--out", "{d}/run", "--device", "cpu")
EVAL_CK = ("eval", "{d}/ck", "--data", "{s}/data", "--device", "cpu")
FT_CK = (
    "finetune",
    "{d}/ck",
    "--recipe",
    "{s}/recipe.yaml",
    "--data",
    "{s}/data",
    "--out",
    "{d}/run",
    "--device",
    "cpu",
)
FT_DATA = ("finetune", "--recipe", "{s}/recipe.yaml", "--data", "{d}/data", "--out", "{d}/run", "--device", "cpu")
EVAL_DATA = ("eval", "{s}/ckpt", "--data", "{d}/data", "--device", "cpu")
HF_CONFIG = json.dumps({"architectures": ["ResNetForImageClassification"], "model_type": "resnet"})

CASES = [
    # --- model names
    Case("model-unknown", ("inspect", "timm:nosuchnet"), ("unknown timm model 'nosuchnet'",)),
    Case(
        "model-misspelt",
        ("inspect", "convnext_attto"),
        ("unknown timm model 'convnext_attto'", "did you mean convnext_atto"),
    ),
    Case(
        "model-misspelt-torchvision",
        ("inspect", "torchvision:resnet5O"),
        ("unknown torchvision model 'resnet5O'", "did you mean resnet50"),
    ),
    Case("model-empty", ("inspect", ""), ("no model name in ''", "timm:NAME")),
    Case("model-timm-no-name", ("inspect", "timm:"), ("no model name in 'timm:'",)),
    Case(
        "model-torchvision-no-name",
        ("swap", "torchvision:", "--no-pretrained", *OUT),
        ("no model name in 'torchvision:'",),
    ),
    Case(
        "model-unknown-library",
        ("inspect", "foo:resnet50"),
        ("unknown model library 'foo'", "timm:NAME or torchvision:NAME"),
    ),
    Case(
        "model-unknown-swap", ("swap", "timm:nosuchnet", "--no-pretrained", *OUT), ("unknown timm model 'nosuchnet'",)
    ),
    Case(
        "model-no-convertible-norm",
        ("swap", "timm:resnet10t", "--no-pretrained", *OUT),
        ("nothing to convert", "BatchNorm", "--include-batchnorm"),
    ),
    # --- BatchNorm modes, calibration and weights by position
    Case(
        "calibrate-without-batchnorm-gn",
        (*R10, "--calibrate", "{d}/imgs"),
        ("--calibrate", "--batchnorm gn"),
        calibration_folder(images=4),
    ),
    Case(
        "calibrate-frozen",
        (*R10, "--batchnorm", "frozen", "--calibrate", "{d}/imgs"),
        ("--calibrate", "--batchnorm gn"),
        calibration_folder(images=4),
    ),
    Case(
        "calibrate-empty-folder",
        (*R10, "--batchnorm", "gn", "--calibrate", "{d}/imgs"),
        ("{d}/imgs holds no image",),
        calibration_folder(),
    ),
    Case(
        "calibrate-imageless-folder",
        (*R10, "--batchnorm", "gn", "--calibrate", "{d}/imgs"),
        ("{d}/imgs holds no image",),
        calibration_folder(other=True),
    ),
    Case(
        "calibrate-not-a-folder",
        (*R10, "--batchnorm", "gn", "--calibrate", "{d}/nope"),
        ("{d}/nope is not a directory",),
    ),
    Case(
        "calibrate-too-few-images",
        (*R10, "--batchnorm", "gn", "--calibrate", "{d}/imgs", "--calibration-images", "10"),
        ("holds 3 images, fewer than the 10 asked",),
        calibration_folder(images=3),
    ),
    Case(
        "calibrate-unreadable-image",
        (*R10, "--batchnorm", "gn", "--calibrate", "{d}/imgs", "--calibration-images", "3"),
        ("cannot read image {d}/imgs/broken.jpg",),
        calibration_folder(images=2, broken=True),
    ),
    Case(
        "calibrate-groups-not-a-number",
        (*R10, "--batchnorm", "gn", "--calibrate", "{d}/imgs", "--groups", "many"),
        ("--groups must be auto or a positive integer",),
        calibration_folder(images=4),
    ),
    Case("batchnorm-unknown", (*R10, "--batchnorm", "ln"), ("--batchnorm must be one of gn, frozen",)),
    Case(
        "batchnorm-frozen-with-proxy",
        (*R10, "--batchnorm", "frozen", "--method", "proxy"),
        ("batchnorm='frozen'", "use method 'ilm' or 'none'"),
    ),
    Case(
        "weights-by-position-count-mismatch",
        ("swap", "timm:resnet10t", "--weights", "{d}/w.safetensors", "--weights-by-position", *OUT),
        ("cannot match by position",),
        renamed_weights,
    ),
    Case(
        "model-include-matches-nothing",
        ("inspect", "timm:convnext_atto", "--include", "no.such.module*"),
        ("nothing to convert",),
    ),
    Case(
        "model-pretrained-offline",
        ("swap", "timm:convnext_atto", *OUT),
        ("convnext_atto", "--weights", "--no-pretrained"),
    ),
    Case(
        "model-pretrained-bad-tag",
        ("swap", "timm:convnext_atto.no_such_tag", *OUT),
        ("unknown pretrained tag 'no_such_tag' for timm:convnext_atto", "d2_in1k"),
    ),
    Case(
        "model-pretrained-bad-tag-torchvision",
        ("swap", "torchvision:resnet18.IMAGENET1K_V9", "--include-batchnorm", *OUT),
        ("unknown pretrained tag 'IMAGENET1K_V9' for torchvision:resnet18", "did you mean IMAGENET1K_V1"),
    ),
    # --- --weights
    Case("weights-missing", (*ATTO, "--weights", "{d}/nope.safetensors"), ("{d}/nope.safetensors", "does not exist")),
    Case("weights-a-folder", (*ATTO, "--weights", "{d}"), ("{d}", "not a file")),
    Case(
        "weights-empty-safetensors",
        (*ATTO, "--weights", "{d}/w.safetensors"),
        ("{d}/w.safetensors", "empty"),
        file("w.safetensors", b""),
    ),
    Case("weights-empty-pt", (*ATTO, "--weights", "{d}/w.pt"), ("{d}/w.pt", "empty"), file("w.pt", b"")),
    Case(
        "weights-random-bytes-safetensors",
        (*ATTO, "--weights", "{d}/w.safetensors"),
        ("cannot read weights file {d}/w.safetensors",),
        file("w.safetensors", RANDOM_BYTES),
    ),
    Case(
        "weights-random-bytes-pt",
        (*ATTO, "--weights", "{d}/w.pt"),
        ("cannot read weights file {d}/w.pt",),
        file("w.pt", RANDOM_BYTES),
    ),
    Case(
        "weights-truncated-safetensors",
        (*ATTO, "--weights", "{d}/w.safetensors"),
        ("cannot read weights file {d}/w.safetensors",),
        truncated_safetensors,
    ),
    Case(
        "weights-other-width",
        (*ATTO, "--weights", "{s}/convnext_femto.safetensors"),
        ("convnext_femto.safetensors does not fit timm:convnext_atto", "shape mismatch"),
    ),
    Case(
        "weights-other-architecture",
        (*ATTO, "--weights", "{s}/resnet10t.safetensors"),
        ("resnet10t.safetensors does not fit timm:convnext_atto", "missing key"),
    ),
    Case(
        "weights-not-a-state-dict",
        (*ATTO, "--weights", "{s}/a-list.pt"),
        ("a-list.pt does not hold a state dict of tensors",),
    ),
    Case(
        "weights-pickled-code-zip",
        (*ATTO, "--weights", "{d}/w.pt"),
        ("{d}/w.pt", "refused", "safetensors"),
        pickled_payload(True),
    ),
    Case(
        "weights-pickled-code-raw",
        (*ATTO, "--weights", "{d}/w.pt"),
        ("{d}/w.pt", "refused", "safetensors"),
        pickled_payload(False),
    ),
    # --- --out
    Case(
        "out-existing-file",
        ("swap", "timm:convnext_atto", "--no-pretrained", "--out", "{d}/out"),
        ("{d}/out exists", "choose a new or empty directory"),
        file("out", "a file"),
    ),
    Case("out-nonempty-folder", ATTO, ("{d}/out exists and is not an ilmconvert checkpoint",), nonempty_folder),
    Case(
        "out-under-a-file",
        ("swap", "timm:convnext_atto", "--no-pretrained", "--out", "{d}/afile/out"),
        ("{d}/afile", "not a directory"),
        file("afile", "a file"),
    ),
    Case(
        "out-under-proc",  # writable by its mode bits for root, yet it takes no new folder: found before the work
        ("swap", "timm:convnext_atto", "--no-pretrained", "--out", "/proc/ilmconvert-test"),
        ("cannot write checkpoint to /proc/ilmconvert-test", "choose another directory"),
    ),
    # --- checkpoints
    Case("ckpt-flipped-byte", EVAL_CK, ("{d}/ck/model.safetensors is corrupt or truncated",), flip_byte),
    Case("ckpt-truncated", EVAL_CK, ("{d}/ck/model.safetensors is corrupt or truncated",), truncate_weights),
    Case("ckpt-missing-weights", EVAL_CK, ("{d}/ck/model.safetensors is missing",), remove("model.safetensors")),
    Case("ckpt-missing-config", EVAL_CK, ("{d}/ck", "config.json"), remove("config.json")),
    Case("ckpt-config-not-json", EVAL_CK, ("{d}/ck/config.json", "not valid JSON"), config_text("{not json")),
    Case(
        "ckpt-config-foreign",
        EVAL_CK,
        ("{d}/ck/config.json is not an ilmconvert checkpoint config",),
        config_text(HF_CONFIG),
    ),
    Case("ckpt-config-no-source", EVAL_CK, ("{d}/ck/config.json", "source"), config_edit(source={})),
    Case(
        "ckpt-config-no-settings",
        EVAL_CK,
        ("{d}/ck/config.json", "conversion"),
        config_edit(conversion={"converted": []}),
    ),
    Case("ckpt-config-metadata-list", EVAL_CK, ("{d}/ck/config.json", "metadata"), config_edit(metadata=[1, 2])),
    Case("ckpt-newer-format", EVAL_CK, ("format version 99", "upgrade ilmconvert"), config_edit(format_version=99)),
    Case(
        "ckpt-eval-missing",
        ("eval", "{d}/nowhere", "--data", "{s}/data", "--device", "cpu"),
        ("{d}/nowhere does not exist",),
    ),
    Case(
        "ckpt-eval-run-without-best",
        ("eval", "{d}", "--data", "{s}/data", "--device", "cpu"),
        ("{d} is neither a checkpoint",),
        file("metrics.jsonl", ""),
    ),
    Case("ckpt-finetune-flipped-byte", FT_CK, ("{d}/ck/model.safetensors is corrupt or truncated",), flip_byte),
    Case("ckpt-finetune-config-not-json", FT_CK, ("{d}/ck/config.json", "not valid JSON"), config_text("{not json")),
    Case(
        "ckpt-finetune-config-foreign",
        FT_CK,
        ("{d}/ck/config.json is not an ilmconvert checkpoint config",),
        config_text(HF_CONFIG),
    ),
    Case(
        "ckpt-resume-pickled-trainer-state",
        ("finetune", "--data", "{s}/data", "--out", "{d}/run", "--resume", "--device", "cpu"),
        ("{d}/run/last/trainer_state.pt", "refused"),
        resume_with_pickled_trainer_state,
    ),
    Case(
        "ckpt-resume-config-not-json",
        ("finetune", "--data", "{s}/data", "--out", "{d}/run", "--resume", "--device", "cpu"),
        ("{d}/run/last/config.json", "not valid JSON"),
        run_config_text("last", "{not json"),
    ),
    Case(
        "ckpt-eval-run-best-config-not-json",
        ("eval", "{d}/run", "--data", "{s}/data", "--device", "cpu"),
        ("{d}/run/best/config.json", "not valid JSON"),
        run_config_text("best", "{not json"),
    ),
    Case(
        "ckpt-finetune-a-run-folder",
        (
            "finetune",
            "{d}/run",
            "--recipe",
            "{s}/recipe.yaml",
            "--data",
            "{s}/data",
            "--out",
            "{d}/new",
            "--device",
            "cpu",
        ),
        ("{d}/run is a run folder, not a checkpoint", "{d}/run/best"),
        run_folder,
    ),
    # --- conversion settings
    Case("conv-K-0", ("inspect", "timm:convnext_atto", "-K", "0"), ("-K",), usage=True),
    Case("conv-K-negative", ("inspect", "timm:convnext_atto", "-K", "-1"), ("-K",), usage=True),
    Case("conv-r-0", ("inspect", "timm:convnext_atto", "-r", "0"), ("-r",), usage=True),
    Case("conv-num-classes-0", (*ATTO, "--num-classes", "0"), ("--num-classes",), usage=True),
    Case("conv-num-classes-negative", (*ATTO, "--num-classes", "-3"), ("--num-classes",), usage=True),
    Case(
        "conv-norms-unknown", ("inspect", "timm:convnext_atto", "--norms", "gx"), ("unknown norm kind gx", "gn, in, ln")
    ),
    Case("conv-norms-empty", ("inspect", "timm:convnext_atto", "--norms", ""), ("norm kind", "gn, in, ln")),
    Case("conv-init-unknown", (*ATTO, "--init", "zeros"), ("--init must be preserve or paper", "'zeros'")),
    # --- recipes
    Case(
        "recipe-unknown",
        ("finetune", "--recipe", "nosuch", "--data", "{s}/data", "--out", "{d}/run"),
        ("unknown recipe 'nosuch'", "cifar10-smoke"),
    ),
    Case(
        "recipe-misspelt",
        ("finetune", "--recipe", "cifar1O", "--data", "{s}/data", "--out", "{d}/run"),
        ("unknown recipe 'cifar1O'", "did you mean cifar10"),
    ),
    Case(
        "recipe-misspelt-key",
        FT_R,
        ("{d}/r.yaml", "unknown key 'train.epochz'", "did you mean 'epochs'"),
        recipe(TINY_RECIPE.replace("epochs: 1", "epochz: 1")),
    ),
    Case(
        "recipe-mistyped-value",
        FT_R,
        ("{d}/r.yaml", "train.epochs", "integer"),
        recipe(TINY_RECIPE.replace("epochs: 1", "epochs: many")),
    ),
    Case(
        "recipe-nan-value",
        FT_R,
        ("{d}/r.yaml", "train.lr", "finite"),
        recipe(TINY_RECIPE.replace("lr: 0.05", "lr: .nan")),
    ),
    Case("recipe-empty-file", FT_R, ("{d}/r.yaml", "empty"), recipe("")),
    Case(
        "recipe-unparsable",
        FT_R,
        ("{d}/r.yaml", "invalid YAML at line"),
        recipe("model: {name: timm:resnet18\ntrain: [1, 2\n"),
    ),
    Case(
        "recipe-missing-file",
        FT_R,
        ("{d}/r.yaml", "cannot be read"),
    ),
    Case(
        "recipe-unknown-model",
        FT_R,
        ("unknown timm model 'resnet18x'", "did you mean resnet18"),
        recipe(TINY_RECIPE.replace("timm:resnet18", "timm:resnet18x")),
    ),
    Case(
        "recipe-bad-model-kwargs",
        FT_R,
        ("cannot build timm:resnet18", "bogus"),
        recipe(TINY_RECIPE.replace("layers: [1, 1, 1, 1]", "bogus: 1")),
    ),
    Case(
        "recipe-pretrained-offline",
        FT_R,
        ("cannot get pretrained weights for timm:resnet18", "pretrained: false"),
        recipe(TINY_RECIPE.replace("model:\n", "model:\n  pretrained: true\n")),
    ),
    Case(
        "recipe-short-tuple",
        FT_R,
        ("{d}/r.yaml", "data.mean: too few values"),
        recipe(TINY_RECIPE.replace("data: {", "data: {mean: [0.5, 0.5], ")),
    ),
    Case(
        "recipe-unknown-scheduler",
        FT_R,
        ("'bogus' scheduler",),
        recipe(TINY_RECIPE.replace("train: {", "train: {sched: bogus, ")),
    ),
    # --- data
    Case(
        "data-missing",
        ("finetune", "--recipe", "{s}/recipe.yaml", "--data", "{d}/nowhere", "--out", "{d}/run"),
        ("{d}/nowhere does not exist",),
    ),
    Case("data-a-file", FT_DATA, ("{d}/data", "not a folder"), file("data", "a file")),
    Case("data-no-train", FT_DATA, ("{d}/data has no train/",), data_folder(train=None)),
    Case("data-no-test", FT_DATA, ("{d}/data has no test/ (or val/)",), data_folder(test=None)),
    Case("data-empty-class-folders", FT_DATA, ("{d}/data/train", "no image"), data_folder(empty_train=True)),
    Case("data-no-class-folders", FT_DATA, ("{d}/data/train", "class folder"), data_folder(train=())),
    Case(
        "data-undecodable-png",
        FT_DATA,
        ("cannot decode image {d}/data/train/b/broken.png",),
        junk_image("train", ".png"),
    ),
    Case(
        "data-undecodable-jpg-uncached",
        ("finetune", "--recipe", "{d}/r.yaml", "--data", "{d}/data", "--out", "{d}/run", "--device", "cpu"),
        ("{d}/data/train/b/broken.jpg",),
        junk_image("train", ".jpg", cache=False),
    ),
    Case(
        "data-classes-differ",
        FT_DATA,
        ("different class folders", "only in train/: c", "only in test/: d"),
        data_folder(test=("a", "b", "d")),
    ),
    Case(
        "data-eval-undecodable",
        EVAL_DATA,
        ("cannot decode image {d}/data/test/b/broken.png",),
        junk_image("test", ".png"),
    ),
    Case("data-eval-other-classes", EVAL_DATA, ("predicts 3 classes", "has 2"), data_folder(test=("a", "b"))),
    Case(
        "data-truncated-image-in-a-worker",
        ("finetune", "--recipe", "{d}/r.yaml", "--data", "{d}/data", "--out", "{d}/run", "--device", "cpu"),
        ("cannot decode image {d}/data/train/b/0.png", "truncated"),
        truncated_image,
        writes_run=True,
    ),
    Case("data-eval-no-test", EVAL_DATA, ("{d}/data has no test/ (or val/) sub-folder",), data_folder(test=None)),
    # --- training options
    Case("train-epochs-0", (*FT, "--epochs", "0"), ("--epochs",), usage=True),
    Case("train-batch-size-0", (*FT, "--batch-size", "0"), ("--batch-size",), usage=True),
    Case("train-lr-negative", (*FT, "--lr", "-0.1"), ("--lr",), usage=True),
    Case("train-lr-0", (*FT, "--lr", "0"), ("train.lr", "greater than 0")),
    Case("train-lr-nan", (*FT, "--lr", "nan"), ("--lr",), usage=True),
    Case("train-lr-inf", (*FT, "--lr", "inf"), ("train.lr", "finite")),
    Case("train-device-unknown", (*FT, "--device", "tpu"), ("--device must be one of", "'tpu'")),
    Case("train-device-cuda-absent", (*FT[:-1], "cuda"), ("--device cuda", "--device cpu")),
    Case(
        "train-resume-not-a-run",
        ("finetune", "--data", "{s}/data", "--out", "{d}/run", "--resume"),
        ("not a run folder",),
    ),
    Case("eval-subset-0", ("eval", "{s}/ckpt", "--data", "{s}/data", "--subset", "0"), ("--subset",), usage=True),
    # --- export
    Case(
        "export-format-contradicts-extension",
        ("export", "{s}/ckpt", "--format", "pt2", "--out", "{d}/z.onnx"),
        ("format pt2 contradicts the file name '{d}/z.onnx'", "'{d}/z.pt2'"),
    ),
    Case(
        "export-unknown-extension",
        ("export", "{s}/ckpt", "--out", "{d}/z.bin"),
        ("cannot tell the format from the file name '{d}/z.bin'", ".onnx or .pt2"),
    ),
    # --- resume, sweep, the data flags
    Case(
        "train-resume-changed-value",
        (*FT, "--resume", "--set", "train.lr=0.5"),
        ("--resume cannot change train.lr", "train.lr: 0.05 in the run, 0.5 now"),
        run_with_recipe,
    ),
    Case("train-subset-0", (*FT, "--train-subset", "0"), ("--train-subset",), usage=True),
    Case(
        "sweep-set-misspelt-key",
        ("sweep", "--recipe", "{s}/recipe.yaml", "--data", "{s}/data", "--out", "{d}/sw", "--set", "train.lrr=0.1"),
        ("unknown key 'train.lrr'", "did you mean 'lr'"),
    ),
    Case(
        "sweep-set-bad-value",
        ("sweep", "--recipe", "{s}/recipe.yaml", "--data", "{s}/data", "--out", "{d}/sw", "--set", "train.lr=-1"),
        ("train.lr", "greater than 0"),
    ),
    # --- the command line itself
    Case("cli-unknown-option", ("inspect", "timm:convnext_atto", "--bogus"), ("--bogus",), usage=True),
    Case("cli-missing-out", ("swap", "timm:convnext_atto", "--no-pretrained"), ("--out",), usage=True),
    Case("cli-missing-data", ("finetune", "--out", "{d}/run"), ("--data",), usage=True),
    Case("cli-unknown-command", ("swapp", "timm:convnext_atto"), ("swapp",), usage=True),
]


# --- no network and no HF_HUB_OFFLINE: the unreachable host is found out within seconds, then one line.
# Nothing listens on port 9 (discard) of the loopback: every connection is refused at once. The Hub is
# pointed there with HF_ENDPOINT; torchvision's and CIFAR's fixed hosts are reached through a proxy there.
UNREACHABLE = "http://127.0.0.1:9"
OFFLINE_TIMEOUT_S = 120  # a safety bound: the Hub's retries alone took over 45 s per command before the check
HUB_DOWN = (("HF_ENDPOINT", UNREACHABLE),)
PROXY_DOWN = (("HTTPS_PROXY", UNREACHABLE), ("HTTP_PROXY", UNREACHABLE), ("NO_PROXY", ""))
OFFLINE_CASES = [
    Case(
        "offline-swap-timm-hub",
        ("swap", "timm:convnext_atto", *OUT),
        ("cannot get pretrained weights for timm:convnext_atto", "cannot connect to 127.0.0.1:9", "Hub cache"),
        env=HUB_DOWN,
    ),
    Case(
        "offline-swap-torchvision",
        ("swap", "torchvision:resnet18", "--include-batchnorm", *OUT),
        ("cannot get pretrained weights for torchvision:resnet18", "proxy 127.0.0.1:9 for download.pytorch.org"),
        env=PROXY_DOWN,
    ),
    Case(
        "offline-finetune-pretrained-recipe",
        FT_R,
        ("cannot get pretrained weights for timm:resnet18", "cannot connect to 127.0.0.1:9", "pretrained: false"),
        recipe(TINY_RECIPE.replace("model:\n", "model:\n  pretrained: true\n")),
        env=HUB_DOWN,
    ),
    Case(
        "offline-finetune-cifar10-download",
        ("finetune", "--recipe", "{s}/recipe.yaml", "--data", "cifar10", "--out", "{d}/run", "--device", "cpu"),
        ("cannot download cifar10", "proxy 127.0.0.1:9 for www.cs.toronto.edu", "ImageFolder"),
        env=PROXY_DOWN,
    ),
    Case(
        "offline-push",
        ("push", "{s}/ckpt", "org/name"),
        ("cannot connect to 127.0.0.1:9", "nothing can be pushed to org/name"),
        env=HUB_DOWN,
    ),
]


# ------------------------------------------------------------------------------------------ running
ZYGOTE = r"""
import json, os, runpy, signal, sys, traceback
for name in ("ilmconvert", "ilmconvert.cli", "ilmconvert.io", "ilmconvert.train.run", "safetensors.torch",
             "timm", "torchvision", "torchvision.datasets", "PIL.Image", "yaml"):
    try:
        __import__(name)
    except Exception:
        pass
jobs, workers, timeout = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
running, results = {}, {}

def start(job):
    pid = os.fork()
    if pid:
        running[pid] = job
        return
    code = 1
    try:
        signal.alarm(timeout)
        os.chdir(job["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["ilmconvert", *job["args"]]
        try:
            runpy.run_module("ilmconvert", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                code = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

queue = list(jobs)
while queue or running:
    while queue and len(running) < workers:
        start(queue.pop(0))
    pid, status = os.wait()
    job = running.pop(pid)
    results[job["id"]] = os.waitstatus_to_exitcode(status)
print(json.dumps(results))
"""


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    before: dict[str, Any]
    after: dict[str, Any]


def snapshot(root: Path) -> dict[str, Any]:
    """Every file and folder under ``root``: type and mode, and for files size and modification time
    (a folder's own size and time change when a file is created in it and removed again, e.g. a
    lock file: that leaves nothing on disk)."""
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = (info.st_size, info.st_mtime_ns) if not stat.S_ISDIR(info.st_mode) else ()
        found[str(path.relative_to(root))] = (info.st_mode, *content)
    return found


def environment(base: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "80",  # a long error line must still be one line (no wrapping)
        "ILMCONVERT_DATA": str(base / "downloads"),
        "TORCH_HOME": str(base / "torch-home"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def expand(text: str, d: Path, s: Path) -> str:
    return text.replace("{d}", str(d)).replace("{s}", str(s))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run every case once; return the results by case id, plus the shared inputs' snapshots."""
    base = tmp_path_factory.mktemp("bad-inputs")
    shared = base / "shared"
    build_shared(shared)
    jobs = []
    for case in CASES:
        d = base / "cases" / case.id
        d.mkdir(parents=True)
        if case.setup is not None:
            case.setup(d, shared)
        jobs.append(
            {
                "id": case.id,
                "cwd": str(d),
                "args": [expand(a, d, shared) for a in case.args],
                "stdout": str(base / f"{case.id}.out"),
                "stderr": str(base / f"{case.id}.err"),
            }
        )
    shared_before = snapshot(shared)
    before = {case.id: snapshot(base / "cases" / case.id) for case in CASES}
    env = environment(base)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", ZYGOTE, json.dumps(jobs), str(max(2, os.cpu_count() or 2)), str(TIMEOUT_S)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S * 3,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    results = {
        case.id: Result(
            codes[case.id],
            Path(job["stdout"]).read_text(errors="replace"),
            Path(job["stderr"]).read_text(errors="replace"),
            before[case.id],
            snapshot(base / "cases" / case.id),
        )
        for case, job in zip(CASES, jobs)
    }
    return {
        "results": results,
        "base": base,
        "shared": shared,
        "shared_before": shared_before,
        "env": env,
        "jobs": {job["id"]: job for job in jobs},
        "seconds": time.perf_counter() - started,
    }


def error_line(result: Result) -> str:
    """The single ``error: ...`` line of a failed command (exit code 2, no traceback)."""
    output = f"--- exit code {result.rc}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert result.rc == 2, output
    assert lines[0].startswith("error: "), output
    return lines[0]


def offline_environment(catalogue: dict[str, Any], case: Case) -> dict[str, str]:
    """The catalogue's environment without HF_HUB_OFFLINE (and without proxies unless the case sets
    them), with a Hub cache of its own, plus the case's variables."""
    dropped = {"HF_HUB_OFFLINE", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"}
    env = {k: v for k, v in catalogue["env"].items() if k.upper() not in dropped}
    return {**env, "HF_HOME": str(catalogue["base"] / "hf-home"), **dict(case.env)}


@pytest.fixture(scope="module")
def offline_catalogue(catalogue: dict[str, Any]) -> dict[str, Result]:
    """Run :data:`OFFLINE_CASES` as plain ``python -m ilmconvert`` processes (huggingface_hub reads
    HF_ENDPOINT when it is imported, so a zygote that imported it cannot serve them), two at a time.
    """
    base, shared = catalogue["base"], catalogue["shared"]

    def run(case: Case) -> Result:
        d = base / "cases" / case.id
        d.mkdir(parents=True)
        if case.setup is not None:
            case.setup(d, shared)
        before = snapshot(d)
        done = subprocess.run(
            [sys.executable, "-m", "ilmconvert", *(expand(a, d, shared) for a in case.args)],
            cwd=d,
            env=offline_environment(catalogue, case),
            capture_output=True,
            text=True,
            timeout=OFFLINE_TIMEOUT_S,
        )
        return Result(done.returncode, done.stdout, done.stderr, before, snapshot(d))

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([c.id for c in OFFLINE_CASES], pool.map(run, OFFLINE_CASES)))


# ------------------------------------------------------------------------------------------ tests
def check_case(case: Case, result: Result, d: Path, s: Path) -> None:
    """One ``error: ...`` line naming ``case.expect``, exit code 2, nothing written (or only the run)."""
    line = error_line(result)
    for fragment in case.expect:
        assert expand(fragment, d, s) in line, line
    if case.writes_run:
        assert all(k in result.after for k in result.before) and all(
            k.startswith("run") for k in set(result.after) - set(result.before)
        )
    else:
        assert result.after == result.before, f"the case changed its folder: {line}"
    assert not (d / "MARKER").exists(), "the pickled payload ran"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, catalogue: dict[str, Any]) -> None:
    check_case(case, catalogue["results"][case.id], catalogue["base"] / "cases" / case.id, catalogue["shared"])


@pytest.mark.parametrize("case", OFFLINE_CASES, ids=[c.id for c in OFFLINE_CASES])
def test_unreachable_network_is_one_line_without_hf_hub_offline(
    case: Case, catalogue: dict[str, Any], offline_catalogue: dict[str, Result]
) -> None:
    result = offline_catalogue[case.id]
    check_case(case, result, catalogue["base"] / "cases" / case.id, catalogue["shared"])
    assert "Retrying" not in result.stdout + result.stderr


def test_load_from_an_unreachable_hub_is_one_error(catalogue: dict[str, Any]) -> None:
    """``ilmconvert.load("hf-hub:...")`` in a process without HF_HUB_OFFLINE and with the Hub
    unreachable raises one HubError at once, without huggingface_hub's retries."""
    code = (
        "import ilmconvert\n"
        "from ilmconvert.hub import HubError\n"
        "try:\n    ilmconvert.load('hf-hub:org/name')\n"
        "except HubError as err:\n    print(f'HubError: {err}')\n"
    )
    case = Case("offline-load", (), (), env=HUB_DOWN)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=catalogue["base"],
        env=offline_environment(catalogue, case),
        capture_output=True,
        text=True,
        timeout=OFFLINE_TIMEOUT_S,
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    assert done.stdout.startswith("HubError: cannot connect to 127.0.0.1:9"), done.stdout
    assert "org/name is not in the Hub cache" in done.stdout and len(done.stdout.splitlines()) == 1


def test_an_unwritable_out_is_refused_before_the_work(catalogue: dict[str, Any]) -> None:
    """swap checks --out before building and converting: nothing (no table, no PASS line) on stdout."""
    assert catalogue["results"]["out-under-proc"].stdout == ""


def test_nothing_outside_the_case_folders_changed(catalogue: dict[str, Any]) -> None:
    assert snapshot(catalogue["shared"]) == catalogue["shared_before"]
    base = catalogue["base"]
    for name in ("downloads", "torch-home"):
        assert not any(p.is_file() for p in (base / name).rglob("*")), name


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payload the weights cases pass would run if it were unpickled (so its not running means something)."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "MARKER")))
    assert (tmp_path / "MARKER").exists()


def test_plain_subprocess_agrees_with_the_zygote(catalogue: dict[str, Any]) -> None:
    """A few cases through ``python -m ilmconvert`` itself give the same exit code and error line."""
    ids = ["model-misspelt", "weights-pickled-code-zip", "ckpt-config-not-json"]

    def run(case_id: str) -> subprocess.CompletedProcess:
        job = catalogue["jobs"][case_id]
        return subprocess.run(
            [sys.executable, "-m", "ilmconvert", *job["args"]],
            cwd=job["cwd"],
            env=catalogue["env"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )

    with ThreadPoolExecutor(len(ids)) as pool:
        plain = dict(zip(ids, pool.map(run, ids)))
    for case_id, done in plain.items():
        zygote: Result = catalogue["results"][case_id]
        assert (done.returncode, done.stderr) == (zygote.rc, zygote.stderr), case_id
        assert "Traceback" not in done.stdout + done.stderr
        assert not (Path(catalogue["jobs"][case_id]["cwd"]) / "MARKER").exists()


def test_checkpoint_files_get_the_umask_permissions(tmp_path: Path) -> None:
    import ilmconvert

    network = tiny_converted_network(num_classes=3)
    old = os.umask(0o022)
    try:
        ilmconvert.save(network, tmp_path / "ck")
        ilmconvert.save(network, tmp_path / "ck", trainer_state={"epoch": 1})  # the replacing path too
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "trainer_state.pt"):
        assert stat.S_IMODE((tmp_path / "ck" / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755


def test_the_catalogue_is_large_and_fast(catalogue: dict[str, Any]) -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    print(f"\n{len(CASES)} cases in {catalogue['seconds']:.1f} s")  # with -s: the catalogue of messages
    for case in CASES:
        print(f"{case.id:40} {catalogue['results'][case.id].stderr.strip()}")
