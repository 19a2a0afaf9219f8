"""The generated command-line reference (docs/generated.py) documents nested sub-commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def generated(monkeypatch):
    monkeypatch.syspath_prepend(str(DOCS))
    import generated as module
    yield module
    sys.modules.pop("generated", None)


def test_verbs_of_a_command_get_their_own_section_with_their_options(generated):
    text = generated.cli_rst()
    for title in ("groupcomm bundle install", "groupcomm plan apply", "groupcomm cluster history",
                  "groupcomm key add"):
        assert f"\n{title}\n{'^' * len(title)}\n" in text, f"no section for {title!r}"
        assert f".. program:: {title}\n" in text
    install = text[text.index("\ngroupcomm bundle install\n"):text.index("\ngroupcomm bundle start\n")]
    assert ".. option:: --start" in install and ".. option:: --group G" in install
    assert "\ngroupcomm bundle\n~~~~~~~~~~~~~~~~\n" in text           # the command itself one level up


def test_a_third_level_is_documented_and_a_help_sentence_is_not_repeated(generated):
    parser = argparse.ArgumentParser(prog="tool")
    outer = parser.add_subparsers().add_parser("outer", help="outer things", description="Outer things.")
    inner = outer.add_subparsers().add_parser("inner", help="inner things")
    inner.add_subparsers().add_parser("leaf", help="the leaf").add_argument("--deep", help="deep option")
    text = generated.parser_rst(parser)
    assert "\ntool outer inner leaf\n" + '"' * len("tool outer inner leaf") + "\n" in text
    assert ".. option:: --deep" in text
    assert text.count("Outer things.") == 1
