"""The ``ilmconvert`` command line: a thin Typer app over the library, rendered with rich.

The commands live in :mod:`.convert` (``inspect``, ``swap``), :mod:`.train` (``finetune``,
``eval``, ``recipes``), :mod:`.sweep` (``sweep``, ``plot``) and :mod:`.hub` (``push``) as plain
functions; this module builds the app and registers them, so no command module imports the app
(no import cycle). Every expected mistake, click's usage errors included, is one line
``error: ...`` on stderr with exit code 2 and no traceback (:mod:`.output`).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import typer
from typer.core import TyperGroup

from . import convert, hub, sweep, train
from .export import export as export_command
from .output import EXIT_USAGE, err_console, one_line

# click's exceptions, from the click typer runs on (recent typer vendors it as typer._click)
_click_errors = importlib.import_module(typer.BadParameter.__module__)
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """A warning as one ``warning: ...`` line on stderr (not Python's ``file:line: Category:`` and source line)."""
    err_console.print(f"[bold yellow]warning:[/] {one_line(str(message))}", highlight=False, soft_wrap=True)


class _OneLineErrors(TyperGroup):
    """The app's click group: usage errors (a value out of range, an unknown or missing option)
    become one line ``error: ...; see `ilmconvert CMD --help``` with exit code 2, instead of
    typer's multi-line panel. Running without arguments still prints the help."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NoArgsIsHelp as err:
            print(err.ctx.get_help() if err.ctx else "", file=sys.stderr)
            rv = EXIT_USAGE
        except _click_errors.ClickException as err:
            where = err.ctx.command_path if getattr(err, "ctx", None) is not None else "ilmconvert"
            message = one_line(" ".join(err.format_message().split()).rstrip("."))
            err_console.print(f"[bold red]error:[/] {message}; see `{where} --help`", highlight=False, soft_wrap=True)
            rv = err.exit_code
        except typer.Abort:
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="ilmconvert",
    cls=_OneLineErrors,
    help=(
        "Convert timm / torchvision networks to Instance-Level Meta Normalization (ILM Norm), "
        "fine-tune and evaluate them."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
def _version(value: bool) -> None:
    if value:
        from ..version import __version__

        print(f"ilmconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Convert timm / torchvision networks to ILM Norm (or Proxy Norm), fine-tune and evaluate them."""


app.command()(convert.inspect)
app.command()(convert.swap)
app.command()(train.finetune)
app.command("eval")(train.eval_)
app.command()(train.recipes)
app.command()(sweep.sweep)
app.command()(sweep.plot)
app.command()(hub.push)
app.command("export")(export_command)


def main() -> None:
    """Console-script entry point (``ilmconvert``, ``python -m ilmconvert``, ``python -m ilmconvert.cli``)."""
    app()


__all__ = ["app", "main"]
