"""Converted checkpoints: ``model.safetensors`` + ``config.json`` + ``README.md`` in one directory.

``config.json`` says where the network came from (:class:`~ilmconvert.models.ModelSource`), how
it was converted (the :class:`~ilmconvert.convert.ConversionReport` with its settings), the
versions that wrote it and the sha256 of ``model.safetensors``, next to timm's Hub fields
(``architecture``, ``num_classes``, ``pretrained_cfg``, ``label_names``...,
:mod:`ilmconvert.hub_config`); ``README.md`` is the model card (:mod:`ilmconvert.model_card`), so
the folder can be pushed to the Hub as it is (:func:`push`). :func:`load` takes a folder or
``hf-hub:ORG/NAME[@REV]``, rebuilds the architecture, re-applies the conversion and loads the
weights strictly; it reads format version 1 too (docs/design.md §5). Writes are atomic: the
files are written into a temporary sibling directory that then replaces the target, so an
interrupted save leaves the previous checkpoint or none. Nothing is ever unpickled: weights are
safetensors and the optional trainer state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import stat
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic, hub, model_card
from .convert import ConversionError, ConversionReport, convert
from .errors import IlmconvertError, first_line
from .hub_config import base_model, hub_fields
from .models import (
    ModelSource,
    ModelSourceError,
    build,
    classifier_size,
    load_state_dict_checked,
    parse_model_spec,
    sha256_of,
    source_of,
)
from .nn.core import ILMNorm
from .nn.fast_torch import D_GAMMA_OFFSET
from .version import __version__

FORMAT = "ilmconvert-checkpoint"
#: 2: ILM layers store ``weight = B_omega + 1/2`` (the replaced norm's weight at preserve init);
#: 1: they stored B_omega, which :func:`load` converts by adding 1/2 (docs/design.md §5).
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
TRAINER_STATE_FILE = "trainer_state.pt"


class CheckpointError(IlmconvertError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


class CheckpointWriteError(CheckpointError, atomic.WriteError):
    """:func:`save` met a full, over-quota or read-only disk (a :class:`CheckpointError` and an
    :class:`~ilmconvert.atomic.WriteError`); the previous checkpoint, if any, is kept whole."""


def versions() -> dict[str, str]:
    """Versions of ilmconvert, torch, torchvision and timm (recorded in every checkpoint)."""
    import timm
    import torchvision

    return {
        "ilmconvert": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def _resolve_source(model: nn.Module, source: ModelSource | str | None) -> ModelSource:
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, str):
        library, name, tag = parse_model_spec(source)
        classes = classifier_size(model)
        return ModelSource(library, name, pretrained_tag=tag, kwargs={"num_classes": classes} if classes else {})
    found = source_of(model)
    if found is None:
        raise CheckpointError(
            f"cannot tell which architecture this {type(model).__name__} is; pass "
            "source='timm:NAME' / 'torchvision:NAME' or a ModelSource to save()"
        )
    return found


def is_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds an ilmconvert ``config.json``."""
    try:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest parent that exists (``.`` when none does): where a new
    directory at ``path`` would be created, so the folder whose permissions matter."""
    return next((p for p in [path, *path.parents] if p.exists()), Path("."))


def check_target(directory: str | Path) -> Path:
    """Check that a checkpoint can be written to ``directory`` before any work is done.

    The directory must be new, empty or an earlier ilmconvert checkpoint (which is replaced), and
    its nearest existing ancestor must be writable: a folder is created there and removed again.

    Raises:
        CheckpointError: when either does not hold.
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_checkpoint(target))):
        raise CheckpointError(f"{target} exists and is not an ilmconvert checkpoint; choose a new or empty directory")
    parent = existing_ancestor(target)
    if not parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint to {target}: {parent} is not a directory; choose another one")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(
            f"cannot write checkpoint to {target}: {parent} is not writable; choose another directory"
        )
    try:  # what the permission bits do not tell (root, /proc, a read-only mount): try it
        os.rmdir(tempfile.mkdtemp(prefix=".ilmconvert-probe-", dir=parent))
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint to {target}: {parent} takes no new folder ({err.strerror or err}); "
            "choose another directory"
        ) from None
    return target


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    source: ModelSource | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    pretrained_cfg: Mapping[str, Any] | None = None,
) -> Path:
    """Write a converted network to ``directory`` (``model.safetensors``, ``config.json``, ``README.md``).

    Args:
        model: a network converted with :func:`ilmconvert.convert` (its report is read from
            ``model.ilm_conversion``).
        directory: created if needed; an existing one must be empty or an ilmconvert checkpoint,
            which is replaced as a whole.
        source: where the architecture comes from, when ``model`` was not made by
            :func:`ilmconvert.models.create_model` and is not a timm model (``pretrained_cfg``):
            a spec such as ``"torchvision:resnet50"`` or a :class:`ModelSource`.
        metadata: JSON-serializable extra information stored under ``"metadata"``.
        trainer_state: optimizer / scheduler / epoch state for resuming, written to
            ``trainer_state.pt`` (tensors, numbers, strings, lists and dicts only).
        label_names: class names in classifier order, for ``config.json``'s ``label_names``
            (otherwise those of the pretrained weights or of a fine-tune's data, when known).
        pretrained_cfg: entries of timm's ``pretrained_cfg`` (``input_size`` ``[3, H, W]``,
            ``crop_pct``, ``interpolation``, ``mean``, ``std``, ``license``...) overriding the
            ones found (:func:`ilmconvert.hub_config.hub_fields`).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: unconverted model, unknown source, non-checkpoint target directory, a
            target that cannot be written, or ``label_names`` of the wrong length.
        CheckpointWriteError: the file system is full, over quota or read-only (one line with the
            path and the size needed); the previous checkpoint at ``directory``, if any, is kept whole.
    """
    report = getattr(model, "ilm_conversion", None)
    if not isinstance(report, ConversionReport):
        raise CheckpointError("this model has not been converted; call ilmconvert.convert(model) before save()")
    resolved = _resolve_source(model, source)
    target = check_target(directory)
    try:
        fields = hub_fields(
            model, resolved, metadata=metadata or {}, label_names=label_names, pretrained_cfg=pretrained_cfg
        )
    except ValueError as err:
        raise CheckpointError(f"cannot save: {err}") from err

    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        with atomic.guard(target, need, CheckpointWriteError):
            _write_checkpoint(model, tmp, target, resolved, report, fields, metadata, trainer_state)
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint to {target}: {err.strerror or err}; choose another directory"
        ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_checkpoint(
    model: nn.Module, tmp: Path, target: Path, resolved: ModelSource, report: ConversionReport,
    fields: dict[str, Any], metadata: Mapping[str, Any] | None, trainer_state: Mapping[str, Any] | None,
) -> None:
    """:func:`save`'s writes: the files into the new folder ``tmp``, fsynced, then ``tmp`` renamed
    to ``target``. The trainer state is serialized in memory first, so that a full disk is an
    ``OSError`` with its errno (``torch.save`` into a file reports it without one); it records the
    sha256 of the weights beside it (:func:`load_trainer_state` checks that they belong together)."""
    from safetensors.torch import save_model

    tmp.mkdir(parents=True)
    weights = tmp / WEIGHTS_FILE
    save_model(model, str(weights), metadata={"format": FORMAT})
    config = {
        **fields,
        "base_model": base_model(model, resolved),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": resolved.to_dict(),
        "conversion": report.to_dict(),
        "versions": versions(),
        "weights_sha256": sha256_of(weights),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metadata": dict(metadata or {}),
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (tmp / CARD_FILE).write_text(model_card.render(config, base_model=config["base_model"]))
    # safetensors writes through a private (0600) temporary file: give the weights the
    # permissions the umask gives config.json
    os.chmod(weights, stat.S_IMODE((tmp / CONFIG_FILE).stat().st_mode))
    if trainer_state is not None:
        buffer = io.BytesIO()
        torch.save({**trainer_state, "weights_sha256": config["weights_sha256"]}, buffer)
        atomic.write_bytes(tmp / TRAINER_STATE_FILE, buffer.getvalue())
    _fsync_dir_files(tmp)
    _replace_dir(tmp, target)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing ``target`` with two renames.

    A process killed between the two renames leaves no ``target`` but the previous checkpoint as
    ``.NAME.old-XXXXXXXX`` beside it, which :func:`recover_checkpoint` puts back.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(directory: str | Path) -> bool:
    """Put back the checkpoint that an interrupted :func:`save` moved aside, when ``directory`` is
    missing and exactly that is left (a kill between the two renames of a replacement).

    Returns:
        True when a checkpoint was put back at ``directory``.
    """
    target = Path(directory)
    if target.exists() or not target.parent.is_dir():
        return False
    moved = [p for p in target.parent.glob(f".{target.name}.old-*") if is_checkpoint(p)]
    if len(moved) != 1:
        return False
    os.replace(moved[0], target)
    return True


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read and check ``directory/config.json``.

    Raises:
        CheckpointError: missing directory or file, invalid JSON, or not an ilmconvert checkpoint.
    """
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(
            f"{directory} is not a directory; pass a checkpoint directory written by `ilmconvert swap`"
        )
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing; pass a checkpoint directory written by `ilmconvert swap`") from err
    except OSError as err:
        raise CheckpointError(f"{path} is unreadable: {err.strerror or err}") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is unreadable or not valid JSON ({first_line(err)})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ilmconvert checkpoint config; write one with `ilmconvert swap`")
    version = config.get("format_version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is malformed: format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {version}; upgrade ilmconvert to read it")
    for key in ("source", "conversion", "weights_sha256"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    problem = _config_problem(config)
    if problem:
        raise CheckpointError(f"{path} is malformed: {problem}; write the checkpoint again")
    return config


def _config_problem(config: dict[str, Any]) -> str:
    """What is wrong with the entries of an ilmconvert ``config.json`` ("" when nothing)."""
    source, conversion = config["source"], config["conversion"]
    if not isinstance(source, dict) or not all(isinstance(source.get(k), str) for k in ("library", "architecture")):
        return "'source' needs the strings 'library' and 'architecture'"
    if not isinstance(source.get("kwargs", {}), dict) or not isinstance(source.get("adaptations", []), list):
        return "'source' has a 'kwargs' that is not a mapping or 'adaptations' that are not a list"
    if not isinstance(conversion, dict) or not isinstance(conversion.get("settings"), dict):
        return "'conversion' needs a 'settings' mapping"
    converted = conversion.get("converted", [])
    if not isinstance(converted, list) or not all(isinstance(c, dict) and "name" in c for c in converted):
        return "'conversion.converted' must be a list of modules with a 'name'"
    if not isinstance(config.get("metadata", {}) or {}, dict):
        return "'metadata' is not a mapping"
    return ""


def load(directory: str | Path, *, model: nn.Module | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a converted network from a checkpoint directory written by :func:`save`.

    The architecture is rebuilt from ``config.json`` (or ``model``, an unconverted instance of
    it, when given), the recorded conversion is re-applied, and ``model.safetensors`` is loaded
    strictly. On CPU, the result's outputs equal the saved network's bit for bit. A format
    version 1 checkpoint (ILM ``weight`` = B_omega) is converted on the way: 1/2 is added to the
    ``weight`` of every ILM layer (docs/design.md §5).

    Args:
        directory: the checkpoint directory, or ``"hf-hub:ORG/NAME[@REV]"`` for one on the
            Hugging Face Hub (downloaded into, or read from, the Hub cache with
            ``huggingface_hub.snapshot_download``; ``HF_HUB_OFFLINE=1`` reads the cache only).
        model: optional unconverted network to load into, for architectures that cannot be
            rebuilt by name (e.g. built with a custom ``norm_layer`` callable).
        verify: check the sha256 of ``model.safetensors`` against ``config.json``.

    Returns:
        The network on CPU, in eval mode, with ``ilm_source`` and ``ilm_conversion`` set.

    Raises:
        CheckpointError: missing, corrupt, truncated or mismatching files (one line naming the
            file and the problem).
        HubError: an ``hf-hub:`` name that cannot be downloaded (offline and not cached, not
            found, private, unreachable), one line saying what to do.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = hub.download(directory) if hub.is_hub_spec(directory) else Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    if verify and sha256_of(weights) != config["weights_sha256"]:
        raise CheckpointError(f"{weights} is corrupt or truncated: its sha256 does not match {CONFIG_FILE}")

    source = ModelSource.from_dict(config["source"])
    try:
        if model is None:
            model = build(source)
        settings = dict(config["conversion"]["settings"])
        report = convert(model, **settings)
    except (ModelSourceError, ConversionError, TypeError) as err:
        raise CheckpointError(f"cannot rebuild the network of {directory / CONFIG_FILE}: {err}") from err
    expected = [c["name"] for c in config["conversion"].get("converted", [])]
    if [c.name for c in report.converted] != expected:
        raise CheckpointError(
            f"the rebuilt {source.spec()} converts different modules than {directory / CONFIG_FILE} records "
            f"({len(report.converted)} vs {len(expected)}); were the library versions changed?"
        )
    _restore_group_counts(model, report, config["conversion"].get("converted", []))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} cannot be read: {str(err).splitlines()[0]}") from err
    if config.get("format_version", 0) < 2:
        upgrade_v1_state(model, state)
    problems = load_state_dict_checked(model, state)
    if problems:
        raise CheckpointError(f"{weights} does not match {source.spec()}: {problems}")
    model.ilm_source = source
    return model.eval()


def _restore_group_counts(model: nn.Module, report: ConversionReport, rows: list[dict[str, Any]]) -> None:
    """Give every converted layer the group count G its row records (calibration may have chosen
    another G than the conversion's default, docs/calibration.md); G is not in the state dict."""
    for row, fresh in zip(rows, report.converted):
        module = model.get_submodule(fresh.name)
        groups = row.get("norm_groups")
        if isinstance(groups, int) and hasattr(module, "num_groups") and module.num_groups != groups:
            if module.num_channels % groups:
                raise CheckpointError(f"{fresh.name}: G = {groups} does not divide its {module.num_channels} channels")
            module.num_groups = fresh.norm_groups = groups


def upgrade_v1_state(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Turn a format version 1 state dict of ``model`` into version 2, in place.

    Version 1 stored B_omega as the ``weight`` of ILM layers; version 2 stores
    ``weight = B_omega + 1/2``. Only the ``weight`` of :class:`~ilmconvert.nn.core.ILMNorm`
    modules (under every name, shared modules included) changes; Proxy Norm and every other
    module are untouched.

    Args:
        model: the converted network ``state`` belongs to (its ILM layers are looked up by name).
        state: ``{key: tensor}`` as read from ``model.safetensors``; the affected entries are
            replaced by new tensors of the same dtype.

    Returns:
        The keys that were changed.
    """
    changed = []
    for name, module in model.named_modules(remove_duplicate=False):
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, ILMNorm) and key in state:
            state[key] = state[key] + D_GAMMA_OFFSET
            changed.append(key)
    return changed


def push(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a checkpoint folder to the Hugging Face Hub model repository ``repo_id``.

    The folder is checked first (``config.json`` and the sha256 of ``model.safetensors``), then
    that the Hub can be reached (:func:`ilmconvert.hub.require_online`), its
    ``README.md`` model card is written again with ``repo_id`` in the load snippet (atomically;
    the weights and ``config.json`` are not touched), then every file is uploaded in one commit
    (``HfApi.upload_folder``; the repository is created if needed). ``trainer_state.pt`` stays local.

    Args:
        directory: a checkpoint written by :func:`save` (format version 2; load and save a
            version 1 checkpoint first).
        repo_id: ``ORG/NAME``.
        private: make a *new* repository private (an existing one keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing);
            ``None``: the default branch.
        commit_message: defaults to ``"Upload NAME with ilmconvert"``.

    Returns:
        The URL of the commit.

    Raises:
        CheckpointError: not a checkpoint, corrupt weights, or an old format version.
        HubError: offline, not logged in, no write access, the Hub unreachable (one line).
    """
    directory = Path(directory)
    config = read_config(directory)
    if config.get("format_version", 0) < FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} has format version {config.get('format_version')}; "
            "write it again with ilmconvert.save(ilmconvert.load(DIR), DIR) before pushing"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() or sha256_of(weights) != config["weights_sha256"]:
        raise CheckpointError(f"{weights} is missing, corrupt or truncated; write the checkpoint again")
    repo, _ = hub.parse_hub_spec(repo_id)
    hub.require_online(repo)  # before the card is written again
    card = model_card.render(config, base_model=config.get("base_model"), repo_id=repo)
    try:
        atomic.write_text(directory / CARD_FILE, card)
    except OSError as err:
        raise CheckpointError(f"cannot write {directory / CARD_FILE}: {err.strerror or err}") from err
    return hub.upload(
        directory,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, CARD_FILE],  # not trainer_state.pt
    )


def load_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    """The trainer state saved next to a checkpoint (``None`` when there is none).

    Read with ``torch.load(weights_only=True)``: no code is unpickled. A state written by
    :func:`save` records the sha256 of the weights it was saved with; it must be that of the
    folder's ``config.json`` (a ``trainer_state.pt`` copied from another checkpoint is refused).

    Raises:
        CheckpointError: if the file exists but cannot be read, or belongs to other weights.
    """
    path = Path(directory) / TRAINER_STATE_FILE
    if not path.exists():
        return None
    from .models import refused_pickle, safe_torch_load

    try:
        state = safe_torch_load(path)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} cannot be read: {refused_pickle(err)}") from err
    except Exception as err:
        raise CheckpointError(
            f"{path} cannot be read ({first_line(err)}); it is damaged: start a new run, or put back a copy of it"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a trainer state (a {type(state).__name__}); start a new run")
    recorded = state.get("weights_sha256")
    if recorded is not None and recorded != read_config(directory).get("weights_sha256"):
        raise CheckpointError(
            f"{path} belongs to other weights than {Path(directory) / WEIGHTS_FILE} (another run or epoch: "
            "its recorded sha256 differs); put back the trainer_state.pt saved with them, or start a new run"
        )
    return state
