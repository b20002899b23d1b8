"""The admin command ``pve-gpu-hook``: argparse, one module per sub-command, one error type.

Every sub-command module in ``pvegpuhook.commands`` has ``add_parser(subparsers)`` and
``run(args) -> int``; a GpuHookError anywhere becomes one line on stderr and its exit code.

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

COMMANDS = ("dry-run", "recover", "status", "register", "unregister", "scan", "start", "handover")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pve-gpu-hook",
        description="Free a shared passed-through GPU for vzdump backups and put guests back.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib

    for name in COMMANDS:
        module = importlib.import_module(f"pvegpuhook.commands.{name.replace('-', '_')}")
        module.add_parser(subparsers)
    return parser


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
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except GpuHookError as error:
        print(f"pve-gpu-hook: {clean(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("pve-gpu-hook: interrupted", file=sys.stderr)
        return EXIT_USAGE
