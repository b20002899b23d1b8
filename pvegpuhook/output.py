"""How the read commands print: ``--output-format text|json|json-pretty|yaml``, like ``pvesh``.

Every read command builds two things and hands them to :func:`emit`:

* ``data`` — plain JSON-able values (dict/list/str/int/float/bool/None). This is the stable,
  documented machine shape of the command (each command's docstring describes its own), printed by
  ``json`` (one line, keys sorted), ``json-pretty`` (indent 4, keys sorted) and ``yaml``
  (block style, keys sorted). Every shape carries ``"format": 1`` (:data:`FORMAT_VERSION`),
  raised when a key changes meaning or goes away, so that scripts can check what they read.
* ``tables`` and ``notes`` — the human view, printed by ``text`` (the default): each table (its
  title, a header row, one row per item), then the notes, one per line, after a blank line. Notes
  are printed verbatim (the caller writes ``warning: ...`` when it is one).

Text goes to a terminal as ``rich`` tables (rich is imported only then, and only if installed);
piped, it is plain aligned text for ``grep``/``awk``: columns separated by two spaces, one line per
row (never wrapped), no colours, no box drawing; ``--noheader`` drops the titles and header rows,
``--noborder`` the box lines of the rich form. Every string printed in text form passes through
:func:`pvegpuhook.log.clean`, because guest names and config values may carry escape sequences;
the json/yaml serialisers escape control characters themselves.

Cell values: ``None`` and empty lists print as ``-``, booleans as ``yes``/``no``, lists and tuples
joined with ``, ``, anything else with ``str()``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pvegpuhook.log import clean

FORMATS = ("text", "json", "json-pretty", "yaml")
FORMAT_VERSION = 1
EMPTY = "-"  # keeps piped columns aligned and countable when a value is missing
SEP = "  "


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--output-format``, ``--noborder`` and ``--noheader`` (PVE's names) to a sub-command."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-format",
        choices=FORMATS,
        default="text",
        help="text (default: tables), json (one line), json-pretty or yaml",
    )
    group.add_argument(
        "--noborder", action="store_true", help="text: do not draw borders around tables"
    )
    group.add_argument(
        "--noheader", action="store_true", help="text: do not print table titles and header rows"
    )


class Table:
    """A table of the text form: ``columns`` are ``(key, header)`` pairs, ``rows`` dicts by key."""

    def __init__(
        self,
        columns: list[tuple[str, str]],
        rows: list[dict[str, object]],
        title: str | None = None,
    ) -> None:
        self.columns = list(columns)
        self.rows = list(rows)
        self.title = title

    def headers(self) -> list[str]:
        return [clean(header) for _, header in self.columns]

    def cells(self) -> list[list[str]]:
        return [[cell(row.get(key)) for key, _ in self.columns] for row in self.rows]


def cell(value: object) -> str:
    """The one-line text of a table cell (control characters escaped)."""
    if value is None:
        return EMPTY
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return ", ".join(cell(item) for item in items) or EMPTY
    text = clean(str(value))
    return text if text else EMPTY


def emit(
    args: argparse.Namespace,
    data: object,
    tables: list[Table],
    notes: Sequence[str] = (),
) -> None:
    """Print ``data`` (json/yaml) or ``tables`` then ``notes`` (text) as ``args`` asks."""
    fmt = getattr(args, "output_format", "text") or "text"
    if isinstance(data, dict):
        data = {"format": FORMAT_VERSION, **data}
    if fmt == "json":
        _write(json.dumps(data, sort_keys=True) + "\n")
    elif fmt == "json-pretty":
        _write(json.dumps(data, sort_keys=True, indent=4) + "\n")
    elif fmt == "yaml":
        import yaml

        _write(yaml.safe_dump(_yaml_safe(data), sort_keys=True, default_flow_style=False))
    else:
        noheader = bool(getattr(args, "noheader", False))
        noborder = bool(getattr(args, "noborder", False))
        if not (_isatty() and _emit_rich(tables, notes, noheader=noheader, noborder=noborder)):
            _write(render_plain(tables, notes, noheader=noheader))
    sys.stdout.flush()


def render_plain(
    tables: Sequence[Table], notes: Sequence[str] = (), *, noheader: bool = False
) -> str:
    """The piped text form: aligned columns, two spaces apart, no trailing blanks."""
    blocks: list[str] = []
    for table in tables:
        lines: list[str] = []
        if table.title and not noheader:
            lines.append(clean(table.title))
        grid = table.cells()
        if not noheader:
            grid.insert(0, table.headers())
        widths = [max((len(row[i]) for row in grid), default=0) for i in range(len(table.columns))]
        for row in grid:
            padded = [text.ljust(width) for text, width in zip(row, widths, strict=True)]
            lines.append(SEP.join(padded).rstrip())
        blocks.append("\n".join(lines))
    if notes:
        blocks.append("\n".join(clean(note) for note in notes))
    blocks = [block for block in blocks if block]
    return "\n\n".join(blocks) + "\n" if blocks else ""


def _emit_rich(
    tables: Sequence[Table], notes: Sequence[str], *, noheader: bool, noborder: bool
) -> bool:
    """Rich tables on a terminal; False when rich is not installed (then plain text is used)."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table as RichTable
        from rich.text import Text
    except ImportError:
        return False
    console = Console(highlight=False)
    for index, table in enumerate(tables):
        if index:
            console.print()
        # Text() everywhere: config strings must never be read as rich markup.
        rich_table = RichTable(
            title=Text(clean(table.title)) if table.title and not noheader else None,
            title_justify="left",
            box=None if noborder else box.SIMPLE_HEAD,
            show_header=not noheader,
            header_style="bold",
        )
        for header in table.headers():
            rich_table.add_column(Text(header))
        for row in table.cells():
            rich_table.add_row(*(Text(text) for text in row))
        console.print(rich_table)
    if notes:
        console.print()
        for note in notes:
            line = Text(clean(note))
            if note.startswith(("warning", "WARNING")):
                line.stylize("yellow")
            console.print(line)
    return True


def _yaml_safe(data: object) -> object:
    """Lone surrogates (undecodable bytes in a config) would make PyYAML raise: escape them."""
    if isinstance(data, str):
        if any(0xD800 <= ord(char) <= 0xDFFF for char in data):
            return clean(data)
        return str(data)  # an enum's value (a str subclass PyYAML's safe dumper does not know)
    if isinstance(data, dict):
        return {_yaml_safe(key): _yaml_safe(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_yaml_safe(item) for item in data]
    return data


def _isatty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _write(text: str) -> None:
    sys.stdout.write(text)
