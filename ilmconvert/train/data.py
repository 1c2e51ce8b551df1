"""Image classification data: an ImageFolder tree or torchvision's CIFAR-10 / CIFAR-100.

``DATA`` is either a folder with ``train/`` and ``test/`` (or ``val/``) sub-folders in the
torchvision :class:`~torchvision.datasets.ImageFolder` layout (``train/<class>/<image>``), or the
word ``cifar10`` / ``cifar100`` (torchvision's datasets, downloaded into ``data_root``; offline the
download fails with a one-line :class:`DataError` that suggests an ImageFolder path instead, and
a partial archive or the empty folders the attempt created are removed).

Images travel as uint8 ``(3, H, W)`` tensors: they are decoded once (into memory when
``cache`` is on: 3 KiB per 32x32 image, 180 MiB for all of CIFAR-10), augmented with torchvision
``transforms.v2`` (RandomCrop with padding + horizontal flip), batched, and only converted to
float and normalized on the training device (:func:`ilmconvert.train.loader.to_input`).

With ``data.pipeline: timm`` the images are read at their own size and go through timm's
``create_transform`` (:func:`timm_transform`), configured from the network's
``timm.data.resolve_data_config`` (:func:`resolve_pipeline`), which also ends in uint8 tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import IlmconvertError, first_line
from ..models import resolve_preprocessing
from ..preprocessing import IMAGENET_DEFAULTS, Preprocessing
from .recipes import DataSettings

TORCHVISION_DATASETS = ("cifar10", "cifar100")
TEST_SPLIT_NAMES = ("test", "val")


class DataError(IlmconvertError):
    """The data cannot be found, downloaded or read; the message says what to pass instead."""

    def __init__(self, message: str = "", *args: Any) -> None:
        # a DataLoader worker's DataError is re-raised in the main process as
        # DataError("Caught DataError in DataLoader worker process N.\nOriginal Traceback ...\n
        # ...DataError: <message>"): keep just the original one-line message
        if isinstance(message, str) and message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message, *args)


def default_data_root() -> Path:
    """Where ``cifar10`` / ``cifar100`` are downloaded: ``$ILMCONVERT_DATA`` or ~/.cache/ilmconvert/data."""
    return Path(os.environ.get("ILMCONVERT_DATA", Path.home() / ".cache" / "ilmconvert" / "data"))


@dataclass
class DataSource:
    """Where the images of one DATA argument come from.

    Attributes:
        name: the DATA argument as given (``cifar10`` or a folder path).
        kind: ``imagefolder``, ``cifar10`` or ``cifar100``.
        root: the ImageFolder root, or the torchvision download folder.
        splits: ``{"train": path, "test": path}`` for ImageFolder (``test`` may be a ``val/`` folder).
    """

    name: str
    kind: str
    root: Path
    splits: dict[str, Path]


def resolve_data(
    data: str, data_root: str | Path | None = None, needed: Sequence[str] = ("train", "test")
) -> DataSource:
    """Find the data that ``data`` names, without reading any image.

    Args:
        needed: the splits the caller reads (``("test",)`` for evaluation).

    Raises:
        DataError: a folder that does not exist or lacks a needed ``train/`` / ``test/`` (or ``val/``).
    """
    if data.lower() in TORCHVISION_DATASETS:
        return DataSource(data, data.lower(), Path(data_root) if data_root else default_data_root(), {})
    root = Path(data).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"data {root} is a file, not a folder; pass an ImageFolder root with train/ and test/")
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; pass an ImageFolder root with train/ and test/ (or val/), "
            "or cifar10 / cifar100"
        )
    splits = {}
    if (root / "train").is_dir():
        splits["train"] = root / "train"
    test = next((root / n for n in TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    if test is not None:
        splits["test"] = test
    missing = [n for n in needed if n not in splits]
    if missing:
        wanted = " and ".join("test/ (or val/)" if n == "test" else "train/" for n in missing)
        expected = " and ".join(f"{root}/{n}/<class>/<image>" for n in needed)
        raise DataError(f"data folder {root} has no {wanted} sub-folder; expected {expected}")
    return DataSource(data, "imagefolder", root, splits)


# ------------------------------------------------------------------------------------------ images
def _decode(path: str, size: int) -> np.ndarray:
    """One image file as a (size, size, 3) uint8 array: RGB, shorter side resized, center-cropped."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = F.center_crop(F.resize(image, size), size)
        return np.array(image)  # a writable copy


PROGRESS_EVERY = 256  #: images between two calls of an :class:`ImageSet`'s ``progress``


def _each(fn: Callable[[Any], Any], items: Sequence[Any], progress: Optional[Callable[[int, int], None]]) -> list[Any]:
    """``[fn(item) for item in items]`` on a thread pool (PIL decodes without the GIL), in order,
    calling ``progress(done, total)`` at the start, every :data:`PROGRESS_EVERY` items and at the end."""
    total = len(items)
    results: list[Any] = []
    if progress is not None and total:
        progress(0, total)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for result in pool.map(fn, items, chunksize=PROGRESS_EVERY):
            results.append(result)
            if progress is not None and (len(results) % PROGRESS_EVERY == 0 or len(results) == total):
                progress(len(results), total)
    return results


class ImageSet(Dataset):
    """Labelled images as uint8 ``(3, H, W)`` tensors, decoded on demand or all at once.

    Args:
        items: per image, a file path (str) or an (H, W, 3) uint8 array.
        labels: class index per image.
        classes: class names, index order.
        image_size: square size in pixels that images are brought to.
        transform: applied to each uint8 ``(3, H, W)`` tensor (e.g. torchvision v2 RandomCrop).
        cache: decode all files now (with a thread pool) and keep them as one uint8 tensor.
        raw: give ``transform`` the RGB PIL image at its own size (timm's transforms, which end
            in a uint8 tensor) instead of a uint8 tensor at ``image_size``; nothing is cached,
            and a seeded ``transform`` also sees Python's and NumPy's generators seeded.
        progress: called as ``progress(done, total)`` while the files are decoded (or their
            headers checked): at the start, every :data:`PROGRESS_EVERY` images and at the end.

    ``ds[i]`` returns ``(image uint8 (3, H, W), label int)``. ``ds[(i, seed)]`` (what
    :class:`~ilmconvert.train.loader.EpochSampler` yields) runs ``transform`` with torch's CPU generator seeded with
    ``seed`` (and restores the generator's state afterwards), so an image's augmentation depends
    only on that seed, not on which process draws it or what that process drew before.

    Raises:
        DataError: an image file that cannot be decoded.
    """

    def __init__(
        self,
        items: Sequence[Any],
        labels: Sequence[int],
        classes: Sequence[str],
        image_size: int,
        transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        cache: bool = True,
        raw: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        self.raw = raw
        cache = cache and not raw
        self.items = list(items)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.classes = list(classes)
        self.image_size = image_size
        self.transform = transform
        self.images: torch.Tensor | None = None
        if cache:
            self.images = self._decode_all(progress)
        else:  # read each file's header now: a broken file must stop the run before it starts
            _each(self._check, self.items, progress)

    def _load(self, item: Any) -> np.ndarray:
        if isinstance(item, np.ndarray):
            return item
        try:
            return _decode(item, self.image_size)
        except Exception as err:  # PIL raises several types for broken files
            raise DataError(_undecodable(item, err)) from err

    def _check(self, item: Any) -> None:
        if isinstance(item, np.ndarray):
            return
        from PIL import Image

        try:
            with Image.open(item):
                pass
        except Exception as err:
            raise DataError(_undecodable(item, err)) from err

    def _decode_all(self, progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """All images as one uint8 tensor (N, 3, H, W); PIL decodes without the GIL, so threads help."""
        arrays = _each(self._load, self.items, progress)
        if not arrays:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        if self.raw:
            return self._raw_item(index, seed)
        if self.images is not None:
            image = self.images[index]
        else:
            image = torch.from_numpy(self._load(self.items[index])).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image) if seed is None else _seeded(self.transform, image, seed)
        return image, int(self.labels[index])


    def _raw_item(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        from PIL import Image

        item = self.items[index]
        if isinstance(item, np.ndarray):
            image = Image.fromarray(item)
        else:
            try:
                with Image.open(item) as opened:
                    image = opened.convert("RGB")
            except Exception as err:
                raise DataError(_undecodable(item, err)) from err
        transform = self.transform or _pil_to_tensor
        if seed is None:
            out = transform(image)
        else:
            out = seeded_globals(lambda: _seeded(transform, image, seed), seed)
        return out, int(self.labels[index])


def _pil_to_tensor(image: Any) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.pil_to_tensor(image)


def seeded_globals(fn: Callable[[], Any], seed: int) -> Any:
    """``fn()`` with Python's ``random`` and NumPy's global generator seeded from ``seed`` (timm's
    augmentations and ``Mixup`` draw from them); both states are restored afterwards."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _seeded(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's CPU generator (which torchvision's random transforms
    draw from) seeded with ``seed``; the generator's previous state is restored afterwards."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


def _undecodable(path: Any, err: Exception) -> str:
    detail = first_line(err) if str(path) not in str(err) else type(err).__name__  # PIL repeats the path
    return f"cannot decode image {path} ({detail}); remove or replace the file"


def _unusable_folder(folder: Path, err: Exception) -> str:
    """One line for a split folder that torchvision's ImageFolder refused (no class folder, a
    class folder without images, ...)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not classes:
        return f"data folder {folder} has no class folders; expected {folder}/<class>/<image>"
    images = IMG_EXTENSIONS
    empty = [c.name for c in classes if not any(f.is_file() and f.suffix.lower() in images for f in c.rglob("*"))]
    if empty:
        names = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        return (
            f"data folder {folder}: class folder(s) {names} hold no image ({', '.join(IMG_EXTENSIONS[:3])}, ...); "
            "add images or remove the folder(s)"
        )
    return f"data folder {folder}: {first_line(err)}; expected {folder}/<class>/<image>"


def train_transform(settings: DataSettings) -> Callable[[Any], torch.Tensor] | None:
    """The training augmentation on uint8 tensors: ``cifar`` = RandomCrop(size, padding=size // 8)
    (4 px at 32 px) + RandomHorizontalFlip, as in the paper and in most CIFAR work; ``none``.
    With ``pipeline: timm``, timm's (:func:`timm_transform`)."""
    if settings.pipeline == "timm":
        return timm_transform(settings, train=True)
    if settings.augment == "none":
        return None
    from torchvision.transforms import v2

    size = settings.image_size
    return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()])


def resolve_pipeline(settings: DataSettings, network: Any, found: Preprocessing | None = None) -> DataSettings:
    """``settings`` with what the recipe left open taken from the network's preprocessing
    (``found``, default :func:`ilmconvert.models.resolve_preprocessing` of ``network``).

    ``image_size``, ``mean`` and ``std`` that the recipe did not set come from the network for the
    ``timm`` pipeline, and for the ``cifar`` pipeline when the network brings its own (pretrained
    weights or a fine-tune's record, :attr:`Preprocessing.from_weights`): a checkpoint converted
    from 224-px ImageNet weights is trained at 224 px with ImageNet's statistics, an untrained
    network at the recipe defaults (32 px, CIFAR-10 statistics). ``crop_pct`` and
    ``interpolation`` come from the network when ``None`` (``timm`` pipeline only: the ``cifar``
    pipeline does not use them).
    """
    timm_pipeline = settings.pipeline == "timm"
    found = found or resolve_preprocessing(network)
    if not timm_pipeline and not found.from_weights:
        return settings
    given = settings.model_fields_set
    update: dict[str, Any] = {}
    for key, value in (("image_size", found.image_size), ("mean", found.mean), ("std", found.std)):
        if key not in given:
            update[key] = value
    if timm_pipeline and settings.crop_pct is None:
        update["crop_pct"] = found.crop_pct
    if timm_pipeline and settings.interpolation is None:
        update["interpolation"] = found.interpolation
    return DataSettings.model_validate(settings.model_dump() | update)


def timm_transform(settings: DataSettings, train: bool) -> Callable[[Any], torch.Tensor]:
    """timm's ``create_transform`` for a PIL image, ending in a uint8 ``(3, H, W)`` tensor
    (``normalize=False``: :func:`~ilmconvert.train.loader.to_input` normalizes on the device).
    Training: RandomResizedCrop (``scale``, ``ratio``), horizontal flip (``hflip``), ``aa`` (else
    timm's colour jitter); test: resize to ``image_size / crop_pct`` with ``interpolation``, center
    crop.

    Raises:
        DataError: an ``aa`` policy or interpolation timm does not know.
    """
    from timm.data import create_transform

    interpolation = settings.interpolation or IMAGENET_DEFAULTS["interpolation"]
    common = {"input_size": settings.image_size, "interpolation": interpolation,
              "mean": settings.mean, "std": settings.std, "normalize": False}
    try:
        if train:
            return create_transform(
                is_training=True, scale=settings.scale, ratio=settings.ratio, hflip=settings.hflip,
                auto_augment=settings.aa, **common,
            )
        return create_transform(is_training=False, crop_pct=settings.crop_pct, **common)
    except (AssertionError, ValueError, KeyError) as err:
        raise DataError(f"timm cannot build the data pipeline (data.aa {settings.aa!r}): {first_line(err)}") from None


def subset_indices(total: int, size: int | None, seed: int) -> list[int]:
    """A fixed random subset of ``range(total)`` of ``size`` indices (sorted), or all of them."""
    if size is None or size >= total:
        return list(range(total))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=generator)[:size].tolist())


def _torchvision_split(source: DataSource, split: str) -> Any:
    import torchvision

    from .. import online

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[source.kind]
    created = _first_missing(Path(source.root))
    with contextlib.suppress(Exception):  # not there yet (torchvision raises RuntimeError) or not whole
        return cls(str(source.root), train=split == "train", download=False)  # downloaded before
    url = getattr(cls, "url", None)
    offline = online.unreachable(url) if url else None  # within seconds, not after urllib's minutes
    try:
        if offline is not None:
            raise ConnectionError(offline)
        return cls(str(source.root), train=split == "train", download=True)
    except Exception as err:  # URLError, socket errors, checksum errors, ...
        _discard_partial_download(Path(source.root), cls, created)
        raise DataError(
            f"cannot download {source.kind} into {source.root} ({offline or first_line(err)}); offline, pass an "
            f"ImageFolder root with train/ and test/ instead (e.g. --data /path/to/{source.kind})"
        ) from None


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (``None`` if it exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _discard_partial_download(root: Path, cls: type, created: Path | None) -> None:
    """After a failed download: remove an archive that fails torchvision's md5 check (a partial
    file), then the folders the attempt created if they hold no file."""
    from torchvision.datasets.utils import check_integrity

    filename, md5 = getattr(cls, "filename", None), getattr(cls, "tgz_md5", None)
    if filename and (root / filename).is_file() and not check_integrity(str(root / filename), md5):
        (root / filename).unlink()
    if created is not None and created.is_dir() and not any(p.is_file() for p in created.rglob("*")):
        import shutil

        shutil.rmtree(created, ignore_errors=True)


def open_split(
    source: DataSource,
    split: str,
    settings: DataSettings,
    *,
    subset: int | None = None,
    seed: int = 0,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ImageSet:
    """The ``train`` or ``test`` split of ``source`` as an :class:`ImageSet`.

    Args:
        subset: keep a fixed random subset of this many images (``seed`` picks it).
        transform: per-image augmentation (see :func:`train_transform`).
        progress: ``progress(done, total)`` while the images are read (see :class:`ImageSet`).

    Raises:
        DataError: missing / empty folders, undecodable images, impossible download.
    """
    if source.kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        folder = source.splits[split]
        try:
            dataset = ImageFolder(str(folder))
        except (FileNotFoundError, OSError) as err:
            raise DataError(_unusable_folder(Path(folder), err)) from None
        indices = subset_indices(len(dataset.samples), subset, seed)
        items = [dataset.samples[i][0] for i in indices]
        labels = [dataset.samples[i][1] for i in indices]
        classes = dataset.classes
    else:
        dataset = _torchvision_split(source, split)
        indices = subset_indices(len(dataset.targets), subset, seed)
        items = [dataset.data[i] for i in indices]  # (32, 32, 3) uint8 arrays, already in memory
        labels = [int(dataset.targets[i]) for i in indices]
        classes = dataset.classes
    raw = settings.pipeline == "timm"
    return ImageSet(
        items, labels, classes, settings.image_size,
        transform=transform, cache=settings.cache, raw=raw, progress=progress,
    )  # fmt: skip


def test_transform(settings: DataSettings) -> Callable[[Any], torch.Tensor] | None:
    """The test-time transform: none for the ``cifar`` pipeline (images are decoded at
    ``image_size``), timm's resize + center crop for ``timm`` (:func:`timm_transform`)."""
    return timm_transform(settings, train=False) if settings.pipeline == "timm" else None


def list_classes(source: DataSource) -> list[str]:
    """The class names of ``source``'s training split, without reading an image.

    Raises:
        DataError: as :func:`open_split`.
    """
    if source.kind == "imagefolder":
        from torchvision.datasets.folder import find_classes

        folder = source.splits["train"]
        try:
            return list(find_classes(str(folder))[0])
        except (FileNotFoundError, OSError) as err:
            raise DataError(_unusable_folder(Path(folder), err)) from None
    return list(_torchvision_split(source, "train").classes)


def check_same_classes(train: ImageSet, test: ImageSet, source: DataSource) -> None:
    """Raise :class:`DataError` when the train and test splits name different classes."""
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:3]
        only_test = sorted(set(test.classes) - set(train.classes))[:3]
        raise DataError(
            f"data {source.name}: train/ and test/ have different class folders ({len(train.classes)} vs "
            f"{len(test.classes)}; only in train/: {', '.join(only_train) or 'none'}; only in test/: "
            f"{', '.join(only_test) or 'none'}); both need the same <class> folders"
        )
