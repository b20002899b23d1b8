"""VMID completers for argcomplete (``pve-gpu-hook dry-run 10<TAB>``).

argcomplete calls a completer with keyword arguments (``prefix``, ``action``, ``parser``,
``parsed_args``) while the shell waits, so these only list the guest config directories and read the
state file: no guest config is parsed, no lock is taken, nothing is written. Any error means "no
suggestions", never a traceback in the admin's shell.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any


def _matching(vmids: Iterable[int], prefix: str, taken: Iterable[object] = ()) -> list[str]:
    skip = {str(vmid) for vmid in taken}
    words = (str(vmid) for vmid in sorted(set(vmids)))
    return [word for word in words if word.startswith(prefix) and word not in skip]


def _taken(action: argparse.Action | None, parsed_args: argparse.Namespace | None) -> list[object]:
    """The VMIDs already on the command line for this argument (``dry-run 102 10<TAB>``)."""
    if action is None or parsed_args is None:
        return []
    value = getattr(parsed_args, action.dest, None)
    return list(value) if isinstance(value, list) else []


def _local() -> list[int]:
    from pvegpuhook.inventory import local_vmids

    try:
        return list(local_vmids())
    except (OSError, ValueError):
        return []


def _recorded() -> list[int]:
    from pvegpuhook.errors import GpuHookError
    from pvegpuhook.state import StateStore

    try:
        # not held, records() only reads (a corrupt file is not moved aside)
        return [record.vmid for record in StateStore().records()]
    except (GpuHookError, OSError, ValueError):
        return []  # e.g. /var/lib/pve-gpu-hook is root-only and this is a user's shell


def local_vmids(
    prefix: str = "",
    action: argparse.Action | None = None,
    parsed_args: argparse.Namespace | None = None,
    **_: Any,
) -> list[str]:
    """The guests configured on this node (``etc/pve/{qemu-server,lxc}/*.conf``)."""
    return _matching(_local(), prefix, _taken(action, parsed_args))


def recorded_vmids(
    prefix: str = "",
    action: argparse.Action | None = None,
    parsed_args: argparse.Namespace | None = None,
    **_: Any,
) -> list[str]:
    """The guests the state file says the hook stopped; the local guests when there are none
    (or the state cannot be read), so ``recover`` still completes something sensible."""
    return _matching(_recorded() or _local(), prefix, _taken(action, parsed_args))


def local_vmid_list(prefix: str = "", **_: Any) -> list[str]:
    """A comma-separated list of local guests (``--exclude 102,10<TAB>`` → ``102,103``)."""
    head, comma, last = prefix.rpartition(",")
    given = [part for part in head.split(",") if part]
    return [f"{head}{comma}{word}" for word in _matching(_local(), last, given)]
