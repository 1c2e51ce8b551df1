"""``ilmconvert eval``: a checkpoint's test loss, top-1 and top-5 on a data set's test split."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

from ..errors import first_line
from ..io import load, read_config
from ..models import classifier_size, resolve_preprocessing, source_of
from .data import open_split, resolve_data, resolve_pipeline, test_transform
from .loader import make_loader
from .loop import Batches, Precision, cpu_threads, evaluate, select_device
from .recipes import DataSettings
from .run_folder import RunError, resolve_checkpoint


def evaluate_checkpoint(
    path: str | Path,
    data: str,
    *,
    data_root: str | Path | None = None,
    device: str = "auto",
    subset: int | None = None,
    batch_size: int | None = None,
    batches: Batches | None = None,
) -> dict[str, Any]:
    """Test loss, top-1 and top-5 of a checkpoint (or a run's ``best/``) on DATA's test split.

    The images are prepared as :func:`checkpoint_settings` says.

    Returns:
        ``{"checkpoint", "loss", "top1", "top5" (percent), "images", "seconds", "classes"}``.

    Raises:
        RunError, CheckpointError, DataError, TrainError: one-line messages.
    """
    checkpoint = resolve_checkpoint(path)
    torch_device = select_device(device)
    config = read_config(checkpoint)
    meta = config.get("metadata", {}) or {}
    network = load(checkpoint)
    settings = checkpoint_settings(checkpoint, network, config)
    source = resolve_data(data, data_root, needed=("test",))
    test = open_split(source, "test", settings, subset=subset, seed=1, transform=test_transform(settings))
    classes = classifier_size(network)
    if classes != len(test.classes):
        raise RunError(
            f"{checkpoint} predicts {classes} classes but {data} has {len(test.classes)}; "
            "evaluate on the data it was trained for"
        )
    trained_on = meta.get("data", {}).get("classes")
    if trained_on and list(trained_on) != test.classes:
        raise RunError(
            f"{checkpoint} was trained on classes {trained_on[:3]}... but {data} has {test.classes[:3]}...; "
            "evaluate on the data it was trained for"
        )
    precision = Precision(torch_device)
    network = precision.prepare(network)
    pin = torch_device.type == "cuda"
    loader = make_loader(test, batch_size or settings.eval_batch_size, train=False, pin_memory=pin)
    with cpu_threads(torch_device, (meta.get("train") or {}).get("cpu_threads")):
        result = evaluate(network, loader, settings, precision, batches)
    return {"checkpoint": str(checkpoint), **result, "classes": len(test.classes)}


def checkpoint_settings(checkpoint: Path, network: nn.Module, config: Mapping[str, Any]) -> DataSettings:
    """The test-time data settings of a checkpoint (``config``: its ``config.json``).

    Those ``finetune`` recorded (``metadata.data.settings``); for a checkpoint written by ``swap``,
    the network's preprocessing (:func:`ilmconvert.models.resolve_preprocessing`: the
    ``pretrained_cfg`` of its config.json, as ``export`` reads it) with timm's test transform
    (resize to ``image_size / crop_pct`` with ``interpolation``, center crop); for a network
    without a pretrained input (``cifar_stem``, or an unknown source) the recipe defaults (CIFAR-10
    statistics at 32 px).

    Raises:
        RunError: recorded settings that are not valid.
    """
    recorded = ((config.get("metadata") or {}).get("data") or {}).get("settings")
    source = source_of(network)
    if recorded is None and (source is None or "cifar_stem" in source.adaptations):
        recorded = {"augment": "none", "pipeline": "cifar"}
    elif recorded is None:  # written by swap: what the weights expect, as config.json and export say
        found = resolve_preprocessing(network, config=config)
        recorded = {
            "augment": "none", "pipeline": "timm", "image_size": found.image_size, "mean": found.mean,
            "std": found.std, "crop_pct": found.crop_pct, "interpolation": found.interpolation,
        }  # fmt: skip
    try:
        settings = DataSettings.model_validate(recorded)
    except ValidationError as err:  # written by another version, or edited
        raise RunError(f"{checkpoint}/config.json: metadata.data.settings are invalid ({first_line(err)})") from None
    return resolve_pipeline(settings, network)
