"""The networks of a sweep's pretrained variants: conversions of one checkpoint, each made once.

``ilmconvert sweep --checkpoint DIR`` compares fine-tunes of a pretrained network (a checkpoint
folder from ``swap``, ``save`` or ``finetune``, e.g. ImageNet weights through
``ilmconvert swap timm:tf_efficientnet_lite1 --weights F --weights-by-position --method none``) with
fine-tunes of its conversions. Such a variant carries a ``swap:`` key, the settings of
``ilmconvert swap`` (:class:`SwapSettings`), instead of a recipe change; the built-in ones are
:data:`PRETRAINED_VARIANTS`. A recipe may add more under ``variants:``, e.g.::

    variants:
      gn-cal-g8: {swap: {method: none, batchnorm: gn, calibrate: true, groups: 8}}

Before its cells run, each variant's network is made once (:func:`prepare_networks`) into
``OUT/networks/VARIANT`` with :func:`ilmconvert.save`: the checkpoint is loaded, a deep copy kept
as the original, converted with :func:`ilmconvert.swap` (which checks that a conversion meant to
keep the function keeps it) and, for ``calibrate: true``, calibrated
(:meth:`ilmconvert.swapping.SwapResult.calibrate`, what ``swap --calibrate`` does) on
``--calibration-images`` images of the sweep data's training split, preprocessed as the cells will
train on them (the recipe's input size, mean and std, else the checkpoint's), seeded with 0, so
every seed and batch size fine-tunes the same network. ``config.json`` records the preservation
check, the calibration report and ``metadata.sweep`` (the variant, its swap settings, the
checkpoint and its ``weights_sha256``). A variant that converts nothing (``bn``: ``swap: {}``)
fine-tunes ``DIR`` itself.

Two sweep processes may share one ``OUT`` (disjoint grids, e.g. one per batch size): a network is
prepared under a per-variant lock (``fcntl.flock``; the kernel releases it when a process dies)
and written atomically (:func:`ilmconvert.save`: a temporary folder, then a rename), so the second
process waits for it and reuses it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, model_validator

from .. import methods
from ..batchnorm_modes import check_batchnorm
from ..errors import first_line
from ..io import CheckpointError, load, read_config, save
from .sweep_grid import Cell, Sweep, SweepError

#: The folder of a sweep that holds the prepared networks, ``OUT/networks/VARIANT``.
NETWORKS = "networks"
#: ``calibrate()``'s default distillation budget (seconds), also ``sweep --calibration-time``'s.
CALIBRATION_TIME = 300.0
CALIBRATION_IMAGES = 1024
_SEED = 0  # the conversion's new weights (ILM's W1), the calibration images and the calibration


def _swap(method: str = methods.NONE, batchnorm: str | None = None, calibrate: bool = False) -> dict[str, Any]:
    settings: dict[str, Any] = {"method": method, "batchnorm": batchnorm}
    return {"swap": settings | ({"calibrate": True} if calibrate else {})}


#: The built-in variants of ``sweep --checkpoint DIR``: conversions of DIR's network (``swap:``
#: settings).
#:
#: - ``bn``: DIR as is (BN trains with batch statistics, the naive fine-tune);
#: - ``bn-frozen``: timm's ``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d`` in place of every
#:   BatchNorm (:class:`ilmconvert.nn.baselines.FrozenBatchNorm` calls timm's
#:   ``freeze_batch_norm_2d`` on each one): BN's running statistics, fixed, in training mode too,
#:   and its affine fixed as well (timm's frozen layers hold weight and bias as buffers, as
#:   detectron2's ``FrozenBatchNorm2d`` does); the detection default;
#: - ``gn``: BN -> GroupNorm, BN's affine kept (``swap --include-batchnorm --method none``);
#:   ``ilm+gn``, ``gn+pn``: the same with ILM / Proxy Norm;
#: - ``gn-cal``, ``ilm+gn-cal``, ``gn+pn-cal``: the same three, calibrated (``swap --calibrate``);
#: - ``ilm+frozen``: frozen BN standardization under ILM rescaling (the same function at step 0).
PRETRAINED_VARIANTS: dict[str, dict[str, Any]] = {
    "bn": {"swap": {}},
    "bn-frozen": _swap(batchnorm="frozen"),
    "gn": _swap(batchnorm="gn"),
    "ilm+gn": _swap(methods.ILM, "gn"),
    "gn+pn": _swap(methods.PROXY, "gn"),
    "gn-cal": _swap(batchnorm="gn", calibrate=True),
    "ilm+gn-cal": _swap(methods.ILM, "gn", calibrate=True),
    "gn+pn-cal": _swap(methods.PROXY, "gn", calibrate=True),
    "ilm+frozen": _swap(methods.ILM, "frozen"),
}


class SwapSettings(BaseModel):
    """The ``swap:`` key of a sweep variant: ``ilmconvert swap``'s settings (same names and
    defaults; ``calibrate`` is a flag here, the images being the sweep data's)."""

    model_config = ConfigDict(extra="forbid")

    method: str = methods.NONE
    batchnorm: Optional[Literal["gn", "frozen"]] = None
    calibrate: bool = False
    groups: Union[Literal["auto"], PositiveInt] = "auto"
    init: Literal["preserve", "paper"] = "preserve"
    norms: str = "gn,in,ln"
    key_group_size: PositiveInt = 16
    reduction: PositiveInt = 16
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None

    @model_validator(mode="after")
    def _consistent(self) -> SwapSettings:
        if self.method not in methods.names():
            raise ValueError(f"method must be one of {', '.join(methods.names())}, got {self.method!r}")
        problem = check_batchnorm(self.batchnorm, self.method)
        if problem:
            raise ValueError(problem)
        if self.calibrate and (self.batchnorm != "gn" or self.init != "preserve"):
            raise ValueError("calibrate fits the layers that replace BatchNorm: it needs batchnorm gn, init preserve")
        if self.groups != "auto" and not self.calibrate:
            raise ValueError("groups chooses the group counts of calibrate; add calibrate: true")
        return self

    @property
    def converts(self) -> bool:
        """False for ``method: none`` without ``batchnorm``: the checkpoint as is."""
        return self.method != methods.NONE or self.batchnorm is not None

    def convert_kwargs(self) -> dict[str, Any]:
        """:func:`ilmconvert.convert`'s arguments."""
        return self.model_dump(exclude={"calibrate", "groups"})

    def describe(self) -> str:
        """``method ilm, batchnorm gn, calibrated`` (what a progress line shows)."""
        if not self.converts:
            return "the checkpoint as is"
        words = [f"method {self.method}"] + ([f"batchnorm {self.batchnorm}"] if self.batchnorm else [])
        return ", ".join(words + (["calibrated"] if self.calibrate else []))


def swap_settings(name: str, variant: Mapping[str, Any]) -> SwapSettings:
    """The checked ``swap:`` settings of variant ``name``.

    Raises:
        SweepError: not a mapping, an unknown key, a bad value, or ``checkpoint:`` beside it (one
            line naming the variant and the key).
    """
    if "checkpoint" in variant:
        raise SweepError(f"variant {name!r}: give either swap: (a conversion of --checkpoint) or checkpoint:, not both")
    raw = variant["swap"]
    if not isinstance(raw, Mapping):
        raise SweepError(f"variant {name!r}: swap: must be a mapping of swap settings, got {raw!r}")
    try:
        return SwapSettings.model_validate(dict(raw))
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            known = ", ".join(SwapSettings.model_fields)
            raise SweepError(f"variant {name!r}: unknown swap key {key!r}; known: {known}") from None
        where = f"swap key {key!r}" if key else "swap"
        raise SweepError(f"variant {name!r}: bad {where}: {e['msg'].removeprefix('Value error, ')}") from None


# ------------------------------------------------------------------------------------------ planning
@dataclass
class Pretrained:
    """The checkpoint of ``sweep --checkpoint``: its folder, ``weights_sha256``, the input the
    cells train at where the recipe leaves it open, and what is recorded in ``sweep.json``."""

    path: Path
    weights_sha256: str
    input_defaults: dict[str, Any]
    calibration_images: int = CALIBRATION_IMAGES
    calibration_time: float = CALIBRATION_TIME

    def record(self) -> dict[str, Any]:
        """``sweep.json``'s ``checkpoint`` entry."""
        return {
            "path": str(self.path),
            "weights_sha256": self.weights_sha256,
            "calibration_images": self.calibration_images,
            "calibration_time": self.calibration_time,
        }


def plan_pretrained(
    checkpoint: str | Path, variants: Mapping[str, Mapping[str, Any]], calibration_images: int, calibration_time: float
) -> Pretrained:
    """Check ``checkpoint`` and the ``swap:`` variants (each converted on the meta device, so a
    conversion that cannot be made fails here, before anything is written).

    Raises:
        SweepError: not a checkpoint folder, a checkpoint already converted (a variant converts it
            again), a conversion that cannot be made, bad calibration settings.
    """
    from ..convert import ConversionError, convert
    from ..models import ModelSource, ModelSourceError, build, resolve_preprocessing

    path = Path(checkpoint).expanduser().resolve()
    try:
        config = read_config(path)
    except CheckpointError as err:
        raise SweepError(f"--checkpoint {checkpoint} is not a checkpoint folder ({first_line(err)})") from None
    if calibration_images < 8:
        raise SweepError(f"--calibration-images must be at least 8 (1/8 is held out), got {calibration_images}")
    if calibration_time < 0:
        raise SweepError(f"--calibration-time must not be negative, got {calibration_time}")
    source = ModelSource.from_dict(config["source"])
    try:
        skeleton = build(source, device="meta")
    except ModelSourceError as err:
        raise SweepError(f"--checkpoint {checkpoint}: cannot rebuild its network ({first_line(err)})") from None
    already = len(config["conversion"].get("converted", []))
    for name, variant in variants.items():
        settings = swap_settings(name, variant)
        if not settings.converts:
            continue
        if already:
            raise SweepError(
                f"variant {name!r} converts --checkpoint {checkpoint}, which is already converted ({already} modules); "
                "pass the unconverted network's checkpoint (ilmconvert swap MODEL --method none --out DIR)"
            )
        try:
            convert(copy.deepcopy(skeleton), **settings.convert_kwargs())
        except ConversionError as err:
            raise SweepError(f"variant {name!r}: cannot convert --checkpoint {checkpoint}: {first_line(err)}") from None
    found = resolve_preprocessing(skeleton, source=source, config=config)
    defaults = {"image_size": found.image_size, "mean": list(found.mean), "std": list(found.std)}
    return Pretrained(path, str(config["weights_sha256"]), defaults, calibration_images, calibration_time)


def count_train_images(sweep: Sweep) -> int:
    """How many images the training split of the sweep's data holds (no image is decoded).

    Raises:
        DataError: the data cannot be found.
    """
    from .data import _torchvision_split, resolve_data

    source = resolve_data(sweep.data, sweep.data_root)
    if source.kind != "imagefolder":
        return len(_torchvision_split(source, "train").targets)
    from torchvision.datasets import ImageFolder

    return len(ImageFolder(str(source.splits["train"])).samples)


# ------------------------------------------------------------------------------------------ preparing
@contextlib.contextmanager
def folder_lock(path: Path, waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on the file ``path`` (created), waiting for another
    process that holds it (``waiting()`` is called once first). No lock where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class PreparedNetwork:
    """What :func:`prepare_networks` did for one variant.

    Attributes:
        variant: its name; ``path``: the checkpoint folder its cells fine-tune.
        description: what was converted (``method ilm, batchnorm gn, calibrated``).
        converted: modules converted; ``reused``: made earlier (this or another process).
        calibration: held-out figures per stage (``before``, ``closed_form``, ``distilled``:
            ``relative_change``, ``top1_agreement``), or ``None`` when not calibrated.
        seconds: time spent making it here (0 when reused).
    """

    variant: str
    path: Path
    description: str
    converted: int = 0
    reused: bool = False
    calibration: Optional[dict[str, Any]] = None
    seconds: float = 0.0


@dataclass
class PrepareHooks:
    """Callbacks for a front-end: ``waiting(variant)`` another process prepares it;
    ``calibrating(variant)`` returns the ``progress`` for :func:`ilmconvert.calibrate.calibrate`
    (a started rich Progress, or None); ``ready(prepared)`` once per variant."""

    waiting: Callable[[str], None] = lambda variant: None
    calibrating: Callable[[str], Any] = lambda variant: None
    ready: Callable[[PreparedNetwork], None] = lambda prepared: None


def network_folder(sweep: Sweep, variant: str) -> Path | None:
    """The checkpoint the cells of ``variant`` fine-tune: its ``checkpoint:``, ``OUT/networks/VARIANT``
    for a conversion of ``--checkpoint``, ``--checkpoint`` itself for ``swap: {}``, else None."""
    spec = sweep.variants[variant]
    if "swap" not in spec:
        return spec.get("checkpoint")
    assert sweep.pretrained is not None, "a swap: variant needs --checkpoint (plan_sweep checks it)"
    converts = SwapSettings.model_validate(spec["swap"]).converts
    return sweep.out / NETWORKS / variant if converts else sweep.pretrained.path


def prepare_networks(
    sweep: Sweep, hooks: PrepareHooks | None = None, variants: list[str] | None = None
) -> dict[str, PreparedNetwork]:
    """Make the network of every ``swap:`` variant of ``sweep`` (or of ``variants``), once.

    A network already in ``OUT/networks/VARIANT`` made from the same checkpoint and settings is
    reused; one that another process is making is waited for.

    Returns:
        Per variant, what was done (:class:`PreparedNetwork`).

    Raises:
        SweepError: ``OUT/networks/VARIANT`` was made from another checkpoint or settings, or the
            training split holds fewer images than ``--calibration-images``.
        CheckpointError, CalibrationError, DataError: as ``swap`` and ``finetune``.
        PreservationError: a conversion meant to keep the function did not (a defect, exit 1).
    """
    hooks = hooks or PrepareHooks()
    done: dict[str, PreparedNetwork] = {}
    for name in variants if variants is not None else list(sweep.variants):
        spec = sweep.variants[name]
        if "swap" not in spec:
            continue
        settings = SwapSettings.model_validate(spec["swap"])
        target = network_folder(sweep, name)
        assert target is not None and sweep.pretrained is not None
        if not settings.converts:
            done[name] = PreparedNetwork(name, target, settings.describe(), reused=True)
        else:
            with folder_lock(sweep.out / NETWORKS / f".{name}.lock", lambda: hooks.waiting(name)):
                done[name] = _prepared(sweep, name, settings, target, hooks)
        hooks.ready(done[name])
    return done


def _record(sweep: Sweep, name: str, settings: SwapSettings) -> dict[str, Any]:
    pretrained = sweep.pretrained
    assert pretrained is not None
    record = {"variant": name, "swap": settings.model_dump(), "checkpoint": str(pretrained.path)}
    record["checkpoint_weights_sha256"] = pretrained.weights_sha256
    if settings.calibrate:
        record["calibration_images"] = pretrained.calibration_images
        record["calibration_time"] = pretrained.calibration_time
        data = _input_settings(sweep, name)
        record["calibration_input"] = {"image_size": data.image_size, "mean": list(data.mean), "std": list(data.std)}
    return record


def _prepared(sweep: Sweep, name: str, settings: SwapSettings, target: Path, hooks: PrepareHooks) -> PreparedNetwork:
    wanted = _record(sweep, name, settings)
    if (target / "config.json").is_file():
        config = read_config(target)
        made = dict((config.get("metadata") or {}).get("sweep") or {})
        if made | {"checkpoint": wanted["checkpoint"]} != wanted:  # the checkpoint may have moved
            raise SweepError(
                f"{target} was made from another checkpoint or with other settings than variant {name!r} now has; "
                "remove it or use a new --out"
            )
        stages = (config["metadata"].get("calibration") or {}).get("stages")
        converted = len(config["conversion"].get("converted", []))
        return PreparedNetwork(name, target, settings.describe(), converted, True, stages)
    started = time.perf_counter()
    result, config = _convert(sweep, name, settings, hooks)
    save(
        result.model, target, metadata=result.metadata | {"sweep": wanted},
        pretrained_cfg=config.get("pretrained_cfg"), label_names=config.get("label_names"),
    )  # fmt: skip
    stages = result.metadata.get("calibration", {}).get("stages")
    seconds = round(time.perf_counter() - started, 1)
    return PreparedNetwork(name, target, settings.describe(), len(result.report.converted), False, stages, seconds)


def _convert(sweep: Sweep, name: str, settings: SwapSettings, hooks: PrepareHooks) -> tuple[Any, dict[str, Any]]:
    """The converted (and calibrated) network of variant ``name`` as a SwapResult, and the
    checkpoint's config."""
    from ..swapping import swap

    pretrained = sweep.pretrained
    assert pretrained is not None
    config = read_config(pretrained.path)
    network = load(pretrained.path)
    original = copy.deepcopy(network).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)  # the new weights a conversion draws (ILM's W1)
        result = swap(network, **settings.convert_kwargs())  # raises when frozen BN does not preserve
    if settings.calibrate:
        images = calibration_images(sweep, name, original, config)
        result.calibrate(
            original, images, groups=settings.groups, time_budget=pretrained.calibration_time, seed=_SEED,
            progress=hooks.calibrating(name),
        )  # fmt: skip
    return result, config


def _input_settings(sweep: Sweep, variant: str) -> Any:
    """The data settings the cells of ``variant`` train with, before the network fills what is open."""
    return sweep.cell_recipe(Cell(variant, sweep.batch_sizes[0], sweep.seeds[0])).data


def calibration_images(sweep: Sweep, variant: str, network: torch.nn.Module, config: Mapping[str, Any]) -> torch.Tensor:
    """``--calibration-images`` images of the training split, a seeded subset (seed 0), as the
    cells of ``variant`` see their test images: read and preprocessed by the fine-tuning data code
    (:func:`~ilmconvert.train.data.open_split`, :func:`~ilmconvert.train.data.resolve_pipeline`,
    :func:`~ilmconvert.train.loader.to_input`) at the cells' input size, mean and std, without
    augmentation. Returns float32 ``(N, 3, S, S)``.

    Raises:
        SweepError: the training split holds fewer images. DataError: as ``finetune``.
    """
    from ..models import resolve_preprocessing
    from .data import open_split, resolve_data, resolve_pipeline, test_transform
    from .loader import to_input

    pretrained = sweep.pretrained
    assert pretrained is not None
    count = pretrained.calibration_images
    found = resolve_preprocessing(network, config=config)
    settings = resolve_pipeline(_input_settings(sweep, variant), network, found)
    source = resolve_data(sweep.data, sweep.data_root)
    split = open_split(source, "train", settings, subset=count, seed=_SEED, transform=test_transform(settings))
    if len(split) < count:
        raise SweepError(f"--calibration-images {count} is more than the {len(split)} training images of {sweep.data}")
    batch = torch.stack([split[i][0] for i in range(len(split))])
    return to_input(batch, settings.mean, settings.std, torch.device("cpu"))


def check_calibration_count(sweep: Sweep) -> None:
    """Refuse ``--calibration-images`` above the training split's size when a variant calibrates
    (before anything is written).

    Raises:
        SweepError: too many asked. DataError: the data cannot be found.
    """
    pretrained = sweep.pretrained
    calibrating = [
        n for n, v in sweep.variants.items() if "swap" in v and SwapSettings.model_validate(v["swap"]).calibrate
    ]
    if pretrained is None or not calibrating:
        return
    total = count_train_images(sweep)
    if pretrained.calibration_images > total:
        raise SweepError(
            f"--calibration-images {pretrained.calibration_images} is more than the {total} training images of "
            f"{sweep.data} (variant {calibrating[0]!r} calibrates on them); pass at most {total}"
        )

