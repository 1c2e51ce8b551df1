"""The Hugging Face Hub transport: ``hf-hub:ORG/NAME[@REV]`` names, download and upload.

A thin layer over ``huggingface_hub`` (``snapshot_download``, ``HfApi.create_repo`` /
``create_branch`` / ``upload_folder``) that turns its exceptions into one-line
:class:`HubError` messages saying what failed and what to do (offline, not found, no token,
refused). Whether the Hub can be reached is found out first, within seconds
(:mod:`ilmconvert.online`). It knows nothing about what a checkpoint holds: :func:`ilmconvert.io.load` and
:func:`ilmconvert.io.push` check the folder (docs/design.md §5).
"""

from __future__ import annotations

import re
from pathlib import Path

from . import online
from .errors import IlmconvertError, first_line

PREFIX = "hf-hub:"
#: The files of a checkpoint that :func:`download` fetches (``trainer_state.pt`` is not needed to load).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "README.md")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HubError(IlmconvertError):
    """A Hub download or upload failed; the message says why and what to do."""


def is_hub_spec(name: object) -> bool:
    """True for a string of the form ``hf-hub:...`` (as timm spells Hub model names)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """Split ``hf-hub:ORG/NAME[@REV]`` (or ``ORG/NAME[@REV]``) into ``(repo_id, revision)``.

    The revision is a branch, tag or commit hash; ``None`` means the default branch.

    Raises:
        HubError: when the name is not ``ORG/NAME`` with at most one ``@REV``.
    """
    text = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    repo_id, sep, revision = text.partition("@")
    if not _REPO_ID.match(repo_id) or (sep and (not revision or "@" in revision)):
        raise HubError(f"{spec!r} is not a Hub model name; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo_id, revision or None


def _named(repo_id: str, revision: str | None) -> str:
    return repo_id + (f"@{revision}" if revision else "")


def download(spec: str) -> Path:
    """The local folder of the checkpoint ``hf-hub:ORG/NAME[@REV]``, downloaded into (or read
    from) the Hub cache by ``huggingface_hub.snapshot_download``.

    Honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME`` and ``HF_TOKEN`` like every
    Hugging Face library; only :data:`CHECKPOINT_FILES` are fetched.

    Returns:
        The snapshot folder (read-only by convention: it lives in the shared cache).

    Raises:
        HubError: a malformed name; offline (``HF_HUB_OFFLINE=1``, or the Hub not answering
            within seconds) with the revision not cached; repository or revision
            not found (or private without a token, or gated); the Hub unreachable.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = parse_hub_spec(spec)
    name = _named(repo_id, revision)
    fetch = f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"
    offline = online.hub_unreachable()  # within seconds; then only the cache is read
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_FILES))
    except GatedRepoError as err:
        raise HubError(
            f"{name} is gated on the Hub: accept its terms at https://huggingface.co/{repo_id} and log in "
            "with `hf auth login` (or set HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubError(
            f"{name} is not on the Hub or is private: check the name, or log in with `hf auth login` "
            "(or set HF_TOKEN) if it is private"
        ) from err
    except RevisionNotFoundError as err:
        raise HubError(f"{repo_id} has no revision {revision!r} on the Hub; check the branch, tag or commit") from err
    except LocalEntryNotFoundError as err:
        if offline is not None:
            raise HubError(
                f"{offline}, and {name} is not in the Hub cache ({constants.HF_HUB_CACHE}); check the "
                f"network, or download it elsewhere with {fetch} and copy the cache"
            ) from err
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"HF_HUB_OFFLINE=1 is set and {name} is not in the Hub cache ({constants.HF_HUB_CACHE}): "
                f"unset HF_HUB_OFFLINE, or download it where there is a network with {fetch} and copy the cache"
            ) from err
        raise HubError(
            f"cannot reach the Hub to download {name} and it is not in the cache ({first_line(err)}); "
            f"check the network, or download it elsewhere with {fetch} and copy the cache"
        ) from err
    except Exception as err:  # HTTP and connection errors of the client's HTTP library
        raise HubError(f"cannot download {name} from the Hub ({first_line(err)}); check the network and retry") from err
    return Path(path)


def require_online(repo_id: str) -> None:
    """Check that something can be pushed to ``repo_id`` now: the Hub answers (found out within
    seconds, :mod:`ilmconvert.online`) and ``HF_HUB_OFFLINE`` is not set.

    Raises:
        HubError: either does not hold (one line).
    """
    from huggingface_hub import constants

    offline = online.hub_unreachable()  # within seconds, not after a minute of retries
    if offline is not None:
        raise HubError(f"{offline}, so nothing can be pushed to {repo_id}; check the network and retry")
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"HF_HUB_OFFLINE=1 is set, so nothing can be pushed to {repo_id}: unset it and retry")


def upload(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    allow_patterns: list[str] | None = None,
) -> str:
    """Upload the files of ``directory`` (those matching ``allow_patterns``; all when None) to the
    Hub model repository ``repo_id``.

    Creates the repository if needed (``create_repo(exist_ok=True)``, ``private`` applies only
    to a new one) and the branch ``revision`` when it is not the default one
    (``create_branch(exist_ok=True)``), then ``HfApi.upload_folder`` makes one commit.

    Returns:
        The URL of the commit.

    Raises:
        HubError: a malformed ``repo_id``; offline (``HF_HUB_OFFLINE=1``); not logged in; the
            Hub refused (no write access) or cannot be reached.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    repo_id, rev = parse_hub_spec(repo_id)
    if rev is not None:
        raise HubError(f"pass the branch of {repo_id} as revision, not as @{rev}")
    require_online(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {Path(directory).name} with ilmconvert",
            allow_patterns=allow_patterns,
        )
    except LocalTokenNotFoundError as err:
        raise HubError(
            f"not logged in to the Hub, so {repo_id} cannot be written: run `hf auth login` or set HF_TOKEN"
        ) from err
    except OfflineModeIsEnabled as err:
        raise HubError(f"HF_HUB_OFFLINE=1 is set, so nothing can be pushed to {repo_id}: unset it and retry") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"the Hub refused to write {repo_id} (HTTP {status}): use a token with write access to it "
                "(`hf auth login` or HF_TOKEN)"
            ) from err
        raise HubError(
            f"cannot push to {repo_id} ({first_line(err)}); check the name and the network and retry"
        ) from err
    except Exception as err:  # connection errors of the client's HTTP library (not OSError)
        raise HubError(
            f"cannot reach the Hub to push {repo_id} ({first_line(err)}); check the network and retry"
        ) from err
    return str(getattr(info, "commit_url", info))
