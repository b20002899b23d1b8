"""``pve-gpu-hook unregister``: take the block ``register`` added out of ``/etc/vzdump.conf``.

When the file still ends with exactly what ``register`` appended, it is cut off and the file is
byte for byte what it was before. Otherwise only the lines ``register`` wrote are removed and the
admin's own lines (also those inside our block) stay. The chained-hook record is dropped, so a
hook that ``register --chain`` shadowed is vzdump's script again. Called by the Debian prerm.
"""

from __future__ import annotations

import argparse

from pvegpuhook import metrics, registration
from pvegpuhook.commands import seconds_arg
from pvegpuhook.commands.register import print_report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "unregister",
        help="remove the hook from /etc/vzdump.conf",
        description=(
            "Remove the block 'pve-gpu-hook register' added to /etc/vzdump.conf, restoring the "
            "file byte for byte, and forget the chained hook (it is vzdump's script again). "
            "Lines the admin added are never removed. Safe to run again."
        ),
    )
    parser.add_argument(
        "--wait",
        type=seconds_arg,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the lock, 0-3600",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    code = print_report(registration.unregister(wait=args.wait))
    metrics.refresh("unregister", args.wait)  # the registration is one of the metrics
    return code
