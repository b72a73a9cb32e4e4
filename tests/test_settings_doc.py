"""docs/configuration.md is generated from `service.settings.Settings` and must not drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from osdface.cli import build_parser
from osdface.settings_doc import COMMAND, render
from service.settings import Settings

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
PREFIX = Settings.model_config["env_prefix"]


def page_rows() -> dict[str, list[str]]:
    """{variable: [flag, values, default, meaning]} from the page's table."""
    found = {}
    for line in PAGE.read_text().splitlines():
        m = re.match(r"\| `(" + PREFIX + r"\w+)` \|", line)
        if m:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            found[m.group(1)] = cells[1:]
    return found


def test_page_is_what_the_generator_writes() -> None:
    assert PAGE.read_text() == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_page_lists_every_setting_once() -> None:
    expected = {PREFIX + name.upper() for name in Settings.model_fields}
    assert set(page_rows()) == expected


@pytest.mark.parametrize("variable", sorted(page_rows()))
def test_page_default_read_back_through_the_environment_is_the_class_default(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Independent of the renderer: the page's default, set as the variable, changes nothing."""
    default = page_rows()[variable][2]
    if default == "unset":
        field = Settings.model_fields[variable.removeprefix(PREFIX).lower()]
        assert field.get_default() is None
        return
    monkeypatch.setenv(variable, default.strip("`"))
    assert Settings() == Settings.model_construct(), f"{variable}: page says {default}"


def test_flags_on_the_page_are_serve_flags() -> None:
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    flags = {row[0].strip("`") for row in page_rows().values() if row[0]}
    assert flags, "the serve flags were not found"
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", serve_help), flag
