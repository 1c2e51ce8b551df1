"""What the command line prints where people read it (issue 21): off a terminal (a pipe, a log) full
module names, recipe descriptions and help words, not cut at 80 columns; in a 100-column terminal
tables that fold instead of cutting; help that names the extras as written ('ilmconvert[onnx]').

The commands run in child processes, piped or on a pseudo-terminal 100 columns wide, with neither
COLUMNS nor TERMINAL_WIDTH set: what a user's shell gives them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEPARATOR = "=== ilmconvert-test-separator ==="
#: one child runs several commands of the real app (each as `ilmconvert ARGS`), separated by a marker line
RUNNER = f"""
import json, sys
from ilmconvert.cli import app
for args in json.loads(sys.argv[1]):
    print({SEPARATOR!r}, flush=True)
    try:
        app(args, prog_name="ilmconvert")
    except SystemExit as exit:
        print("exit", exit.code, flush=True)
"""
INSPECT = ["inspect", "timm:convnext_atto"]  # module names such as stages.0.blocks.0.norm (22 characters)
COMMANDS = [
    ["recipes"],
    ["inspect", "timm:resnet50_gn", "--method", "ilm+proxy"],  # the widest table: 10 columns
    INSPECT,
    [*INSPECT, "--json"],
    ["finetune", "--help"],
    ["swap", "--help"],
    ["export", "--help"],
]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH", "NO_COLOR")}
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TERM": "xterm-256color", "PYTHONPATH": path}


def _outputs(text: str) -> list[str]:
    parts = ANSI.sub("", text.replace("\r\n", "\n")).split(SEPARATOR + "\n")[1:]
    assert len(parts) == len(COMMANDS), text[-2000:]
    for args, part in zip(COMMANDS, parts):
        assert part.rstrip().endswith("exit 0"), (args, part[-1000:])
    return [part.rstrip().removesuffix("exit 0") for part in parts]


@pytest.fixture(scope="module")
def piped() -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(COMMANDS)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _outputs(done.stdout)


@pytest.fixture(scope="module")
def terminal() -> list[str]:
    """The same commands with stdin / stdout / stderr on a pseudo-terminal of 100 columns."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 100, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(COMMANDS)], stdin=slave, stdout=slave, stderr=slave, env=_env()
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert child.wait(timeout=300) == 0, b"".join(chunks)[-3000:]
    return _outputs(b"".join(chunks).decode(errors="replace"))


def _converted_names(parts: list[str]) -> list[str]:
    report = json.loads(parts[3])
    names = [c["name"] for c in report["converted"]]
    assert len(names) > 10 and any(len(n) > 20 for n in names)
    return names


def test_piped_output_keeps_full_names_descriptions_and_help_words(piped):
    from ilmconvert.train.recipes import list_recipes

    recipes, _, table, _, finetune_help, swap_help, _ = piped
    for recipe in list_recipes():
        assert any(recipe.description in line for line in recipes.splitlines()), recipe.description
    lines = table.splitlines()
    for name in _converted_names(piped):
        assert any(f" {name} " in line for line in lines), name
    for text in piped:
        assert "…" not in text
    for option in ("--grad-accum-steps", "--checkpoint-hist", "--model-ema-decay", "--no-channels-last"):
        assert option in finetune_help
    for option in ("--key-group-size", "--include-batchnorm"):
        assert option in swap_help


def test_a_100_column_terminal_folds_tables_and_loses_nothing(terminal):
    from ilmconvert.train.recipes import list_recipes

    recipes, _, table, _, finetune_help, _, _ = terminal
    for text in terminal:
        assert "…" not in text
        assert max(len(line) for line in text.splitlines()) <= 100
    words = recipes.split()
    for recipe in list_recipes():
        assert all(word in words for word in recipe.description.split()), recipe.description
    for name in _converted_names(terminal):  # whole here; the 10-column table folds what does not fit
        assert any(f" {name} " in line for line in table.splitlines()), name
    assert "--grad-accum-steps" in finetune_help


def test_help_names_the_extras_with_their_brackets(piped):
    def words(text: str) -> str:  # the help's words, its box and line breaks taken out
        return " ".join(text.replace("│", " ").split())

    assert "pip install 'ilmconvert[tensorboard]'" in words(piped[4])
    assert "pip install 'ilmconvert[onnx]'" in words(piped[6])


def test_no_help_text_loses_characters_to_rich_markup():
    """Every command's and option's help, rendered as rich markup (typer's rich_markup_mode), keeps
    every character it was written with."""
    from rich.text import Text
    from typer.main import get_command

    from ilmconvert.cli import app

    group = get_command(app)
    checked = 0
    for command in [group, *group.commands.values()]:
        for text in [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]:
            shown = Text.from_markup(text).plain
            assert shown == text.replace("\\[", "["), (command.name, text)
            checked += "[" in text
    assert checked >= 3
