"""The admin command ``pve-gpu-hook``: argparse, one module per sub-command, one error type.

Every sub-command module in ``pvegpuhook.commands`` has ``add_parser(subparsers)`` and
``run(args) -> int``; a GpuHookError anywhere becomes one line on stderr and its exit code. A
usage error is reported by the parser it belongs to: ``scan 102 103`` with ``scan``'s usage, an
unknown option before any sub-command as that option, not as a missing COMMAND.

Tab completion: the bash completion script (``completion/pve-gpu-hook``, made by argcomplete's
``register-python-argcomplete``) runs the command with ``_ARGCOMPLETE=1``; :func:`main` then answers
right after the parser is built (the command modules import nothing heavy at import time, and
``rich`` only when a table is printed) and exits before any sub-command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from pvegpuhook import __version__
from pvegpuhook.errors import EXIT_USAGE, GpuHookError
from pvegpuhook.log import clean

# in the order an admin meets them: look, predict, repair, act, set up
COMMANDS = ("status", "scan", "dry-run", "recover", "start", "register", "unregister", "handover")


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and action.nargs != 0
            and default not in (None, "", [], argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pve-gpu-hook",
        description="Free a shared passed-through GPU for vzdump backups and put guests back.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=Parser, required=False
    )
    import importlib

    for name in COMMANDS:
        module = importlib.import_module(f"pvegpuhook.commands.{name.replace('-', '_')}")
        module.add_parser(subparsers)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and report a usage error with the usage of the parser it belongs to."""
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    if command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.error(f"a COMMAND is needed: one of {', '.join(COMMANDS)}")
    if extra:
        sub = _subparser(parser, command)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


# commands whose answer does not read the state: a damaged one is said after it (status and
# recover say it with theirs; register and unregister keep their own answers)
TELL_DAMAGE = ("scan", "dry-run")


def damage_told() -> int:
    """Say once on stderr that the state is damaged (guests the hook stopped may be off and no
    record names them), and give exit status 1; 0 when it is whole."""
    from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, NotPermitted
    from pvegpuhook.state import StateStore

    said: list[str] = []
    store = StateStore(report=said.append)
    try:
        store.records()
    except NotPermitted:
        raise
    except GpuHookError as error:
        said.append(str(error))
    said += [f"a damaged state file is kept aside: {path}" for path in store.corrupt_files()]
    if not said:
        return EXIT_OK
    sys.stdout.flush()
    print(
        f"pve-gpu-hook: warning: {clean('; '.join(said))}: guests the hook stopped may still be "
        "off; 'pve-gpu-hook recover --dry-run' shows which",
        file=sys.stderr,
    )
    return EXIT_ATTENTION


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's tab completion and exit, when this run is one (argcomplete's protocol)."""
    # only a completion run has _ARGCOMPLETE set: every other run skips importing argcomplete
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return  # no completion without it; the command itself does not need it
    argcomplete.autocomplete(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:  # a completion request comes from the shell, never from a caller's argv
        autocomplete(parser)
    args = parse(parser, argv)
    try:
        code = int(args.run(args))
        if args.command in TELL_DAMAGE and code != EXIT_USAGE:
            code = max(code, damage_told())
        return code
    except GpuHookError as error:
        sys.stdout.flush()
        print(f"pve-gpu-hook: {clean(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("pve-gpu-hook: interrupted", file=sys.stderr)
        return EXIT_USAGE
