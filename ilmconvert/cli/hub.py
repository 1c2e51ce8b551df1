"""``ilmconvert push``: upload a checkpoint folder to the Hugging Face Hub (thin over :func:`ilmconvert.io.push`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .output import console, expected_errors


@expected_errors
def push(
    directory: Annotated[Path, typer.Argument(help="Checkpoint directory written by `ilmconvert swap` or finetune.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repository, ORG/NAME (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[
        Optional[str],
        typer.Option("--revision", "--branch", help="Branch to commit to (created if missing); default: main."),
    ] = None,
) -> None:
    """Upload DIRECTORY (model.safetensors, config.json, README.md) to the Hub as ORG/NAME."""
    from ..io import push as push_checkpoint

    with console.status(f"pushing {directory} to {repo_id}"):
        url = push_checkpoint(directory, repo_id, private=private or None, revision=revision)
    console.print(f"pushed [bold]{directory}[/] to {url}; load it with ilmconvert.load('hf-hub:{repo_id}')")
