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

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
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
            from ..train.stopping import SIGNALS  # SIGTERM during finetune / sweep: 143

            fail("interrupted", code=SIGNALS.exit_code)

    return wrapper


#: seconds a start-up step runs before a log (off a terminal) hears of it, and between its lines
QUIET_S = 10.0


class _PlainSteps:
    """``steps(step, done, total)`` off a terminal: nothing for a step that ends within
    :data:`QUIET_S` (an expected mistake stays one line), else ``reading 32,000 train images:
    8,192/32,000 after 10 s`` every :data:`QUIET_S` and ``...: done in 25.3 s`` at its end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, dict[str, Any]] = {}

    def __call__(self, step: str, done: int, total: int) -> None:
        with self.lock:
            state = self.running.get(step)
            if state is None:
                state = self.running[step] = {"start": time.perf_counter(), "shown": False}
                self._arm(step, state)
            state.update(done=done, total=total)
            if done < total:
                return
            del self.running[step]
            state["timer"].cancel()
        if state["shown"]:
            console.print(f"{step}: done in {time.perf_counter() - state['start']:.1f} s", highlight=False)

    def _arm(self, step: str, state: dict[str, Any]) -> None:
        state["timer"] = threading.Timer(QUIET_S, self._tell, (step,))
        state["timer"].daemon = True
        state["timer"].start()

    def _tell(self, step: str) -> None:
        with self.lock:
            state = self.running.get(step)
            if state is None:
                return
            state["shown"] = True
            self._arm(step, state)
            done, total, seconds = state["done"], state["total"], time.perf_counter() - state["start"]
        counted = f": {done:,}/{total:,}" if total > 1 else ""
        console.print(f"{step}{counted} after {seconds:.0f} s", highlight=False)

    def close(self) -> None:
        with self.lock:
            for state in self.running.values():
                state["timer"].cancel()
            self.running.clear()


@contextlib.contextmanager
def steps() -> Iterator[Callable[[str, int, int], None]]:
    """A ``steps(step, done, total)`` reporter for long start-up steps (reading images, building the
    network): on a terminal a transient rich progress bar per step; off a terminal (a log) plain
    lines for a step that runs longer than :data:`QUIET_S` (:class:`_PlainSteps`)."""
    if not console.is_terminal:
        plain = _PlainSteps()
        try:
            yield plain
        finally:
            plain.close()
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"))
    bars = Progress(*columns, TimeElapsedColumn(), console=console, transient=True)
    tasks: dict[str, Any] = {}

    def rich(step: str, done: int, total: int) -> None:
        if step not in tasks:
            tasks[step] = bars.add_task(step, total=total if total > 1 else None, count="")
        if total > 1:
            bars.update(tasks[step], completed=done, count=f"{done:,}/{total:,}")
        if done >= total:
            bars.remove_task(tasks.pop(step))

    with bars:
        yield rich


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
