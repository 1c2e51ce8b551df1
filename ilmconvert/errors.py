"""The base of every error a user can cause and fix (the CLI prints it as one line, exit code 2)."""


def first_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"`` (just the type name for an empty message)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class IlmconvertError(ValueError):
    """An expected mistake: bad name, bad file, bad setting. The message says what to do.

    ``exit_code`` is the command line's exit status for it: 2 (the user can fix the arguments)
    unless a subclass says otherwise (e.g. 130 for an interrupted run).
    """

    exit_code: int = 2
