"""The command-line reference (``docs/reference/cli.md``) names every command and option the
parser defines, so a new command or option cannot land undocumented."""

from __future__ import annotations

import argparse
import json
import re
import subprocess

from flymy_receiver.cli import _build_parser
from tests.conftest import require
from tests.docs.snippets import DOCS, ROOT
from tests.servers import PYTHON

PAGE = DOCS / "reference" / "cli.md"


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> dict[str, argparse.ArgumentParser]:
    """{"journal list": its parser, ...} for every leaf command."""
    found: dict[str, argparse.ArgumentParser] = {}
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers and prefix:
        found[" ".join(prefix)] = parser
    for action in subparsers:
        for name, sub in action.choices.items():
            found.update(_commands(sub, (*prefix, name)))
    return found


def _sections() -> dict[str, str]:
    """The page's ``### `command` `` sections: {command: its text}."""
    text = PAGE.read_text()
    parts = re.split(r"^### `([^`]+)`\n", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_the_walk_finds_the_commands() -> None:
    commands = _commands(_build_parser())
    assert {"sign", "verify", "send", "listen", "inspect", "schema"} <= set(commands)
    assert {"journal list", "journal show", "journal replay", "journal refusals"} <= set(commands)


def test_every_command_has_a_section() -> None:
    sections = _sections()
    missing = sorted(set(_commands(_build_parser())) - set(sections))
    assert not missing, f"commands without a section in {PAGE.name}: {missing}"


def test_every_option_is_named_in_its_command_section() -> None:
    sections = _sections()
    journal_intro = PAGE.read_text().split("## The journal", 1)[1].split("### ", 1)[0]
    missing = []
    for name, parser in _commands(_build_parser()).items():
        text = sections.get(name, "")
        if name.startswith("journal "):
            text += journal_intro  # --json, --store and --app are described once there
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and option not in text:
                    missing.append(f"{name} {option}")
    assert not missing, f"options not named on {PAGE.name}: {missing}"


_MANAGE_PARSER = """
import argparse, json
import django
from django.conf import settings
settings.configure(INSTALLED_APPS=["flymy_receiver.django"], DATABASES={})
django.setup()
from flymy_receiver.django.management.commands.flymy_journal import Command
parser = Command().create_parser("manage.py", "flymy_journal")
found = {}
for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
        for name, sub in action.choices.items():
            found[name] = sorted(
                o for a in sub._actions for o in a.option_strings
                if o.startswith("--") and o != "--help"
            )
print(json.dumps(found))
"""


def test_every_management_subcommand_and_option_is_named() -> None:
    require("django")
    result = subprocess.run(
        [PYTHON, "-c", _MANAGE_PARSER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    subcommands = json.loads(result.stdout)
    assert {"list", "show", "replay", "resolve", "resend", "sweep", "refusals"} <= set(subcommands)
    section = PAGE.read_text().split("## `manage.py flymy_journal`", 1)[1]
    missing = [
        f"{name} {option}"
        for name, options in subcommands.items()
        for option in [f"flymy_journal {name}", *options]
        if option not in section
    ]
    assert not missing, f"manage.py flymy_journal names not on {PAGE.name}: {missing}"


def test_the_table_columns_on_the_page_are_the_printed_ones() -> None:
    from flymy_receiver import tables

    text = PAGE.read_text()
    for columns in (tables.ENTRY_COLUMNS, tables.REFUSAL_COLUMNS):
        assert ", ".join(f"`{c}`" for c in columns) in text, columns
