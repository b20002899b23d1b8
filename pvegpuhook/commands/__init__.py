"""One module per sub-command of ``pve-gpu-hook``, and the argument types they share."""

from __future__ import annotations

import argparse


def vmid_arg(text: str) -> int:
    """A VMID as PVE allows it (100-999999999, plain ASCII digits)."""
    from pvegpuhook.hook import parse_vmid

    vmid = parse_vmid(text)
    if vmid is None:
        raise argparse.ArgumentTypeError(f"invalid VMID {text!r} (100-999999999)")
    return vmid
