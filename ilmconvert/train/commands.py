"""CLI commands for fine-tuning: ``finetune``, ``eval``, ``recipes`` (registered on ilmconvert.cli.app)."""

from ..cli import app, console, expected_errors  # noqa: F401
