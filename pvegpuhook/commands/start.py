"""``pve-gpu-hook start VMID``: hand the guest its GPU, then start it.

Shuts down, gracefully, the running guests that hold a device the guest will claim (the same
decision as for a backup: mapping pools picked as PVE picks them, ``protect``, HA,
``shutdown_timeout``, ``force_stop``), decided in full before anybody is stopped; then starts the
guest and confirms it runs. The holders stay off. Text: one line per holder, then one for the
guest, as they happen.

JSON shape (``--output-format json``)::

    {"format": 1, "guest": {"vmid": 102, "type": "qemu", "name": "gpu2"}, "dry_run": false,
     "result": "started" | "running" | "would-start" | "refused" | "failed",
     "reason": str,                        # why it was refused or failed; else ""
     "holders": [{"vmid": 104, "type": "qemu", "name": "win11", "address": "0000:01:00.0",
                  "action": "shut-down" | "stopped-hard" | "would-shut-down" | "failed"
                            | "refused" | "untouched",
                  "detail": str}],
     "warnings": [str, ...]}

Exit status 0 when the guest runs (or, with ``--dry-run``, would be started), 1 when a holder
must not or could not be stopped or the guest did not start, 2 for an unknown guest or an invalid
override file that keeps the hand-over from stopping anyone.
"""

from __future__ import annotations

import argparse
import sys

from pvegpuhook import completion
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK
from pvegpuhook.handover import hand_over
from pvegpuhook.log import clean
from pvegpuhook.output import add_output_options, emit
from pvegpuhook.settings import load_settings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "start",
        help="hand a guest its GPU: shut down the guests holding it, then start the guest",
        description=(
            "Start a guest whose passed-through devices other running guests hold: shut those "
            "guests down gracefully (as for a backup: shutdown_timeout, force_stop, protect, "
            "HA), confirm they are gone, then start the guest and confirm it runs. Decides "
            "everything before stopping anyone: when a holder is protected or locked, nobody is "
            "stopped. The holders are not started again. Prints one line per holder."
        ),
    )
    vmid = parser.add_argument("vmid", metavar="VMID", type=vmid_arg, help="the guest to start")
    vmid.completer = completion.local_vmids  # type: ignore[attr-defined]
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    add_output_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    load_settings()  # an invalid override file: exit 2 before anything (protect is unknown)
    text = (getattr(args, "output_format", "text") or "text") == "text"
    done = hand_over(args.vmid, dry_run=args.dry_run, say=_print if text else None)
    if text:
        if done.reason and not done.ok:
            print(f"pve-gpu-hook: {clean(done.reason)}", file=sys.stderr)
        for warning in done.warnings:
            print(f"warning: {clean(warning)}")
    else:
        data = {
            "guest": {"vmid": done.guest.vmid, "type": done.guest.kind, "name": done.guest.name},
            "dry_run": done.dry_run,
            "result": done.result,
            "reason": done.reason,
            "holders": [h.as_data() for h in done.holders],
            "warnings": done.warnings,
        }
        emit(args, data, [])
    return EXIT_OK if done.ok else EXIT_ATTENTION


def _print(line: str) -> None:
    print(clean(line), flush=True)
