"""Reads the node into the model (:mod:`pvegpuhook.model`): guests, claims, and the holders.

Reading is proportional to what a decision needs: the guest being backed up plus the guests that
run now, never every config of the node.
"""

from __future__ import annotations

import os

from pvegpuhook import paths, pci, runtime
from pvegpuhook.claims import ClaimReader, vfio_hosts
from pvegpuhook.model import (
    IOMMU_MISSING,
    RESERVED,
    Claim,
    ClaimKind,
    Guest,
    GuestKind,
    Holder,
    JobOrder,
    Need,
    start_failure,
)
from pvegpuhook.pveconf import ha_resources, is_number, node_name, parse_guest_config, read_text


def config_path(kind: GuestKind, vmid: int) -> str:
    return paths.qemu_conf(vmid) if kind == GuestKind.QEMU else paths.lxc_conf(vmid)


def guest_kind(vmid: int) -> GuestKind | None:
    if os.path.exists(paths.qemu_conf(vmid)):
        return GuestKind.QEMU
    if os.path.exists(paths.lxc_conf(vmid)):
        return GuestKind.LXC
    return None


def load_guest(vmid: int, kind: GuestKind | None = None) -> Guest | None:
    kind = kind or guest_kind(vmid)
    if kind is None:
        return None
    path = config_path(kind, vmid)
    text = read_text(path)
    if text is None:
        return None
    return Guest(vmid, kind, parse_guest_config(text, path))


def guest_configs(node: str | None = None) -> dict[int, tuple[GuestKind, str]]:
    """Every guest configured on this node (or on ``node`` of the cluster): vmid → (kind, path)."""
    base = "etc/pve" if node is None else f"etc/pve/nodes/{node}"
    found: dict[int, tuple[GuestKind, str]] = {}
    for kind, folder in ((GuestKind.QEMU, f"{base}/qemu-server"), (GuestKind.LXC, f"{base}/lxc")):
        for name in paths.listdir(paths.host(folder)):
            stem = name[:-5]
            if name.endswith(".conf") and is_number(stem):
                found.setdefault(int(stem), (kind, paths.host(folder, name)))
    return dict(sorted(found.items()))


def local_vmids() -> dict[int, GuestKind]:
    """Every guest configured on this node: vmid → kind."""
    return {vmid: kind for vmid, (kind, _) in guest_configs().items()}


def all_guests(node: str | None = None) -> list[Guest]:
    """Every guest of this node (or of ``node``), in VMID order — for the CLI: the hook never
    needs them all."""
    guests = []
    for vmid, (kind, path) in guest_configs(node).items():
        text = read_text(path)
        if text is not None:
            guests.append(Guest(vmid, kind, parse_guest_config(text, path)))
    return guests


class Inventory:
    def __init__(self) -> None:
        self.sysfs = pci.Sysfs()
        self.node = node_name()
        self.reader = ClaimReader(self.sysfs, self.node)
        self._ha: dict[int, str] | None = None

    @property
    def mapping_warnings(self) -> list[str]:
        """Problems of ``pci.cfg`` itself (empty until a mapping was looked up)."""
        return self.reader.mapping_warnings

    def ha_states(self) -> dict[int, str]:
        """HA resources: VMID → requested state (``started``, ``ignored``, ...)."""
        if self._ha is None:
            self._ha = ha_resources()
        return self._ha

    def needs(self, guest: Guest, *, for_start: bool) -> tuple[list[Need], list[str]]:
        """A VM's passthrough needs (``for_start``: as its next start sees them, pending
        applied), and the problems of its config; a CT needs nothing for its backup.

        A need PVE's start will die on has its ``failure`` (no IOMMU included), and the problems
        end with one line saying so, naming the file and line at fault.
        """
        if guest.kind != GuestKind.QEMU:
            return [], []
        needs, warnings = self.reader.vm_needs(guest.config, with_pending=for_start)
        if needs and not self.sysfs.iommu_present():
            for need in needs:
                if need.failure is None:
                    need.failure = IOMMU_MISSING
                    need.blame = f"{paths.host(pci.IOMMU_CLASS)} is empty"
        problems = [*guest.config.warnings, *warnings]
        failed = start_failure(needs)
        if failed is not None:
            line = f"{failed.blame}: {failed.source}: PVE will not start {guest.label}: "
            line += str(failed.failure)
            if for_start:
                line += "; its backup fails, so no guest is stopped for it"
            problems.append(line)
        return needs, problems

    def job_order(
        self, guests: list[Guest], *, stop_mode: bool
    ) -> tuple[JobOrder, dict[int, list[str]]]:
        """The guests of a backup job (given in vzdump's order) as the planner walks them, and
        the problems of each. A stopped guest's needs are its start's; so are a running VM's in
        stop mode, where vzdump restarts it and that start applies its pending changes."""
        order: JobOrder = []
        problems: dict[int, list[str]] = {}
        for guest in guests:
            running = runtime.running(guest.kind, guest.vmid)
            needs, problems[guest.vmid] = self.needs(guest, for_start=not running or stop_mode)
            order.append((guest, running, needs))
        return order, problems

    def claims_of_stopped(self, guest: Guest) -> list[Claim]:
        """What a guest would hold if started now (every alternative of a mapping)."""
        if guest.kind == GuestKind.QEMU:
            needs, _ = self.needs(guest, for_start=True)
            return [c for need in needs for c in need.claims()]
        return self.reader.ct_claims(guest.config, with_pending=True)

    def holders(self, exclude: set[int] | None = None) -> list[Holder]:
        """Every running guest that holds at least one PCI unit."""
        exclude = exclude or set()
        reserved = runtime.reservations()
        result: list[Holder] = []
        for vmid in runtime.vm_candidates():
            if vmid in exclude:
                continue
            argv = runtime.qemu_cmdline(vmid)
            if argv is None:
                continue
            holder = self._vm_holder(vmid, argv, reserved.get(vmid, []))
            if holder is not None:
                result.append(holder)
        for vmid, (functions, _) in runtime.starting_vms().items():
            if vmid not in exclude:
                path = paths.qemu_conf(vmid)
                guest = Guest(vmid, GuestKind.QEMU, parse_guest_config(read_text(path) or "", path))
                claims = [self._exclusive(f, RESERVED) for f in functions]
                result.append(Holder(guest, [c for c in claims if c], starting=True))
        for vmid in runtime.running_cts():
            if vmid in exclude:
                continue
            text = read_text(paths.lxc_conf(vmid))
            if text is None or not ("dev" in text or "lxc." in text):
                continue
            guest = Guest(vmid, GuestKind.LXC, parse_guest_config(text, paths.lxc_conf(vmid)))
            claims = self.reader.ct_claims(guest.config)
            if claims:
                result.append(Holder(guest, claims))
        return result

    def _exclusive(self, raw: str, source: str) -> Claim | None:
        address = pci.normalize(raw)
        if address is None:
            return None
        return Claim(address, self.sysfs.units(address), ClaimKind.EXCLUSIVE, source)

    def _vm_holder(self, vmid: int, argv: list[str], reserved: list[str]) -> Holder | None:
        if not reserved and not any(word.startswith("vfio-pci,") for word in argv):
            return None  # a QEMU without a vfio-pci device holds no PCI device, mdevs included
        path = paths.qemu_conf(vmid)
        text = read_text(path) or ""
        guest = Guest(vmid, GuestKind.QEMU, parse_guest_config(text, path))
        claims: list[Claim] = []
        # PVE's reservation file first: only those functions count for its own check (raw
        # "args" devices and the rest of an IOMMU group are not reserved, yet held)
        for raw, source in [(r, RESERVED) for r in reserved] + [
            (h, "running") for h in vfio_hosts(argv)
        ]:
            claim = self._exclusive(raw, source)
            if claim is not None and all(c.address != claim.address for c in claims):
                claims.append(claim)
        if "hostpci" in text or "vfio" in text:
            # a holder's config problems are not this decision's: its warnings are not reported
            needs, _ = self.reader.vm_needs(guest.config, with_pending=False)
            for need in needs:
                # a mapping with several alternatives: only the running process says which
                if len(need.alternatives) == 1:
                    claims.extend(need.alternatives[0])
        if not claims:
            return None
        holder = Holder(guest, claims)
        # whether PVE would start it again: a hostpci line or pci.cfg changed since its start,
        # or its start bound a GPU of an mdev-marked mapping to vfio-pci (docs/pve-facts.md §5)
        holder.restart_needs = self.needs(guest, for_start=True)[0]
        failed = start_failure(holder.restart_needs)
        if failed is not None:
            holder.restart_failure = f"{failed.source}: {failed.failure}"
        return holder
