"""What ``scan`` reads of a node: every guest, its claims as its next start sees them, who runs.

Unlike :class:`~pvegpuhook.inventory.Inventory`, which reads only what one decision needs, a view
reads every guest config of the node (or, for ``scan --cluster``, of another node, from its
configs only). What it could not read is kept with the view as :class:`Finding` s; the checks
over a view are :mod:`pvegpuhook.findings`.
"""

from __future__ import annotations

import os

from pvegpuhook import paths, pci, runtime
from pvegpuhook.claims import ClaimReader
from pvegpuhook.inventory import Inventory, all_guests
from pvegpuhook.model import IOMMU_MISSING, Claim, Guest, GuestKind, Holder, Need
from pvegpuhook.plan import held_alternative, plan_free, same_function
from pvegpuhook.pveconf import PciMapping, load_pci_mapping


class Finding:
    """A warning an admin must see, and the guests it concerns (``scan VMID`` shows those)."""

    __slots__ = ("message", "vmids")

    def __init__(self, message: str, *vmids: int) -> None:
        self.message = message
        self.vmids = frozenset(vmids)


class ConfigOnlySysfs(pci.Sysfs):
    """Another node's hardware, which this host cannot see: every address is its own device."""

    local = False

    def iommu_present(self) -> bool:
        return True  # unknown: nothing is claimed about it

    def all_functions(self) -> list[str]:
        return []

    def functions(self, address: str) -> list[str]:
        return []

    def exists(self, address: str) -> bool:
        return False

    def group_members(self, group: str) -> list[str]:
        return []

    def driver(self, function: str) -> str | None:
        return None

    def attribute(self, function: str, name: str) -> str | None:
        return None

    def node_functions(self, node: str) -> list[str]:
        return []

    def char_functions(self, major: int, minor: int | None) -> list[str]:
        return []


class Entry:
    """One claim of one guest, with the need it belongs to (None for a CT) and the index of the
    need's alternative it is part of."""

    __slots__ = ("guest", "claim", "need", "alternative")

    def __init__(
        self, guest: Guest, claim: Claim, need: Need | None, alternative: int | None = None
    ) -> None:
        self.guest = guest
        self.claim = claim
        self.need = need
        self.alternative = alternative

    @property
    def mapping(self) -> str | None:
        return self.need.mapping if self.need is not None else None

    @property
    def firm(self) -> bool:
        """False for one alternative of a mapping with several: PVE may take another one."""
        return self.need is None or len(self.need.alternatives) <= 1


class NodeView:
    """Everything ``scan`` knows about one node: guests, their claims, holders, warnings."""

    def __init__(self, node: str, sysfs: pci.Sysfs, *, local: bool) -> None:
        self.node = node
        self.sysfs = sysfs
        self.local = local
        self.guests: dict[int, Guest] = {}
        self.needs: dict[int, list[Need]] = {}
        self.entries: list[Entry] = []
        self.running: set[int] | None = set() if local else None  # None: unknown
        self.holders: list[Holder] = []
        self.mappings: dict[str, PciMapping] = {}
        self.problems: list[Finding] = []  # what reading found (config lines, pci.cfg)
        self.notes: list[str] = []
        self.mapped_groups: dict[str, str] = {}  # device → iommugroup of a map line (other nodes)

    def problem(self, message: str, *vmids: int) -> None:
        self.problems.append(Finding(message, *vmids))

    def is_running(self, vmid: int) -> bool | None:
        return None if self.running is None else vmid in self.running

    def holder(self, vmid: int) -> Holder | None:
        return next((h for h in self.holders if h.vmid == vmid), None)

    def held(self, entry: Entry) -> bool | None:
        """Whether the entry's guest runs and holds this very address now (a running mapped VM
        holds one alternative, not all); None when unknown (another node)."""
        if self.running is None:
            return None
        holder = self.holder(entry.guest.vmid)
        return holder is not None and any(
            same_function(entry.claim.address, c.address) for c in holder.claims
        )

    def chosen(self, protect: frozenset[int] = frozenset()) -> dict[tuple[int, str], int]:
        """(vmid, need source) → the alternative of a mapping with several that the guest holds
        (running: read from its QEMU) or that PVE gives it at a start now (stopped: the
        planner's pick, as for a backup). Empty on another node: nothing is known there."""
        if self.running is None:
            return {}
        found: dict[tuple[int, str], int] = {}
        for vmid, needs in self.needs.items():
            pools = [n for n in needs if len(n.alternatives) > 1]
            guest = self.guests[vmid]
            if not pools or guest.template:
                continue
            holder = self.holder(vmid)
            if holder is not None:
                for need in pools:
                    index = held_alternative(need, holder.claims)
                    if index is not None:
                        found[(vmid, need.source)] = index
            elif vmid not in self.running and not any(n.failure for n in needs):
                plan = plan_free(guest, needs, self.holders, protect)
                for need, index in zip(needs, plan.picks, strict=True):
                    if len(need.alternatives) > 1 and index is not None:
                        found[(vmid, need.source)] = index
        return found

    def entries_of(self, vmid: int) -> list[Entry]:
        return [e for e in self.entries if e.guest.vmid == vmid]

    def conflicts_of(self, vmid: int) -> list[Conflict]:
        """Each claim of another guest that conflicts with claims of ``vmid``, once, in VMID
        order (an address in several alternatives of a mapping counts once)."""
        mine = self.entries_of(vmid)
        found: dict[tuple[int, str, str], Conflict] = {}
        for theirs in self.entries:
            hits = [m for m in mine if m.claim.conflicts_with(theirs.claim)]
            key = (theirs.guest.vmid, theirs.claim.source, theirs.claim.address)
            if theirs.guest.vmid == vmid or not hits or key in found:
                continue
            units = frozenset().union(*(theirs.claim.units & m.claim.units for m in hits))
            found[key] = Conflict(theirs, sorted({m.claim.address for m in hits}), units)
        return [found[key] for key in sorted(found)]


class Conflict:
    """Another guest's claim ``theirs`` against this guest's addresses ``mine``, on ``units``."""

    __slots__ = ("theirs", "mine", "units")

    def __init__(self, theirs: Entry, mine: list[str], units: frozenset[str]) -> None:
        self.theirs, self.mine, self.units = theirs, mine, units


def local_view(inventory: Inventory) -> NodeView:
    view = NodeView(inventory.node, inventory.sysfs, local=True)
    mappings, mapping_warnings = load_pci_mapping()
    inventory.reader.mappings = mappings
    view.mappings = mappings
    for warning in mapping_warnings:
        view.problem(warning)
    guests = all_guests()
    _read_claims(view, inventory.reader, guests)
    if not view.sysfs.iommu_present():  # PVE's start of any of them dies: say it of each
        for needs in view.needs.values():
            for need in needs:
                if need.failure is None:
                    need.failure = IOMMU_MISSING
                    need.blame = f"{paths.host(pci.IOMMU_CLASS)} is empty"
    assert view.running is not None
    view.running.update(v for v in runtime.vm_candidates() if runtime.qemu_cmdline(v) is not None)
    view.running.update(runtime.running_cts())
    view.holders = inventory.holders()
    return view


def remote_view(node: str, mappings: dict[str, PciMapping]) -> NodeView:
    view = NodeView(node, ConfigOnlySysfs(), local=False)
    view.mappings = mappings
    for mapping in mappings.values():
        for line in mapping.for_node(node):
            for raw in line.paths:
                address = pci.normalize(raw)
                if address is not None and line.iommugroup:
                    view.mapped_groups.setdefault(pci.device_of(address), line.iommugroup)
    reader = ClaimReader(view.sysfs, node, mappings)
    guests = all_guests(node)
    _read_claims(view, reader, guests)
    for guest in guests:
        if guest.kind == GuestKind.LXC and _uses_gpu_nodes(guest):
            view.notes.append(
                f"{guest.label} uses GPU device nodes; which GPU is unknown without {node}'s sysfs"
            )
    return view


def _uses_gpu_nodes(guest: Guest) -> bool:
    """Whether a CT config names GPU device nodes or their cgroup majors at all."""
    majors = (f"{pci.NVIDIA_MAJOR}:", f"{pci.DRM_MAJOR}:")
    for key, value, _ in guest.config.raw_entries(with_pending=True):
        if (key.startswith("dev") and key[3:].isdigit()) or key == "lxc.mount.entry":
            if "/dev/dri" in value or "/dev/nvidia" in value:
                return True
        elif key.endswith("devices.allow"):
            words = value.split()
            if len(words) > 1 and words[1].startswith(majors):
                return True
    return False


def _read_claims(view: NodeView, reader: ClaimReader, guests: list[Guest]) -> None:
    """Each guest's claims as its next start sees them, warnings tagged with its VMID."""
    for guest in guests:
        view.guests[guest.vmid] = guest
        for warning in guest.config.warnings:
            view.problem(warning, guest.vmid)
        if guest.kind == GuestKind.QEMU:
            needs, warnings = reader.vm_needs(guest.config, with_pending=True)
            for warning in warnings:
                view.problem(warning, guest.vmid)
            if not view.local:
                needs = [_mapping_groups(need, view) for need in needs]
            view.needs[guest.vmid] = needs
            for need in needs:
                for index, alternative in enumerate(need.alternatives):
                    view.entries.extend(Entry(guest, claim, need, index) for claim in alternative)
        else:
            claims = reader.ct_claims(guest.config, with_pending=True)
            view.entries.extend(Entry(guest, claim, None) for claim in claims)


def _mapping_groups(need: Need, view: NodeView) -> Need:
    """On a node without sysfs, the PCI mapping's ``iommugroup`` for a device is its unit.

    Used for every claim of a device that a map line of that node names (a mapped claim, but also
    a raw ``hostpci`` of the same device, so that the two are seen to conflict); else the device.
    """
    alternatives = []
    for alternative in need.alternatives:
        claims = []
        for claim in alternative:
            group = view.mapped_groups.get(pci.device_of(claim.address))
            units = frozenset({f"group:{group}"}) if group else claim.units
            claims.append(Claim(claim.address, units, claim.kind, claim.source))
        alternatives.append(tuple(claims))
    return Need(
        need.source, alternatives, mapping=need.mapping, failure=need.failure, blame=need.blame
    )


def cluster_views(inventory: Inventory) -> list[NodeView]:
    """This node's view, then every other node of ``/etc/pve/nodes`` (from its configs only)."""
    try:
        nodes = sorted(os.listdir(paths.host("etc/pve/nodes")))
    except OSError:
        nodes = []
    views = [local_view(inventory)]
    for node in nodes:
        if node != inventory.node and os.path.isdir(paths.host("etc/pve/nodes", node)):
            views.append(remote_view(node, views[0].mappings))
    return views
