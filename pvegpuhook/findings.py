"""What ``scan`` warns about on a node: configurations that break backups or boots.

Each check takes a :class:`~pvegpuhook.nodeview.NodeView` and returns its findings; nothing is
appended to a list someone else owns.
"""

from __future__ import annotations

from pvegpuhook import paths, pci
from pvegpuhook.model import ClaimKind, Guest
from pvegpuhook.nodeview import Entry, Finding, NodeView


def findings(view: NodeView) -> list[Finding]:
    """Every warning about the view, each message once, the reading problems first."""
    found = [
        *view.problems,
        *(
            Finding(_pending_message(guest), vmid)
            for vmid, guest in sorted(view.guests.items())
            if guest.config.has_pending("hostpci")
        ),
        *(_mapping_findings(view) if view.local else []),
        *_claim_findings(view),
    ]
    seen: set[str] = set()
    unique = []
    for finding in found:
        if finding.message not in seen:
            seen.add(finding.message)
            unique.append(finding)
    return unique


def join_and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _claim_findings(view: NodeView) -> list[Finding]:
    """Missing devices, siblings in one IOMMU group, conflicting ``onboot`` guests."""
    found: list[Finding] = []
    sysfs = view.sysfs
    by_unit: dict[str, list[Entry]] = {}
    missing: dict[tuple[int, str], list[Entry]] = {}
    for entry in view.entries:
        for unit in entry.claim.units:
            by_unit.setdefault(unit, []).append(entry)
        if view.local and not entry.mapping and not sysfs.exists(entry.claim.address):
            missing.setdefault((entry.guest.vmid, entry.claim.source), []).append(entry)
    for (vmid, source), entries in missing.items():
        found.append(
            Finding(
                f"{entries[0].guest.label} {source}: "
                f"{', '.join(e.claim.address for e in entries)} not on this node "
                "(no such device in sysfs)",
                vmid,
            )
        )
    for unit in sorted(by_unit, key=pci.unit_order):
        entries = by_unit[unit]
        where = pci.unit_text(unit)
        # Siblings: a full passthrough binds the whole group, so other devices in it go too.
        by_device: dict[str, list[Entry]] = {}
        for entry in entries:
            by_device.setdefault(pci.device_of(entry.claim.address), []).append(entry)
        pairs: set[tuple[int, int]] = set()
        for device, mine_list in by_device.items() if len(by_device) > 1 else ():
            for mine in mine_list:
                if mine.claim.kind != ClaimKind.EXCLUSIVE:
                    continue
                for other_device, others in by_device.items():
                    if other_device == device:
                        continue
                    for other in others:
                        pair = (mine.guest.vmid, other.guest.vmid)
                        if pair[0] == pair[1] or pair in pairs or pair[::-1] in pairs:
                            continue
                        pairs.add(pair)
                        found.append(
                            Finding(
                                f"{mine.guest.label} passes {mine.claim.address} and "
                                f"{other.guest.label} uses {other.claim.address}, both in {where}: "
                                "PVE binds the whole group to vfio-pci, so they cannot run at the "
                                "same time",
                                mine.guest.vmid,
                                other.guest.vmid,
                            )
                        )
        # onboot: only one of them can get the unit at boot; firm claims only (a mapping
        # with several alternatives can give each its own device).
        boot = [e for e in entries if e.guest.onboot and not e.guest.template and e.firm]
        guests = sorted({e.guest.vmid for e in boot})
        if len(guests) > 1 and any(e.claim.kind == ClaimKind.EXCLUSIVE for e in boot):
            conflicting = [
                vmid
                for vmid in guests
                if any(
                    a.claim.conflicts_with(b.claim)
                    for a in boot
                    if a.guest.vmid == vmid
                    for b in boot
                    if b.guest.vmid != vmid
                )
            ]
            if len(conflicting) > 1:
                labels = [view.guests[v].label for v in conflicting]
                found.append(
                    Finding(
                        f"{join_and(labels)} {'both' if len(labels) == 2 else 'all'} have "
                        f"onboot: 1 and conflict on {where}: only one of them can start at boot",
                        *conflicting,
                    )
                )
    return found


def _mapping_findings(view: NodeView) -> list[Finding]:
    """Map lines for this node that point at hardware this node does not have."""
    found: list[Finding] = []
    users: dict[str, set[int]] = {}
    for entry in view.entries:
        if entry.mapping:
            users.setdefault(entry.mapping, set()).add(entry.guest.vmid)
    for name, mapping in sorted(view.mappings.items()):
        for line in mapping.for_node(view.node):
            for raw in line.paths:
                address = pci.normalize(raw)
                if address is not None and view.sysfs.exists(address):
                    continue
                where = f"{paths.host(paths.PCI_MAPPING)}:{line.line}"
                what = repr(raw) if address is None else address
                found.append(
                    Finding(
                        f"{where}: PCI mapping {name!r} points at {what} for node {view.node}, "
                        "which this node does not have",
                        *sorted(users.get(name, ())),
                    )
                )
    return found


def _pending_message(guest: Guest) -> str:
    changed = sorted({k for k, _, _ in guest.config.pending if k.startswith("hostpci")})
    deleted = sorted(k for k in guest.config.pending_delete if k.startswith("hostpci"))
    parts = [f"{k}: {v}" for k, v, _ in guest.config.pending if k in changed]
    parts += [f"delete {k}" for k in deleted]
    return (
        f"{guest.label} has a hostpci change waiting in [PENDING] ({'; '.join(parts)}): "
        "it applies at the next start, also vzdump's start of the stopped VM for a backup; "
        "scan shows it applied"
    )
