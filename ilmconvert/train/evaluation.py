"""``ilmconvert eval``: a checkpoint's test loss, top-1 and top-5 on a data set's test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import first_line
from ..io import load, read_config
from ..models import classifier_size, preprocessing
from .data import make_loader, open_split, resolve_data, resolve_pipeline, test_transform
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

    The input size and normalization are those recorded in the checkpoint by ``finetune``; for a
    checkpoint written by ``swap``, those its pretrained weights expect
    (:func:`ilmconvert.models.preprocessing`: timm's data config, torchvision's weights
    transforms), or the recipe defaults (CIFAR-10 statistics at 32 px) for a ``cifar_stem`` network.

    Returns:
        ``{"checkpoint", "loss", "top1", "top5" (percent), "images", "seconds", "classes"}``.

    Raises:
        RunError, CheckpointError, DataError, TrainError: one-line messages.
    """
    checkpoint = resolve_checkpoint(path)
    torch_device = select_device(device)
    meta = read_config(checkpoint).get("metadata", {}) or {}
    network = load(checkpoint)
    recorded = meta.get("data", {}).get("settings")
    if recorded is None:  # written by swap: the pretrained weights' preprocessing (timm's protocol for timm)
        expected = preprocessing(network)
        timm_source = expected is not None and getattr(network, "ilm_source", None) is not None
        pipeline = "timm" if timm_source and network.ilm_source.library == "timm" else "cifar"
        recorded = {"augment": "none", **(expected or {}), "pipeline": pipeline}
    try:
        settings = DataSettings.model_validate(recorded)
    except ValidationError as err:  # written by another version, or edited
        raise RunError(f"{checkpoint}/config.json: metadata.data.settings are invalid ({first_line(err)})") from None
    settings = resolve_pipeline(settings, network)
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
