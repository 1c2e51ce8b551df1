"""Where networks come from: timm, torchvision, or a local weights file.

A network is named ``timm:NAME[.TAG]``, ``torchvision:NAME[.WEIGHTS]`` or a bare timm name.
Pretrained weights come through timm's / torchvision's own download code; offline, that fails
fast with a one-line :class:`ModelSourceError` that says what to pass instead. Every network
built here carries a :class:`ModelSource` (``model.ilm_source``) that records how to build it
again, which :func:`ilmconvert.save` writes and :func:`ilmconvert.load` reads.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import IlmconvertError, first_line
from .preprocessing import Preprocessing, resolve

LIBRARIES = ("timm", "torchvision")


class ModelSourceError(IlmconvertError):
    """A network cannot be named, built or given its weights as asked."""


@dataclass
class ModelSource:
    """How to rebuild a network's architecture (its weights come from the checkpoint).

    Attributes:
        library: ``"timm"`` or ``"torchvision"``.
        architecture: the library's model name, e.g. ``"resnet50_gn"``.
        pretrained_tag: the pretrained weights the network started from (timm tag or torchvision
            weights enum name, ``"default"`` for the library's default), or ``None``.
        weights_file: a local weights file it started from, and its sha256.
        kwargs: constructor keyword arguments (``num_classes``, ``norm_layer``, ...).
        adaptations: structural changes applied after construction, by name (see
            :data:`ADAPTATIONS`), e.g. ``["cifar_stem"]``.
    """

    library: str
    architecture: str
    pretrained_tag: str | None = None
    weights_file: str | None = None
    weights_sha256: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    adaptations: list[str] = field(default_factory=list)

    def spec(self) -> str:
        return f"{self.library}:{self.architecture}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# ---------------------------------------------------------------------------------------- names
def parse_model_spec(spec: str) -> tuple[str, str, str | None]:
    """Split ``timm:NAME[.TAG]`` / ``torchvision:NAME[.WEIGHTS]`` / ``NAME`` into (library, name, tag).

    Raises:
        ModelSourceError: for an unknown library prefix or an empty name.
    """
    library, sep, rest = spec.partition(":")
    if not sep:
        library, rest = "timm", spec
    library = library.strip().lower()
    if library not in LIBRARIES:
        raise ModelSourceError(f"unknown model library {library!r} in {spec!r}; use timm:NAME or torchvision:NAME")
    name, _, tag = rest.strip().partition(".")
    if not name:
        raise ModelSourceError(f"no model name in {spec!r}; use timm:NAME or torchvision:NAME")
    return library, name, tag or None


def _available(library: str) -> list[str]:
    if library == "timm":
        import timm

        return timm.list_models()
    import torchvision

    return torchvision.models.list_models()


def _check_name(library: str, name: str) -> None:
    names = _available(library)
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see `{library}` model list"
    raise ModelSourceError(f"unknown {library} model {name!r}{hint}")


def _check_tag(library: str, name: str, tag: str | None) -> None:
    """Refuse a pretrained tag (or weights name) the library does not know, before any download."""
    if library == "timm":
        import timm

        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*")]
        if not tags:
            raise ModelSourceError(f"timm has no pretrained weights for {name}; pass --no-pretrained or --weights FILE")
    else:
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(name)
        except (ValueError, KeyError):
            return  # torchvision's own error will say it
        tags = list(enum.__members__)
        try:
            if tag is not None:
                enum.verify(tag)
            return
        except (ValueError, KeyError):
            pass
    if tag is None or tag in tags:
        return
    close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelSourceError(f"unknown pretrained tag {tag!r} for {library}:{name}; {hint}available: {', '.join(tags)}")


# ---------------------------------------------------------------------------------------- building
def _construct(source: ModelSource, pretrained: bool) -> nn.Module:
    kwargs = dict(source.kwargs)
    if source.library == "timm":
        import timm

        name = source.architecture + (
            f".{source.pretrained_tag}" if pretrained and source.pretrained_tag not in (None, "default") else ""
        )
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    import torchvision

    weights = None
    if pretrained:
        weights = "DEFAULT" if source.pretrained_tag in (None, "default") else source.pretrained_tag
    return torchvision.models.get_model(source.architecture, weights=weights, **kwargs)


def build(source: ModelSource, *, device: torch.device | str | None = None) -> nn.Module:
    """Build ``source``'s architecture with fresh weights (no download) and apply its adaptations.

    Use ``device="meta"`` to build the structure only (no memory for weights); architectures
    whose constructor cannot run on the meta device are built on the CPU instead.

    Raises:
        ModelSourceError: if the architecture is unknown or the constructor rejects the kwargs.
    """
    _check_name(source.library, source.architecture)
    try:
        try:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = _construct(source, pretrained=False)
        except (NotImplementedError, RuntimeError):
            if str(device) != "meta":
                raise
            # a few constructors compute on tensors (torchvision's RegNet block widths) and cannot
            # run on the meta device: build for real instead
            model = _construct(source, pretrained=False)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelSourceError(f"cannot build {source.spec()} with {source.kwargs}: {first_line(err)}") from err
    for name in source.adaptations:
        adapt(model, name)
    model.ilm_source = source
    return model


def create_model(
    spec: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    weights_by_position: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Create a network from ``spec`` with pretrained, local or fresh weights.

    Args:
        spec: ``timm:NAME[.TAG]``, ``torchvision:NAME[.WEIGHTS]`` or a bare timm name.
        pretrained: download (or read from the hub cache) the library's pretrained weights.
        weights: a local weights file (safetensors, or a state dict read with
            ``torch.load(weights_only=True)``); overrides ``pretrained``.
        num_classes: classifier size. A weights file with a head of that size is loaded whole;
            otherwise (and for pretrained weights) the head is re-initialized, as timm does.
        device: ``"meta"`` builds the structure only.
        weights_by_position: load ``weights`` by the order of its tensors instead of their names
            (:func:`load_state_dict_by_position`), for a file from another implementation.
        **kwargs: passed to the library's constructor (must be JSON-serializable to be saved).

    Returns:
        The network as the library returns it (training mode), with ``model.ilm_source`` set.

    Raises:
        ModelSourceError: unknown name (close matches suggested), download impossible (offline),
            unreadable or mismatching weights file.
    """
    library, name, tag = parse_model_spec(spec)
    source = ModelSource(library, name, pretrained_tag=tag, kwargs=dict(kwargs))
    if weights is not None or not pretrained:
        source.pretrained_tag = None
        state = read_state_dict(Path(weights)) if weights is not None else None
        if num_classes is not None:
            source.kwargs["num_classes"] = num_classes
        model = build(source, device=device)
        load = load_state_dict_by_position if weights_by_position else load_state_dict_checked
        if state is not None:
            problems = load(model, state)
            if problems and num_classes is not None:
                # the file may hold another head (e.g. the library's default): load it, then resize
                del source.kwargs["num_classes"]
                model = build(source, device=device)
                problems = load(model, state)
            if problems and weights_by_position and Path(weights).suffix == ".safetensors":
                problems += (
                    " (a .safetensors file stores its tensors sorted by name, not in the order they were "
                    "saved: loading by position needs the original pickled state dict, e.g. the .pth)"
                )
            if problems:
                raise ModelSourceError(f"weights file {weights} does not fit {spec}: {problems}")
            note = tensorflow_port_note(library, name, state)
            if note:
                warnings.warn(f"{weights}: {note}", UserWarning, stacklevel=2)
            source.weights_file, source.weights_sha256 = str(weights), sha256_of(weights)
    else:
        _check_name(library, name)
        _check_tag(library, name, tag)
        if source.pretrained_tag is None:
            source.pretrained_tag = "default"
        hub_offline = _check_download(source, spec)  # within seconds, not after a minute of retries
        try:
            model = _construct(source, pretrained=True)
        except Exception as err:  # the libraries raise many types for "no network"
            raise _no_pretrained_weights(spec, hub_offline or first_line(err)) from err
        model.ilm_source = source
    if num_classes is not None and num_classes != classifier_size(model):
        resize_classifier(model, num_classes)
    return model


def _no_pretrained_weights(spec: str, why: str) -> ModelSourceError:
    return ModelSourceError(
        f"cannot get pretrained weights for {spec} ({why}); offline, pass "
        "--weights FILE (safetensors or a state dict) or --no-pretrained (in a recipe: pretrained: false)"
    )


def _check_download(source: ModelSource, spec: str) -> str | None:
    """Find out within seconds (:mod:`ilmconvert.online`) whether the pretrained weights of
    ``source`` can be downloaded, instead of after the libraries' minute of retries.

    Weights on the Hugging Face Hub (timm's ``hf_hub_id``) may still be in the Hub cache: when the
    Hub cannot be reached, ``huggingface_hub`` is switched to offline mode (it then reads the cache
    at once) and the reason is returned, for the message if the cache has them not. Other weights
    (a URL such as torchvision's download.pytorch.org) are needed from their host unless torch's
    hub cache holds the file.

    Returns:
        Why the Hub cannot be reached, or ``None`` (it can, or the weights are not on the Hub).

    Raises:
        ModelSourceError: URL weights neither cached nor reachable.
    """
    from urllib.parse import urlsplit

    from . import online

    if source.library == "timm":
        import timm

        tag = "" if source.pretrained_tag in (None, "default") else f".{source.pretrained_tag}"
        cfg = timm.models.get_pretrained_cfg(source.architecture + tag)
        if cfg is not None and cfg.hf_hub_id:
            from huggingface_hub import constants

            reason = online.hub_unreachable()
            return f"{reason}; not in the Hub cache {constants.HF_HUB_CACHE}" if reason else None
        url = cfg.url if cfg is not None else None
    else:
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(source.architecture)
            url = enum.verify("DEFAULT" if source.pretrained_tag in (None, "default") else source.pretrained_tag).url
        except (ValueError, KeyError, AttributeError):
            return None  # torchvision's own error will say it
    if not url or (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name).is_file():
        return None
    reason = online.unreachable(url)
    if reason is not None:
        raise _no_pretrained_weights(spec, f"{reason}; not in torch's hub cache {torch.hub.get_dir()}")
    return None


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a (weights-only) torch file; never unpickles code.

    Training checkpoints that wrap the weights under ``state_dict`` / ``model`` are unwrapped.

    Raises:
        ModelSourceError: missing, unreadable or non-state-dict file.
    """
    if not path.exists():
        raise ModelSourceError(f"weights file {path} does not exist")
    if not path.is_file():
        raise ModelSourceError(f"weights file {path} is not a file; pass a safetensors file or a state dict")
    if path.stat().st_size == 0:
        raise ModelSourceError(f"weights file {path} is empty; pass a safetensors file or a state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = safe_torch_load(path)
    except pickle.UnpicklingError as err:
        raise ModelSourceError(f"cannot read weights file {path}: {refused_pickle(err)}") from err
    except Exception as err:
        kind = "safetensors" if path.suffix == ".safetensors" else "a file written by torch.save"
        raise ModelSourceError(f"cannot read weights file {path} as {kind}: {first_line(err)}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSourceError(f"weights file {path} does not hold a state dict of tensors")
    return state


def safe_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, without torch's warnings on stderr."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says more
        return torch.load(path, map_location="cpu", weights_only=True)


def refused_pickle(err: pickle.UnpicklingError) -> str:
    """One line for a pickle that ``torch.load(weights_only=True)`` refused: it names what the
    file asked for (a Python callable, an unsupported opcode) and what to pass instead."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    details = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    detail = details[0] if details else (lines[0] if lines else type(err).__name__)
    if "GLOBAL" in detail:
        return (
            f"it would run Python code when unpickled ({detail}); refused, nothing in it was run. "
            "Pass a safetensors file or a plain state dict of tensors"
        )
    return (
        f"it is not a plain pickle of tensors ({detail}); refused to unpickle it. "
        "Pass a safetensors file or a state dict saved with torch.save"
    )


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Load ``state`` into ``model`` strictly; return "" or one line describing the mismatch.

    Keys missing from ``state`` only because they alias a loaded tensor (tied weights, which
    safetensors stores once) are not a mismatch. On a mismatch ``model`` may be partly loaded.
    The per-module versions that ``state_dict()`` records (``_metadata``, which safetensors does
    not store and which e.g. torchvision's MNASNet requires) are those of ``model`` itself.
    """
    own = model.state_dict()
    if getattr(state, "_metadata", None) is None and getattr(own, "_metadata", None) is not None:
        state = OrderedDict(state)
        state._metadata = own._metadata  # type: ignore[attr-defined]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        return (
            f"{len(wrong)} shape mismatch(es) (e.g. {k}: {tuple(state[k].shape)} in the file, "
            f"{tuple(own[k].shape)} in the network)"
        )
    result = model.load_state_dict(state, strict=False)
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (e.g. {missing[0]})")
    if result.unexpected_keys:
        parts.append(f"{len(result.unexpected_keys)} unexpected key(s) (e.g. {result.unexpected_keys[0]})")
    if missing and result.unexpected_keys:
        if not _positional_mismatch(own, state):
            parts.append(
                "the names come from another implementation but the tensors match the network's one to one "
                "in order and shape (e.g. an EfficientNet-PyTorch port): pass --weights-by-position "
                "(API: weights_by_position=True)"
            )
        else:
            parts.append("likely cause: weights of another architecture, or names from another implementation")
    return ", ".join(parts)


def _positional_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``state``'s entries in order, without BatchNorm's ``num_batches_tracked`` counters."""
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def _positional_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """"" when ``state``'s tensors match ``own``'s one to one in order and shape, else why not."""
    mine, theirs = _positional_tensors(own), _positional_tensors(state)
    if len(mine) != len(theirs):
        return (
            f"the file holds {len(theirs)} tensors and the network {len(mine)} "
            "(num_batches_tracked aside): they cannot match by position"
        )
    for i, ((k, a), (j, b)) in enumerate(zip(mine, theirs)):
        if a.shape != b.shape:
            return (
                f"tensor {i} differs in shape: {j} {tuple(b.shape)} in the file, {k} {tuple(a.shape)} "
                "in the network; they do not match by position"
            )
    return ""


def load_state_dict_by_position(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Load ``state`` into ``model`` by the order of its tensors, whatever their names.

    For weights from another implementation of the same architecture (EfficientNet-PyTorch ports
    of the EfficientNets, older checkpoints): the i-th tensor of ``state`` goes to the i-th entry
    of ``model.state_dict()``, after checking that both hold the same number of tensors and that
    every shape matches (BatchNorm's ``num_batches_tracked`` counters aside; the network keeps its
    own). Returns "" or one line describing the mismatch (then nothing is loaded).
    """
    own = model.state_dict()
    problem = _positional_mismatch(own, state)
    if problem:
        return problem
    renamed = {k: v for (k, _), (_, v) in zip(_positional_tensors(own), _positional_tensors(state))}
    renamed.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked")})
    return load_state_dict_checked(model, renamed)


#: Names every EfficientNet-PyTorch state dict begins with (lukemelas/EfficientNet-PyTorch and its
#: EfficientNet-Lite fork), whose weights are ports of the TensorFlow checkpoints.
_TENSORFLOW_PORT_NAMES = ("_conv_stem.weight", "_bn0.weight", "_bn0.running_var")


def tensorflow_port_note(library: str, name: str, state: Mapping[str, torch.Tensor]) -> str:
    """A one-line note when ``state`` is a TensorFlow port loaded into the PyTorch-style timm variant, else "".

    EfficientNet-PyTorch's weights (names ``_conv_stem``, ``_bn0``, ...) were trained in TensorFlow:
    they expect its asymmetric 'same' padding and BatchNorm eps 1e-3, which timm builds as
    ``tf_NAME`` (``Conv2dSame``, ``eps=1e-3``, with the TensorFlow input normalization in its
    pretrained configuration); timm's ``NAME`` pads symmetrically with eps 1e-5. Their tensors
    match either one by position (:func:`load_state_dict_by_position`), so only the names tell.
    """
    if library != "timm" or name.startswith("tf_") or not all(k in state for k in _TENSORFLOW_PORT_NAMES):
        return ""
    import timm

    if not timm.is_model(f"tf_{name}"):
        return ""
    return (
        f"the names (_conv_stem, _bn0, ...) are EfficientNet-PyTorch's, whose weights are TensorFlow ports "
        f"expecting 'same' padding and BatchNorm eps 1e-3: timm builds that as tf_{name}, not {name} "
        f"(pass timm:tf_{name})"
    )


# ---------------------------------------------------------------------------------------- description
def source_of(model: nn.Module) -> ModelSource | None:
    """The :class:`ModelSource` of ``model``: the one it was created with, or for a timm model
    created elsewhere one read from its ``pretrained_cfg``; ``None`` when unknown."""
    source = getattr(model, "ilm_source", None)
    if isinstance(source, ModelSource):
        return source
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs = {"num_classes": int(model.num_classes)} if isinstance(getattr(model, "num_classes", None), int) else {}
        return ModelSource("timm", cfg["architecture"], pretrained_tag=cfg.get("tag"), kwargs=kwargs)
    return None


def resolve_preprocessing(
    model: nn.Module,
    *,
    source: ModelSource | None = None,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Preprocessing:
    """The input ``model`` expects (size, mean, std, interpolation, crop_pct, class names): the one
    resolver that ``eval``, ``export``, ``config.json`` and ``finetune`` read
    (:func:`ilmconvert.preprocessing.resolve`: a checkpoint's ``config`` / a fine-tune's
    ``metadata``, else the library's ``pretrained_cfg`` / weights transforms, else timm's ImageNet
    defaults).

    Args:
        source: how it was built (default :func:`source_of`).
        config, metadata: a checkpoint's ``config.json`` (or overrides) and metadata.
    """
    return resolve(
        model, source or source_of(model), config=config, metadata=metadata, num_classes=classifier_size(model)
    )


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the network expects (:func:`resolve_preprocessing`; ImageNet's 3 x 224 x 224 when unknown)."""
    return resolve_preprocessing(model).input_size


def preprocessing(model: nn.Module) -> dict[str, Any] | None:
    """Input side and normalization the network's pretrained weights expect (:func:`resolve_preprocessing`).

    Returns:
        ``{"image_size": int (pixels), "mean": (r, g, b), "std": (r, g, b)}`` for [0, 1] RGB, or
        ``None`` when the network was adapted away from its pretrained input (``cifar_stem``) or
        its source is unknown.
    """
    source = source_of(model)
    if source is None or "cifar_stem" in source.adaptations:
        return None
    found = resolve_preprocessing(model, source=source)
    return {"image_size": found.image_size, "mean": found.mean, "std": found.std}


def _classifier(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, layer) of the last nn.Linear: the classifier of torchvision models."""
    found = None
    for _, parent in model.named_modules():
        for name, child in parent._modules.items():
            if isinstance(child, nn.Linear):
                found = (parent, name, child)
    return found


def classifier_size(model: nn.Module) -> int | None:
    """Number of classes the network predicts (``None`` when it has no classifier)."""
    if isinstance(getattr(model, "num_classes", None), int) and hasattr(model, "reset_classifier"):
        return int(model.num_classes)
    head = _classifier(model)
    return head[2].out_features if head else None


def resize_classifier(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a freshly initialized classifier for ``num_classes`` classes.

    timm models use their ``reset_classifier``; torchvision models get their last ``nn.Linear``
    replaced. ``model.ilm_source.kwargs['num_classes']`` is updated so that the architecture is
    rebuilt with the new head.

    Raises:
        ModelSourceError: when the network has no recognizable classifier.
    """
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        head = _classifier(model)
        if head is None:
            raise ModelSourceError(f"{type(model).__name__} has no nn.Linear classifier to resize")
        parent, name, old = head
        parent._modules[name] = nn.Linear(
            old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
    source = getattr(model, "ilm_source", None)
    if isinstance(source, ModelSource):
        source.kwargs["num_classes"] = int(num_classes)


# ---------------------------------------------------------------------------------------- adaptations
def _cifar_stem(model: nn.Module) -> None:
    """The paper's CIFAR ResNet stem (§4.1.1): first conv 3x3 stride 1 padding 1, no max-pooling."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise ModelSourceError(f"cifar_stem needs a ResNet with conv1 / maxpool; {type(model).__name__} has none")
    model.conv1 = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        3,
        1,
        1,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    model.maxpool = nn.Identity()


#: Structural changes recorded by name in a checkpoint and re-applied on load.
ADAPTATIONS: dict[str, Callable[[nn.Module], None]] = {"cifar_stem": _cifar_stem}


def adapt(model: nn.Module, name: str) -> None:
    """Apply the adaptation ``name`` from :data:`ADAPTATIONS` and record it in ``model.ilm_source``.

    Raises:
        ModelSourceError: unknown adaptation or unsuitable network.
    """
    if name not in ADAPTATIONS:
        raise ModelSourceError(f"unknown adaptation {name!r}; choose from {', '.join(ADAPTATIONS)}")
    ADAPTATIONS[name](model)
    source = getattr(model, "ilm_source", None)
    if isinstance(source, ModelSource) and name not in source.adaptations:
        source.adaptations.append(name)
