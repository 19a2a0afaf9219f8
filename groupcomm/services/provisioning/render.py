"""Showing provisioning results to people: tables, progress, JSON (no trio).

Input is what the control socket returns (:func:`.control.to_json` of the API's
values: objects, lists, scalars).  Three outputs:

* a terminal (``rich``, imported only then; plain text if it is missing):
  tables, and a live progress table (batch, node, step, progress, health);
* plain text when the output is not a terminal: aligned columns, and one line
  per progress event, ``[batch 1] n2 installing hello 2.0 (2/3) health ok``;
* JSON (``--json``): the value as one line; progress events one per line as
  ``{"progress": EVENT}`` before the result's line.

The renderers take what they find: a table's columns are the keys of its rows
(the preferred ones first), a row holding a list of objects (a bundle's
per-node rows) becomes one line per object.  Progress events are objects with
any of ``batch``, ``node``, ``step``, ``detail``, ``done``, ``total``,
``unit`` (``"bytes"`` shows done/total as sizes) and ``health``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any, Self

__all__ = [
    "ProgressView",
    "cell",
    "flatten",
    "format_progress",
    "format_size",
    "is_terminal",
    "print_json",
    "render_mapping",
    "render_rows",
    "render_status",
    "table_text",
]

STATUS_COLUMNS = ("node", "group", "role", "bundle", "name", "version", "actual.version", "desired", "actual",
                  "state", "health", "in_sync", "detail")
"""Preferred column order of status-like tables (``cluster status``, ``bundle list``)."""


def is_terminal(out: IO[str]) -> bool:
    """Whether ``out`` is an interactive terminal."""
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def print_json(value: Any, out: IO[str] | None = None) -> None:
    """``value`` as one line of JSON."""
    print(json.dumps(value, separators=(",", ":"), sort_keys=False), file=out or sys.stdout, flush=True)


def format_size(n: float) -> str:
    """``n`` bytes as ``512 B``, ``1.5 KiB``, ``3.0 MiB``..."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cell(value: Any) -> str:
    """One table cell: ``-`` for none, ``yes``/``no``, lists joined by commas, objects as ``k=v``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "-"
    return " ".join(str(value).split())


def _rows_in(value: Any) -> list[dict[str, Any]] | None:
    """``value`` as a list of objects (a dict of objects gets a ``name`` column), or None."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return [dict(v) for v in value]
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        return [{"name": k, **v} if "name" not in v and "node" not in v else dict(v) for k, v in value.items()]
    return None


def flatten(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a nested list of objects (e.g. a bundle's per-node actual rows) as one row per
    nested object, its keys next to the parent's (``field.key`` when the parent has the key)."""
    out = []
    for row in rows:
        nested = next(((k, r) for k, v in row.items() if (r := _rows_in(v)) is not None), None)
        if nested is None:
            out.append(dict(row))
            continue
        key, children = nested
        parent = {k: v for k, v in row.items() if k != key}
        for child in children:
            merged = dict(parent)
            for k, v in child.items():
                merged[f"{key}.{k}" if k in parent else k] = v
            out.append(merged)
    return out


def _columns(rows: Sequence[Mapping[str, Any]], prefer: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return [c for c in prefer if c in seen] + [c for c in seen if c not in prefer]


def table_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text columns with an upper-case header."""
    lines = [[c.upper() for c in columns]] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _rich_console(out: IO[str]) -> Any | None:
    try:
        from rich.console import Console
    except ImportError:                                # rich is optional: plain text then
        return None
    return Console(file=out)


def render_rows(rows: Sequence[Mapping[str, Any]], *, prefer: Sequence[str] = (), title: str | None = None,
                out: IO[str] | None = None, rich: bool | None = None, empty: str = "(none)") -> None:
    """A table of ``rows`` (flattened) on ``out``: rich on a terminal, aligned text otherwise."""
    out = out or sys.stdout
    rows = flatten(rows)
    console = _rich_console(out) if (is_terminal(out) if rich is None else rich) else None
    if not rows:
        print(f"{title}: {empty}" if title else empty, file=out, flush=True)
        return
    columns = _columns(rows, prefer)
    if console is not None:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column.upper())
        for row in rows:
            table.add_row(*(cell(row.get(c)) for c in columns))
        console.print(table)
        return
    if title:
        print(f"{title}:", file=out)
    print(table_text(rows, columns), file=out, flush=True)


def render_mapping(value: Mapping[str, Any], *, out: IO[str] | None = None) -> None:
    """An object as ``key: value`` lines."""
    out = out or sys.stdout
    width = max((len(k) for k in value), default=0)
    for key, item in value.items():
        print(f"{key + ':':<{width + 1}} {cell(item)}", file=out)
    out.flush()


def render_status(status: Any, *, out: IO[str] | None = None, rich: bool | None = None) -> None:
    """A cluster status (or any object): its scalar fields as ``key: value`` lines, each list of
    objects (node x bundle rows, configuration versions, what is out of sync) as a titled table."""
    out = out or sys.stdout
    if not isinstance(status, Mapping):
        render_value(status, out=out, rich=rich)
        return
    scalars = {k: v for k, v in status.items() if _rows_in(v) is None and not (isinstance(v, list) and not v)}
    if scalars:
        render_mapping(scalars, out=out)
    for key, value in status.items():
        if key in scalars:
            continue
        render_rows(_rows_in(value) or [], prefer=STATUS_COLUMNS, title=key.replace("_", " "), out=out, rich=rich)


def render_value(value: Any, *, prefer: Sequence[str] = STATUS_COLUMNS, out: IO[str] | None = None,
                 rich: bool | None = None, empty: str = "(none)") -> None:
    """Whatever an API call returned: rows as a table, an object as lines, a scalar as itself."""
    out = out or sys.stdout
    rows = _rows_in(value)
    if rows is not None:
        render_rows(rows, prefer=prefer, out=out, rich=rich)
    elif isinstance(value, Mapping):
        render_status(value, out=out, rich=rich) if value else print(empty, file=out, flush=True)
    elif isinstance(value, list) and not value:
        print(empty, file=out, flush=True)
    elif value is not None:
        print(cell(value), file=out, flush=True)


# --------------------------------------------------------------------------- progress


def format_progress(event: Mapping[str, Any]) -> str:
    """One plain line for a progress event: ``[batch 1] n2 installing hello 2.0 (1/3) health ok``."""
    parts = []
    if event.get("batch") is not None:
        parts.append(f"[batch {event['batch']}]")
    for key in ("node", "step", "detail"):
        if event.get(key) not in (None, ""):
            parts.append(cell(event[key]))
    amount = _amount(event)
    if amount:
        parts.append(f"({amount})")
    if event.get("health") not in (None, ""):
        parts.append(f"health {cell(event['health'])}")
    known = {"batch", "node", "step", "detail", "done", "total", "unit", "health"}
    parts.extend(f"{k}={cell(v)}" for k, v in event.items() if k not in known and v is not None)
    return " ".join(parts) or "(progress)"


def _amount(event: Mapping[str, Any]) -> str:
    done, total = event.get("done"), event.get("total")
    if done is None:
        return ""
    show = format_size if event.get("unit") == "bytes" else (lambda n: str(n))
    return f"{show(done)}/{show(total)}" if total is not None else show(done)


class ProgressView:
    """Shows progress events as they come: ``mode`` is ``"rich"`` (a live table, one row per
    batch and node), ``"plain"`` (a line each) or ``"json"`` (a ``{"progress": ...}`` line each).

    Call it with each event; use it as a context manager (the live table ends on exit)."""

    def __init__(self, mode: str, out: IO[str] | None = None) -> None:
        if mode not in ("rich", "plain", "json"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.out = out or sys.stdout
        self.mode = mode
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._live: Any = None
        if mode == "rich":
            console = _rich_console(self.out)
            if console is None:
                self.mode = "plain"
            else:
                from rich.live import Live

                self._live = Live(self._table(), console=console, auto_refresh=False, transient=False)

    @classmethod
    def for_output(cls, *, json_mode: bool, out: IO[str] | None = None) -> ProgressView:
        """JSON with ``--json``, rich on a terminal, plain lines otherwise."""
        out = out or sys.stdout
        return cls("json" if json_mode else "rich" if is_terminal(out) else "plain", out)

    def __enter__(self) -> Self:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def __call__(self, event: Any) -> None:
        if not isinstance(event, Mapping):
            event = {"detail": event}
        if self.mode == "json":
            print_json({"progress": event}, self.out)
        elif self.mode == "plain":
            print(format_progress(event), file=self.out, flush=True)
        else:
            key = (cell(event.get("batch")), cell(event.get("node")))
            self.rows[key] = {**self.rows.get(key, {}), **event}
            self._live.update(self._table(), refresh=True)

    def _table(self) -> Any:
        from rich.table import Table

        table = Table(title="progress", title_justify="left")
        for column in ("BATCH", "NODE", "STEP", "DETAIL", "PROGRESS", "HEALTH"):
            table.add_column(column)
        for event in self.rows.values():
            table.add_row(cell(event.get("batch")), cell(event.get("node")), cell(event.get("step")),
                          cell(event.get("detail")), _amount(event) or "-", cell(event.get("health")))
        return table
