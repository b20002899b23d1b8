"""``pve-gpu-hook register [--chain]``: make vzdump call the hook from ``/etc/vzdump.conf``.

Appends a marked block with our ``script:`` line at the end of the file (PVE uses the last
``script:``), never changing a line of the admin's, and records what was appended so that
``unregister`` restores the file byte for byte. Another active hook is never overridden silently:
``--chain`` keeps it (its line stays, shadowed by ours) and records it in our state, and the hook
runs it after its own work with the same arguments and environment. Called by the Debian postinst.
"""

from __future__ import annotations

import argparse
import sys

from pvegpuhook import metrics, registration
from pvegpuhook.commands import seconds_arg
from pvegpuhook.errors import EXIT_OK
from pvegpuhook.log import clean


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="add the hook to /etc/vzdump.conf",
        description=(
            f"Append a marked block setting 'script: {registration.HOOK_PATH}' to /etc/vzdump.conf "
            "(atomically; nothing else in the file changes). Refused when another hook script "
            "is active, unless --chain is given: then that script is kept and run by "
            "pve-gpu-hook after its own work, with the same arguments and environment. "
            "Safe to run again."
        ),
    )
    parser.add_argument(
        "--chain",
        action="store_true",
        help="keep the hook script already set in /etc/vzdump.conf and run it after ours",
    )
    parser.add_argument(
        "--wait",
        type=seconds_arg,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the lock, 0-3600",
    )
    parser.set_defaults(run=run)


def print_report(report: registration.Report) -> int:
    for warning in report.warnings:
        print(f"pve-gpu-hook: warning: {clean(warning)}", file=sys.stderr)
    for line in report.lines:
        print(clean(line))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    code = print_report(registration.register(chain_previous=args.chain, wait=args.wait))
    metrics.refresh("register", args.wait)  # the registration is one of the metrics
    return code
