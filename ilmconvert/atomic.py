"""Replacing a file in one step: a process killed at any moment leaves the old file or the new one,
never half of one. A leaf module (imports nothing from the package), shared by the run folder,
the sweep, the logs and the checkpoint card."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: write a temporary file beside it, then ``os.replace`` it.

    The temporary name is unique per call, so two writers never share it; it is removed when the
    write fails.

    Raises:
        OSError: the file cannot be written (callers name the file in their own one-line error).
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
