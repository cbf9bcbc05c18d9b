"""Every `fedtune` command line printed in README.md, docs/*.md and examples/* works
as written: it parses against the real command line (options, arguments, types),
and the ones that build a run config (train, run, federate, compare, config) also
resolve it — every --set key and value valid, every config file found — with the
long-running part replaced by a recorder. A renamed option or config key fails here,
naming the file and line that still shows the old one.

What counts as a command line: in Markdown, the lines of shell code blocks and the
inline code spans that start with `fedtune`, `scripts/fedtune` or `.venv/bin/fedtune`;
in examples/, comment lines that start so. Lines ending in a backslash continue.
A span that is only `fedtune COMMAND` names a command: it must exist.
A usage synopsis is checked too, as the command it describes: `[...]` brackets and
`...` are dropped, a placeholder such as CONFIG or runs/<name> is kept as a value.

`python benchmarks/NAME.py ...` lines in the docs are checked too: the script exists
and, where it uses argparse, the printed arguments parse (its work replaced by a stop)."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedtune import cli

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("fedtune", "scripts/fedtune", ".venv/bin/fedtune")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
# Commands whose config resolution is checked by running them with the work stubbed.
RESOLVED = ("train", "run", "federate", "compare", "config")


@dataclass(frozen=True)
class CommandLine:
    where: str  # file:line, for the failure message
    text: str  # as printed, continuations joined

    @property
    def synopsis(self) -> bool:
        """A usage synopsis (`fedtune config --method NAME`, `[--set key=value ...]`):
        it parses, but its placeholders make no config to resolve."""
        words = shlex.split(self.text, comments=True)
        bracketed = any(w.startswith("[") or w.endswith("]") for w in words)
        return bracketed or any(w in ("...", "…") or re.fullmatch(r"[A-Z_]{3,}", w) for w in words)

    def argv(self) -> list[str]:
        """The arguments after the program name, as a shell would split them, with
        redirections, synopsis brackets and ellipses dropped."""
        words = shlex.split(self.text, comments=True)
        words = words[1:]  # the program
        out: list[str] = []
        skip_next = False
        for w in words:
            if skip_next:
                skip_next = False
                continue
            if w in (">", ">>", "|", "2>&1", "&&"):
                if w == "|" or w == "&&":
                    break  # the rest is another program
                skip_next = w in (">", ">>")
                continue
            w = w.strip("[]")
            if w in ("", "...", "…"):
                continue
            out.append(w)
        return out


def _starts_command(line: str) -> bool:
    line = line.removeprefix("$ ").lstrip()
    return any(line == p or line.startswith(p + " ") for p in PROGRAMS)


def _joined(lines: list[str], start: int, strip: str = "") -> tuple[str, int]:
    """The command starting at lines[start], with backslash continuations; returns
    it and the index after it."""
    parts = []
    i = start
    while True:
        text = lines[i].strip()
        if strip:
            text = text.removeprefix(strip).strip()
        cont = text.endswith("\\")
        parts.append(text.rstrip("\\").strip())
        i += 1
        if not cont or i >= len(lines):
            return " ".join(parts).removeprefix("$ "), i


def _markdown_commands(
    path: Path, starts: Callable[[str], bool] = _starts_command
) -> list[CommandLine]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT)
    found: list[CommandLine] = []
    fence: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            i += 1
            continue
        if fence is not None:
            if fence in SHELL_BLOCKS and starts(stripped):
                text, nxt = _joined(lines, i)
                found.append(CommandLine(f"{rel}:{i + 1}", text))
                i = nxt
                continue
        else:
            for span in re.findall(r"`([^`\n]+)`", line):
                if starts(span) and " " in span.strip():
                    found.append(CommandLine(f"{rel}:{i + 1}", span.strip()))
        i += 1
    return found


def _example_commands(path: Path) -> list[CommandLine]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT)
    found: list[CommandLine] = []
    i = 0
    while i < len(lines):
        body = lines[i].strip()
        if body.startswith("#") and _starts_command(body.lstrip("#").strip()):
            text, i = _joined(lines, i, strip="#")
            found.append(CommandLine(f"{rel}:{i}", text))
            continue
        i += 1
    return found


def collect() -> list[CommandLine]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    examples = sorted(p for p in (ROOT / "examples").iterdir() if p.is_file())
    found = [c for p in docs for c in _markdown_commands(p)]
    return found + [c for p in examples for c in _example_commands(p)]


COMMANDS = collect()


def test_the_docs_have_commands_to_check() -> None:
    """The collector finds the README's Quick start and the examples' own lines (a
    collector that finds nothing would pass everything)."""
    texts = {c.text for c in COMMANDS}
    assert "scripts/fedtune demo" in {t.split("  ")[0].split(" #")[0] for t in texts}
    assert any(c.where.startswith("examples/icl.toml") for c in COMMANDS)
    assert len(COMMANDS) > 60


def _parse(argv: list[str]) -> click.Context:
    """What click does before calling the command: options, arguments and their
    types, with no command run."""
    cmd = typer.main.get_command(cli.app)
    ctx = cmd.make_context("fedtune", list(argv))
    while isinstance(cmd, click.Group):  # down to the command (`models install`)
        rest = ctx.protected_args + ctx.args
        if not rest and cmd.invoke_without_command:
            return ctx
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        cmd, ctx = sub, sub.make_context(name, rest, parent=ctx)
    if ctx.info_name == "install":
        from fedtune.catalog import CATALOG

        name = ctx.params["name"]
        if name not in CATALOG and not re.fullmatch(r"[A-Z_]+", name):  # NAME: a synopsis
            raise click.BadParameter(f"no catalog model {name!r}")
    return ctx


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command_parses(command: CommandLine) -> None:
    argv = command.argv()
    assert argv, f"{command.where}: no arguments in {command.text!r}"
    try:
        _parse(argv)
    except click.ClickException as e:
        if isinstance(e, click.MissingParameter) and len(argv) == 1:
            return  # `fedtune index` in a sentence names the command; it only has to exist
        pytest.fail(f"{command.where}: `{command.text}` does not parse: {e.format_message()}")


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Replace what the resolving commands run (training, federation, comparisons)
    with a recorder of the resolved config."""
    import fedtune.federated.compare as compare
    import fedtune.federated.runner as runner
    import fedtune.regimes as regimes

    calls: list[tuple[str, object]] = []

    def record(name: str):  # type: ignore[no-untyped-def]
        def stub(*args: object, **kwargs: object) -> None:
            calls.append((name, args[0] if args else kwargs))

        return stub

    monkeypatch.setattr(regimes, "run_centralized", record("train"))
    monkeypatch.setattr(runner, "run_federated", record("federate"))
    monkeypatch.setattr(compare, "run_regimes", record("compare"))
    monkeypatch.setattr(compare, "run_seeds", record("compare"))
    monkeypatch.setattr(compare, "resume_comparison", record("compare --resume"))
    monkeypatch.chdir(ROOT)  # the docs give paths from the repository root
    return calls


RESOLVING = [c for c in COMMANDS if c.argv() and c.argv()[0] in RESOLVED and not c.synopsis]


@pytest.mark.parametrize("command", RESOLVING, ids=[c.where for c in RESOLVING])
def test_command_resolves_its_config(
    command: CommandLine, stubbed: list[tuple[str, object]]
) -> None:
    argv = command.argv()
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, (
        f"{command.where}: `{command.text}` fails: {result.output.strip()}"
    )
    if argv[0] != "config":
        assert stubbed, f"{command.where}: `{command.text}` ran nothing"


# --- `python benchmarks/NAME.py ...` lines in the docs -------------------------------

BENCHMARKS = ROOT / "benchmarks"


def _starts_benchmark(line: str) -> bool:
    return line.removeprefix("$ ").lstrip().startswith("python benchmarks/")


def collect_benchmark_commands() -> list[CommandLine]:
    """`python benchmarks/NAME.py ...` lines in README.md and docs/*.md (shell blocks
    and inline spans), found as the fedtune ones are."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [c for p in docs for c in _markdown_commands(p, _starts_benchmark)]


BENCHMARK_COMMANDS = collect_benchmark_commands()


class _Parsed(Exception):
    """Raised in place of the benchmark's work once its arguments parsed."""


def test_the_docs_have_benchmark_commands_to_check() -> None:
    assert any("benchmarks/demo_seeds.py" in c.text for c in BENCHMARK_COMMANDS)


@pytest.mark.parametrize("command", BENCHMARK_COMMANDS, ids=[c.where for c in BENCHMARK_COMMANDS])
def test_benchmark_command_parses(command: CommandLine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script exists and, where it parses its arguments with argparse, the printed
    arguments parse (a renamed part or option fails here, naming the doc line); the
    benchmark itself does not run."""
    import argparse
    import importlib.util

    words = shlex.split(command.text, comments=True)
    script = ROOT / words[1]
    assert script.is_file(), f"{command.where}: `{command.text}`: {words[1]} does not exist"
    source = script.read_text(encoding="utf-8")
    if "parse_args(" not in source:
        return  # reads sys.argv itself: only its existence is checked
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        real(self, args, namespace)  # exits with status 2 on a bad argument
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", [str(script), *command.argv()[1:]])
    spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look it up
    spec.loader.exec_module(module)
    with pytest.raises(_Parsed):
        try:
            module.main()
        except SystemExit as e:
            pytest.fail(f"{command.where}: `{command.text}` does not parse (exit {e.code})")
