"""What ``scan`` warns about on a node: configurations that break backups or boots.

Each check takes a :class:`~pvegpuhook.nodeview.NodeView` and returns its findings; nothing is
appended to a list someone else owns.
"""

from __future__ import annotations

from pvegpuhook import paths, pci
from pvegpuhook.claims import invalid_map_entry
from pvegpuhook.model import IOMMU_MISSING, RESERVED, Claim, ClaimKind, Guest, GuestKind, Holder
from pvegpuhook.nodeview import Entry, Finding, NodeView

BOOT_ORDER = "startup order, then VMID"


def findings(view: NodeView) -> list[Finding]:
    """Every warning about the view, each message once, the reading problems first."""
    found = [
        *view.problems,
        *(
            Finding(_pending_message(guest), vmid)
            for vmid, guest in sorted(view.guests.items())
            if guest.config.has_pending("hostpci")
        ),
        *(_iommu_findings(view) if view.local else []),
        *_mapping_findings(view),
        *_failure_findings(view),
        *_sibling_findings(view),
        *_boot_findings(view),
        *(health_findings(view) if view.local else []),
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


def _labels(view: NodeView, vmids: list[int]) -> str:
    return join_and([view.guests[v].label for v in vmids])


# ---- what PVE refuses at a start ----------------------------------------------------------------


def _iommu_findings(view: NodeView) -> list[Finding]:
    """No IOMMU: PVE starts no VM with a PCI device (pve-common SysFSTools.pm
    check_iommu_support, as qemu-server PCI.pm prepare_pci_device asks it)."""
    users = sorted(v for v, needs in view.needs.items() if needs and not view.guests[v].template)
    if not users or view.sysfs.iommu_present():
        return []
    return [
        Finding(
            f"no IOMMU: {paths.host(pci.IOMMU_CLASS)} is empty (IOMMU off in the firmware or on "
            f"the kernel command line): PVE starts no VM with a PCI device "
            f"('cannot prepare PCI pass-through, IOMMU not present'), so {_labels(view, users)} "
            "cannot start, nor be backed up while stopped",
            *users,
        )
    ]


def _mapping_findings(view: NodeView) -> list[Finding]:
    """Mappings PVE cannot use on this node, each said once against its ``pci.cfg`` line with
    the guests it keeps from starting: one PVE ignores whole (no valid map line), one without a
    map line for this node (only when a guest here uses it), and map lines out of date with the
    hardware (a device gone, an id or IOMMU group changed)."""
    found: list[Finding] = []
    users: dict[str, set[int]] = {}
    for entry in view.entries:
        if entry.mapping:
            users.setdefault(entry.mapping, set()).add(entry.guest.vmid)
    for vmid, needs in view.needs.items():  # a need without alternatives has no entry
        for need in needs:
            if need.mapping:
                users.setdefault(need.mapping, set()).add(vmid)
    where = paths.host(paths.PCI_MAPPING)
    for name, mapping in sorted(view.mappings.items()):
        vmids = sorted(users.get(name, ()))
        who = f"PVE cannot start {_labels(view, vmids)} (mapping {name!r})" if vmids else ""
        if mapping.dropped:
            found.append(
                Finding(
                    f"{where}:{mapping.line}: mapping {name!r}: PVE ignores it, "
                    f"{mapping.dropped}; {who or 'no guest uses it'}",
                    *vmids,
                )
            )
            continue
        if not mapping.for_node(view.node) and vmids:
            found.append(
                Finding(
                    f"{where}:{mapping.line}: mapping {name!r} has no map line for node "
                    f"{view.node}: {who}",
                    *vmids,
                )
            )
        for line in mapping.for_node(view.node) if view.local else []:  # sysfs needed
            problem = invalid_map_entry(view.sysfs, mapping, line)
            if problem is None:
                continue
            found.append(
                Finding(
                    f"{where}:{line.line}: mapping {name!r} does not match this node's hardware "
                    f"({problem}): PVE refuses it ('PCI device mapping invalid (hardware probably "
                    f"changed)'); {who or 'no guest uses it'}",
                    *vmids,
                )
            )
    return found


def _failure_findings(view: NodeView) -> list[Finding]:
    """Each config line PVE's start will die on, blamed on that line (a ``pci.cfg`` line is
    reported once by :func:`_mapping_findings`, not in every guest using it)."""
    found: list[Finding] = []
    mapping_file = paths.host(paths.PCI_MAPPING)
    for vmid, needs in sorted(view.needs.items()):
        guest = view.guests[vmid]
        for need in needs:
            if need.failure in (None, IOMMU_MISSING) or guest.template:
                continue  # no IOMMU is one finding for the node
            if (need.blame or "").startswith(mapping_file + ":"):
                continue
            detail = " (not in sysfs)" if need.failure.startswith("no PCI device found") else ""
            found.append(
                Finding(
                    f"{need.blame}: {need.source}: {need.failure}{detail}: PVE cannot start "
                    f"{guest.label}, nor back it up while it is stopped",
                    vmid,
                )
            )
    return found


# ---- who can take whose device ------------------------------------------------------------------


def _sibling_findings(view: NodeView) -> list[Finding]:
    """A full passthrough binds the whole IOMMU group: other devices in it go too."""
    found: list[Finding] = []
    by_unit: dict[str, list[Entry]] = {}
    for entry in view.entries:
        for unit in entry.claim.units:
            by_unit.setdefault(unit, []).append(entry)
    for unit in sorted(by_unit, key=pci.unit_order):
        where = pci.unit_text(unit)
        by_device: dict[str, list[Entry]] = {}
        for entry in by_unit[unit]:
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
    return found


def _boot_order(view: NodeView) -> list[Guest]:
    """The guests PVE starts at boot (``onboot: 1``, not templates), in its order: ``startup``
    order, then VMID (pve-manager's startall)."""
    from pvegpuhook.plan import UNORDERED

    guests = [g for g in view.guests.values() if g.onboot and not g.template]
    return sorted(
        guests, key=lambda g: (UNORDERED if g.startup_order is None else g.startup_order, g.vmid)
    )


def _claims_of(view: NodeView, guest: Guest) -> list[Claim]:
    if guest.kind == GuestKind.QEMU:
        return [c for need in view.needs.get(guest.vmid, []) for c in need.claims()]
    return [e.claim for e in view.entries_of(guest.vmid)]


def _boot_findings(view: NodeView) -> list[Finding]:
    """``onboot`` guests that can take each other's device, and what the boot then does.

    The boot is walked guest by guest in PVE's order with the planner's own choice
    (:func:`~pvegpuhook.plan.plan_free`): each VM takes the alternative PVE gives it with the
    guests before it running; one that finds its device taken does not start (a CT starts but
    cannot use it). A group of guests whose claims overlap gets one warning saying who gets what.
    """
    from pvegpuhook.plan import plan_free

    order = _boot_order(view)
    claims = {g.vmid: _claims_of(view, g) for g in order}
    # which boot guests can take each other's device: connected groups
    group_of: dict[int, int] = {g.vmid: g.vmid for g in order}

    def root(vmid: int) -> int:
        while group_of[vmid] != vmid:
            vmid = group_of[vmid]
        return vmid

    for index, a in enumerate(order):
        for b in order[index + 1 :]:
            if any(x.conflicts_with(y) for x in claims[a.vmid] for y in claims[b.vmid]):
                group_of[root(b.vmid)] = root(a.vmid)
    groups: dict[int, list[Guest]] = {}
    for guest in order:
        groups.setdefault(root(guest.vmid), []).append(guest)

    running: list[Holder] = []
    events: dict[int, str] = {}
    taken: dict[int, list[str]] = {}
    for guest in order:
        if guest.kind == GuestKind.QEMU:
            needs = view.needs.get(guest.vmid, [])
            if not needs or any(n.failure for n in needs):
                continue  # no device, or it cannot start anyway (reported on its own)
            plan = plan_free(guest, needs, running, frozenset())
            blocker = plan.stops[0] if plan.stops else None
            if blocker is None and plan.refusal is not None:
                blocker_vmid, address = plan.refusal.holder.vmid, plan.refusal.address
            elif blocker is not None:
                blocker_vmid, address = blocker.holder.vmid, blocker.address
            else:
                picked = zip(needs, plan.picks, strict=True)
                got = [c for n, i in picked if i is not None for c in n.alternatives[i]]
                taken[guest.vmid] = [c.address for c in got]
                held = [Claim(c.address, c.units, c.kind, _source(c)) for c in got]
                running.append(Holder(guest, held))
                events[guest.vmid] = f"{guest.label} takes {', '.join(taken[guest.vmid])}"
                continue
            events[guest.vmid] = (
                f"{guest.label} cannot start: {address} is taken by "
                f"{view.guests[blocker_vmid].label}"
            )
        else:
            mine = claims[guest.vmid]
            if not mine:
                continue
            other = next(
                (h for h in running for c in h.claims for m in mine if m.conflicts_with(c)), None
            )
            if other is None:
                running.append(Holder(guest, mine))
                taken[guest.vmid] = [c.address for c in mine]
                events[guest.vmid] = f"{guest.label} uses {', '.join(taken[guest.vmid])}"
            else:
                events[guest.vmid] = (
                    f"{guest.label} cannot use its GPU: {other.guest.label} has it (vfio-pci)"
                )

    found: list[Finding] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        vmids = sorted(g.vmid for g in members)
        labels = _labels(view, vmids)
        pools = {
            n.mapping
            for g in members
            for n in view.needs.get(g.vmid, [])
            if n.mapping and len(n.alternatives) > 1
        }
        if not pools:
            units = sorted(
                {u for g in members for c in claims[g.vmid] for u in c.units}, key=pci.unit_order
            )
            shared = [
                u
                for u in units
                if sum(any(u in c.units for c in claims[g.vmid]) for g in members) > 1
            ]
            what = f"conflict on {join_and([pci.unit_text(u) for u in shared])}"
        elif len(pools) == 1 and all(
            any(n.mapping in pools for n in view.needs.get(g.vmid, [])) for g in members
        ):
            what = f"mapping {next(iter(pools))}"
        else:
            what = "can take each other's device"
        first = next((g for g in members if g.vmid in taken), None)
        prize = ", ".join(taken[first.vmid]) if first is not None else "it"
        rule = f"whichever starts first ({BOOT_ORDER}) takes {prize}"
        if not pools:
            rule = f"only one of them can have it: {rule}"
        story = "; ".join(events[g.vmid] for g in members if g.vmid in events)
        found.append(
            Finding(
                f"{labels} {'both' if len(members) == 2 else 'all'} have onboot: 1 and {what}: "
                f"{rule}" + (f"; at boot: {story}" if story else ""),
                *vmids,
            )
        )
    return found


def _source(claim: Claim) -> str:
    """What a started VM's claim counts as for the next one: PVE reserves every function it
    passes through (not an mdev)."""
    return claim.source if claim.kind == ClaimKind.MDEV else RESERVED


# ---- the GPU's own health -----------------------------------------------------------------------


def health_findings(view: NodeView) -> list[Finding]:
    """Passed-through devices in ``D3cold`` or without a reset method (sysfs ``power_state``,
    ``reset_method``), with the VMs passing them through."""
    found: list[Finding] = []
    users: dict[str, set[int]] = {}
    for entry in view.entries:
        if entry.claim.kind == ClaimKind.EXCLUSIVE:
            users.setdefault(pci.device_of(entry.claim.address), set()).add(entry.guest.vmid)
    for device, vmids in sorted(users.items()):
        functions = view.sysfs.functions(device)
        if not functions:
            continue
        labels = join_and([f"{view.guests[v].kind.word} {v}" for v in sorted(vmids)])
        message = health_problem(view.sysfs, device, functions[0])
        if message is not None:
            found.append(Finding(f"{message} (passed through by {labels})", *sorted(vmids)))
    return found


def health_problem(sysfs: pci.Sysfs, device: str, function: str) -> str | None:
    """What is wrong with a GPU itself, for a VM that passes it through, or None."""
    if sysfs.power_state(function) == "D3cold":
        return (
            f"{device} is in power state D3cold: the next start of a VM with it may fail with "
            "'Unable to change power state from D3cold to D0, device inaccessible'"
        )
    if sysfs.reset_methods(function) == []:
        return (
            f"{device} has no reset method (its reset_method is empty): a VM that stops may leave "
            "it unusable until the host reboots (as with the AMD reset bug), so a guest shut down "
            "to free it may not start again"
        )
    return None


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
