"""What input a network expects: size, normalization, resize and crop, class names; one resolver.

:func:`resolve` is the only place that decides a network's preprocessing; ``eval``, ``export``,
the Hub fields of ``config.json`` and ``finetune`` all read its :class:`Preprocessing` (call it
through :func:`ilmconvert.models.resolve_preprocessing`, which finds the network's
:class:`~ilmconvert.models.ModelSource`). Key by key, first match wins (docs/design.md §7):

1. given values: a checkpoint's ``config.json`` (its top-level ``pretrained_cfg`` and
   ``label_names``, timm's names) or the caller's overrides (``save(pretrained_cfg=...)``);
2. a fine-tune's record (``metadata["data"]``): the size, mean, std, resize and crop that
   ``finetune`` trained and tested with, and the class names;
3. the library: timm's ``pretrained_cfg`` of the recorded tag, resolved by
   ``timm.data.resolve_data_config`` (and ImageNet's synsets for a pretrained ImageNet head), or
   torchvision's weights ``transforms()`` and ``meta["categories"]``; skipped for a network
   adapted away from its pretrained input (``cifar_stem``);
4. ImageNet defaults, timm's: :data:`IMAGENET_DEFAULTS` (listed in ``defaulted``).

This module imports nothing of the package (the network's source is passed in), so that
:mod:`ilmconvert.models` can build on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

#: The input keys of timm's ``pretrained_cfg`` that a :class:`Preprocessing` holds.
DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
#: What nothing else decides: timm's ImageNet defaults (``timm.data.IMAGENET_DEFAULT_MEAN`` /
#: ``_STD``, ``DEFAULT_CROP_PCT``, ``DEFAULT_CROP_MODE``, and ``resolve_data_config``'s bicubic).
IMAGENET_DEFAULTS: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


class Source(Protocol):
    """What :func:`resolve` reads of a :class:`ilmconvert.models.ModelSource`."""

    library: str
    architecture: str
    pretrained_tag: str | None
    weights_file: str | None
    adaptations: list[str]


@dataclass(frozen=True)
class Preprocessing:
    """The input a network expects, in timm's ``pretrained_cfg`` terms.

    Attributes:
        input_size: ``(C, H, W)`` in pixels.
        interpolation: resize interpolation (``"bicubic"``, ``"bilinear"``, ...).
        crop_pct: test-time center crop: resize the shorter side to ``H / crop_pct``, crop ``H``.
        crop_mode: timm's crop mode (``"center"``).
        mean, std: per-channel normalization of [0, 1] RGB pixels.
        label_names: class names in index order, or ``None`` when unknown.
        source: where ``input_size`` came from, as a phrase for messages.
        from_weights: the values are those the weights were trained with (pretrained weights, a
            fine-tune's record, or a checkpoint's config.json that records either), not the
            architecture's defaults for an untrained network.
        defaulted: the keys of :data:`DATA_KEYS` filled with :data:`IMAGENET_DEFAULTS`.
    """

    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...] | None = None
    source: str = "ImageNet defaults"
    from_weights: bool = False
    defaulted: tuple[str, ...] = ()

    @property
    def image_size(self) -> int:
        """The (square) side in pixels: ``input_size[-1]``."""
        return int(self.input_size[-1])

    def pretrained_cfg(self) -> dict[str, Any]:
        """The :data:`DATA_KEYS` as timm's ``pretrained_cfg`` entries, JSON-ready (lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in DATA_KEYS)}


def resolve(
    model: nn.Module,
    source: Source | None,
    *,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> Preprocessing:
    """The preprocessing of ``model``, key by key from the first of the four places that has it
    (module doc).

    Args:
        model: the network (timm's ``resolve_data_config`` reads its ``pretrained_cfg``).
        source: how it was built (``None``: unknown, only given values and defaults apply).
        config: given values: ``{"pretrained_cfg": {...}, "label_names": [...]}`` (a checkpoint's
            ``config.json``, or overrides); its ``metadata`` is used when ``metadata`` is None.
        metadata: a checkpoint's metadata (``metadata["data"]`` of a fine-tune).
        num_classes: class names of another length are dropped (``None``: kept).

    Returns:
        A :class:`Preprocessing`.
    """
    config = config or {}
    metadata = metadata if metadata is not None else config.get("metadata") or {}
    given = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), Mapping) else {}
    recorded, recorded_labels = finetuned(metadata)
    library, library_labels, library_source = ({}, None, "")
    pretrained_input = source is not None and "cifar_stem" not in source.adaptations
    if pretrained_input:
        library, library_labels, library_source = _library(model, source)
    places = [(given, "the checkpoint's config.json"), (recorded, "the fine-tune's record"), (library, library_source)]
    values: dict[str, Any] = {}
    defaulted = []
    size_from = "ImageNet defaults"
    for key in DATA_KEYS:
        found = next(((c[key], name) for c, name in places if c.get(key) is not None), None)
        if found is None:
            defaulted.append(key)
        value, name = found or (IMAGENET_DEFAULTS[key], "ImageNet defaults")
        values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        if key == "input_size":
            size_from = name
    values["input_size"] = tuple(int(v) for v in values["input_size"])
    values["crop_pct"] = float(values["crop_pct"])
    labels = next((n for n in (config.get("label_names"), recorded_labels, library_labels) if n), None)
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        labels = None  # names of another head
    from_weights = bool(recorded) or (
        pretrained_input and (source.pretrained_tag is not None or source.weights_file is not None)
    )
    return Preprocessing(
        **values,
        label_names=tuple(str(n) for n in labels) if labels else None,
        source=size_from,
        from_weights=from_weights,
        defaulted=tuple(defaulted),
    )


def finetuned(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """The preprocessing and class names a fine-tune recorded (``metadata["data"]``), if any.

    The ``cifar`` pipeline resizes the shorter side to ``image_size`` (torchvision's bilinear
    ``resize``) and center-crops it (``crop_pct`` 1); the ``timm`` pipeline resizes to
    ``image_size / crop_pct`` with ``interpolation`` and center-crops (ilmconvert/train/data.py).
    """
    data = metadata.get("data")
    if not isinstance(data, Mapping):
        return {}, None
    settings = data.get("settings") if isinstance(data.get("settings"), Mapping) else {}
    cfg: dict[str, Any] = {}
    if isinstance(settings.get("image_size"), int):
        size = settings["image_size"]
        timm_pipeline = settings.get("pipeline") == "timm"
        cfg.update(input_size=[3, size, size], crop_mode="center")
        cfg["crop_pct"] = settings.get("crop_pct") if timm_pipeline else 1.0
        cfg["interpolation"] = settings.get("interpolation") if timm_pipeline else "bilinear"
    for key in ("mean", "std"):
        if isinstance(settings.get(key), Sequence):
            cfg[key] = list(settings[key])
    classes = data.get("classes")
    return cfg, [str(c) for c in classes] if isinstance(classes, Sequence) and classes else None


def _library(model: nn.Module, source: Source) -> tuple[dict[str, Any], list[str] | None, str]:
    """(the library's preprocessing, its class names, a phrase naming it) for ``source``."""
    if source.library == "timm":
        cfg = timm_pretrained_cfg(model, source)
        import timm

        data = timm.data.resolve_data_config({}, pretrained_cfg=cfg, model=model)
        labels = None
        if source.pretrained_tag is not None and source.weights_file is None:
            labels = cfg.get("label_names") or _imagenet_labels(model)
        tag = f".{source.pretrained_tag}" if source.pretrained_tag not in (None, "default") else ""
        where = f"timm's pretrained_cfg of {source.architecture}{tag}"
        return {k: data[k] for k in DATA_KEYS if k in data}, labels, where
    weights = torchvision_weights(source)
    if weights is None:
        return {}, None, ""
    tf = weights.transforms()
    crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
    cfg = {
        "input_size": [3, crop, crop],
        "interpolation": getattr(tf.interpolation, "value", str(tf.interpolation)),
        "crop_pct": round(crop / resize, 4),
        "crop_mode": "center",
        "mean": list(tf.mean),
        "std": list(tf.std),
    }
    categories = weights.meta.get("categories")
    return cfg, list(categories) if categories else None, f"torchvision's {weights} transforms"


def timm_pretrained_cfg(model: nn.Module, source: Source) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of the recorded tag, else the model's own, else the
    architecture's default one (a copy; ``{}`` when timm has none)."""
    import timm

    cfg: dict[str, Any] = {}
    if source.pretrained_tag not in (None, "default"):
        found = timm.models.get_pretrained_cfg(f"{source.architecture}.{source.pretrained_tag}")
        cfg = found.to_dict() if found is not None else {}
    if not cfg:
        own = getattr(model, "pretrained_cfg", None)
        cfg = dict(own) if isinstance(own, Mapping) else {}
    if not cfg:
        found = timm.models.get_pretrained_cfg(source.architecture)
        cfg = found.to_dict() if found is not None else {}
    return cfg


def torchvision_weights(source: Source) -> Any:
    """The torchvision weights enum member of ``source`` (``None`` without weights or when unknown)."""
    if source.pretrained_tag is None:
        return None
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(source.architecture)
        return enum.DEFAULT if source.pretrained_tag == "default" else enum.verify(source.pretrained_tag)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _imagenet_labels(model: nn.Module) -> list[str] | None:
    """ImageNet synsets (timm's ``ImageNetInfo``) for a pretrained timm ImageNet head, else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    try:
        subset = infer_imagenet_subset(model)
        names = ImageNetInfo(subset).label_names() if subset else None
    except Exception:  # unknown subsets or label files: no names rather than a failed save
        return None
    return list(names) if names else None
