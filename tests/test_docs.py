"""The docs keep up with the code: every CLI option is documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main

from cwkd.cli.app import app

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _options():
    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for param in sub.params:
            if param.param_type_name == "option":
                yield name, param.opts[0]


@pytest.mark.parametrize("command,option", list(_options()))
def test_every_cli_option_is_in_the_reference(command, option):
    text = (DOCS / "cli.md").read_text()
    section = text.split(f"## `cwkd {command}`", 1)
    assert len(section) == 2, f"docs/cli.md has no section for cwkd {command}"
    body = section[1].split("\n## ", 1)[0]
    assert f"`{option}" in body, f"{option} of cwkd {command} is not documented in docs/cli.md"


def test_doc_links_resolve():
    for page in DOCS.glob("*.md"):
        for target in [part.split(")")[0] for part in page.read_text().split("](")[1:]]:
            if target.endswith(".md") and "://" not in target:
                assert (DOCS / target).is_file(), f"{page.name} links to missing {target}"
