"""The one VMID validator: PVE's range, plain ASCII digits, no leading zero.

Kept apart from :mod:`pvegpuhook.model` because the hook parses its argv on every call, and the
enums there cost more to import than a phase with nothing to do may spend.
"""

from __future__ import annotations

MIN_VMID = 100
MAX_VMID = 999999999


def parse_vmid(text: str) -> int | None:
    """``text`` as a VMID, or None when PVE would not accept it."""
    if not text.isascii() or not text.isdigit() or len(text) > 9 or text.startswith("0"):
        return None
    vmid = int(text)
    return vmid if MIN_VMID <= vmid <= MAX_VMID else None


def is_vmid(value: object) -> bool:
    """Whether a parsed value (JSON, YAML) is a VMID: an int, not a bool, in PVE's range."""
    return isinstance(value, int) and not isinstance(value, bool) and MIN_VMID <= value <= MAX_VMID
