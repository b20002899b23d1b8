"""``python3 -m tools.manpage``: the generated documentation, written at build time, not shipped.

* ``pve-gpu-hook.8`` (the default): the roff source of pve-gpu-hook(8), made from the parser;
* ``yaml5``: ``man/pve-gpu-hook.yaml.5`` with its KEYS section made from the settings schema
  (:data:`pvegpuhook.settings.OPTIONS`); the rest of that page is written by hand;
* ``config``: ``etc/config.yaml``, the commented template the package installs, from the schema.

``make man`` writes all three, and ``tests/unit/test_manpage.py`` fails when a committed file
differs from what this prints, so a changed option or setting cannot ship with a stale page.
Sub-commands, their descriptions, options, positionals and help texts come from
:func:`pvegpuhook.cli.build_parser`; the JSON shapes from the read commands' module docstrings; the
rest (what the hook does, exit status, files, examples) is written here. Nothing reads the clock
or the environment: the same tree always gives the same bytes.

Text written here uses two marks of reStructuredText: ````literal```` (bold) and ``*word*``
(italic). Everything else is escaped for roff: backslashes, hyphens (``\\-``, so that options and
commands copied from the page work), non-ASCII characters, and a leading ``.`` or ``'``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

from pvegpuhook import __version__

# The page's date is the release date of the version it documents, never today: regeneration
# must give the same bytes. Add a line here with each new version.
RELEASE_DATES = {"0.1.0": "2026-11-28"}

PROG = "pve-gpu-hook"
SECTION = "8"
WIDTH = 79  # the longest text line of the source (mandoc's style check wants < 80)
MANUAL = "System Administration"

INLINE = re.compile(r"``(.+?)``|(?<![\w/*])\*([^\s*]+)\*(?!\w)")
# in parser texts (help, descriptions) options and absolute paths are marked automatically
AUTO = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)|(?<![\w.~])(/[\w.+-]+(?:/[\w.*+-]+)+)")


# ---- roff escaping ------------------------------------------------------------------------------


def escape(text: str) -> str:
    """``text`` safe inside a roff line: backslash, hyphen and non-ASCII characters escaped."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\e")
        elif char == "-":
            out.append("\\-")  # a real minus/hyphen-minus: copy-and-paste of options works
        elif ord(char) > 127:
            out.append(f"\\[u{ord(char):04X}]")
        else:
            out.append(char)
    return "".join(out)


def line(text: str) -> str:
    """A text line that roff cannot take for a request (no leading ``.`` or ``'``)."""
    return "\\&" + text if text.startswith((".", "'")) else text


def fill(text: str, width: int = WIDTH) -> list[str]:
    """A paragraph of roff text as source lines: a new sentence on a new line (so roff sees where
    sentences end), and a sentence longer than ``width`` broken between words, never after a
    full stop (roff would take it for a sentence end) and never at an escaped space ``\\ ``."""
    lines: list[list[str]] = [[]]
    for word in re.split(r"(?<!\\) ", text):
        current = lines[-1]
        previous = current[-1] if current else ""
        # a sentence starts with a capital or a literal (``protect`` ...)
        capital = word.startswith("\\f") or re.sub(r"^(\\&)+", "", word)[:1].isupper()
        too_long = len(" ".join([*current, word])) > width
        if current and _sentence_end(previous) and capital:
            lines.append([word])  # a new sentence
        elif current and too_long and not _sentence_end(previous):
            lines.append([word])
        else:
            current.append(word)
    return [line(" ".join(words)) for words in lines if words]


def _sentence_end(word: str) -> bool:
    # roff's own rule: . ? ! possibly followed by closing quotes and brackets
    return bool(re.search(r"[.?!][)\]\"']*$", word))


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def inline(text: str) -> str:
    """One paragraph of marked text (````literal````, ``*word*``) as roff; in between, options are
    bold and absolute paths italic (:func:`marked`), as is a literal that is a path."""
    out, last = [], 0
    for match in INLINE.finditer(text):
        out.append(marked(text[last : match.start()]))
        literal, word = match.groups()
        if literal is not None and not literal.startswith("/"):
            out.append(bold(literal))
        else:
            out.append(italic(literal if literal is not None else word))
        last = match.end()
    out.append(marked(text[last:]))
    return "".join(out)


def marked(text: str) -> str:
    """A parser text (help, description) as roff: options bold, absolute paths italic."""
    out, last = [], 0
    for match in AUTO.finditer(text):
        option, path = match.groups()
        if path is not None:
            stripped = path.rstrip(".")  # a sentence's full stop is not part of the path
            end = match.start() + len(stripped)
            out.append(escape(text[last : match.start()]) + italic(stripped))
        else:
            end = match.end()
            out.append(escape(text[last : match.start()]) + bold(option))
        last = end
    out.append(escape(text[last:]))
    return "".join(out)


def rst(text: str) -> list[str]:
    """Paragraphs and ``::`` literal blocks (reStructuredText's subset the docstrings use)."""
    lines = textwrap.dedent(text).strip("\n").splitlines()
    out: list[str] = []
    paragraph: list[str] = []
    literal_next = False
    index = 0
    while index < len(lines):
        current = lines[index]
        if current.strip():
            paragraph.append(current.strip())
            index += 1
            continue
        literal_next = _flush(paragraph, out) or literal_next
        paragraph = []
        index += 1
        if literal_next:
            block: list[str] = []
            while index < len(lines) and (not lines[index].strip() or lines[index][:1] == " "):
                block.append(lines[index])
                index += 1
            out.extend(_literal(block))
            literal_next = False
    _flush(paragraph, out)
    return out


def _flush(paragraph: list[str], out: list[str]) -> bool:
    """Write one paragraph; True when it ends with ``::`` (a literal block follows)."""
    if not paragraph:
        return False
    text = " ".join(paragraph)
    literal = text.endswith("::")
    if literal:
        text = text[:-1]
    out.extend([".PP", *fill(inline(text))])
    return literal


def _literal(block: list[str]) -> list[str]:
    while block and not block[-1].strip():
        block.pop()
    # two spaces of indentation instead of the docstring's four: the shapes are wide already
    block = [f"  {text}" for text in textwrap.dedent("\n".join(block)).splitlines()]
    body = [line(escape(text.rstrip())) if text.strip() else "" for text in block]
    # an empty line in a no-fill block is fine for roff, but \& keeps linters quiet
    return [".PP", ".EX", *(text or "\\&" for text in body), ".EE"]


# ---- the parser ---------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of ``parser``, in the order ``--help`` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    # argparse's own expansion of %(default)s, %(prog)s and the like
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    default = action.default
    if (
        action.option_strings
        and action.nargs != 0
        and default not in (None, "", [], argparse.SUPPRESS)
        and "default" not in (action.help or "")  # the help says it (maybe as %(default)s)
    ):
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text


def _value(action: argparse.Action) -> str:
    """The roff of an option's value: its choices (bold, ``|``) or its metavar (italic)."""
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None:
        return "|".join(bold(str(choice)) for choice in action.choices)
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return italic(metavar)


def _positional(action: argparse.Action) -> str:
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest
    name = italic(metavar)
    if action.nargs == "?":
        return f"[{name}]"
    if action.nargs == "*":
        return f"[{name} ...]"
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    return name


def _documented(parser: argparse.ArgumentParser, *, with_help: bool) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        and not isinstance(action, argparse._SubParsersAction)
        and (with_help or not isinstance(action, argparse._HelpAction))
    ]


def synopsis(name: str, parser: argparse.ArgumentParser) -> list[str]:
    words = [bold(name)] if name else []
    for action in _documented(parser, with_help=not name):
        if not action.option_strings:
            words.append(_positional(action))
            continue
        value = _value(action)
        words.append(f"[{bold(action.option_strings[-1])}{' ' + value if value else ''}]")
    # .SY indents continuation lines under the first word; a no-break space inside each item
    # makes fill break lines between items, never inside one
    items = [word.replace(" ", "\\ ") for word in words]
    body = fill(" ".join(items)) if items else []
    return [f".SY {escape(PROG)}", *body, ".YS"]


def options(parser: argparse.ArgumentParser, *, with_help: bool) -> list[str]:
    out: list[str] = []
    for action in _documented(parser, with_help=with_help):
        if action.option_strings:
            value = _value(action)
            tag = ", ".join(bold(option) for option in action.option_strings)
            tag += f" {value}" if value else ""
        else:
            tag = _positional(action)
        # a .TP tag is the one line after it: never filled
        out.extend([".TP", line(tag), *fill(marked(_help(parser, action)))])
    return out


# ---- the page -----------------------------------------------------------------------------------

DESCRIPTION = """
vzdump backs up a stopped virtual machine by starting its QEMU paused with every ``hostpci``
device attached. When another guest holds the GPU, that backup fails with ``PCI device
'0000:05:00.0' already in use by VMID '104'``. *pve-gpu-hook* is a vzdump hook script plus this
admin command: before such a backup the hook shuts the holder down gracefully, and afterwards it
puts every guest back into the power state it had before the job, also after failures, aborts and
crashes. It never boots a guest that was off, never leaves a guest off that was on, and says in the
task log what it did and why.

vzdump runs the hook (``/usr/share/pve-gpu-hook/vzdump-hook``, set by ``pve-gpu-hook register``
as the ``script:`` of ``/etc/vzdump.conf``) in every phase of a job:
"""

PHASES = (
    (
        "job-start",
        "Reports guests an interrupted earlier job left off, and an invalid override file.",
    ),
    (
        "backup-start",
        "Of a stopped VM that passes through a PCI device: finds the running guests holding an "
        "IOMMU group it needs, records each in ``/var/lib/pve-gpu-hook/state.json`` before "
        "touching it, shuts it down (``qm shutdown --timeout``, or ``pct shutdown``; a hard stop "
        "only with ``force_stop``) and confirms that it is gone and its PCI reservation released. "
        "A protected, locked or stubborn holder fails just that backup, with one clear line.",
    ),
    (
        "log-end",
        "Of that VM: starts the holders again (the default ``restart: after-guest``), confirmed by "
        "polling their state.",
    ),
    (
        "job-end, job-abort",
        "Starts every guest still recorded. A guest that does not come back keeps its record and "
        "makes ``job-end`` fail, so the backup notification says so.",
    ),
    (
        "other phases",
        "Nothing. Running guests, templates, containers, VMs without passthrough and "
        "mdev-only VMs need nothing either.",
    ),
)

DESCRIPTION_END = """
Every action is logged to ``/var/log/pve-gpu-hook.log``. The admin command shows whether the hook
is in place (``status``), which guests fight for which GPU (``scan``), what a backup job would do
(``dry-run``), starts what a crash left off (``recover``) and edits ``/etc/vzdump.conf``
(``register``, ``unregister``). The optional settings are in ``/etc/pve-gpu-hook/config.yaml``,
see ``pve-gpu-hook.yaml(5)``.

It also hands a GPU over outside backups: ``start`` shuts down, gracefully, the running guests that
hold the devices of a guest, then starts that guest; the holders stay off. ``handover enable``
attaches the guest hookscript ``/usr/share/pve-gpu-hook/guest-hook`` to a guest, so that every
start of it (from the GUI too) does the same before PVE reserves its devices; when a holder must
not stop, PVE's start fails with ``hookscript error for <vmid> on pre-start``. vzdump's start of a
stopped VM for its backup (``lock: backup``) is left to the vzdump hook.
"""

OUTPUT = """
The read commands (``status``, ``scan``, ``dry-run``), ``recover`` and ``start`` take
``--output-format``, as PVE's own tools do: ``text`` (the default), ``json`` (one line, keys
sorted), ``json-pretty`` (indented, keys sorted) or ``yaml``. Their shapes, below, are stable:
scripts and monitoring can rely on them.

On a terminal ``text`` prints tables; a table too wide for the terminal is printed in the plain
form rather than cut, so a PCI address or a VMID is always whole. Piped, it prints plain aligned
text for ``grep`` and ``awk``: one line per row, columns at least two spaces apart, no colours, no
box drawing, and one awk field per column: a header is one word, a list is joined with ``,`` and no
blank (``102,103``), a blank inside a value is written ``_``, an empty value is ``-``. A table
without rows is a sentence saying so. Warnings and notes follow the tables, one per line.
``--noheader`` prints the rows only, without titles, header rows or blank lines; the notes and
warnings then go to stderr. ``--noborder`` drops the borders of the terminal tables. Control
characters from guest names and configuration files are printed escaped.
"""

METRICS = """
The hook and the command write what they know about waiting guests and backup jobs to
``/var/lib/prometheus/node-exporter/pve-gpu-hook.prom`` (the ``metrics_file`` setting moves it or
turns it off, see ``pve-gpu-hook.yaml(5)``), in Prometheus' text format. Debian's
``prometheus-node-exporter`` reads that directory with its textfile collector, as an unprivileged
user: watching the hook needs neither root nor a daemon. Zabbix, CheckMK or a script can read the
file as well, and ``pve-gpu-hook status --quiet`` answers by its exit status alone.

The file is written only when its directory exists, atomically, and readable by every user (mode
0644): when the hook records a guest it is about to stop (so that a crash still leaves a file that
says the guest is off), after it starts guests again, at the end of every backup job, and after
``recover``, ``register`` and ``unregister``. It is not rewritten in between:
``node_textfile_mtime_seconds`` tells when it was written. The last job is the last backup job
whose end the hook saw, whether or not it stopped a guest. Every metric is a gauge, and no sample
carries a timestamp:
"""

METRICS_ALERTS = """
Two alert rules for Prometheus: a guest has been waiting for more than 30 minutes, and the last job
failed to start a guest again. A holder stays off while the backups that need its GPU run (with
``restart: after-job``, until the end of the job): make the 30 minutes longer than those backups
take. The rules::

    groups:
    - name: pve-gpu-hook
      rules:
      - alert: PveGpuHookGuestLeftOff
        expr: >-
          time() - pve_gpu_hook_guest_waiting_since_timestamp_seconds
          > 30 * 60
        annotations:
          summary: >-
            {{ $labels.type }} {{ $labels.vmid }} on {{ $labels.instance }}
            was stopped by pve-gpu-hook {{ $value | humanizeDuration }} ago
            and is still off: see 'pve-gpu-hook status', then run
            'pve-gpu-hook recover'
      - alert: PveGpuHookRestartFailed
        expr: pve_gpu_hook_last_job_failed_restarts > 0
        annotations:
          summary: >-
            the last backup job on {{ $labels.instance }} could not start
            {{ $value }} guest(s) again: see 'pve-gpu-hook status'
"""


def metrics_section() -> list[str]:
    """The METRICS section: the list comes from the metrics module, as the file's HELP lines."""
    from pvegpuhook.metrics import METRICS as FAMILIES

    out = rst(METRICS)
    for metric in FAMILIES:
        text = metric.help
        if metric.labels:
            text += f" Labels: {', '.join(metric.labels)}."
        out += [".TP", line(bold(metric.name)), *fill(marked(text))]
    return out + rst(METRICS_ALERTS)


EXIT_STATUS = (
    ("0", "Success; nothing needs attention."),
    (
        "1",
        "Something needs attention or failed: ``status`` found something the admin must see (use "
        "it from monitoring), ``dry-run`` predicts a failing backup, ``recover`` could not start a "
        "guest (its record is kept), ``register`` refused to replace another hook script, "
        "``start`` was refused (nobody was stopped) or its guest did not start, ``handover "
        "enable`` found another hookscript or no storage for snippets. While a damaged state "
        "file exists (``state.json``, or one kept aside as ``state.json.corrupt-*``), "
        "``status``, ``scan``, ``dry-run`` and ``recover`` say so once on stderr and exit 1; "
        "``unregister --check-waiting`` (asked before a package removal) refuses.",
    ),
    (
        "2",
        "Usage or configuration error: a bad option or argument, an unknown VMID, an invalid "
        "override file (the message names the file and line). Also a command that cannot read "
        "what its answer depends on: run as another user than root, it says "
        "``must be run as root: cannot read`` and the file, and answers nothing.",
    ),
)

ENVIRONMENT = (
    (
        "PVE_GPU_HOOK_ROOT",
        "For tests only. A directory that stands for ``/`` for every host path read or written "
        "and every command run (``etc/pve``, ``etc/vzdump.conf``, ``sys``, ``proc``, ``run``, "
        "``var``, ``usr/sbin/qm``, ...), so the test suite and ``make demo`` run the real code "
        "against a fake node. Never set it on a real host. Default: ``/``.",
    ),
)

FILES = (
    (
        "/etc/vzdump.conf",
        "vzdump's node settings; ``register`` adds a marked block with the ``script:`` line, "
        "``unregister`` takes it out again.",
    ),
    ("/usr/share/pve-gpu-hook/vzdump-hook", "The hook script vzdump runs."),
    (
        "/usr/share/pve-gpu-hook/guest-hook",
        "The guest hookscript of ``handover enable``, linked as ``pve-gpu-hook-guest-hook`` into "
        "the ``snippets`` directory of a directory storage of ``/etc/pve/storage.cfg``.",
    ),
    ("/etc/pve-gpu-hook/config.yaml", "The optional override file, see ``pve-gpu-hook.yaml(5)``."),
    (
        "/var/lib/pve-gpu-hook/state.json",
        "The guests the hook stopped and has not confirmed running again (survives a reboot). "
        "The same directory keeps the chained hook (``chain``) and what ``register`` added "
        "(``registration.json``). A corrupt state file is kept aside next to it.",
    ),
    ("/var/log/pve-gpu-hook.log", "Every action of the hook and the command, with timestamps."),
    (
        "/var/lib/prometheus/node-exporter/pve-gpu-hook.prom",
        "The metrics (see METRICS), written only when that directory exists.",
    ),
    ("/run/lock/pve-gpu-hook.lock", "The lock of the state file."),
    (
        "/etc/pve/jobs.cfg",
        "The cluster's backup jobs; a job that sets its own ``script`` bypasses the hook "
        "(``status`` names it).",
    ),
    (
        "/etc/pve/qemu-server/*.conf, /etc/pve/lxc/*.conf",
        "The guest configurations of this node; ``scan --cluster`` reads ``/etc/pve/nodes/*``.",
    ),
    ("/etc/pve/mapping/pci.cfg", "PCI resource mappings (``hostpciN: mapping=...``)."),
    (
        "/usr/share/bash-completion/completions/pve-gpu-hook",
        "Bash completion of commands, options and VMIDs.",
    ),
)

EXAMPLES = (
    (
        "Check from monitoring; exit status 1 means something needs the admin:",
        [
            "pve-gpu-hook status",
            "pve-gpu-hook status --output-format json",
            "pve-gpu-hook status --quiet",
        ],
    ),
    (
        "See which guests fight for which GPU, then one guest in detail:",
        ["pve-gpu-hook scan", "pve-gpu-hook scan 102"],
    ),
    (
        "Predict a stop-mode backup of every guest, and of all but two:",
        [
            "pve-gpu-hook dry-run --all --mode stop",
            "pve-gpu-hook dry-run --all --exclude 110,111 --mode stop",
        ],
    ),
    (
        "After a crash or a killed backup job: see what is waiting, then start it:",
        ["pve-gpu-hook status", "pve-gpu-hook recover --dry-run", "pve-gpu-hook recover"],
    ),
    (
        "Start VM 102, shutting down the guest that holds its GPU; or have every start of it do "
        "that:",
        [
            "pve-gpu-hook start 102 --dry-run",
            "pve-gpu-hook start 102",
            "pve-gpu-hook handover enable 102",
        ],
    ),
    (
        "Register the hook where another hook script is already set in /etc/vzdump.conf, keeping "
        "it (it runs after ours):",
        ["pve-gpu-hook register --chain"],
    ),
)

HEADS = (".SH", ".SS")
SEE_ALSO = ("vzdump(1)", "qm(1)", "pct(1)", "pve-gpu-hook.yaml(5)")

# the read commands whose module docstrings document their JSON shapes
SHAPES = ("status", "scan", "dry-run", "recover", "start")


def _tagged(items: Iterable[tuple[str, str]], *, tag: Callable[[str], str] = bold) -> list[str]:
    out: list[str] = []
    for name, text in items:
        tags = ", ".join(tag(part) for part in name.split(", "))
        out.extend([".TP", line(tags), *fill(inline(text))])
    return out


def _shape_doc(name: str) -> list[str]:
    """The JSON part of a read command's module docstring: from its first mention of JSON on."""
    module = importlib.import_module(f"pvegpuhook.commands.{name.replace('-', '_')}")
    doc = textwrap.dedent((module.__doc__ or "").split("\n", 1)[-1])
    paragraphs = re.split(r"\n\s*\n", doc.strip("\n"))
    for index, paragraph in enumerate(paragraphs):
        if "JSON" in paragraph and not paragraph.startswith(" "):
            return rst("\n\n".join(paragraphs[index:]))
    return []


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole page."""
    if parser is None:
        from pvegpuhook.cli import build_parser

        parser = build_parser()
    date = RELEASE_DATES.get(__version__)
    if date is None:
        raise SystemExit(
            f"tools/manpage.py: no release date for version {__version__}: add it to RELEASE_DATES"
        )
    commands = subcommands(parser)
    summary = (parser.description or "").rstrip(".")
    summary = summary[:1].lower() + summary[1:]
    out = [
        f'.\\" {PROG}({SECTION}): generated by "python3 -m tools.manpage" (make man).',
        '.\\" Do not edit: change the parser or tools/manpage.py and run "make man".',
        f'.TH {escape(PROG.upper())} {SECTION} "{date}" "{escape(PROG)} {escape(__version__)}" '
        f'"{MANUAL}"',
        # no hyphenation, so paths and options print as typed: .nh, and HY (groff_man's
        # hyphenation register) 0, as .YS and .EE restore hyphenation from it; and ragged
        # right, as long unbreakable paths would stretch justified lines
        ".nr HY 0",
        ".nh",
        ".ad l",
        ".SH NAME",
        *fill(f"{escape(PROG)} \\- {escape(summary)}"),
        ".SH SYNOPSIS",
    ]
    out += synopsis("", parser)
    for name, sub in commands.items():
        out += synopsis(name, sub)
    out += [".SH DESCRIPTION"]
    out += rst(DESCRIPTION)
    out += _tagged(PHASES)
    out += rst(DESCRIPTION_END)
    out += [".SH OPTIONS"]
    out += options(parser, with_help=True)
    out += [
        ".PP",
        *fill(f"Every command also takes {bold('-h')}, {bold('--help')}."),
        ".SH COMMANDS",
    ]
    for name, sub in commands.items():
        out += [f".SS {escape(name)}", *fill(marked(sub.description or ""))]
        out += options(sub, with_help=False)
    out += [".SH OUTPUT FORMATS"]
    out += rst(OUTPUT)
    for name in SHAPES:
        if name in commands:
            out += [f'.SS "{escape(name)} output"', *_shape_doc(name)]
    out += [".SH METRICS"]
    out += metrics_section()
    out += [".SH EXIT STATUS"]
    out += _tagged(EXIT_STATUS)
    out += [".SH ENVIRONMENT"]
    out += _tagged(ENVIRONMENT)
    out += [".SH FILES"]
    out += _tagged(FILES, tag=italic)
    out += [".SH EXAMPLES"]
    for text, commands_ in EXAMPLES:
        out += [".PP", *fill(inline(text)), ".PP", ".EX"]
        out += [line(escape(f"  {command}")) for command in commands_]
        out += [".EE"]
    out += [".SH SEE ALSO"]
    refs = [ref.partition("(") for ref in SEE_ALSO]
    out += [
        f".BR {escape(page)} ({number}{',' if index < len(refs) - 1 else ''}"
        for index, (page, _, number) in enumerate(refs)
    ]
    # a paragraph right after a heading needs no .PP (mandoc warns about it)
    out = [text for i, text in enumerate(out) if not (text == ".PP" and out[i - 1][:3] in HEADS)]
    return "\n".join(out) + "\n"


# ---- the settings schema: pve-gpu-hook.yaml(5) and etc/config.yaml -----------------------------

REPO = Path(__file__).resolve().parents[1]
YAML_PAGE = "man/pve-gpu-hook.yaml.5"
KEYS_BEGIN = '.\\" KEYS: generated from pvegpuhook/settings.py OPTIONS by "make man"'
KEYS_END = '.\\" end of KEYS'


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def keys_section() -> list[str]:
    """The KEYS section of pve-gpu-hook.yaml(5): one tagged paragraph per key of the schema."""
    from pvegpuhook.settings import OPTIONS

    out = [KEYS_BEGIN, ".SH KEYS"]
    for option in OPTIONS:
        default = bold(_yaml_value(option.default))
        out += [".TP", f".B {escape(option.name)}"]
        out += fill(f"Type: {escape(option.expected)}; default: {default}.")
        out += [".br", *fill(inline(option.doc))]
    return [*out, KEYS_END]


def render_yaml_page(page: str) -> str:
    """``page`` (the committed pve-gpu-hook.yaml(5)) with its KEYS section made anew."""
    lines = page.splitlines()
    try:
        begin, end = lines.index(KEYS_BEGIN), lines.index(KEYS_END)
    except ValueError:
        raise SystemExit(f"{YAML_PAGE}: the KEYS markers are missing") from None
    return "\n".join([*lines[:begin], *keys_section(), *lines[end + 1 :]]) + "\n"


CONFIG_HEAD = """\
# /etc/pve-gpu-hook/config.yaml: local settings of pve-gpu-hook (see pve-gpu-hook.yaml(5)).
#
# Every key is optional. Each one is shown below, commented out, with its default value: to change
# a setting, remove the "#" in front of its key and edit the value. A key that is not known, or a
# value of the wrong type, is an error naming the file and line: 'pve-gpu-hook status' shows it,
# and until it is fixed the hook stops no guest (it still starts the guests it stopped before).
"""


def render_config() -> str:
    """``etc/config.yaml``: every key commented out with its default, under its comment."""
    from pvegpuhook.settings import OPTIONS

    blocks = [CONFIG_HEAD.rstrip("\n")]
    for option in OPTIONS:
        lines = [f"# {text}" for text in textwrap.wrap(option.comment, 98, break_on_hyphens=False)]
        lines.append(f"#{option.name}: {_yaml_value(option.default)}")
        if option.example:
            lines.append(f"#   {option.example}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what = argv[0] if argv else "page8"
    if what == "page8":
        sys.stdout.write(render())
    elif what == "yaml5":
        with open(REPO / YAML_PAGE, encoding="utf-8") as f:
            sys.stdout.write(render_yaml_page(f.read()))
    elif what == "config":
        sys.stdout.write(render_config())
    else:
        print("usage: python3 -m tools.manpage [page8|yaml5|config]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
