"""Unlabeled images for calibration: a folder read recursively, or tensors from Python.

A folder is any tree of image files (an ``ImageFolder`` is one): every file with one of
torchvision's image extensions is found, recursively, in sorted order; a seeded random subset of
the number asked for is decoded with PIL and preprocessed with the network's own pretrained
configuration (:func:`ilmconvert.models.preprocessing`: resize the shorter side, centre-crop to
the input size, normalize with the weights' mean and std). Every mistake is one
:class:`CalibrationError` line, raised before anything is computed or written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import IlmconvertError


class CalibrationError(IlmconvertError):
    """Calibration cannot run as asked (no or too few images, an unreadable image, bad settings)."""


def _setting(pre: Any, key: str) -> Any:
    """``pre[key]`` for the dict form of :func:`ilmconvert.models.preprocessing`, else its attribute."""
    return pre[key] if isinstance(pre, dict) else getattr(pre, key)


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, following linked folders, each real folder
    once; sorted), by torchvision's extensions.

    Raises:
        CalibrationError: ``folder`` is not a directory, or holds no image file.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise CalibrationError(f"calibration folder {root} is not a directory; pass a folder of images")
    files, seen = [], set()
    for top, dirs, names in os.walk(root, followlinks=True):  # ImageFolders of linked class folders
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree: walk each real folder once
            dirs.clear()
            continue
        seen.add(real)
        files += [Path(top, n) for n in names if Path(n).suffix.lower() in IMG_EXTENSIONS]
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise CalibrationError(
            f"calibration folder {root} holds no image ({', '.join(IMG_EXTENSIONS[:4])}, ...), looked recursively"
        )
    return files


def load_images(
    folder: str | Path, count: int, model: nn.Module, *, seed: int = 0, preprocess: Any = None
) -> torch.Tensor:
    """``count`` images from ``folder``, preprocessed for ``model``: ``(count, 3, S, S)`` float32.

    Args:
        folder: a folder of images (an ImageFolder, or any tree of image files).
        count: how many to take (a seeded random subset when the folder holds more).
        model: the (original) network, whose pretrained preprocessing is used.
        seed: seed of the subset.
        preprocess: instead of ``model``'s pretrained preprocessing, this one (a dict or object
            with ``image_size``, ``mean``, ``std``; e.g. a checkpoint's
            :func:`ilmconvert.models.resolve_preprocessing` with its ``config.json``).

    Raises:
        CalibrationError: no folder, no image, fewer than ``count`` images, an unreadable image,
            or a network without a known pretrained preprocessing.
    """
    from PIL import Image
    from torchvision.transforms import v2

    from .models import preprocessing

    files = image_files(folder)
    if count < 1:
        raise CalibrationError(f"the number of calibration images must be positive, got {count}")
    if len(files) < count:
        raise CalibrationError(f"calibration folder {folder} holds {len(files)} images, fewer than the {count} asked")
    pre = preprocess if preprocess is not None else preprocessing(model)
    if pre is None:
        raise CalibrationError("the network has no known pretrained preprocessing; pass preprocessed tensors instead")
    size = int(_setting(pre, "image_size"))
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(_setting(pre, "mean")), list(_setting(pre, "std"))),
        ]
    )
    chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    out = torch.empty(count, 3, size, size)
    for i, index in enumerate(chosen.tolist()):
        path = files[index]
        try:
            with Image.open(path) as image:
                out[i] = transform(image.convert("RGB"))
        except Exception as err:  # PIL raises many types for a broken file
            raise CalibrationError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return out


def as_batches(images: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """Calibration images from Python as one ``(N, C, H, W)`` tensor: a tensor, or an iterable of
    batches (tensors, or ``(images, labels)`` pairs whose labels are ignored).

    Raises:
        CalibrationError: no image, or batches of different shapes.
    """
    if isinstance(images, torch.Tensor):
        batches = [images]
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
    batches = [b for b in batches if b.numel()]
    if not batches:
        raise CalibrationError("no calibration images were given")
    if len({tuple(b.shape[1:]) for b in batches}) > 1:
        raise CalibrationError("calibration batches differ in image shape; give images of one size")
    return torch.cat([b if b.is_floating_point() else b.float() for b in batches])
