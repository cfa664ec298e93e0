"""Every `dreamlens ...` command the README and docs/*.md show parses with the CLI's own parser (nothing
runs): a renamed or removed flag, a wrong value type or a missing argument fails here, naming the line."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from dreamlens.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
OPERATORS = {";", "&", "&&", "|", "||", "(", ")"}
# what a placeholder of the prose stands for, so that `dreamlens dream OBJ --modes K` parses as a use would
PLACEHOLDERS = {
    "OBJ": "blocks.6.mlp.hook_post[0]", "OBJECTIVE": "blocks.6.mlp.hook_post[0]", "SPEC": "sae:embedded[0:8]",
    "OUT": "out", "FOLDER": "out", "DIR": "out", "DREAM_DIR": "out", "SCAN_DIR": "scans/x",
    "SWEEP_OR_RESULT": "out", "K": "2", "N": "2", "XE": "6", "ADDRESS": "127.0.0.1:6379",
}


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, command line) of every line of a shell code block (continuations joined), and of
    every inline code span that starts with `dreamlens `."""
    lines = markdown.splitlines()
    out: list[tuple[int, str]] = []
    fence: str | None = None
    pending = ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence is not None:
            if fence in SHELL_BLOCKS:
                if stripped.endswith("\\"):
                    pending += stripped[:-1] + " "
                    continue
                out.append((number, pending + stripped))
                pending = ""
            continue
        out += [(number, span) for span in re.findall(r"`!?(dreamlens [^`]+)`", line)]
    return out


def dreamlens_commands(line: str) -> list[list[str]]:
    """The argument lists of every `dreamlens` invocation in one shell line (after `.venv/bin/`, `!`,
    `python -m`, environment assignments; `;`, `&&`, `|` and `&` separate commands; `#` starts a comment)."""
    lexer = shlex.shlex(line.lstrip("!"), posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    found = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]  # VAR=value before the command
        if len(words) >= 3 and words[0].endswith("python") and words[1:3] == ["-m", "dreamlens"]:
            words = ["dreamlens", *words[3:]]
        if words and (words[0] == "dreamlens" or words[0].endswith("/dreamlens")):
            found.append([PLACEHOLDERS.get(w, w) for w in words[1:]])
    return found


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCUMENTS:
        for number, line in shell_lines(path.read_text()):
            if "dreamlens" not in line:
                continue  # output shown in a block, or another tool's command
            found += [(f"{path.name}:{number}", args) for args in dreamlens_commands(line)]
    return found


def parse_error(args: list[str]) -> str | None:
    """None when the CLI's parser accepts `args`; else what it printed."""
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            build_parser().parse_args(args)
    except SystemExit as e:
        if e.code not in (0, None):  # --help and --version exit 0
            return stderr.getvalue().strip() or f"exit status {e.code}"
    return None


@pytest.fixture(autouse=True)
def any_device(monkeypatch):
    """`--device cuda` is checked against this machine's GPUs when parsed; whether the machine has one
    is not a property of the command line."""
    import torch

    import dreamlens.devices

    monkeypatch.setattr(dreamlens.devices, "resolve_device", lambda text: torch.device(text), raising=False)


def test_the_documents_show_commands():
    """The extraction finds the README's commands (an empty list would pass anything)."""
    subcommands = {args[0] for _, args in all_commands() if args}
    assert {"dream", "scan", "compare", "sweep", "report", "info", "install-embedded", "demo"} <= subcommands


@pytest.mark.parametrize("where, args", all_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_command_parses(where, args):
    error = parse_error(args)
    assert error is None, f"{where}: `dreamlens {shlex.join(args)}` does not parse: {error}"


def test_a_stale_flag_is_caught():
    """The check can fail: a flag the CLI does not have, a bad value, a missing argument."""
    markdown = "```bash\n.venv/bin/dreamlens dream 'blocks.6.mlp.hook_post[1]' --no-such-flag 3   # comment\n```\n"
    ((number, line),) = shell_lines(markdown)
    ((args),) = dreamlens_commands(line)
    assert number == 2 and args == ["dream", "blocks.6.mlp.hook_post[1]", "--no-such-flag", "3"]
    assert "--no-such-flag" in (parse_error(args) or "")
    assert parse_error(["dream", "blocks.6.mlp.hook_post[1]", "--length", "eight"]) is not None
    assert parse_error(["scan"]) is not None
    assert parse_error(["dream", "blocks.6.mlp.hook_post[1]", "--length", "8"]) is None


def test_lines_split_into_commands():
    line = "A=1 .venv/bin/dreamlens info && python -m dreamlens demo --force & dreamlens report x --out r.html  # then open"
    assert dreamlens_commands(line) == [["info"], ["demo", "--force"], ["report", "x", "--out", "r.html"]]
    assert dreamlens_commands("echo dreamlens") == []
    assert shell_lines("see `dreamlens dream OBJ --modes K` and `!dreamlens install-embedded`") == [
        (1, "dreamlens dream OBJ --modes K"), (1, "dreamlens install-embedded")]
