"""The base of every error a user can cause and fix (the CLI prints it as one line, exit code 2)."""


class IlmconvertError(ValueError):
    """An expected mistake: bad name, bad file, bad setting. The message says what to do."""
