"""The docs stay true: links resolve, and every `certmgr …` command line they show parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from certmgr.cli import main

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _links(page: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()) if "://" not in m]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link in README.md and docs/ points at a file in the repository."""
    missing = [link for link in _links(page) if not (page.parent / link).exists()]
    assert not missing, f"{page.name}: broken links {missing}"


def _command_lines(page: Path) -> list[str]:
    out = []
    for block in re.findall(r"```(?:sh|console|bash)?\n(.*?)```", page.read_text(), re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            # `certmgr ALL=(root) …` is a sudoers line for the user named certmgr, not a command
            if line.startswith(("certmgr ", ".venv/bin/certmgr ")) and "ALL=" not in line:
                out.append(line)
    return out


CASES = [(p.name, line) for p in PAGES for line in _command_lines(p)]


@pytest.mark.parametrize(("page", "line"), CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_documented_commands_parse(page: str, line: str) -> None:
    """Each `certmgr …` line in the docs names real commands and options (parsed by click, not run)."""
    argv = [a for a in shlex.split(line)[1:] if not a.startswith("$")]
    ctx = main.make_context("certmgr", list(argv), resilient_parsing=False)
    cmd: click.Command = main
    args = [*ctx._protected_args, *ctx.args]
    while isinstance(cmd, click.Group) and args:
        name, sub, args = cmd.resolve_command(ctx, args)
        assert sub is not None, f"{page}: unknown command in {line!r}"
        try:
            ctx = sub.make_context(name or "", list(args), parent=ctx)
        except click.BadParameter as exc:
            # paths on an operator's machine (/etc/letsencrypt) need not exist here
            assert "does not exist" in str(exc), f"{page}: {line!r}: {exc}"
            return
        cmd = sub
        args = [*ctx._protected_args, *ctx.args] if isinstance(sub, click.Group) else []
