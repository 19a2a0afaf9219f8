"""Protocol stacks as TOML files, JGroups-style.

A stack is a list of layers, bottom (the transport) first::

    # comment
    description = "UDP multicast with a Totem ring"   # optional

    [[layer]]
    name = "UDP"
    mcast_port = "${GROUPCOMM_MCAST_PORT:45588}"
    bind_addr = "127.0.0.1"
    recv_buffer = "4MiB"

    [[layer]]
    name = "TOTEM"
    token_timeout = "1s"
    join = "50ms"

The stacks that ship with groupcomm live in the top-level ``protocols/``
directory of the source tree, installed as the package ``groupcomm.protocols``;
:func:`load_stack` finds them by name (``"udp"`` is ``protocols/udp.toml``) or
takes a path to any other file.

Loading is two steps.  :func:`load_stack` checks the shape of the file,
substitutes ``${NAME:default}`` environment references inside strings and
applies programmatic overrides, giving a :class:`StackSpec` of raw
:class:`LayerSpec` settings.  :func:`build_config` then turns one layer's
settings into the layer's frozen config dataclass, converting each value by the
field's annotation (:class:`Duration` and :class:`Size` fields accept ``"50ms"``
and ``"4MiB"``).  Every mistake is a :class:`~groupcomm.errors.ConfigError`
naming the file, the layer and the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.resources
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupcomm.config.units import Duration, Size, config_error, parse_duration, parse_size, suggest_key
from groupcomm.errors import ConfigError

__all__ = [
    "Duration",
    "LayerSpec",
    "Size",
    "StackSpec",
    "build_config",
    "describe",
    "find_stack",
    "load_stack",
    "parse_duration",
    "parse_size",
    "stack_names",
    "substitute_env",
]

_PACKAGE = "groupcomm.protocols"


# --------------------------------------------------------------------------- environment

# "$${" (escape), "${...}" (reference), or a "${" that never closes.
_ENV_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def substitute_env(value: str, *, where: str = "", environ: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` and ``${NAME:default}`` with environment variables.

    References may appear anywhere in the string, several times.  A variable
    that is set (even to the empty string) wins over the default; one that is
    unset and has no default is a :class:`ConfigError` naming it and ``where``.
    ``$${`` is a literal ``${``.  Substituted text is not scanned again, and
    defaults cannot contain references.  ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ

    def replace(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "$${":
            return "${"
        inner = m.group(1)
        if inner is None:
            raise config_error(where, "unterminated '${' (write '$${' for a literal '${')", value)
        name, colon, default = inner.partition(":")
        if not _ENV_NAME.fullmatch(name):
            raise config_error(where, f"invalid environment variable name {name!r} in {token!r}", value)
        if "${" in default:
            raise config_error(where, f"nested '${{' in the default of {token!r} is not supported", value)
        if name in env:
            return env[name]
        if colon:
            return default
        raise config_error(
            where,
            f"environment variable {name!r} is not set and has no default (write '${{{name}:default}}' to give one)",
        )

    return _ENV_TOKEN.sub(replace, value)


def _substitute_value(value: Any, where: str, environ: Mapping[str, str] | None) -> Any:
    """Substitute inside strings (also in arrays and inline tables); freeze containers."""
    if isinstance(value, str):
        return substitute_env(value, where=where, environ=environ)
    if isinstance(value, list):
        return tuple(_substitute_value(v, f"{where}[{i}]", environ) for i, v in enumerate(value))
    if isinstance(value, dict):
        return types.MappingProxyType(
            {k: _substitute_value(v, f"{where}.{k}", environ) for k, v in value.items()}
        )
    return value  # int, float, bool, dates: as TOML gave them


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class LayerSpec:
    """One ``[[layer]]`` of a stack: its name and settings after env substitution.

    ``index`` counts from 0 at the bottom of the stack.  ``settings`` is a
    read-only mapping of the layer's keys (everything but ``name``); TOML
    arrays become tuples.
    """

    name: str
    settings: Mapping[str, Any]
    source: str
    index: int


@dataclass(frozen=True)
class StackSpec:
    """A whole stack, layers bottom to top; ``source`` is a path or ``<stack 'name'>``."""

    name: str
    source: str
    layers: tuple[LayerSpec, ...]
    description: str = ""

    def layer(self, name: str) -> LayerSpec:
        """The layer called ``name``; ConfigError if the stack has none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ConfigError(f"{self.source}: no layer {name!r} (layers: {', '.join(self.names) or 'none'})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)


# --------------------------------------------------------------------------- finding stacks


def _shipped_root():
    """The directory (a Traversable) of the shipped stacks, or None.

    Normally the ``groupcomm.protocols`` package.  A source checkout whose
    editable install predates that package falls back to ``<checkout>/protocols``.
    """
    try:
        return importlib.resources.files(_PACKAGE)
    except ModuleNotFoundError as e:
        if e.name not in (_PACKAGE, "groupcomm"):
            raise
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "protocols").is_dir():
        return checkout / "protocols"
    return None


def stack_names() -> list[str]:
    """Names of the stacks shipped in the package (``*.toml`` in ``protocols``), sorted."""
    root = _shipped_root()
    if root is None:
        return []
    return sorted(
        entry.name[: -len(".toml")]
        for entry in root.iterdir()
        if entry.name.endswith(".toml") and len(entry.name) > len(".toml") and entry.is_file()
    )


def _is_bare_name(name: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(s in name for s in seps) and not name.endswith(".toml")


def find_stack(name_or_path: str | os.PathLike[str]) -> tuple[str, str]:
    """Locate a stack; returns ``(display source, TOML text)``.

    A bare name (a string with no ``/`` and not ending in ``.toml``) is a
    shipped stack, shown as ``<stack 'udp'>``; anything else is a file path.
    """
    if isinstance(name_or_path, str) and _is_bare_name(name_or_path):
        name = name_or_path
        available = stack_names()
        if name not in available:
            hint = ""
            close = difflib.get_close_matches(name, available, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            listing = ", ".join(available) if available else "none are installed"
            raise ConfigError(
                f"unknown protocol stack {name!r}{hint}; available stacks: {listing} "
                f"(give a path, e.g. './{name}.toml', to load another file)"
            )
        root = _shipped_root()
        assert root is not None
        try:
            text = root.joinpath(f"{name}.toml").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"<stack {name!r}>: not UTF-8 text: {e}") from None
        return f"<stack {name!r}>", text

    path = os.fspath(name_or_path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such stack file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read stack file: {e.strerror or e}") from None
    try:
        return path, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None


# --------------------------------------------------------------------------- loading

_LAYER_NAME = re.compile(r"[A-Z0-9_]+")
_LAYER_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*(?:layer|\"layer\"|'layer')[ \t]*\]\]", re.MULTILINE)
_TOP_LEVEL_KEYS = ("description", "layer")
_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    return suggest_key(key, known)


def load_stack(
    name_or_path: str | os.PathLike[str],
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> StackSpec:
    """Read, check and resolve a stack (see :func:`find_stack` for ``name_or_path``).

    Strings in layer settings get :func:`substitute_env` (from ``environ``,
    default ``os.environ``).  ``overrides`` such as
    ``{"TOTEM": {"token_timeout": "300ms"}}`` then replace or add settings of
    the named layers; override values are taken as given (no substitution).
    """
    source, text = find_stack(name_or_path)
    if isinstance(name_or_path, str) and _is_bare_name(name_or_path):
        stack_name = name_or_path
    else:
        stack_name = Path(os.fspath(name_or_path)).stem
    return _load_text(stack_name, source, text, overrides=overrides, environ=environ)


def _load_text(
    stack_name: str,
    source: str,
    text: str,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None,
    environ: Mapping[str, str] | None,
) -> StackSpec:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        pos = _TOML_POSITION.search(message)
        if pos:
            bare = _TOML_POSITION.sub("", message).strip()
            raise ConfigError(f"{source}:{pos[1]}:{pos[2]}: invalid TOML at line {pos[1]}, column {pos[2]}: {bare}") from None
        if "(at end of document)" in message:
            last = max(1, len(text.splitlines()))
            bare = message.replace("(at end of document)", "").strip()
            raise ConfigError(f"{source}:{last}: invalid TOML at the end of the document (line {last}): {bare}") from None
        raise ConfigError(f"{source}: invalid TOML: {message}") from None

    for key in doc:
        if key not in _TOP_LEVEL_KEYS:
            raise ConfigError(
                f"{source}: unknown top-level key {key!r}{_suggest(key, _TOP_LEVEL_KEYS)}; "
                "layer settings go inside a [[layer]] table"
            )
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise config_error(source, "'description' must be a string", description)
    if "layer" not in doc:
        raise ConfigError(f"{source}: no [[layer]] tables: a stack lists its layers bottom to top")
    raw_layers = doc["layer"]
    if not isinstance(raw_layers, list) or not all(isinstance(t, dict) for t in raw_layers):
        raise ConfigError(f"{source}: 'layer' must be an array of tables, written as [[layer]] sections")
    if not raw_layers:
        raise ConfigError(f"{source}: the stack has no layers (empty 'layer' array)")

    # Where each [[layer]] header is, for messages (only if the file uses headers throughout).
    header_lines = [text.count("\n", 0, m.start()) + 1 for m in _LAYER_HEADER.finditer(text)]
    if len(header_lines) != len(raw_layers):
        header_lines = []

    def at(i: int) -> str:
        return f"{source}:{header_lines[i]}" if header_lines else source

    layers: list[LayerSpec] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(raw_layers):
        if "name" not in table:
            raise ConfigError(f"{at(i)}: [[layer]] number {i + 1} has no 'name'")
        name = table["name"]
        if not isinstance(name, str):
            raise config_error(at(i), f"[[layer]] number {i + 1}: 'name' must be a string", name)
        if not _LAYER_NAME.fullmatch(name):
            raise config_error(
                at(i),
                f"[[layer]] number {i + 1}: invalid layer name {name!r}: "
                "use upper-case letters, digits and '_' (like 'UDP' or 'TOTEM')",
            )
        if name in seen:
            raise ConfigError(
                f"{at(i)}: duplicate layer {name!r} ([[layer]] number {seen[name] + 1} and {i + 1})"
            )
        seen[name] = i
        settings = {
            key: _substitute_value(value, f"{source}: layer {name}: key {key!r}", environ)
            for key, value in table.items()
            if key != "name"
        }
        layers.append(LayerSpec(name=name, settings=settings, source=source, index=i))

    if overrides:
        by_name = {layer.name: layer for layer in layers}
        for layer_name, changes in overrides.items():
            if layer_name not in by_name:
                close = difflib.get_close_matches(str(layer_name), list(by_name), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(
                    f"{source}: override for unknown layer {layer_name!r}{hint}; "
                    f"the stack has {', '.join(by_name)}"
                )
            if not isinstance(changes, Mapping):
                raise config_error(f"{source}: override for layer {layer_name}", "expected a mapping of settings", changes)
            for key in changes:
                if not isinstance(key, str) or key == "name":
                    raise config_error(f"{source}: override for layer {layer_name}", "invalid setting name", key)
            layer = by_name[layer_name]
            by_name[layer_name] = dataclasses.replace(layer, settings={**layer.settings, **changes})
        layers = [by_name[layer.name] for layer in layers]

    frozen = tuple(dataclasses.replace(layer, settings=types.MappingProxyType(dict(layer.settings))) for layer in layers)
    return StackSpec(name=stack_name, source=source, layers=frozen, description=description)


# --------------------------------------------------------------------------- building configs

_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_INT = re.compile(r"[+-]?\d+")
_NONE_TYPE = type(None)


def _type_name(hint: Any) -> str:
    if hint is Duration:
        return "a duration"
    if hint is Size:
        return "a size"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    return getattr(hint, "__name__", None) or str(hint)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` converted to the annotation ``hint``; ConfigError (prefixed ``where``) if it cannot be."""
    origin = typing.get_origin(hint)

    if hint is Any or hint is object:
        return value

    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if _NONE_TYPE in args and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))):
            return None
        options = [a for a in args if a is not _NONE_TYPE]
        if len(options) == 1:
            return _coerce(options[0], value, where)
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        expected = " or ".join(_type_name(o) for o in options)
        raise config_error(where, f"expected {expected}" + (" or 'none'" if _NONE_TYPE in args else ""), value)

    if value is None:
        raise config_error(where, f"expected {_type_name(hint)}, not None", value)

    if origin is typing.Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if type(choice) is type(value) and choice == value:
                return choice
        raise config_error(where, f"expected one of {', '.join(repr(c) for c in choices)}", value)

    if hint is tuple or origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            items: tuple[Any, ...] = tuple(part.strip() for part in value.split(",") if part.strip())
        elif isinstance(value, (list, tuple)):
            items = tuple(value)
        else:
            raise config_error(where, "expected an array or a comma-separated string", value)
        if not args:
            return items
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], item, f"{where}: item {i}") for i, item in enumerate(items))
        if args == ((),):  # tuple[()]
            args = ()
        if len(items) != len(args):
            raise config_error(where, f"expected {len(args)} items, not {len(items)}", value)
        return tuple(_coerce(a, item, f"{where}: item {i}") for i, (a, item) in enumerate(zip(args, items)))

    if hint is dict or origin is dict:
        # A TOML table ({ 1 = 2, 7 = 1 } or a [layer.key] section); keys arrive as
        # strings and are converted by the key type like any value.
        if not isinstance(value, Mapping):
            raise config_error(where, "expected a table (e.g. { 1 = 2, 3 = 1 })", value)
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {
            _coerce(key_hint, k, f"{where}: key {k!r}"): _coerce(value_hint, v, f"{where}: value of {k!r}")
            for k, v in value.items()
        }

    if hint is Duration:
        return Duration(parse_duration(value, where=where))
    if hint is Size:
        return Size(parse_size(value, where=where))

    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise config_error(where, "expected a boolean (true/false, yes/no, 1/0)", value)

    if hint is int:
        if isinstance(value, bool):
            raise config_error(where, "expected an integer, not a boolean", value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            try:
                return int(value.strip())
            except ValueError:  # beyond int()'s digit limit
                raise config_error(where, "integer is too large", value) from None
        raise config_error(where, "expected an integer", value)

    if hint is float:
        if isinstance(value, bool):
            raise config_error(where, "expected a number, not a boolean", value)
        if isinstance(value, (int, float)):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise config_error(where, "expected a number", value) from None
        else:
            raise config_error(where, "expected a number", value)
        try:
            result = float(number)
        except OverflowError:
            raise config_error(where, "number is too large", value) from None
        if not math.isfinite(result):
            raise config_error(where, "expected a finite number", value)
        return result

    if hint is str:
        if isinstance(value, str):
            return value
        raise config_error(where, "expected a string", value)

    raise TypeError(f"build_config: {where}: unsupported field annotation {hint!r}")


def build_config(cls: type, layer: LayerSpec) -> Any:
    """An instance of the frozen dataclass ``cls`` from ``layer``'s settings.

    Each setting must be an init field of ``cls`` (a misspelt key gets a
    suggestion) and is converted by the field's annotation: :class:`Duration`,
    :class:`Size`, ``int``, ``float``, ``bool``, ``str``, ``tuple[X, ...]``
    (an array or a comma-separated string), ``dict[K, V]`` (a table), ``Literal[...]``, ``X | None``
    (``"none"`` or ``""`` give None) and ``Any``.  Fields not set keep their
    defaults.  Errors from the dataclass's ``__post_init__`` (ValueError or
    TypeError) come back as ConfigError naming the source and layer.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"build_config: {cls!r} is not a dataclass")
    prefix = f"{layer.source}: layer {layer.name}"
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)

    values: dict[str, Any] = {}
    for key, raw in layer.settings.items():
        if key not in fields:
            raise ConfigError(f"{prefix}: unknown key {key!r}{_suggest(key, fields)}")
        values[key] = _coerce(hints.get(key, Any), raw, f"{prefix}: key {key!r}")

    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")

    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


# --------------------------------------------------------------------------- describe

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(float(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return _toml_string(str(value))


def describe(spec: StackSpec) -> str:
    """A readable, TOML-like dump of the effective stack (after substitution and overrides).

    The result parses back with ``tomllib`` to the same settings (values of
    types TOML lacks are written as strings).
    """
    one_line = lambda s: s.replace("\n", " ").replace("\r", " ")  # noqa: E731
    lines = [f"# stack {spec.name!r} from {one_line(spec.source)}: {' / '.join(spec.names) or 'no layers'} (bottom to top)"]
    if spec.description:
        lines.append(f"description = {_toml_string(spec.description)}")
    for layer in spec.layers:
        lines.append("")
        lines.append(f"[[layer]]  # {layer.index}")
        lines.append(f"name = {_toml_string(layer.name)}")
        for key, value in layer.settings.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
