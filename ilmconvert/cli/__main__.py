"""``python -m ilmconvert.cli ...``: the same app as the ``ilmconvert`` command."""

from ilmconvert.cli import main

main()
