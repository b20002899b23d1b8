"""One module per sub-command of ``pve-gpu-hook``, and the argument types they share.

Each module has ``add_parser(subparsers)`` and a ``run(args) -> int`` adapter: it calls the
library, builds one result, and prints it once (:func:`pvegpuhook.output.emit`). Commands write
no file themselves: the library's owners do (state, registration, log).
"""

from __future__ import annotations

import argparse

from pvegpuhook.vmid import MAX_VMID, MIN_VMID, parse_vmid


def vmid_arg(text: str) -> int:
    """A VMID as PVE allows it (100-999999999, plain ASCII digits)."""
    vmid = parse_vmid(text)
    if vmid is None:
        raise argparse.ArgumentTypeError(f"invalid VMID {text!r} ({MIN_VMID}-{MAX_VMID})")
    return vmid


def seconds_arg(text: str) -> float:
    """A wait in seconds, 0-3600 (a lock wait: the admin's shell should not hang for longer)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r} (0-3600)")
    return value
