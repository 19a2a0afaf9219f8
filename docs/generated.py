"""Pages generated from the code at every docs build (written to docs/_generated/).

- ``configuration.rst``: every layer's settings (:func:`groupcomm.config.reference.reference_rst`);
- ``cli.rst``: the ``groupcomm`` command, from its argparse parser (``groupcomm.cli.build_parser``);
- ``transitions.rst`` / ``transitions.dot``: the ring's membership transition table.

``docs/conf.py`` calls :func:`write_all` when the builder starts.
"""

from __future__ import annotations

import argparse
import os


def write_all(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    pages = {
        "configuration.rst": configuration_rst(),
        "cli.rst": cli_rst(),
        "transitions.rst": transitions_rst(),
        "transitions.dot": transitions_dot(),
    }
    for name, text in pages.items():
        path = os.path.join(out_dir, name)
        # Rewrite only on change, so Sphinx does not rebuild every page each time.
        try:
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except FileNotFoundError:
            pass
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


# --------------------------------------------------------------------------- configuration


def configuration_rst() -> str:
    from groupcomm.config.reference import reference_rst

    return reference_rst()


# --------------------------------------------------------------------------- ring transitions


def transitions_rst() -> str:
    from groupcomm.core.ring import transition_table

    lines = [".. list-table::", "   :header-rows: 1", "", "   * - state", "     - input", "     - next"]
    for state, inp, action in transition_table():
        lines += [f"   * - {state}", f"     - {inp}", f"     - {action}"]
    return "\n".join(lines) + "\n"


def transitions_dot() -> str:
    from groupcomm.core.ring import transition_table

    lines = ["digraph membership {", "  rankdir=LR;"]
    for state, inp, action in transition_table():
        lines.append(f'  "{state}" -> "{action.split(" ")[0]}" [label="{inp}"];')
    return "\n".join(lines) + "\n}\n"


# --------------------------------------------------------------------------- command line


def cli_rst() -> str:
    from groupcomm.cli import build_parser

    # argparse wraps usage lines to the terminal's width; fix it so every build writes the same page.
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        return parser_rst(build_parser())
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command, in the order they were added.

    argparse has no public way to list sub-commands or arguments; ``_actions``
    (stable since Python 3.2) is what every argparse documentation tool reads.
    """
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name) or "", sub))
    return found


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]


def _signature(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    if action.metavar is not None:
        arg = action.metavar
    elif action.choices is not None:
        arg = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        arg = action.dest.upper()
    return ", ".join(f"{opt} {arg}" for opt in action.option_strings)


def _describe(action: argparse.Action) -> str:
    text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
    text = text[0].upper() + text[1:] if text else ""
    notes = []
    if action.required:
        notes.append("required")
    has_default = action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS)
    if has_default and "default" not in text:
        notes.append(f"default: ``{action.default}``")
    if notes:
        text = (text.rstrip(".") + " (" + ", ".join(notes) + ")") if text else "(" + ", ".join(notes) + ")"
    return text or "\\ "


_HEADINGS = "~^\""
"""Title underlines of sub-command sections, by depth (``groupcomm key``, then ``groupcomm key add``, ...)."""


def parser_rst(parser: argparse.ArgumentParser) -> str:
    """The reference of a parser and its sub-commands, with Sphinx ``program`` / ``option`` directives.

    Sub-commands with sub-commands of their own (``groupcomm bundle install``)
    get sections one level down, under their parent's."""
    prog = parser.prog
    lines = []
    if parser.description:
        lines += [parser.description, ""]
    lines += [f".. program:: {prog}", "", "::", ""]
    lines += ["   " + line for line in parser.format_usage().strip().splitlines()]
    lines.append("")
    for action in _options(parser):
        lines += [f".. option:: {_signature(action)}", "", "   " + _describe(action), ""]
    lines += _epilog(parser)
    for name, help_text, sub in _subcommands(parser):
        lines += _command_rst(f"{prog} {name}", help_text, sub, 0)
    return "\n".join(lines)


def _command_rst(title: str, help_text: str, parser: argparse.ArgumentParser, depth: int) -> list[str]:
    """The section of one sub-command ``title``, then those of its own sub-commands."""
    if depth >= len(_HEADINGS):
        raise ValueError(f"{title}: sub-commands nested deeper than {len(_HEADINGS)} levels")
    lines = [title, _HEADINGS[depth] * len(title), ""]
    sentence = help_text[0].upper() + help_text[1:] + ("" if help_text.endswith(".") else ".") if help_text else ""
    if sentence:
        lines += [sentence, ""]
    if parser.description and parser.description not in (help_text, sentence):
        lines += [parser.description, ""]
    lines += [f".. program:: {title}", "", "::", ""]
    lines += ["   " + line for line in parser.format_usage().strip().splitlines()]
    lines.append("")
    for action in _options(parser):
        lines += [f".. option:: {_signature(action)}", "", "   " + _describe(action), ""]
    lines += _epilog(parser)
    for name, sub_help, sub in _subcommands(parser):
        lines += _command_rst(f"{title} {name}", sub_help, sub, depth + 1)
    return lines


def _epilog(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's epilog (examples, exit statuses), kept as preformatted text."""
    if not parser.epilog:
        return []
    return ["::", "", *("   " + line if line.strip() else "" for line in parser.epilog.strip("\n").splitlines()), ""]
