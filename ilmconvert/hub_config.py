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

from .models import ModelSource, _classifier, classifier_size, resolve_preprocessing
from .preprocessing import timm_pretrained_cfg

#: timm's ``pretrained_cfg`` keys that locate the original weights: dropped, as timm's export does.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, or ``None`` when it cannot be written to JSON."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


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
    if label_names is not None and num_classes is not None and len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names but the network predicts {num_classes} classes")
    overrides = dict(pretrained_cfg or {})
    given = {"pretrained_cfg": overrides, "label_names": list(label_names) if label_names is not None else None}
    prep = resolve_preprocessing(model, source=source, config=given, metadata=metadata or {})
    cfg = timm_pretrained_cfg(model, source) if source.library == "timm" else {}
    cfg.update(overrides)
    cfg.update(prep.pretrained_cfg())
    labels = list(prep.label_names) if prep.label_names else None
    defaulted = [f"pretrained_cfg.{k}" for k in prep.defaulted]
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
    hub_id = timm_pretrained_cfg(model, source).get("hf_hub_id")
    return hub_id if isinstance(hub_id, str) and hub_id else None
