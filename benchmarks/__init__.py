"""Benchmark scripts (run as files: ``python benchmarks/NAME.py``) and the harness they share.

This folder is an importable package so that a test can reuse a benchmark's checks with an explicit
``from benchmarks.zoo import checks`` (pytest puts the repository root on ``sys.path``: ``pythonpath``
in pyproject.toml) instead of re-implementing them; the scripts put the repository root on
``sys.path`` themselves. Nothing here is part of the installed ``ilmconvert`` package.
"""
