"""Training recipes: YAML files that name a network, its conversion and its training settings.

A recipe is validated with pydantic; unknown keys are refused (a typo must not silently fall back
to a default), and every problem becomes a one-line :class:`RecipeError` that names the file and
the key. Bundled recipes live in the top-level ``recipes/`` folder, shipped in the wheel as the
package ``ilmconvert.recipes``, and are read through :mod:`importlib.resources`.

Example (``recipes/cifar10-smoke.yaml``)::

    description: small GN ResNet on CIFAR-10 for a CPU
    model: {name: "timm:resnet18", pretrained: false, kwargs: {norm_layer: groupnorm}}
    conversion: {init: paper}
    train: {epochs: 3, batch_size: 64, lr: 0.05}
    data: {train_subset: 20000, test_subset: 2000}
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
)

from .. import methods
from ..errors import IlmconvertError

RECIPE_PACKAGE = "ilmconvert.recipes"

#: CIFAR-10 per-channel mean / std of the training images, in [0, 1] units (RGB).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class RecipeError(IlmconvertError):
    """A recipe cannot be found, parsed or validated; the message names the file and the key."""


class _Strict(BaseModel):
    # no NaN / infinity in any number (pydantic accepts both by default; an infinite lr trains nothing)
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class ModelSettings(_Strict):
    """Which network to build when ``finetune`` is not given a converted checkpoint.

    Attributes:
        name: ``timm:NAME[.TAG]``, ``torchvision:NAME[.WEIGHTS]`` or a bare timm name.
        pretrained: start from the library's pretrained weights (needs the hub, or its cache).
        kwargs: constructor keyword arguments (JSON values only: they are saved in the checkpoint).
        adaptations: structural changes by name (:data:`ilmconvert.models.ADAPTATIONS`), e.g.
            ``["cifar_stem"]``: the paper's 3x3 stride-1 stem without max-pooling.
    """

    name: str
    pretrained: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)
    adaptations: list[str] = Field(default_factory=list)


class ConversionSettings(_Strict):
    """Arguments of :func:`ilmconvert.convert` (see its docstring for their meaning); ``method``
    is any method of the registry (:mod:`ilmconvert.methods`: ILM Norm, Proxy Norm, both, or no
    conversion, the network as built, the baseline a comparison needs)."""

    norms: str = "gn,in,ln"
    init: Literal["preserve", "paper"] = "paper"
    key_group_size: PositiveInt = 16
    reduction: PositiveInt = 16
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    batchnorm: Optional[Literal["gn"]] = None
    method: str = methods.DEFAULT

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        if methods.find_method(value) is None:  # the registry as it is now, methods added later included
            raise ValueError(f"Input should be one of {', '.join(map(repr, methods.names()))}")
        return value


class TrainSettings(_Strict):
    """Optimization settings: a timm optimizer (default SGD with momentum, timm ``opt='momentum'``)
    and a timm scheduler, with timm's training options under timm's names (``timm/train.py``).

    Attributes:
        epochs: number of passes over the (sub-sampled) training set.
        batch_size: images per step (per process under torchrun).
        lr: peak learning rate (after warm-up).
        opt: any ``timm.optim.create_optimizer_v2`` name (``momentum``, ``sgd``, ``adamw``,
            ``lamb``, ``lookahead_adamw`` ...; ``timm.optim.list_optimizers()``).
        opt_eps, opt_betas: the optimizer's eps and betas where it has them (``None``: its default).
        momentum, weight_decay: the paper uses 0.9 and 5e-4. As in timm, biases and norm
            parameters get no weight decay.
        layer_decay: timm's layer-wise learning-rate decay (``param_groups_layer_decay``): the
            deepest layer gets ``lr``, each earlier one ``layer_decay`` times its successor's.
        clip_grad, clip_mode: clip the gradients before each update (timm ``dispatch_clip_grad``):
            ``norm`` (total L2 norm), ``value`` (each entry), ``agc`` (adaptive, per unit; the
            classifier is left out, as in timm).
        grad_accum_steps: batches whose gradients are summed (as a mean) into one update.
        model_ema, model_ema_decay: keep an exponential moving average of the weights (timm
            ``ModelEmaV3``), tested every epoch and saved as ``RUN/best_ema/`` when its top-1 improves.
        sched: a timm scheduler name (``cosine``, ``step``, ``multistep``, ``none`` ...).
        warmup_epochs, warmup_lr, min_lr: scheduler settings, learning rates in absolute units.
        decay_milestones, decay_rate: for ``multistep`` / ``step``.
        smoothing: label smoothing (timm's name; ``label_smoothing`` is accepted as well).
        amp_dtype: autocast dtype: ``auto`` (bf16 on CUDA, none on CPU), ``bf16``, ``fp16`` (with a
            gradient scaler) or ``none`` (float32).
        channels_last: channels-last memory format (``None``: on CUDA only).
        compile: ``torch.compile`` the trained network (``true``: inductor; a string names the
            backend). Checkpoints are saved from the uncompiled module, so their keys stay clean.
        trainable: ``all``; ``norms``: only the ILM / Proxy Norm (or, unconverted, the norm)
            parameters; ``norms+head``: those and the classifier (timm ``get_classifier()``).
        head_steps: linear probing before fine-tuning (LP-FT, Kumar et al., ICLR 2022): a new run
            first trains only the classifier for this many steps (batches), the rest of the network
            frozen and in eval mode (BatchNorm uses its running statistics), with ``opt`` at the
            constant ``lr``, ``batch_size`` and the data's augmentation; the test after it is the
            run's epoch-0 line of ``metrics.jsonl`` (with ``head_steps``), and fine-tuning starts
            from that network with a fresh optimizer and schedule (:mod:`ilmconvert.train.head_probe`).
            ``0``: no such phase. A resumed run never repeats it.
        checkpoint_hist: keep the checkpoints of the N best epochs as ``RUN/checkpoint-EPOCH/``
            (timm's ``--checkpoint-hist``; 0: none besides last/ and best/).
        checkpoint_interval: minutes between mid-epoch checkpoints into ``RUN/last/`` (``None``:
            at the end of each epoch only), from which ``--resume`` continues exactly.
        seed: seeds the network initialization, the data order and augmentation.
        cpu_threads: torch intra-op threads when training on CPU (``None``: torch's default, one
            per core). Small networks train faster on one thread: OpenMP synchronization then
            costs more than a second core gains, and the other core is left to the data loader
            (``data.num_workers: 1``) or to other work.
    """

    epochs: PositiveInt = 100
    batch_size: PositiveInt = 128
    lr: float = Field(0.1, gt=0)
    opt: str = "momentum"
    opt_eps: Optional[float] = Field(None, gt=0)
    opt_betas: Optional[tuple[float, float]] = None
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    layer_decay: Optional[float] = Field(None, gt=0, le=1)
    clip_grad: Optional[float] = Field(None, gt=0)
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    grad_accum_steps: PositiveInt = 1
    model_ema: bool = False
    model_ema_decay: float = Field(0.9998, gt=0, lt=1)
    sched: str = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    warmup_lr: float = Field(1e-5, ge=0)
    min_lr: float = Field(0.0, ge=0)
    decay_milestones: list[int] = Field(default_factory=lambda: [60, 120, 160])
    decay_rate: float = Field(0.2, gt=0)
    smoothing: float = Field(0.0, ge=0, lt=1, validation_alias=AliasChoices("smoothing", "label_smoothing"))
    amp_dtype: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: Optional[bool] = None
    compile: Union[bool, str] = False
    trainable: Literal["all", "norms", "norms+head"] = "all"
    head_steps: int = Field(0, ge=0)
    checkpoint_hist: int = Field(0, ge=0)
    checkpoint_interval: Optional[float] = Field(None, gt=0)
    seed: int = 0
    cpu_threads: Optional[PositiveInt] = None


class DataSettings(_Strict):
    """Input pipeline settings.

    Attributes:
        image_size: images are (resized and center-cropped to) this square size, in pixels.
        mean, std: per-channel normalization of [0, 1] RGB pixels.
        augment: ``cifar`` = RandomCrop(image_size, padding=image_size // 8) + horizontal flip
            (the standard CIFAR augmentation, padding 4 at 32 px); ``none``.
        cache: decode every image once into memory as uint8 (3 bytes per pixel) instead of
            decoding JPEG files at each epoch.
        train_subset, test_subset: use a fixed random subset (seeded) of this many images.
        num_workers: DataLoader worker processes (0: load in the main process).
        eval_batch_size: images per evaluation step.
        pipeline: ``cifar``: images decoded once to ``image_size`` (cached uint8) and augmented as
            ``augment`` says; ``timm``: timm's pipeline from the network's
            ``timm.data.resolve_data_config`` (``create_transform``: RandomResizedCrop with
            ``scale`` / ``ratio``, flips with ``hflip``, ``aa`` for training; resize by
            ``crop_pct`` with the model's ``interpolation`` and center crop for testing). Fields
            left unset (``image_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``) are
            taken from the network's data config and written into ``RUN/recipe.yaml``.
        aa: timm's auto-augment policy (``rand-m9-mstd0.5-inc1``, ``augmix-...``, ``v0`` ...);
            ``timm`` pipeline only.
        scale, ratio, hflip: RandomResizedCrop's area and aspect ranges, the flip probability.
        crop_pct, interpolation: test-time resize (``image_size / crop_pct``) and interpolation.
        mixup, cutmix: Beta alphas of timm's ``Mixup`` (0: off). With either, the targets are
            mixed, smoothed by ``train.smoothing``, and the loss is ``SoftTargetCrossEntropy``.
        mixup_prob, mixup_switch_prob, mixup_mode: timm's ``Mixup`` settings of the same names.
    """

    image_size: PositiveInt = 32
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    augment: Literal["cifar", "none"] = "cifar"
    cache: bool = True
    train_subset: Optional[PositiveInt] = None
    test_subset: Optional[PositiveInt] = None
    num_workers: int = Field(0, ge=0)
    eval_batch_size: PositiveInt = 256
    pipeline: Literal["cifar", "timm"] = "cifar"
    aa: Optional[str] = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    crop_pct: Optional[float] = Field(None, gt=0, le=1)
    interpolation: Optional[str] = None
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"

    @property
    def mixing(self) -> bool:
        """Whether timm's ``Mixup`` runs (a ``mixup`` or ``cutmix`` alpha above 0)."""
        return self.mixup > 0 or self.cutmix > 0

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("std entries must be > 0")
        return value


class Recipe(_Strict):
    """A complete fine-tuning recipe (see the module docstring for the YAML layout).

    ``variants`` is used by ``ilmconvert sweep`` only: more sweep variants, each a partial recipe
    (``model`` / ``conversion`` / ``train`` / ``data`` keys) merged over this one
    (:mod:`ilmconvert.train.sweep`).
    """

    name: str = ""
    description: str = ""
    model: ModelSettings
    conversion: ConversionSettings = Field(default_factory=ConversionSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def with_overrides(
        self,
        *,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        method: str | None = None,
        values: Mapping[str, Any] | None = None,
        settings: Sequence[str] = (),
    ) -> Recipe:
        """A copy with settings replaced (``None`` keeps the recipe's), validated by the same schema.

        Args:
            epochs, batch_size, lr, method: ``train.epochs``, ``train.batch_size``, ``train.lr``,
                ``conversion.method``.
            values: dotted keys mapped to values (``{"train.opt": "adamw"}``); ``None`` values are skipped.
            settings: ``KEY=VALUE`` strings (the CLI's ``--set``): a dotted key (``data.mixup``) and
                a YAML value (``0.2``, ``[0.9, 0.999]``, ``null``), applied after ``values``.

        Raises:
            RecipeError: a malformed ``--set``, an unknown key (with a did-you-mean) or a bad value.
        """
        origin = "with command-line overrides"
        named = {"train.epochs": epochs, "train.batch_size": batch_size, "train.lr": lr, "conversion.method": method}
        changes = {k: v for k, v in {**named, **(values or {})}.items() if v is not None}
        changes.update(parse_settings(settings))
        if not changes:
            return self
        data = self.model_dump(exclude_unset=True)  # what the recipe leaves open stays open (resolve_pipeline)
        for key, value in changes.items():
            _set_dotted(data, ALIASES.get(key, key), value)
        return _validate(Recipe, data, origin)

    def to_yaml(self) -> str:
        """The recipe as YAML (what ``finetune`` writes to ``RUN/recipe.yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


#: Old names of recipe keys that ``--set`` also accepts.
ALIASES = {"train.label_smoothing": "train.smoothing"}


def parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "data.mixup=0.2"]`` -> ``{"train.lr": 0.01, "data.mixup": 0.2}`` (values YAML-parsed).

    Raises:
        RecipeError: an item without ``=``, an empty key or a value that is not YAML.
    """
    parsed: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=0.01")
        try:
            parsed[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML; quote it") from None
    return parsed


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating missing sections (which the
    schema then refuses as unknown keys, with a did-you-mean)."""
    *sections, last = key.split(".")
    node = data
    for depth, section in enumerate(sections):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            where = ".".join(sections[: depth + 1])
            raise RecipeError(f"--set {key}: {where} is a value, not a section; use --set {where}=VALUE")
        node = child
    node[last] = value


# ------------------------------------------------------------------------------------------ errors
def _close_key(cls: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """``"; did you mean 'epochs'?"`` for a misspelt key at ``loc`` in ``cls``, else ``""``."""
    for part in loc[:-1]:  # walk down to the model that holds the key
        field = cls.model_fields.get(str(part)) if cls is not None else None
        annotation = field.annotation if field is not None else None
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if cls is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(err: ValidationError, origin: str, prefix: str = "", cls: type[BaseModel] | None = None) -> str:
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"recipe {origin}: unknown key {key!r}{_close_key(cls, first['loc'])}{more}"
    if first["type"] == "missing" and first["loc"] and isinstance(first["loc"][-1], int):  # a short tuple
        parent = prefix + ".".join(str(p) for p in first["loc"][:-1])
        return f"recipe {origin}: {parent}: too few values (item {first['loc'][-1] + 1} is missing){more}"
    if first["type"] == "missing":
        return f"recipe {origin}: missing key {key!r}{more}"
    return f"recipe {origin}: {key}: {first['msg']}{more}"


def _validate(cls: type[BaseModel], data: Any, origin: str, prefix: str = "") -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_describe(err, origin, prefix, cls)) from None


# ------------------------------------------------------------------------------------------ loading
def parse_recipe(text: str, origin: str, default_name: str = "") -> Recipe:
    """Parse and validate recipe YAML ``text``; ``origin`` names it in error messages.

    Raises:
        RecipeError: YAML syntax error, not a mapping, unknown or missing key, bad value.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {origin}: invalid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        raise RecipeError(f"recipe {origin} is empty; it needs at least model: {{name: ...}} (see the bundled ones)")
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {origin}: expected a mapping with model/conversion/train/data keys")
    recipe = _validate(Recipe, data, origin)
    if not recipe.name:
        recipe.name = default_name
    return recipe


def bundled_recipes() -> dict[str, str]:
    """Names of the bundled recipes mapped to their YAML text (read from package resources)."""
    found = {}
    for entry in resources.files(RECIPE_PACKAGE).iterdir():
        if entry.name.endswith(".yaml") and entry.is_file():
            found[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    return dict(sorted(found.items()))


def list_recipes() -> list[Recipe]:
    """The bundled recipes, validated, sorted by name.

    Raises:
        RecipeError: if a bundled recipe is invalid (a packaging bug).
    """
    return [parse_recipe(text, f"{name} (bundled)", name) for name, text in bundled_recipes().items()]


def load_recipe(name_or_file: str | Path) -> Recipe:
    """A bundled recipe by name (``cifar10``) or a recipe YAML file by path.

    A value that names an existing file, or ends with ``.yaml`` / ``.yml``, is read as a file.

    Raises:
        RecipeError: unknown name (the bundled names are listed), unreadable file, invalid recipe.
    """
    value = str(name_or_file)
    path = Path(value).expanduser()
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise RecipeError(f"recipe file {path} cannot be read: {err.strerror or err}") from None
        return parse_recipe(text, str(path), path.stem)
    bundled = bundled_recipes()
    if value not in bundled:
        close = difflib.get_close_matches(value, list(bundled), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise RecipeError(
            f"unknown recipe {value!r}; {hint}bundled recipes: {', '.join(bundled) or 'none'} (or pass a YAML file)"
        )
    return parse_recipe(bundled[value], f"{value} (bundled)", value)
