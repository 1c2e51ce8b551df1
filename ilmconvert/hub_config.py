"""timm's Hub fields of a checkpoint's ``config.json``: architecture, classes, preprocessing, labels.

timm's ``push_to_hub`` writes ``architecture``, ``num_classes``, ``num_features``,
``global_pool``, ``pretrained_cfg`` and ``label_names`` at the top level of ``config.json``;
:func:`hub_fields` computes the same fields, with the same names, for a converted network, so
that Hub tools and the export path read the preprocessing and class names where a timm user
expects them (docs/design.md §5). Values are taken, first match wins, from

1. the caller's overrides (``save(label_names=..., pretrained_cfg=...)``);
2. a fine-tune's metadata (``metadata["data"]``: image size, mean, std and class names of the
   data it was trained on);
3. the library: timm's ``pretrained_cfg`` of the recorded tag (preprocessing resolved by
   ``timm.data.resolve_data_config``) and ImageNet's synsets for an ImageNet head, or torchvision's
   weights ``transforms()`` and ``meta["categories"]``;
4. defaults (ImageNet's 224 px, bilinear, crop 0.875, mean and std), listed in
   ``"defaulted"`` as dotted names (``"pretrained_cfg.mean"``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .models import ModelSource, _classifier, classifier_size

#: The input pipeline keys of timm's ``pretrained_cfg`` that :func:`hub_fields` always fills.
DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
#: timm's ``pretrained_cfg`` keys that locate the original weights: dropped, as timm's export does.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")
_DEFAULTS: dict[str, Any] = {
    "input_size": [3, 224, 224],
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, or ``None`` when it cannot be written to JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _timm_cfg(model: nn.Module, source: ModelSource) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of the recorded tag (the model's own when no tag is recorded),
    with the preprocessing resolved by ``timm.data.resolve_data_config``."""
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
    data = timm.data.resolve_data_config({}, pretrained_cfg=cfg, model=model)
    cfg.update({k: data[k] for k in DATA_KEYS if k in data})
    return cfg


def _torchvision_cfg(source: ModelSource) -> tuple[dict[str, Any], list[str] | None]:
    """Preprocessing and class names of the recorded torchvision weights (empty without weights)."""
    if source.pretrained_tag is None:
        return {}, None
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(source.architecture)
        weights = enum.DEFAULT if source.pretrained_tag == "default" else enum.verify(source.pretrained_tag)
        tf = weights.transforms()
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}, None
    crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
    interpolation = getattr(tf.interpolation, "value", str(tf.interpolation))
    cfg = {
        "input_size": [3, crop, crop],
        "interpolation": interpolation,
        "crop_pct": round(crop / resize, 4),
        "crop_mode": "center",
        "mean": list(tf.mean),
        "std": list(tf.std),
    }
    categories = weights.meta.get("categories")
    return cfg, list(categories) if categories else None


def _imagenet_labels(model: nn.Module, num_classes: int | None) -> list[str] | None:
    """ImageNet synsets (timm's ``ImageNetInfo``) for a pretrained timm ImageNet head, else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    try:
        subset = infer_imagenet_subset(model)
        names = ImageNetInfo(subset).label_names() if subset else None
    except Exception:  # unknown subsets or label files: no names rather than a failed save
        return None
    return list(names) if names and len(names) == num_classes else None


def _global_pool(model: nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    if isinstance(pool, str):
        return pool or None
    pool_type = getattr(pool, "pool_type", None)
    return pool_type if isinstance(pool_type, str) and pool_type else None


def _num_features(model: nn.Module) -> int | None:
    value = getattr(model, "num_features", None)
    if isinstance(value, int):
        return value
    head = _classifier(model)
    return int(head[2].in_features) if head else None


def _finetuned_data(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """Preprocessing and class names a fine-tune recorded (``metadata["data"]``), if any."""
    data = metadata.get("data")
    if not isinstance(data, Mapping):
        return {}, None
    settings = data.get("settings") if isinstance(data.get("settings"), Mapping) else {}
    cfg: dict[str, Any] = {}
    if isinstance(settings.get("image_size"), int):
        size = settings["image_size"]
        # the fine-tune's evaluation resizes and center-crops to image_size (ilmconvert/train/data.py)
        cfg.update(input_size=[3, size, size], crop_pct=1.0, crop_mode="center")
    for key in ("mean", "std"):
        if isinstance(settings.get(key), Sequence):
            cfg[key] = list(settings[key])
    classes = data.get("classes")
    return cfg, [str(c) for c in classes] if isinstance(classes, Sequence) and classes else None


def hub_fields(
    model: nn.Module,
    source: ModelSource,
    *,
    metadata: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    pretrained_cfg: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """timm's top-level Hub fields of ``config.json`` for ``model`` (see the module doc).

    Args:
        model: the (converted) network; its classifier size and pooling are read.
        source: where its architecture and weights came from.
        metadata: the checkpoint's metadata (a fine-tune's ``data`` entry is used).
        label_names: class names, index order; override everything else.
        pretrained_cfg: entries of timm's ``pretrained_cfg`` (``input_size`` ``[3, H, W]`` in
            pixels, ``crop_pct``, ``interpolation``, ``mean``, ``std``, ``license``...) that
            override the ones found.

    Returns:
        ``{"architecture", "num_classes", "num_features", "global_pool" (timm only),
        "pretrained_cfg", "label_names" (when known), "defaulted"}``, JSON-ready; ``defaulted``
        lists the fields filled with ImageNet defaults rather than known.

    Raises:
        ValueError: when ``label_names`` does not have one name per class.
    """
    num_classes = classifier_size(model)
    labels: list[str] | None = None
    if source.library == "timm":
        cfg = _timm_cfg(model, source)
        if source.pretrained_tag is not None and source.weights_file is None:
            labels = cfg.get("label_names") or _imagenet_labels(model, num_classes)
    else:
        cfg, labels = _torchvision_cfg(source)
    tuned, tuned_labels = _finetuned_data(metadata or {})
    cfg.update(tuned)
    labels = tuned_labels or labels
    cfg.update(dict(pretrained_cfg or {}))
    if label_names is not None:
        labels = [str(n) for n in label_names]
        if num_classes is not None and len(labels) != num_classes:
            raise ValueError(f"label_names has {len(labels)} names but the network predicts {num_classes} classes")
    elif labels is not None and len(labels) != num_classes:
        labels = None  # names of another head
    defaulted = [f"pretrained_cfg.{k}" for k in DATA_KEYS if cfg.get(k) is None]
    for key in DATA_KEYS:
        if cfg.get(key) is None:
            cfg[key] = _DEFAULTS[key]
    cfg.pop("architecture", None)  # at the top level, as timm's export writes it
    cfg["num_classes"] = num_classes
    cfg.pop("label_names", None)  # written at the top level, as timm does
    if source.pretrained_tag is None:  # random or local weights: no tag, no weights license
        for key in ("tag", "license"):
            cfg.pop(key, None)
    clean = {k: _jsonable(v) for k, v in cfg.items() if k not in _SOURCE_KEYS and v is not None}
    fields: dict[str, Any] = {
        "architecture": source.architecture,
        "num_classes": num_classes,
        "num_features": _num_features(model),
    }
    pool = _global_pool(model) if source.library == "timm" else None
    if pool:
        fields["global_pool"] = pool
    fields["pretrained_cfg"] = {k: v for k, v in clean.items() if v is not None}
    if labels:
        fields["label_names"] = labels
    fields["defaulted"] = defaulted
    return fields


def base_model(model: nn.Module, source: ModelSource) -> str | None:
    """The Hub repository of the pretrained weights the network started from (timm's
    ``hf_hub_id`` of the recorded tag), or None (random or local weights, torchvision)."""
    if source.library != "timm" or source.pretrained_tag is None or source.weights_file is not None:
        return None
    hub_id = _timm_cfg(model, source).get("hf_hub_id")
    return hub_id if isinstance(hub_id, str) and hub_id else None
