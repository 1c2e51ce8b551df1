"""Writing files safely: replacing a file in one step, and one line for a full disk.

A process killed at any moment during :func:`write_text` leaves the old file or the new one, never
half of one. :func:`guard` is the one place where a write that fails because its file system is
full, over quota or read-only (``ENOSPC``, ``EDQUOT``, ``EROFS``) becomes a :class:`WriteError`:
one line that names the path, what it needs and what to do, exit code 2 on the command line.
Every writer uses it (checkpoints, the run folder, sweep summaries, exports, figures), also for
the errors that libraries wrap: safetensors reports an ``io::Error`` as ``SafetensorError``
(``... (os error 28)``), and ``torch.save`` as a ``RuntimeError`` without the errno, which is
why :func:`write_bytes` takes the serialized bytes rather than letting a library write the file.

A leaf module (imports nothing from the package but :mod:`ilmconvert.errors`), shared by the run
folder, the sweep, the logs, the checkpoints and the exports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import IlmconvertError

#: The file-system faults that :func:`guard` reports, with what to do about each.
DISK_FAULTS = {
    errno.ENOSPC: ("No space left on device", "free space there or choose another folder"),
    getattr(errno, "EDQUOT", 122): ("Disk quota exceeded", "free space within your quota or choose another folder"),
    errno.EROFS: ("Read-only file system", "choose a writable folder"),
}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # Rust's io::Error, as safetensors reports it


class WriteError(IlmconvertError):
    """A file could not be written because its file system is full, over quota or read-only.

    Nothing half-written is left at the path: the writers write a temporary sibling and rename
    it, so the previous file (or checkpoint folder) is still there and readable.

    Attributes:
        path: what could not be written. problem: the fault and the sizes, e.g. ``No space left
            on device (needs about 97.6 MiB, 2.0 MiB free)``.
    """

    def __init__(self, message: str, path: Path | None = None, problem: str = "") -> None:
        super().__init__(message)
        self.path, self.problem = path, problem


def disk_fault(err: BaseException) -> int | None:
    """The errno of :data:`DISK_FAULTS` behind ``err`` (an ``OSError``, or an error a library
    raised for one: its message's ``(os error N)``, its ``__cause__`` / ``__context__``), else ``None``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = getattr(err, "errno", None) if isinstance(err, OSError) else None
        if code is None:
            found = _OS_ERROR.search(str(err))
            code = int(found.group(1)) if found else None
        if code in DISK_FAULTS:
            return code
        err = err.__cause__ or err.__context__
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def fault_problem(path: Path, code: int, need: int | None = None) -> str:
    """``REASON (needs about N MiB, M MiB free)`` for a fault of :data:`DISK_FAULTS` at ``path``
    (the reason as the C library words it, e.g. ``No space left on device``)."""
    reason = DISK_FAULTS[code][0]
    sizes = []
    if need:
        sizes.append(f"needs about {_mib(need)}")
    if code != errno.EROFS:
        folder = next((p for p in [Path(path), *Path(path).parents] if p.exists()), Path("."))
        with contextlib.suppress(OSError):
            sizes.append(f"{_mib(shutil.disk_usage(folder).free)} free")
    return reason + (f" ({', '.join(sizes)})" if sizes else "")


@contextlib.contextmanager
def guard(path: str | Path, need: int | None = None, error: type[WriteError] = WriteError) -> Iterator[None]:
    """Turn a full, over-quota or read-only file system met in the body into one :class:`WriteError`.

    Args:
        path: what the body writes (named in the message).
        need: about how many bytes it writes, when known (said in the message).
        error: the :class:`WriteError` subclass to raise (e.g. one that is also the caller's own
            error type, which its callers catch).

    Raises:
        WriteError: the body raised an error of :data:`DISK_FAULTS` (see :func:`disk_fault`);
            any other error passes unchanged.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        code = disk_fault(err)
        if code is None:
            raise
        problem = fault_problem(Path(path), code, need)
        raise error(f"cannot write {path}: {problem}; {DISK_FAULTS[code][1]}", Path(path), problem) from err


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with Python's file API (so a full disk is an ``OSError`` with its
    errno), flushed and fsynced.

    Raises:
        WriteError: a full, over-quota or read-only file system. OSError: any other failure.
    """
    with guard(path, len(data)), open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: write a temporary file beside it, then ``os.replace`` it.

    The temporary name is unique per call, so two writers never share it; it is removed when the
    write fails.

    Raises:
        WriteError: a full, over-quota or read-only file system (the old file is kept).
        OSError: the file cannot be written otherwise (callers name the file in their own one-line error).
    """
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    data = text.encode()
    try:
        with guard(path, len(data)):
            tmp.write_bytes(data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
