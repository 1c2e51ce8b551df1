"""What every command prints with: the rich consoles and the one-line error convention.

Expected mistakes (:class:`~ilmconvert.errors.IlmconvertError`, and click's usage errors such as
an option value out of range) are printed as one line ``error: ...`` on stderr, with the error's
exit code (2 unless it says otherwise, e.g. 130 for an interrupted run) and no traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from ..errors import IlmconvertError

console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: message`` on stderr and exit with ``code`` (2: the user can fix it).

    Raises:
        typer.Exit: always, with ``code``.
    """
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def expected_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`IlmconvertError` into a one-line message and its ``exit_code``; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IlmconvertError as err:
            fail(one_line(str(err)), code=err.exit_code)
        except KeyboardInterrupt:
            from ..train.stopping import SIGNALS  # SIGTERM during finetune / sweep: 143

            fail("interrupted", code=SIGNALS.exit_code)

    return wrapper


def one_line(text: str) -> str:
    """``text`` on one line (newlines become spaces), with rich markup escaped (paths and values
    may contain ``[...]``)."""
    from rich.markup import escape

    return escape(" ".join(text.split("\n")))
