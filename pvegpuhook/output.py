"""How the read commands print: ``--output-format text|json|json-pretty|yaml``, like ``pvesh``.

Every read command builds two things and hands them to :func:`emit`:

* ``data`` — plain JSON-able values (dict/list/str/int/float/bool/None). This is the stable,
  documented machine shape of the command (each command's docstring describes its own), printed by
  ``json`` (one line, keys sorted), ``json-pretty`` (indent 4, keys sorted) and ``yaml``
  (block style, keys sorted). Every shape carries ``"format": 1`` (:data:`FORMAT_VERSION`),
  raised when a key changes meaning or goes away, so that scripts can check what they read.
* ``tables`` and ``notes`` — the human view, printed by ``text`` (the default): each table (its
  title, a header row, one row per item), then the notes, one per line, after a blank line. Notes
  are printed verbatim (the caller writes ``warning: ...`` when it is one). A table without rows
  prints the sentence it was given for that case instead of an empty header.

In a table of fields a cell is one token: a PCI address, a VMID, a name, a word. Prose (why a
backup fails, what a warning means) goes into the notes, so that the table stays narrow.

Text goes to a terminal as ``rich`` tables (rich is imported only then, and only if installed);
piped, it is plain text for ``grep`` and ``awk``: one line per row, columns aligned and separated by
at least two spaces, no colours, no box drawing, a missing value ``-``. A table of *fields*
(``fields=True``: ``scan``, ``dry-run``) is made for awk: **one awk field per column**, piped: a
header is one word, a cell never contains a blank (a blank inside a value is written ``_``), a list
is joined with ``,`` and no blank (``102,103``). On a terminal its columns never wrap but those
named in ``wrap`` (free text, between words): when it does not fit the terminal's width, it is
printed in the plain form instead, which the terminal wraps, so that no PCI address or VMID is ever
cut. No cell of any table is cut with ``…``. ``--noheader`` drops titles and header rows; with
tables of fields it prints their rows only, without blank lines, and the notes go to stderr.
``--noborder`` drops the box lines of the rich form. Every string printed in text form passes
through :func:`pvegpuhook.log.clean`, because guest names and config values may carry escape
sequences; the json/yaml serialisers escape control characters themselves.

Cell values: ``None`` and empty lists print as ``-``, booleans as ``yes``/``no``, lists and tuples
joined with ``, `` (``,`` in a piped table of fields), anything else with ``str()``.
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
        help="text (tables; the default), json (one line), json-pretty or yaml",
    )
    group.add_argument(
        "--noborder", action="store_true", help="text: do not draw borders around tables"
    )
    group.add_argument(
        "--noheader",
        action="store_true",
        help="text: print table rows only (no titles, header rows or blank lines; notes and "
        "warnings go to stderr)",
    )


class Table:
    """A table of the text form: ``columns`` are ``(key, header)`` pairs, ``rows`` dicts by key.

    ``fields``: a table for awk (see the module's text). ``wrap``: keys of its columns whose
    cells may wrap between words on a terminal (free text such as a model name). ``empty``: the
    sentence printed instead of the table when it has no rows.
    """

    def __init__(
        self,
        columns: list[tuple[str, str]],
        rows: list[dict[str, object]],
        title: str | None = None,
        *,
        fields: bool = False,
        wrap: Sequence[str] = (),
        empty: str | None = None,
    ) -> None:
        self.columns = list(columns)
        self.rows = list(rows)
        self.title = title
        self.fields = fields
        self.wrap = frozenset(wrap)
        self.empty = empty

    def headers(self, *, plain: bool = True) -> list[str]:
        headers = [clean(header) for _, header in self.columns]
        if plain and self.fields:
            headers = ["_".join(h.split()) or EMPTY for h in headers]
        return headers

    def cells(self, *, plain: bool = True) -> list[list[str]]:
        field = plain and self.fields
        return [[cell(row.get(key), field=field) for key, _ in self.columns] for row in self.rows]


def cell(value: object, *, field: bool = False) -> str:
    """The one-line text of a table cell (control characters escaped); ``field``: one awk field
    (no blank in it)."""
    if value is None:
        return EMPTY
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return ("," if field else ", ").join(cell(item, field=field) for item in items) or EMPTY
    text = clean(str(value))
    if field:
        text = "_".join(text.split())
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
        rows_only = noheader and any(t.fields for t in tables)
        if rows_only:
            # the rows only on stdout; what explains them (empty tables, notes) on stderr
            notes = [t.empty for t in tables if not t.rows and t.empty] + list(notes)
        shown = () if rows_only else notes
        if not (_isatty() and _emit_rich(tables, shown, noheader=noheader, noborder=noborder)):
            _write(render_plain(tables, shown, noheader=noheader))
        if rows_only and notes:
            sys.stdout.flush()
            sys.stderr.write("".join(clean(note) + "\n" for note in notes))
    sys.stdout.flush()


def _plain_lines(table: Table, *, noheader: bool) -> list[str]:
    if not table.rows:
        return [] if noheader or not table.empty else [clean(table.empty)]
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
    return lines


def render_plain(
    tables: Sequence[Table], notes: Sequence[str] = (), *, noheader: bool = False
) -> str:
    """The piped text form: aligned columns, two spaces apart, no trailing blanks. With
    ``noheader`` the tables' rows without titles, headers or blank lines."""
    if noheader and any(table.fields for table in tables):
        lines = [line for table in tables for line in _plain_lines(table, noheader=True)]
        return "".join(line + "\n" for line in [*lines, *(clean(note) for note in notes)])
    blocks = ["\n".join(_plain_lines(table, noheader=noheader)) for table in tables]
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
        from rich.measure import Measurement
        from rich.table import Table as RichTable
        from rich.text import Text
    except ImportError:
        return False
    console = Console(highlight=False)
    printed = False
    for table in tables:
        if not table.rows:
            if table.empty and not noheader:
                if printed:
                    console.print()
                console.print(Text(clean(table.empty)))
                printed = True
            continue
        if printed and not noheader:
            console.print()
        printed = True
        # Text() everywhere: config strings must never be read as rich markup.
        rich_table = RichTable(
            box=None if noborder else box.SIMPLE_HEAD,
            show_header=not noheader,
            header_style="bold",
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,  # two blanks between columns, as in the plain form
        )
        grid = table.cells(plain=False)
        widths = _fitted_widths(table, grid, console.width) if table.fields else None
        for index, (key, header) in enumerate(table.columns):
            whole = table.fields and key not in table.wrap
            width = widths[index] if widths else None
            rich_table.add_column(Text(clean(header)), no_wrap=whole, overflow="fold", width=width)
        for row in grid:
            rich_table.add_row(*(Text(text) for text in row))
        too_wide = widths == [] or (
            Measurement.get(console, console.options, rich_table).minimum > console.width
        )
        if too_wide:
            # too narrow for whole cells: the plain form, which the terminal wraps, never cuts
            sys.stdout.flush()
            _write("\n".join(_plain_lines(table, noheader=noheader)) + "\n")
            sys.stdout.flush()
            continue
        if table.title and not noheader:  # its own line: a title never wraps to the table
            console.print(Text(clean(table.title)), soft_wrap=True)
        console.print(rich_table)
    if notes and not noheader:
        if printed:
            console.print()
        for note in notes:
            line = Text(clean(note))
            if note.startswith(("warning", "WARNING")):
                line.stylize("yellow")
            console.print(line)
    return True


def _fitted_widths(table: Table, grid: list[list[str]], width: int) -> list[int]:
    """Each column's width in a terminal ``width`` wide: a column that must not wrap gets its
    widest cell, one in ``wrap`` at least its longest word and what is left up to its widest
    cell; [] when whole cells do not fit (rich would cut them: the caller prints plain text).
    Rich is given these widths, since it shrinks even a no-wrap column once the wrapping ones
    are at their narrowest."""
    from rich.cells import cell_len

    headers = table.headers(plain=False)
    widest: list[int] = []
    narrowest: list[int] = []
    for index, (key, _) in enumerate(table.columns):
        texts = [headers[index], *(row[index] for row in grid)]
        widest.append(max(cell_len(text) for text in texts))
        if key in table.wrap:
            narrowest.append(max(cell_len(w) for text in texts for w in text.split() or [""]))
        else:
            narrowest.append(widest[-1])
    spare = width - sum(narrowest) - len(SEP) * (len(widths := narrowest[:]) - 1)
    if spare < 0:
        return []
    for index in range(len(widths)):  # the wrapping columns, left to right, take what is left
        extra = min(spare, widest[index] - widths[index])
        widths[index] += extra
        spare -= extra
    return widths


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
