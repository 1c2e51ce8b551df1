"""The base of every error a user can cause and fix (the CLI prints it as one line, exit code 2)."""


def first_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"`` (just the type name for an empty message)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class IlmconvertError(ValueError):
    """An expected mistake: bad name, bad file, bad setting. The message says what to do."""
