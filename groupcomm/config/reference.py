"""The configuration reference, generated from the settings each layer declares.

Every stack-file layer name in :data:`~groupcomm.config.registry.LAYERS` maps
to a frozen settings dataclass declared next to the layer's code.  This module
reads those classes -- field names, annotations, defaults, and the attribute
docstrings written under each field -- and renders them as
reStructuredText, so the documentation cannot drift from the code
(``docs/conf.py`` writes :func:`reference_rst` to
``docs/_generated/configuration.rst`` at every build).

A field whose default is ``None`` is derived from other settings; its
docstring says how, as ``(default ``expression``)``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

from groupcomm.config.registry import LAYERS, layer_settings
from groupcomm.config.units import Duration, Size

__all__ = ["LayerReference", "Setting", "attribute_docstrings", "layer_reference", "reference_rst", "references"]

_DERIVED = re.compile(r"\(default ``(?P<expr>.+?)``\)")
_NONE_TYPE = type(None)


@dataclass(frozen=True)
class Setting:
    """One key of a layer, as a stack file writes it."""

    name: str
    type: str
    """What the value is, in words (``"duration"``, ``"integer"``, ``one of "trio", "c"`` ...)."""
    unit: str
    """``"seconds"`` for durations, ``"bytes"`` for sizes, else empty."""
    default: str
    """The default in stack-file syntax, or how it is derived (``derived: token_timeout / 4.2``)."""
    meaning: str
    """The field's attribute docstring, on one line."""


@dataclass(frozen=True)
class LayerReference:
    """A stack-file layer: its name, its settings class and every key it takes."""

    name: str
    settings_class: type
    summary: str
    """The settings class's docstring."""
    settings: tuple[Setting, ...]


def attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the string literals written right under annotated fields of ``cls``.

    Python keeps no attribute docstrings at run time, so the class source is
    parsed: a string expression statement that directly follows an annotated
    assignment documents that assignment's name.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _type_words(hint: Any) -> tuple[str, str]:
    """(type in words, unit) of an annotation, as the loader converts it."""
    origin = typing.get_origin(hint)
    if hint is Duration:
        return "duration", "seconds"
    if hint is Size:
        return "size", "bytes"
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in typing.get_args(hint) if a is not _NONE_TYPE]
        words = " or ".join(_type_words(o)[0] for o in options)
        units = {_type_words(o)[1] for o in options} - {""}
        derived = ' or ``"none"`` (derived)' if _NONE_TYPE in typing.get_args(hint) else ""
        return words + derived, "/".join(sorted(units))
    if origin is typing.Literal:
        return "one of " + ", ".join(f"``{_toml(c)}``" for c in typing.get_args(hint)), ""
    if hint is tuple or origin is tuple:
        args = typing.get_args(hint)
        item = _type_words(args[0])[0] if len(args) == 2 and args[1] is Ellipsis else "value"
        return f"list of {item}s", ""
    if hint is dict or origin is dict:
        args = typing.get_args(hint) or (Any, Any)
        return f"table of {_type_words(args[0])[0]} to {_type_words(args[1])[0]}", ""
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(hint, getattr(hint, "__name__", str(hint))), ""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _duration_text(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1000), ("us", 1_000_000)):
        amount = seconds * scale
        if abs(amount - round(amount)) < 1e-9 and (round(amount) >= 1 or unit == "us"):
            return f'"{round(amount)}{unit}"'
    return repr(seconds)


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f'"{size // scale}{unit}"'
    return str(size)


def _default_text(field: dataclasses.Field, hint: Any, doc: str) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        derived = _DERIVED.search(doc)
        return f"derived: ``{derived['expr']}``" if derived else "none"
    if hint is Duration or (Duration in typing.get_args(hint) and isinstance(value, (int, float))):
        return f"``{_duration_text(value)}``"
    if hint is Size or (Size in typing.get_args(hint) and isinstance(value, int)):
        return f"``{_size_text(value)}``"
    return f"``{_toml(value)}``"


def layer_reference(name: str) -> LayerReference:
    """The reference of the layer ``name`` of :data:`~groupcomm.config.registry.LAYERS`."""
    cls = layer_settings(name)
    docs = attribute_docstrings(cls)
    hints = typing.get_type_hints(cls)
    settings = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        doc = docs.get(field.name, "")
        kind, unit = _type_words(hints.get(field.name, Any))
        settings.append(Setting(
            name=field.name,
            type=kind,
            unit=unit,
            default=_default_text(field, hints.get(field.name), " ".join(doc.split())),
            meaning=" ".join(doc.split()),
        ))
    return LayerReference(name, cls, inspect.cleandoc(cls.__doc__ or ""), tuple(settings))


def references() -> list[LayerReference]:
    """Every registered layer, in stack order (transports first)."""
    return [layer_reference(name) for name in LAYERS]


def _cell(text: str) -> str:
    return text if text else "\\ "          # an empty list-table cell needs content


def reference_rst() -> str:
    """The configuration reference as reStructuredText: one section per layer, a table of its keys."""
    lines: list[str] = []
    for layer in references():
        title = f"{layer.name}"
        lines += [title, "~" * len(title), ""]
        cls = layer.settings_class
        summary = layer.summary or "(no description)"
        lines += [summary, "", f"Declared by :class:`{cls.__module__}.{cls.__qualname__}`.", ""]
        if not layer.settings:
            lines += ["This layer takes no settings.", ""]
            continue
        lines += [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 18 22 14 12 34",
            "",
            "   * - key",
            "     - type",
            "     - default",
            "     - unit",
            "     - meaning",
        ]
        for s in layer.settings:
            lines += [
                f"   * - ``{s.name}``",
                f"     - {_cell(s.type)}",
                f"     - {_cell(s.default)}",
                f"     - {_cell(s.unit)}",
                f"     - {_cell(s.meaning)}",
            ]
        lines.append("")
    return "\n".join(lines)
