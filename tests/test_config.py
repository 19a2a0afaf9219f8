"""Protocol-stack files: durations, sizes, ``${ENV}``, loading, overrides, building configs.

Everything here is pure Python (no sockets, no C core, no clocks).  Stack files
are written to ``tmp_path``; the shipped-stack lookup is pointed at a temporary
directory where a test needs particular shipped stacks, and the real
``protocols/`` directory is only checked for consistency (it may be empty).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import math
import pickle
import re
import tomllib
import types
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest
from hypothesis import given
from hypothesis import strategies as st

import groupcomm.config.loader as config
from groupcomm.config import (
    Duration,
    LayerSpec,
    Size,
    StackSpec,
    build_config,
    describe,
    find_stack,
    load_stack,
    parse_duration,
    parse_size,
    stack_names,
    substitute_env,
)
from groupcomm.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PROTOCOLS = REPO / "protocols"

EXAMPLE = """\
# comment
[[layer]]
name = "UDP"
mcast_port = "${GROUPCOMM_MCAST_PORT:45588}"
bind_addr = "127.0.0.1"
recv_buffer = "4MiB"

[[layer]]
name = "TOTEM"
token_timeout = "1s"
join = "50ms"
"""


def write(tmp_path: Path, text: str, name: str = "stack.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("300ms", 0.3),
        ("1s", 1.0),
        ("2.5s", 2.5),
        ("1m", 60.0),
        ("1min", 60.0),
        ("250us", 0.00025),
        ("250\u00b5s", 0.00025),
        ("100ns", 1e-7),
        ("1h", 3600.0),
        ("1 s", 1.0),
        ("  50 ms  ", 0.05),
        ("3sec", 3.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("0s", 0.0),
        ("-0s", 0.0),
        ("+2s", 2.0),
        ("10", 10.0),
        ("0.1", 0.1),
        (3, 3.0),
        (0, 0.0),
        (0.25, 0.25),
        (-0.0, 0.0),
    ],
)
def test_parse_duration_valid(text, seconds):
    value = parse_duration(text)
    assert type(value) is float
    assert value == seconds
    assert math.copysign(1.0, value) == 1.0  # never -0.0


@pytest.mark.parametrize(
    "value, problem",
    [
        ("-1s", "cannot be negative"),
        ("-0.5", "cannot be negative"),
        (-1, "cannot be negative"),
        (-0.001, "cannot be negative"),
        ("nan", "finite"),
        ("NaN", "finite"),
        ("inf", "finite"),
        ("-inf", "finite"),
        (float("nan"), "NaN"),
        (float("inf"), "finite"),
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("1x", "unknown duration unit 'x'"),
        ("1M", "unknown duration unit 'M'"),  # case-sensitive: not guessed as minutes
        ("5 days", "unknown duration unit 'days'"),
        ("s", "invalid duration"),
        ("1s2", "invalid duration"),
        ("1m30s", "invalid duration"),
        ("1e3s", "invalid duration"),
        ("1,5s", "invalid duration"),
        ("1.2.3s", "invalid duration"),
        ("1" + "0" * 400 + "h", "too large"),
        (10**400, "too large"),
        (True, "boolean"),
        (None, "NoneType"),
        ([1], "list"),
    ],
)
def test_parse_duration_invalid(value, problem):
    message = config_error(parse_duration, value, where="f.toml: layer TOTEM: key 'join'")
    assert message.startswith("f.toml: layer TOTEM: key 'join': ")
    assert problem in message
    assert message.endswith(f"(got {value!r})")


def test_parse_duration_without_where_has_no_prefix():
    assert config_error(parse_duration, "soon") == (
        "invalid duration: expected a number and a unit such as '500ms' or '1s' (got 'soon')"
    )


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(["ns", "us", "ms", "s", "m", "h"]))
def test_parse_duration_is_exact_decimal(n, unit):
    factor = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600}
    assert parse_duration(f"{n}{unit}") == float(Fraction(n) * factor[unit])


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("64KiB", 64 * 1024),
        ("1MiB", 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("60K", 60_000),
        ("60KB", 60_000),
        ("60kb", 60_000),
        ("1M", 1_000_000),
        ("1G", 1_000_000_000),
        ("4Mi", 4 * 1024**2),
        ("4mib", 4 * 1024**2),
        ("4MIB", 4 * 1024**2),
        ("1.5KiB", 1536),
        ("1.5GB", 1_500_000_000),
        ("0.5K", 500),
        ("100B", 100),
        ("100b", 100),
        ("100", 100),
        (" 8 KiB ", 8192),
        ("0", 0),
        (65536, 65536),
        (0, 0),
        (4096.0, 4096),
    ],
)
def test_parse_size_valid(text, nbytes):
    value = parse_size(text)
    assert type(value) is int
    assert value == nbytes


@pytest.mark.parametrize(
    "value, problem",
    [
        ("-1", "cannot be negative"),
        ("-1KiB", "cannot be negative"),
        (-5, "cannot be negative"),
        (-1.0, "cannot be negative"),
        ("1.5", "whole number of bytes"),
        ("1.5B", "whole number of bytes"),
        ("0.0001K", "whole number of bytes"),
        ("1.0001KiB", "whole number of bytes"),
        (1.5, "whole number of bytes"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("1XB", "unknown size unit 'XB'"),
        ("1KB/s", "unknown size unit 'KB/s'"),
        ("1 kilobyte", "unknown size unit 'kilobyte'"),
        ("1Kib2", "invalid size"),
        ("KiB", "invalid size"),
        ("1e6", "invalid size"),
        ("", "empty size"),
        ("  ", "empty size"),
        ("9" * 5000, "too large"),
        (True, "boolean"),
        (None, "NoneType"),
    ],
)
def test_parse_size_invalid(value, problem):
    message = config_error(parse_size, value, where="f.toml: layer UDP: key 'recv_buffer'")
    assert message.startswith("f.toml: layer UDP: key 'recv_buffer': ")
    assert problem in message
    assert message.endswith(f"(got {value!r})")


_SIZE_FACTORS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
                 "KiB": 1024, "Ki": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from(sorted(_SIZE_FACTORS)), st.booleans(), st.booleans())
def test_parse_size_units_any_case(n, unit, lower, space):
    text = f"{n}{' ' if space else ''}{unit.lower() if lower else unit}"
    assert parse_size(text) == n * _SIZE_FACTORS[unit]


def test_duration_and_size_types():
    d = Duration("50ms")
    assert isinstance(d, float) and isinstance(d, Duration) and d == 0.05
    assert Duration(2) == 2.0 and Duration() == 0.0
    s = Size("64KiB")
    assert isinstance(s, int) and isinstance(s, Size) and s == 65536
    assert Size(10) + 1 == 11
    assert pickle.loads(pickle.dumps(d)) == d and type(pickle.loads(pickle.dumps(s))) is Size
    with pytest.raises(ConfigError, match="negative"):
        Duration("-1s")
    with pytest.raises(ConfigError, match="whole number"):
        Size("0.5")


# --------------------------------------------------------------------------- environment substitution


@pytest.mark.parametrize(
    "text, environ, expected",
    [
        ("${PORT:45588}", {}, "45588"),
        ("${PORT:45588}", {"PORT": "5000"}, "5000"),
        ("${PORT:45588}", {"PORT": ""}, ""),  # set (even empty) wins over the default
        ("${PORT}", {"PORT": "7"}, "7"),
        ("${PORT:}", {}, ""),
        ("${ADDR:127.0.0.1:5000}", {}, "127.0.0.1:5000"),  # the default is everything after the first ':'
        ("udp://${HOST:localhost}:${PORT:1}/x", {"PORT": "99"}, "udp://localhost:99/x"),
        ("${A}${A}-${B:b}", {"A": "a"}, "aa-b"),
        ("$${PORT}", {"PORT": "7"}, "${PORT}"),
        ("$${PORT:1} and ${PORT}", {"PORT": "7"}, "${PORT:1} and 7"),
        ("cost: $5, $HOME, $$ and {braces}", {}, "cost: $5, $HOME, $$ and {braces}"),
        ("${A}", {"A": "${B}"}, "${B}"),  # substituted text is not scanned again
        ("plain", {}, "plain"),
        ("", {}, ""),
    ],
)
def test_substitute_env(text, environ, expected):
    assert substitute_env(text, environ=environ) == expected


def test_substitute_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("GROUPCOMM_TEST_CONFIG_VAR", "from-os")
    assert substitute_env("${GROUPCOMM_TEST_CONFIG_VAR:x}") == "from-os"
    monkeypatch.delenv("GROUPCOMM_TEST_CONFIG_VAR")
    assert substitute_env("${GROUPCOMM_TEST_CONFIG_VAR:x}") == "x"


def test_substitute_env_missing_variable_names_it_and_where():
    message = config_error(substitute_env, "a ${NOPE} b", where="s.toml: layer UDP: key 'x'", environ={})
    assert message.startswith("s.toml: layer UDP: key 'x': ")
    assert "'NOPE'" in message and "not set" in message and "${NOPE:default}" in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("${PORT", "unterminated"),
        ("x ${", "unterminated"),
        ("${}", "invalid environment variable name ''"),
        ("${1X}", "invalid environment variable name '1X'"),
        ("${A B}", "invalid environment variable name 'A B'"),
        ("${:5}", "invalid environment variable name ''"),
        ("${A:${B}}", "nested"),
    ],
)
def test_substitute_env_malformed(text, problem):
    message = config_error(substitute_env, text, where="w", environ={"A": "1", "B": "2"})
    assert message.startswith("w: ") and problem in message


@given(st.text().filter(lambda s: "$" not in s))
def test_substitute_env_leaves_text_without_dollar_alone(text):
    assert substitute_env(text, environ={}) == text


# --------------------------------------------------------------------------- load_stack


def test_load_example(tmp_path):
    path = write(tmp_path, EXAMPLE, "udp-example.toml")
    spec = load_stack(path, environ={})
    assert isinstance(spec, StackSpec)
    assert spec.name == "udp-example"
    assert spec.source == path
    assert spec.description == ""
    assert spec.names == ("UDP", "TOTEM")
    udp, totem = spec.layers
    assert udp == LayerSpec(
        name="UDP",
        settings={"mcast_port": "45588", "bind_addr": "127.0.0.1", "recv_buffer": "4MiB"},
        source=path,
        index=0,
    )
    assert (totem.name, totem.index, totem.source) == ("TOTEM", 1, path)
    assert dict(totem.settings) == {"token_timeout": "1s", "join": "50ms"}
    assert spec.layer("TOTEM") is totem
    assert "no layer 'FRAG'" in config_error(spec.layer, "FRAG")
    assert load_stack(path, environ={"GROUPCOMM_MCAST_PORT": "5000"}).layers[0].settings["mcast_port"] == "5000"


def test_load_accepts_pathlike_and_description(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "a test stack"\n[[layer]]\nname = "LOOP"\n')
    spec = load_stack(path)
    assert (spec.name, spec.source, spec.description) == ("mine", str(path), "a test stack")
    assert spec.layers[0].settings == {}


def test_settings_are_read_only(tmp_path):
    spec = load_stack(write(tmp_path, '[[layer]]\nname = "A"\nx = 1\nl = ["a", "b"]\n'))
    with pytest.raises(TypeError):
        spec.layers[0].settings["x"] = 2  # type: ignore[index]
    assert spec.layers[0].settings["l"] == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.layers[0].name = "B"  # type: ignore[misc]


def test_env_substitution_only_touches_strings(tmp_path):
    text = """\
[[layer]]
name = "UDP"
port = 45588
ratio = 0.5
enabled = true
when = 1979-05-27T07:32:00Z
peers = ["${P1:10.0.0.1}", "${P2}", "plain"]
literal = "$${NOT_A_VAR}"
nested = { host = "${HOST:h}", port = 1 }
"""
    spec = load_stack(write(tmp_path, text), environ={"P2": "10.0.0.2"})
    s = spec.layers[0].settings
    assert s["port"] == 45588 and type(s["port"]) is int
    assert s["ratio"] == 0.5 and type(s["ratio"]) is float
    assert s["enabled"] is True
    assert s["when"] == datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.timezone.utc)
    assert s["peers"] == ("10.0.0.1", "10.0.0.2", "plain")
    assert s["literal"] == "${NOT_A_VAR}"
    assert dict(s["nested"]) == {"host": "h", "port": 1}
    assert isinstance(s["nested"], types.MappingProxyType)


def test_missing_env_var_in_stack_names_source_layer_key_and_variable(tmp_path):
    path = write(tmp_path, '[[layer]]\nname = "UDP"\n[[layer]]\nname = "TOTEM"\npeers = ["a", "${PEER}"]\n')
    message = config_error(load_stack, path, environ={})
    assert message.startswith(f"{path}: layer TOTEM: key 'peers'[1]: ")
    assert "'PEER'" in message


def test_syntax_error_reports_file_and_line(tmp_path):
    path = write(tmp_path, '[[layer]]\nname = "UDP"\n\nport = = 5\n')
    message = config_error(load_stack, path)
    assert message.startswith(f"{path}:4:")
    assert "invalid TOML" in message and "line 4" in message


def test_syntax_error_at_end_of_document_reports_last_line(tmp_path):
    path = write(tmp_path, '[[layer]]\nname = "UDP"\nbind = "unterminated\n')
    message = config_error(load_stack, path)
    assert message.startswith(f"{path}:3:") and "line 3" in message and "invalid TOML" in message


def test_duplicate_toml_key_is_a_syntax_error(tmp_path):
    path = write(tmp_path, '[[layer]]\nname = "UDP"\nport = 1\nport = 2\n')
    assert "invalid TOML" in config_error(load_stack, path)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "no [[layer]] tables"),
        ("# only a comment\n", "no [[layer]] tables"),
        ('description = "nothing"\n', "no [[layer]] tables"),
        ("layer = []\n", "no layers"),
        ("layer = 5\n", "array of tables"),
        ("layer = [1, 2]\n", "array of tables"),
        ("[layer]\nname = 'UDP'\n", "array of tables"),
        ("description = 5\n[[layer]]\nname = 'UDP'\n", "'description' must be a string"),
        ("layers = []\n", "unknown top-level key 'layers' (did you mean 'layer'?)"),
        ("mtu = 1400\n[[layer]]\nname = 'UDP'\n", "unknown top-level key 'mtu' (known keys: description, layer)"),
        ("[totem]\ntoken_timeout = '1s'\n", "unknown top-level key 'totem'"),
    ],
)
def test_stack_shape_errors(tmp_path, text, problem):
    path = write(tmp_path, text)
    message = config_error(load_stack, path)
    assert message.startswith(f"{path}:")
    assert problem in message


@pytest.mark.parametrize(
    "name_line, problem",
    [
        ("", "[[layer]] number 2 has no 'name'"),
        ("name = 5", "[[layer]] number 2: 'name' must be a string (got 5)"),
        ("name = 'totem'", "invalid layer name 'totem'"),
        ("name = 'TO TEM'", "invalid layer name 'TO TEM'"),
        ("name = 'TOTEM-2'", "invalid layer name 'TOTEM-2'"),
        ("name = ''", "invalid layer name ''"),
        ("name = 'UDP'", "duplicate layer 'UDP' ([[layer]] number 1 and 2)"),
    ],
)
def test_layer_name_errors_point_at_the_layer(tmp_path, name_line, problem):
    text = f"[[layer]]\nname = 'UDP'\n\n[[layer]]\n{name_line}\nx = 1\n"
    path = write(tmp_path, text)
    message = config_error(load_stack, path)
    assert message.startswith(f"{path}:4: ")  # the line of the second [[layer]] header
    assert problem in message


def test_valid_layer_names(tmp_path):
    spec = load_stack(write(tmp_path, "[[layer]]\nname = 'UDP_2'\n[[layer]]\nname = 'PING9'\n[[layer]]\nname='X'\n"))
    assert spec.names == ("UDP_2", "PING9", "X")


def test_inline_layer_array_is_accepted_without_line_numbers(tmp_path):
    path = write(tmp_path, "layer = [{ name = 'UDP' }, { name = 'udp' }]\n")
    message = config_error(load_stack, path)
    assert message.startswith(f"{path}: [[layer]] number 2: invalid layer name 'udp'")
    assert load_stack(write(tmp_path, "layer = [{ name = 'UDP', port = 1 }]\n", "ok.toml")).layers[0].settings == {
        "port": 1
    }


def test_missing_file_and_unreadable_files(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert config_error(load_stack, missing) == f"{missing}: no such stack file"
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    assert config_error(load_stack, directory).startswith(f"{directory}: cannot read stack file")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[[layer]]")
    assert config_error(load_stack, binary).startswith(f"{binary}: not UTF-8 text")


# --------------------------------------------------------------------------- overrides


def test_overrides_replace_and_add(tmp_path):
    path = write(tmp_path, EXAMPLE)
    spec = load_stack(
        path,
        environ={},
        overrides={"TOTEM": {"token_timeout": "300ms", "consensus": "2s"}, "UDP": {"mcast_port": 6000}},
    )
    assert dict(spec.layer("TOTEM").settings) == {"token_timeout": "300ms", "join": "50ms", "consensus": "2s"}
    assert spec.layer("UDP").settings["mcast_port"] == 6000
    assert spec.names == ("UDP", "TOTEM")  # order and indices kept
    assert [layer.index for layer in spec.layers] == [0, 1]
    assert load_stack(path, environ={}).layer("TOTEM").settings["token_timeout"] == "1s"  # file untouched


def test_override_values_are_not_env_substituted(tmp_path):
    spec = load_stack(write(tmp_path, EXAMPLE), environ={}, overrides={"UDP": {"bind_addr": "${RAW}"}})
    assert spec.layer("UDP").settings["bind_addr"] == "${RAW}"


def test_override_of_unknown_layer(tmp_path):
    path = write(tmp_path, EXAMPLE)
    message = config_error(load_stack, path, environ={}, overrides={"TOTEN": {"join": "1s"}})
    assert message.startswith(f"{path}: override for unknown layer 'TOTEN' (did you mean 'TOTEM'?)")
    assert "UDP, TOTEM" in message
    assert "'FRAG'" in config_error(load_stack, path, environ={}, overrides={"FRAG": {}})


def test_override_shape_errors(tmp_path):
    path = write(tmp_path, EXAMPLE)
    assert "expected a mapping" in config_error(load_stack, path, environ={}, overrides={"UDP": "port=1"})
    assert "invalid setting name" in config_error(load_stack, path, environ={}, overrides={"UDP": {"name": "X"}})
    assert "invalid setting name" in config_error(load_stack, path, environ={}, overrides={"UDP": {1: 2}})


# --------------------------------------------------------------------------- shipped stacks (by name)


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """Point the shipped-stack lookup at a temporary directory."""
    root = tmp_path / "shipped"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "udp.toml").write_text(EXAMPLE)
    (root / "tcp.toml").write_text('[[layer]]\nname = "TCP"\n')
    (root / "README.md").write_text("not a stack")
    (root / "sub.toml").mkdir()  # a directory is not a stack
    monkeypatch.setattr(config, "_shipped_root", lambda: root)
    return root


def test_stack_names_lists_toml_files(shipped):
    assert stack_names() == ["tcp", "udp"]


def test_find_stack_by_name(shipped):
    source, text = find_stack("udp")
    assert source == "<stack 'udp'>"
    assert text == EXAMPLE
    spec = load_stack("udp", environ={})
    assert (spec.name, spec.source) == ("udp", "<stack 'udp'>")
    assert all(layer.source == "<stack 'udp'>" for layer in spec.layers)


def test_errors_in_shipped_stacks_name_the_stack(shipped):
    (shipped / "bad.toml").write_text('[[layer]]\nname = "UDP"\nport = "${NOPE}"\n')
    assert config_error(load_stack, "bad", environ={}).startswith("<stack 'bad'>: layer UDP: key 'port': ")


def test_unknown_stack_name_lists_available(shipped):
    message = config_error(find_stack, "upd")
    assert "unknown protocol stack 'upd'" in message
    assert "(did you mean 'udp'?)" in message
    assert "available stacks: tcp, udp" in message
    assert "'sub'" not in message and "README" not in message


def test_unknown_stack_name_when_none_are_shipped(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(config, "_shipped_root", lambda: empty)
    assert stack_names() == []
    assert "none are installed" in config_error(load_stack, "udp")
    monkeypatch.setattr(config, "_shipped_root", lambda: None)
    assert stack_names() == []
    assert "none are installed" in config_error(load_stack, "udp")


def test_paths_are_not_names(shipped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "udp.toml").write_text('[[layer]]\nname = "LOCAL"\n')
    assert load_stack("udp.toml").names == ("LOCAL",)  # ends in .toml: a path
    assert load_stack("./udp.toml").names == ("LOCAL",)  # has a '/': a path
    assert load_stack(Path("udp.toml")).source == "udp.toml"  # PathLike: always a path
    assert load_stack("udp", environ={}).names == ("UDP", "TOTEM")  # bare name: shipped
    assert config_error(load_stack, "other.toml") == "other.toml: no such stack file"


# --------------------------------------------------------------------------- the real protocols/ directory


def test_protocols_is_a_package():
    assert (PROTOCOLS / "__init__.py").is_file()


def test_shipped_stacks_match_directory_and_all_load():
    on_disk = sorted(p.stem for p in PROTOCOLS.glob("*.toml") if p.is_file())
    assert stack_names() == on_disk  # may be empty until stacks are written
    for name in stack_names():
        spec = load_stack(name, environ={})  # every ${VAR} of a shipped stack has a default
        assert spec.name == name and spec.source == f"<stack {name!r}>"
        assert spec.layers
        reparsed = tomllib.loads(describe(spec))
        assert [layer["name"] for layer in reparsed["layer"]] == list(spec.names)


def test_wheel_packaging_maps_protocols_to_groupcomm_protocols():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = pyproject["tool"]["setuptools"]
    assert "groupcomm.protocols" in tool["packages"]
    assert tool["package-dir"]["groupcomm.protocols"] == "protocols"
    assert "*.toml" in tool["package-data"]["groupcomm.protocols"]
    manifest = (REPO / "MANIFEST.in").read_text()
    assert re.search(r"^recursive-include protocols \*\.toml$", manifest, re.M)


def test_shipped_root_falls_back_to_the_checkout_when_the_package_is_not_installed(monkeypatch):
    # An editable install made before groupcomm.protocols existed cannot import it.
    def files(package):
        raise ModuleNotFoundError(f"No module named {package!r}", name=package)

    monkeypatch.setattr(importlib.resources, "files", files)
    checkout = Path(config.__file__).resolve().parents[2]
    assert config._shipped_root() == checkout / "protocols"
    assert stack_names() == sorted(p.stem for p in (checkout / "protocols").glob("*.toml") if p.is_file())


def test_shipped_root_does_not_hide_other_import_errors(monkeypatch):
    def files(package):
        raise ModuleNotFoundError("No module named 'something_else'", name="something_else")

    monkeypatch.setattr(importlib.resources, "files", files)
    with pytest.raises(ModuleNotFoundError):
        config._shipped_root()


# --------------------------------------------------------------------------- build_config


@dataclass(frozen=True)
class TotemConfig:
    token_timeout: Duration = Duration("1s")
    join: Duration = Duration("50ms")
    consensus: Duration | None = None
    window_size: int = 50
    loss: float = 0.0
    enabled: bool = True
    label: str = "ring"
    peers: tuple[str, ...] = ()
    ports: tuple[int, ...] = (1, 2)
    recv_buffer: Size = Size("1MiB")
    max_size: Optional[Size] = None
    mode: Literal["agreed", "safe"] = "agreed"
    either: Union[int, str] = 0
    flag_or_count: int | bool = 0
    extra: Any = None
    derived: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.join >= self.token_timeout:
            raise ValueError(f"join ({self.join}s) must be shorter than token_timeout ({self.token_timeout}s)")
        if self.label == "typeerror":
            raise TypeError("label must not be 'typeerror'")
        object.__setattr__(self, "derived", self.token_timeout * 2)


@dataclass(frozen=True)
class Required:
    group: str
    port: int = 1


@dataclass(frozen=True)
class Unsupported:
    table: frozenset[int] = frozenset()
    n: int = 0


def layer(settings: dict[str, Any], name: str = "TOTEM", source: str = "s.toml") -> LayerSpec:
    return LayerSpec(name=name, settings=types.MappingProxyType(settings), source=source, index=1)


def test_build_config_defaults():
    cfg = build_config(TotemConfig, layer({}))
    assert cfg == TotemConfig()
    assert cfg.derived == 2.0


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("token_timeout", "300ms", 0.3),
        ("token_timeout", 2, 2.0),
        ("token_timeout", 0.3, 0.3),
        ("consensus", "2s", 2.0),
        ("consensus", "none", None),
        ("consensus", "None", None),
        ("consensus", "", None),
        ("consensus", None, None),
        ("window_size", 7, 7),
        ("window_size", "45588", 45588),
        ("window_size", " -3 ", -3),
        ("loss", "0.25", 0.25),
        ("loss", 1, 1.0),
        ("loss", 0.5, 0.5),
        ("enabled", False, False),
        ("enabled", "true", True),
        ("enabled", "FALSE", False),
        ("enabled", "yes", True),
        ("enabled", "no", False),
        ("enabled", "1", True),
        ("enabled", "0", False),
        ("label", "hello", "hello"),
        ("label", "", ""),
        ("peers", ("a", "b"), ("a", "b")),
        ("peers", ["a", "b"], ("a", "b")),
        ("peers", "a, b,,c ", ("a", "b", "c")),
        ("peers", "", ()),
        ("ports", "45588, 45589", (45588, 45589)),
        ("ports", (3,), (3,)),
        ("recv_buffer", "64KiB", 65536),
        ("recv_buffer", 100, 100),
        ("max_size", "4MiB", 4 * 1024**2),
        ("max_size", "none", None),
        ("mode", "safe", "safe"),
        ("either", "5", 5),
        ("either", "abc", "abc"),
        ("flag_or_count", "yes", True),
        ("extra", {"anything": [1]}, {"anything": [1]}),
    ],
)
def test_build_config_coercions(key, raw, expected):
    cfg = build_config(TotemConfig, layer({key: raw}))
    value = getattr(cfg, key)
    assert value == expected
    if expected is None:
        assert value is None
    else:
        assert type(value) is type(expected) or isinstance(value, (Duration, Size))
    if key in ("token_timeout", "consensus") and expected is not None:
        assert isinstance(value, Duration)
    if key in ("recv_buffer", "max_size") and expected is not None:
        assert isinstance(value, Size)


def test_build_config_from_file_with_env(tmp_path):
    @dataclass(frozen=True)
    class UdpConfig:
        mcast_port: int = 0
        bind_addr: str = "0.0.0.0"
        recv_buffer: Size = Size(0)

    path = write(tmp_path, EXAMPLE)
    udp = build_config(UdpConfig, load_stack(path, environ={}).layer("UDP"))
    assert udp == UdpConfig(mcast_port=45588, bind_addr="127.0.0.1", recv_buffer=Size("4MiB"))
    udp = build_config(UdpConfig, load_stack(path, environ={"GROUPCOMM_MCAST_PORT": "5000"}).layer("UDP"))
    assert udp.mcast_port == 5000
    totem = build_config(TotemConfig, load_stack(path, environ={}, overrides={"TOTEM": {"token_timeout": "300ms"}}).layer("TOTEM"))
    assert (totem.token_timeout, totem.join) == (0.3, 0.05)


@pytest.mark.parametrize(
    "key, raw, problem",
    [
        ("token_timeout", "fast", "invalid duration"),
        ("token_timeout", "-1s", "cannot be negative"),
        ("token_timeout", True, "boolean"),
        ("consensus", "soon", "invalid duration"),
        ("window_size", "12x", "expected an integer"),
        ("window_size", "", "expected an integer"),
        ("window_size", 1.5, "expected an integer"),
        ("window_size", True, "expected an integer, not a boolean"),
        ("window_size", None, "expected an integer, not None"),
        ("loss", "abc", "expected a number"),
        ("loss", "nan", "expected a finite number"),
        ("loss", float("inf"), "expected a finite number"),
        ("loss", False, "not a boolean"),
        ("loss", [1], "expected a number"),
        ("enabled", "maybe", "expected a boolean"),
        ("enabled", 1, "expected a boolean"),
        ("label", 5, "expected a string"),
        ("label", ["a"], "expected a string"),
        ("peers", 5, "expected an array or a comma-separated string"),
        ("recv_buffer", "1.5", "whole number of bytes"),
        ("recv_buffer", "12 parsecs", "unknown size unit"),
        ("max_size", "-1K", "cannot be negative"),
        ("mode", "fast", "expected one of 'agreed', 'safe'"),
        ("flag_or_count", "maybe", "expected an integer or a boolean"),
    ],
)
def test_build_config_conversion_errors_name_source_layer_key(key, raw, problem):
    message = config_error(build_config, TotemConfig, layer({key: raw}))
    assert message.startswith(f"s.toml: layer TOTEM: key {key!r}: ")
    assert problem in message
    assert message.endswith(f"(got {raw!r})")


@pytest.mark.parametrize(
    "key, raw, item, bad",
    [("peers", ["a", 1], 1, 1), ("ports", "1, x", 1, "x"), ("ports", [True], 0, True)],
)
def test_build_config_item_errors(key, raw, item, bad):
    message = config_error(build_config, TotemConfig, layer({key: raw}))
    assert message.startswith(f"s.toml: layer TOTEM: key {key!r}: item {item}: ")
    assert message.endswith(f"(got {bad!r})")


def test_unknown_key_suggests_the_close_one():
    message = config_error(build_config, TotemConfig, layer({"tokn_timeout": "1s"}, source="/etc/gc/udp.toml"))
    assert message == "/etc/gc/udp.toml: layer TOTEM: unknown key 'tokn_timeout' (did you mean 'token_timeout'?)"
    assert "(did you mean 'token_timeout'?)" in config_error(build_config, TotemConfig, layer({"token-timeout": 1}))


def test_unknown_key_without_close_match_lists_known_keys():
    message = config_error(build_config, Required, layer({"group": "g", "zzzzzz": 1}, name="GMS"))
    assert message == "s.toml: layer GMS: unknown key 'zzzzzz' (known keys: group, port)"


def test_init_false_fields_are_not_settable():
    message = config_error(build_config, TotemConfig, layer({"derived": 1.0}))
    assert message.startswith("s.toml: layer TOTEM: unknown key 'derived'")


def test_missing_required_key():
    assert config_error(build_config, Required, layer({}, name="GMS")) == "s.toml: layer GMS: missing required key 'group'"
    assert build_config(Required, layer({"group": "g"})) == Required(group="g")


def test_post_init_value_error_is_wrapped():
    with pytest.raises(ConfigError) as info:
        build_config(TotemConfig, layer({"join": "2s", "token_timeout": "1s"}))
    assert str(info.value) == "s.toml: layer TOTEM: join (2.0s) must be shorter than token_timeout (1.0s)"
    assert isinstance(info.value.__cause__, ValueError)


def test_post_init_type_error_is_wrapped():
    message = config_error(build_config, TotemConfig, layer({"label": "typeerror"}))
    assert message == "s.toml: layer TOTEM: label must not be 'typeerror'"


def test_build_config_requires_a_dataclass():
    class NotADataclass:
        pass

    with pytest.raises(TypeError, match="not a dataclass"):
        build_config(NotADataclass, layer({}))
    with pytest.raises(TypeError, match="not a dataclass"):
        build_config(TotemConfig(), layer({}))  # an instance, not the class


def test_unsupported_annotation_is_a_programming_error_only_when_set():
    assert build_config(Unsupported, layer({"n": "3"})) == Unsupported(n=3)
    with pytest.raises(TypeError, match="unsupported field annotation"):
        build_config(Unsupported, layer({"table": (1, 2)}))


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        build_config(TotemConfig, layer({"window_size": "many"}))


# --------------------------------------------------------------------------- describe


def test_describe_is_readable_and_parses_back(tmp_path):
    text = """\
description = "test \\"stack\\""

[[layer]]
name = "UDP"
mcast_port = "${PORT:45588}"
peers = ["a", "b"]
ratio = 0.25
on = true
"odd key" = "tab\\there, newline\\nthere, del \\u007f, snowman \\u2603"
when = 1979-05-27T07:32:00Z
nested = { a = 1, "b c" = ["x"] }

[[layer]]
name = "TOTEM"
token_timeout = "1s"
"""
    spec = load_stack(
        write(tmp_path, text, "udp.toml"),
        environ={},
        overrides={"TOTEM": {"join": Duration("50ms"), "big": 10**20, "obj": Path("/x"), "empty": {}}},
    )
    out = describe(spec)
    assert out.startswith("# stack 'udp' from ")
    assert "UDP / TOTEM" in out
    assert '[[layer]]  # 0\nname = "UDP"\nmcast_port = "45588"\n' in out
    assert 'token_timeout = "1s"' in out and "join = 0.05" in out
    doc = tomllib.loads(out)
    assert doc["description"] == 'test "stack"'
    udp, totem = doc["layer"]
    assert udp["name"] == "UDP" and totem["name"] == "TOTEM"
    s = spec.layer("UDP").settings
    assert udp["odd key"] == s["odd key"]
    assert udp["peers"] == list(s["peers"]) and udp["ratio"] == 0.25 and udp["on"] is True
    assert udp["when"] == s["when"]
    assert udp["nested"] == {"a": 1, "b c": ["x"]}
    assert totem["join"] == 0.05 and totem["big"] == 10**20 and totem["obj"] == "/x" and totem["empty"] == {}


def test_describe_minimal():
    spec = StackSpec(name="x", source="<stack 'x'>", layers=(LayerSpec("A", {}, "<stack 'x'>", 0),))
    assert describe(spec) == "# stack 'x' from <stack 'x'>: A (bottom to top)\n\n[[layer]]  # 0\nname = \"A\"\n"


# --------------------------------------------------------------------------- tables (dict fields)


def test_quorum_votes_come_from_a_toml_table(tmp_path):
    from groupcomm.config import build_stack
    from groupcomm.layers.quorum import QuorumConfig

    path = tmp_path / "votes.toml"
    path.write_text(
        '[[layer]]\nname = "UDP"\n[[layer]]\nname = "TOTEM"\n'
        '[[layer]]\nname = "QUORUM"\nexpected_votes = 5\nvotes = { 11 = 3, 12 = "1" }\ntie_breaker = "none"\n'
    )
    quorum = build_stack(load_stack(str(path))).quorum
    assert quorum == QuorumConfig(expected_votes=5, votes={11: 3, 12: 1}, tie_breaker="none")


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('votes = { node = 3 }', "key 'node': expected an integer"),
        ('votes = { 11 = "many" }', "value of '11': expected an integer"),
        ('votes = 3', "expected a table"),
        ('tie_breaker = "highest"', "expected one of 'lowest', 'none'"),
    ],
)
def test_a_bad_quorum_table_names_the_key(tmp_path, line, complaint):
    from groupcomm.config import build_stack

    path = tmp_path / "votes.toml"
    path.write_text(f'[[layer]]\nname = "UDP"\n[[layer]]\nname = "TOTEM"\n[[layer]]\nname = "QUORUM"\n{line}\n')
    with pytest.raises(ConfigError, match=re.escape(complaint)) as info:
        build_stack(load_stack(str(path)))
    assert "QUORUM" in str(info.value)
