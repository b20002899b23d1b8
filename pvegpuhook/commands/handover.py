"""``pve-gpu-hook handover enable|disable VMID``: the hand-over at every start of a guest.

``enable`` attaches the package's guest hookscript to the guest (``qm set``/``pct set
--hookscript``, through a link in the snippets directory of a directory storage); from then on
every start of the guest, from the GUI too, first shuts down the guests holding its devices, as
``pve-gpu-hook start`` does. ``disable`` detaches it.
"""

from __future__ import annotations

import argparse

from pvegpuhook import completion
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_OK
from pvegpuhook.log import clean


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "handover",
        help="hand the GPU over at every start of a guest (its hookscript)",
        description=(
            "enable: attach pve-gpu-hook's guest hookscript to the guest, so that every start "
            "of it (the GUI's too) first shuts down the guests holding its devices, as 'start' "
            "does; the start fails, and nobody is stopped, when a holder is protected. The "
            "hookscript is a link in the snippets directory of the first directory storage "
            "with the content type 'snippets' ('local' first). A guest with another hookscript "
            "is left alone. disable: detach it. vzdump's start of a stopped VM for its backup "
            "is left to the vzdump hook."
        ),
    )
    parser.add_argument("action", choices=("enable", "disable"), help="attach or detach it")
    vmid = parser.add_argument("vmid", metavar="VMID", type=vmid_arg, help="the guest")
    vmid.completer = completion.local_vmids  # type: ignore[attr-defined]
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pvegpuhook import handover

    change = handover.enable if args.action == "enable" else handover.disable
    print(clean(change(args.vmid)))
    return EXIT_OK
