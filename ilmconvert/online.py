"""Whether a download host can be reached, found out once per host and within seconds.

Without a network, ``huggingface_hub`` retries each request five times with back-off (about a
minute of "Retrying in 8s" lines per file before its error), and urllib (torchvision's and timm's
URL weights, the CIFAR archives) can wait minutes for a host that does not answer. Before a
download, :func:`unreachable` opens one TCP connection to the host (or to the proxy that
``HTTPS_PROXY`` / ``HTTP_PROXY`` name for it) with a :data:`TIMEOUT` of a few seconds, once per
host and process. When the Hub cannot be reached, :func:`hub_unreachable` switches
``huggingface_hub`` to offline mode for the rest of the process: files in its cache are still
used, a missing one fails at once (docs/design.md §7).
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request

#: seconds the name lookup and the TCP connection to a host may take together
TIMEOUT = 3.0

_verdicts: dict[tuple[str, int], str | None] = {}
_hub_switched_offline = False


def _target(url: str) -> tuple[str, int, str]:
    """``(host, port, label)`` a request for ``url`` connects to: the proxy configured for its
    scheme (urllib's and httpx's ``*_PROXY`` variables, ``NO_PROXY`` honoured), else its own host."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 80, f"the proxy {p.hostname}:{p.port or 80} for {host}"
    return host, port, f"{host}:{port}"


def _connect(host: str, port: int, label: str, timeout: float) -> str | None:
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {label}: {err.strerror or err}")

    # a thread, so that a name lookup that hangs (getaddrinfo has no timeout) is bounded too
    thread = threading.Thread(target=attempt, name="ilmconvert-reach", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"cannot connect to {label}: no answer within {timeout:g} s"


def unreachable(url: str, timeout: float = TIMEOUT) -> str | None:
    """Why ``url``'s host cannot be reached (``None``: a TCP connection to it succeeded).

    The answer is found once per host and port and process, within ``timeout`` seconds (name
    lookup included); later calls return it at once.

    Returns:
        ``None``, or one line such as ``"cannot connect to huggingface.co:443: Name or service
        not known"``.
    """
    host, port, label = _target(url)
    if not host:
        return None  # not a network URL: nothing to find out
    key = (host, port)
    if key not in _verdicts:
        _verdicts[key] = _connect(host, port, label, timeout)
    return _verdicts[key]


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub (``HF_ENDPOINT``) cannot be reached, or ``None``.

    When it cannot, ``huggingface_hub`` is switched to offline mode for the rest of the process,
    as ``HF_HUB_OFFLINE=1`` would: cached files are used, missing ones raise
    ``LocalEntryNotFoundError`` at once. With ``HF_HUB_OFFLINE=1`` set by the user nothing is
    tried and ``None`` is returned (their offline mode already answers fast).
    """
    global _hub_switched_offline
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not _hub_switched_offline:
        return None
    reason = unreachable(constants.ENDPOINT)
    if reason is not None and not constants.HF_HUB_OFFLINE:
        constants.HF_HUB_OFFLINE = True
        _hub_switched_offline = True
    return reason
