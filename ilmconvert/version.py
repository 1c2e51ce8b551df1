"""The package version (read by ``pyproject.toml`` and recorded in every checkpoint)."""

__version__ = "0.1.0"
