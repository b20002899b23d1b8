"""``pve-gpu-hook unregister``: take the block ``register`` added out of ``/etc/vzdump.conf``.

When the file still ends with exactly what ``register`` appended, it is cut off and the file is
byte for byte what it was before. Otherwise only the lines ``register`` wrote are removed and the
admin's own lines (also those inside our block) stay. The chained-hook record is dropped, so a
hook that ``register --chain`` shadowed is vzdump's script again. Called by the Debian prerm.

``--check-waiting`` changes nothing: it exits 1 while guests the hook stopped wait to be started
again (or the state file is damaged, so that some may), naming them and the ways out. The prerm
asks it before a removal: the records and ``recover`` go with the package, and a waiting guest
would stay off with nothing left to say why.
"""

from __future__ import annotations

import argparse
import sys

from pvegpuhook import metrics, registration
from pvegpuhook.commands import seconds_arg
from pvegpuhook.commands.register import print_report
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, GpuHookError, NotPermitted
from pvegpuhook.log import clean


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
    parser.add_argument(
        "--check-waiting",
        action="store_true",
        help="change nothing; exit 1 while guests the hook stopped wait to be started again "
        "(asked by the package's prerm before a removal)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.check_waiting:
        return check_waiting()
    code = print_report(registration.unregister(wait=args.wait))
    metrics.refresh("unregister", args.wait)  # the registration is one of the metrics
    return code


def check_waiting() -> int:
    """Exit 1, naming them and the ways out, while guests the hook stopped are waiting."""
    from pvegpuhook.state import StateStore

    damage: list[str] = []
    store = StateStore(report=damage.append)
    try:
        waiting = sorted(store.records(), key=lambda r: r.vmid)
    except NotPermitted:
        raise
    except GpuHookError as error:  # unreadable: some guest may be waiting
        waiting, damage = [], [str(error)]
    damaged = [*damage, *(f"{path} is kept aside" for path in store.corrupt_files())]
    if not waiting and not damaged:
        return EXIT_OK
    out = []
    if waiting:
        labels = ", ".join(r.label for r in waiting)
        out.append(f"guests it stopped are waiting to be started again: {labels}")
        out.append(
            "start them with 'pve-gpu-hook recover', or drop a record with "
            "'pve-gpu-hook recover --forget VMID' (the guest is left as it is)"
        )
    if damaged:
        out.append(f"the state is damaged, guests it named may be waiting: {'; '.join(damaged)}")
        out.append(
            "'pve-gpu-hook recover' shows the log lines of the guests the hook stopped; start "
            "those that should run, then delete the damaged file(s)"
        )
    for line in out:
        print(f"pve-gpu-hook: {clean(line)}", file=sys.stderr)
    return EXIT_ATTENTION
