"""What every command prints with: the rich consoles and the one-line error convention.

Off a terminal (a pipe, a log file, CI) rich would cut everything at 80 columns: table cells end in
"…" (module names that ``--include`` / ``--exclude`` need, recipe descriptions) and help loses
words. There, unless ``COLUMNS`` says otherwise, the consoles are :data:`OFF_TERMINAL_WIDTH` wide
(tables stay as wide as their content, a line stays one line) and typer's help is
:data:`HELP_WIDTH` wide (unless ``TERMINAL_WIDTH`` says otherwise). On a terminal its own width
is used; the tables fold long cells instead of cutting them.

Expected mistakes (:class:`~ilmconvert.errors.IlmconvertError`, and click's usage errors such as
an option value out of range) are printed as one line ``error: ...`` on stderr, with the error's
exit code (2 unless it says otherwise, e.g. 130 for an interrupted run) and no traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer
import typer.rich_utils
from rich.console import Console

from ..errors import IlmconvertError

#: columns of the consoles off a terminal without COLUMNS: wider than any line or table printed
OFF_TERMINAL_WIDTH = 1000
#: columns of typer's help off a terminal without TERMINAL_WIDTH / COLUMNS: no option name or
#: help word is cut (at 80 some were: "--grad-accum-st…")
HELP_WIDTH = 120


def _console(stderr: bool = False) -> Console:
    """A rich console: its terminal's width, or COLUMNS, or :data:`OFF_TERMINAL_WIDTH`."""
    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console
    return Console(stderr=stderr, width=OFF_TERMINAL_WIDTH)


console = _console()
err_console = _console(stderr=True)
if not console.is_terminal and not (os.environ.get("TERMINAL_WIDTH") or os.environ.get("COLUMNS")):
    typer.rich_utils.MAX_WIDTH = HELP_WIDTH  # typer's own knob (read from TERMINAL_WIDTH at import)

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
            fail("interrupted", code=EXIT_INTERRUPTED)

    return wrapper


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"1 batch size"``, ``"2 classes"``: ``n`` and ``noun``, or
    ``plural`` (default ``noun + "s"``) when n != 1."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def literal(text: str) -> str:
    """``text`` as help that typer renders with rich markup: brackets are shown as written
    (``pip install 'ilmconvert[onnx]'`` would otherwise lose ``[onnx]``, read as a style tag)."""
    from rich.markup import escape

    return escape(text)


def one_line(text: str) -> str:
    """``text`` on one line (newlines become spaces), with rich markup escaped (paths and values
    may contain ``[...]``)."""
    from rich.markup import escape

    return escape(" ".join(text.split("\n")))
