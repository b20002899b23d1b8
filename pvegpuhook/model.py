"""The model of a node that every decision is made on: guests, what they claim, who holds what.

Pure data, no I/O: :mod:`pvegpuhook.inventory` builds these from the node's files, the planner
decides on them, the fronts print them.
"""

from __future__ import annotations

from enum import StrEnum

from pvegpuhook.pveconf import GuestConfig, startup_order


class GuestKind(StrEnum):
    """PVE's guest types, spelled as PVE spells them (``VMTYPE``, ``.vmlist``, the API)."""

    QEMU = "qemu"
    LXC = "lxc"

    @property
    def word(self) -> str:
        """How PVE's GUI and task logs name one: ``VM 104``, ``CT 200``."""
        return "VM" if self is GuestKind.QEMU else "CT"


class ClaimKind(StrEnum):
    """How a guest uses a PCI unit.

    ``exclusive``: full passthrough (vfio-pci), conflicts with any other use of the unit;
    ``mdev``: a mediated device of the parent, excluded only by a full passthrough of it;
    ``shared``: a CT using the GPU through the host driver, shared with CTs and mdevs.
    """

    EXCLUSIVE = "exclusive"
    MDEV = "mdev"
    SHARED = "shared"


RESERVED = "reserved"  # the source of a claim found in PVE's PCI reservation file


def guest_label(kind: str, vmid: int, name: str | None = None) -> str:
    """``VM 104 (win11)``: the one way a guest is named in messages and tables."""
    word = GuestKind(kind).word
    return f"{word} {vmid} ({name})" if name else f"{word} {vmid}"


_TRUE = ("1", "yes", "on", "true")


class Guest:
    """One guest config of this node."""

    __slots__ = ("vmid", "kind", "config")

    def __init__(self, vmid: int, kind: GuestKind, config: GuestConfig) -> None:
        self.vmid = vmid
        self.kind = GuestKind(kind)
        self.config = config

    @property
    def name(self) -> str | None:
        return self.config.values().get("name" if self.kind == GuestKind.QEMU else "hostname")

    @property
    def template(self) -> bool:
        return self.config.values().get("template", "0") in _TRUE

    @property
    def onboot(self) -> bool:
        return self.config.values().get("onboot", "0") in _TRUE

    @property
    def startup_order(self) -> int | None:
        return startup_order(self.config.values().get("startup"))

    @property
    def lock(self) -> str | None:
        return self.config.values().get("lock")

    @property
    def label(self) -> str:
        return guest_label(self.kind, self.vmid, self.name)


class Claim:
    """A guest's use of one PCI address: the exclusivity units it occupies, and how."""

    __slots__ = ("address", "units", "kind", "source")

    def __init__(self, address: str, units: frozenset[str], kind: ClaimKind, source: str) -> None:
        self.address = address
        self.units = units
        self.kind = kind
        self.source = source

    def conflicts_with(self, other: Claim) -> bool:
        if ClaimKind.EXCLUSIVE not in (self.kind, other.kind):
            return False
        return not self.units.isdisjoint(other.units)

    def __repr__(self) -> str:
        return f"Claim({self.address}, {sorted(self.units)}, {self.kind}, {self.source})"


class Need:
    """One passthrough line of a VM: satisfied when any one alternative is free.

    More than one alternative only for a ``mapping=`` with several ``map`` lines for this node
    (PVE takes the first free one); each alternative is a tuple of claims passed together.
    ``failure``: why PVE will refuse to start the VM with this line whoever holds what (its own
    error, e.g. ``no PCI device found for '0000:09:00.0'``), and ``blame``: the ``file:line`` at
    fault (the guest config's line, or the ``pci.cfg`` line of a mapping).
    """

    __slots__ = ("source", "alternatives", "mapping", "failure", "blame")

    def __init__(
        self,
        source: str,
        alternatives: list[tuple[Claim, ...]],
        mapping: str | None = None,
        *,
        failure: str | None = None,
        blame: str | None = None,
    ) -> None:
        self.source = source
        self.alternatives = alternatives
        self.mapping = mapping
        self.failure = failure
        self.blame = blame

    def claims(self) -> list[Claim]:
        return [c for alt in self.alternatives for c in alt]


IOMMU_MISSING = "cannot prepare PCI pass-through, IOMMU not present"  # PVE's words
# PVE's words when no alternative of an mdev line could create it (the parent is not one now)
MDEV_UNAVAILABLE = "could not create mediated device"


def start_failure(needs: list[Need]) -> Need | None:
    """The need PVE's start of the VM dies on first, if any: it reads every line (in hostpci
    order) before it prepares a device (the IOMMU check, then an mdev's creation)."""
    failing = [need for need in needs if need.failure is not None]

    def phase(need: Need) -> int:
        failure = str(need.failure)
        return 2 if failure.startswith(MDEV_UNAVAILABLE) else 1 if failure == IOMMU_MISSING else 0

    return min(failing, key=phase, default=None)


def binds_before_failing(needs: list[Need]) -> bool:
    """Whether PVE's start binds devices to vfio-pci before it dies: an mdev it cannot create
    comes after the other lines' devices were prepared (qemu-server QemuServer.pm
    vm_start_nolock), and those stay bound to vfio-pci."""
    failed = start_failure(needs)
    if failed is None or not str(failed.failure).startswith(MDEV_UNAVAILABLE):
        return False
    return any(c.kind == ClaimKind.EXCLUSIVE for need in needs for c in need.claims())


# a backup job's guests in vzdump's order: each guest, whether it runs now, and what its next
# start will claim (what the planner walks a job by)
JobOrder = list[tuple[Guest, bool, list[Need]]]


class Holder:
    """A running guest and the claims it holds now; ``starting``: a VM whose start is under way
    (its devices reserved, its QEMU not running yet); ``restart_needs``: what a VM's next start
    will claim (a mapping's device is chosen again then); ``restart_failure``: why PVE would not
    start it again, once stopped (its next start's first failing line), or None."""

    __slots__ = ("guest", "claims", "starting", "restart_needs", "restart_failure")

    def __init__(self, guest: Guest, claims: list[Claim], *, starting: bool = False) -> None:
        self.guest = guest
        self.claims = claims
        self.starting = starting
        self.restart_needs: list[Need] = []
        self.restart_failure: str | None = None

    @property
    def vmid(self) -> int:
        return self.guest.vmid
