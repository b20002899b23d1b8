"""The admin command ``pve-gpu-hook``: argparse, one module per sub-command, one error type.

Every sub-command module in ``pvegpuhook.commands`` has ``add_parser(subparsers)`` and
``run(args) -> int``; a GpuHookError anywhere becomes one line on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import sys

from pvegpuhook import __version__
from pvegpuhook.errors import EXIT_USAGE, GpuHookError

COMMANDS = ("dry-run", "recover", "status", "register", "unregister", "scan")


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except GpuHookError as error:
        print(f"pve-gpu-hook: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("pve-gpu-hook: interrupted", file=sys.stderr)
        return EXIT_USAGE
