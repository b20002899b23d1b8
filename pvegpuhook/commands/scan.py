"""``pve-gpu-hook scan [VMID] [--cluster]``: which guests fight for which GPU on this node.

Read-only: it reads configs, the PCI mapping, sysfs and the runtime state under the root; it runs no
command and writes nothing.

A device (``dddd:bb:dd``, all its functions together) is listed when some guest config claims it
(VM ``hostpciN``/``args`` full passthrough = ``exclusive``, VM ``mdev=`` = ``mdev``, CT device
nodes/cgroup rules = ``shared``), when a running guest holds it, or when it is a display device
(PCI class ``0x03xxxx``). Claims are read as the guest's *next start* sees its config: ``[PENDING]``
changes applied, as ``qm config`` shows it and as vzdump's paused start of a stopped VM uses it.

JSON shape of ``scan`` (keys sorted by ``emit``)::

    {"node": "pve1",
     "devices": [{"address": "0000:01:00",            # the device, every function together
                  "functions": ["0000:01:00.0", ...],  # its functions in sysfs (or as claimed)
                  "present": true,                     # false: a config names it, sysfs lacks
                                                       # it; null: another node (--cluster)
                  "class": "0x030000" | null,
                  "vendor": "10de" | null, "device": "2204" | null,       # hex ids from sysfs
                  "vendor_name": str | null, "device_name": str | null,  # from pci.ids
                  "iommu_group": "14" | null,          # a string, as sysfs names groups
                  "group_members": ["0000:00:01.0", ...],  # the group's functions on other devices
                  "driver": "vfio-pci" | null,         # driver of the first function
                  "claims": [{"vmid": 102, "type": "qemu" | "lxc", "name": str | null,
                              "kind": "exclusive" | "mdev" | "shared",
                              "source": "hostpci0" | "args" | "dev0 (line 7)" | ...,
                              "address": "0000:01:00", # as the config names it, normalised
                              "mapping": "gpu" | null, "onboot": bool, "template": bool,
                              "running": bool | null}],  # null: unknown (another node)
                  "held_by": [104]}],                  # running guests using it now
     "warnings": [str, ...]}

``scan --cluster``: ``{"node": <local node>, "nodes": [<one scan object per node, as above, plus
"sysfs": bool (false: groups come from the PCI mapping's iommugroup, else the device)>]}``.

``scan VMID``::

    {"node": "pve1",
     "guest": {"vmid", "type", "name", "running", "onboot", "template", "lock"},
     "needs": [{"source": "hostpci0", "mapping": str | null,
                "alternatives": [[{"address", "kind", "units": ["group:14"], "present": bool}]]}],
     "conflicts": [{"vmid", "type", "name", "running", "source", "address", "kind",
                    "with": [<this guest's addresses>], "units": [...]}],
     "would_stop": [{"vmid", "type", "name", "address"}],   # running holders to shut down so
                                                            # it can start now; address: held
     "refusal": null | {"vmid", "address", "reason"},       # a holder that must not be stopped
     "warnings": [str, ...]}

Warnings (text: ``warning: ...`` lines after the table): two ``onboot: 1`` guests that conflict
on one unit; a ``hostpci`` change waiting in ``[PENDING]``; a PCI mapping without an entry for the
node, missing, or pointing at hardware sysfs lacks; a full passthrough of a device whose IOMMU
group another guest uses with a different device; a configured device sysfs lacks; every config
line that cannot be parsed.

Exit status 0 (warnings are shown, not signalled); 2 for an unknown VMID or VMID with --cluster.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pvegpuhook import completion, paths, pci, runtime
from pvegpuhook.claims import EXCLUSIVE, Claim, ClaimReader, Need
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_OK, EXIT_USAGE, GpuHookError
from pvegpuhook.inventory import LXC, QEMU, Guest, Holder, Inventory, all_guests, describe
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.pveconf import PciMapping, load_pci_mapping

Json = dict[str, Any]  # a JSON object of the documented shapes
PCI_IDS_FILES = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")
DISPLAY_CLASS = "0x03"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="show the node's GPUs, which guests claim them and who holds them now",
        description=(
            "List the node's GPUs and other passed-through PCI devices with their IOMMU group, "
            "driver, the guests claiming them and the running guest holding them, and warn about "
            "configurations that break backups or boots. With VMID: detail one guest, its "
            "conflicts and who would have to stop for it. Reads only; runs no command."
        ),
    )
    vmid = parser.add_argument(
        "vmid", metavar="VMID", nargs="?", type=vmid_arg, help="detail this guest"
    )
    vmid.completer = completion.local_vmids  # type: ignore[attr-defined]
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="every node's configs from /etc/pve/nodes (other nodes: without their sysfs)",
    )
    add_output_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.vmid is not None and args.cluster:
        raise GpuHookError("scan VMID details a guest of this node: drop --cluster", EXIT_USAGE)
    inventory = Inventory()
    if args.vmid is not None:
        view = local_view(inventory)
        guest = view.guests.get(args.vmid)
        if guest is None:
            raise GpuHookError(f"no guest {args.vmid} on this node", EXIT_USAGE)
        data, tables, notes = guest_report(view, guest)
    elif args.cluster:
        data, tables, notes = cluster_report(inventory)
    else:
        view = local_view(inventory)
        node = node_report(view)
        data = node
        tables = [device_table(view, node)]
        notes = _legend(node) + [f"warning: {w}" for w in node["warnings"]]
    emit(args, data, tables, notes)
    return EXIT_OK


# ---- reading a node ---------------------------------------------------------------------------


class ConfigOnlySysfs(pci.Sysfs):
    """Another node's hardware, which this host cannot see: every address is its own device."""

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
    """One claim of one guest, with the need it belongs to (None for a CT)."""

    __slots__ = ("guest", "claim", "need")

    def __init__(self, guest: Guest, claim: Claim, need: Need | None) -> None:
        self.guest = guest
        self.claim = claim
        self.need = need

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
        # (message, vmids it concerns): ``scan VMID`` shows the ones naming its guest
        self.warnings: list[tuple[str, frozenset[int]]] = []
        self._said: set[str] = set()
        self.notes: list[str] = []
        self.mapped_groups: dict[str, str] = {}  # device → iommugroup of a map line (other nodes)

    def warn(self, message: str, *vmids: int) -> None:
        if message not in self._said:
            self._said.add(message)
            self.warnings.append((message, frozenset(vmids)))

    def is_running(self, vmid: int) -> bool | None:
        return None if self.running is None else vmid in self.running

    def entries_of(self, vmid: int) -> list[Entry]:
        return [e for e in self.entries if e.guest.vmid == vmid]


def local_view(inventory: Inventory) -> NodeView:
    view = NodeView(inventory.node, inventory.sysfs, local=True)
    mappings, mapping_warnings = load_pci_mapping()
    inventory.reader.mappings = mappings
    view.mappings = mappings
    for warning in mapping_warnings:
        view.warn(warning)
    guests = all_guests()
    _read_claims(view, inventory.reader, guests)
    assert view.running is not None
    view.running.update(v for v in runtime.vm_candidates() if runtime.qemu_cmdline(v) is not None)
    view.running.update(runtime.running_cts())
    view.holders = inventory.holders()
    _check_mappings(view)
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
        if guest.kind == LXC and _uses_gpu_nodes(guest):
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
            view.warn(warning, guest.vmid)
        before = len(reader.warnings)
        if guest.kind == QEMU:
            needs = reader.vm_needs(guest.config, with_pending=True)
            if not view.local:
                needs = [_mapping_groups(need, view) for need in needs]
            view.needs[guest.vmid] = needs
            for need in needs:
                view.entries.extend(Entry(guest, claim, need) for claim in need.claims())
            if guest.config.has_pending("hostpci"):
                view.warn(_pending_message(guest), guest.vmid)
        else:
            claims = reader.ct_claims(guest.config, with_pending=True)
            view.entries.extend(Entry(guest, claim, None) for claim in claims)
        for warning in reader.warnings[before:]:
            view.warn(warning, guest.vmid)
        del reader.warnings[before:]


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
    return Need(need.source, alternatives, mapping=need.mapping)


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


def _check_mappings(view: NodeView) -> None:
    """Map lines for this node that point at hardware this node does not have."""
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
                view.warn(
                    f"{where}: PCI mapping {name!r} points at {what} for node {view.node}, "
                    "which this node does not have",
                    *sorted(users.get(name, ())),
                )


# ---- the node report --------------------------------------------------------------------------


def node_report(view: NodeView) -> Json:
    sysfs = view.sysfs
    devices: dict[str, Json] = {}
    addresses: dict[str, set[str]] = {}  # functions named by claims, for devices sysfs lacks

    def device(address: str) -> Json:
        key = pci.device_of(address)
        if key not in devices:
            devices[key] = {"address": key, "claims": [], "held_by": [], "_claimed": set()}
            addresses[key] = set()
        return devices[key]

    for function in sysfs.all_functions():
        if (sysfs.attribute(function, "class") or "").startswith(DISPLAY_CLASS):
            device(function)
    for entry in view.entries:
        row = device(entry.claim.address)
        addresses[pci.device_of(entry.claim.address)].add(entry.claim.address)
        seen = row["_claimed"]
        mark = (entry.guest.vmid, entry.claim.source)
        if mark in seen:
            continue  # "01:00.0;01:00.1" on one line is one claim of the device
        seen.add(mark)
        guest = entry.guest
        claims = row["claims"]
        claims.append(
            {
                "vmid": guest.vmid,
                "type": guest.kind,
                "name": guest.name,
                "kind": entry.claim.kind,
                "source": entry.claim.source,
                "address": entry.claim.address,
                "mapping": entry.mapping,
                "onboot": guest.onboot,
                "template": guest.template,
                "running": view.is_running(guest.vmid),
            }
        )
    for holder in view.holders:
        for claim in holder.claims:
            held = device(claim.address)["held_by"]
            if holder.vmid not in held:
                held.append(holder.vmid)

    names = PciNames(_pci_ids_path()) if view.local else None
    result = []
    for key in sorted(devices):
        row = devices.pop(key)
        del row["_claimed"]
        functions = sysfs.functions(key)
        first = functions[0] if functions else None
        group = None
        members: list[str] = []
        if first is not None:
            unit = sysfs.unit(first)
            if unit.startswith("group:"):
                group = unit[len("group:") :]
                members = [m for m in sysfs.group_members(group) if pci.device_of(m) != key]
        elif not view.local:
            group = view.mapped_groups.get(key)
        if not functions:
            functions = sorted(a for a in addresses[key] if "." in a)
        vendor = _hex_id(sysfs.attribute(first, "vendor")) if first else None
        device_id = _hex_id(sysfs.attribute(first, "device")) if first else None
        vendor_name, device_name = names.lookup(vendor, device_id) if names else (None, None)
        claims = row["claims"]
        claims.sort(key=lambda c: (c["vmid"], c["source"]))
        held = row["held_by"]
        held.sort()
        row.update(
            {
                "functions": functions,
                "present": first is not None if view.local else None,
                "class": sysfs.attribute(first, "class") if first else None,
                "vendor": vendor,
                "device": device_id,
                "vendor_name": vendor_name,
                "device_name": device_name,
                "iommu_group": group,
                "group_members": members,
                "driver": sysfs.driver(first) if first else None,
            }
        )
        result.append(row)
    _check_claims(view)
    data: Json = {
        "node": view.node,
        "devices": result,
        "warnings": [message for message, _ in view.warnings],
    }
    return data


def _hex_id(text: str | None) -> str | None:
    if not text:
        return None
    text = text.strip().lower().removeprefix("0x")
    return text if text and all(c in "0123456789abcdef" for c in text) else None


def _check_claims(view: NodeView) -> None:
    """Missing devices, siblings in one IOMMU group, conflicting ``onboot`` guests."""
    sysfs = view.sysfs
    by_unit: dict[str, list[Entry]] = {}
    missing: dict[tuple[int, str], list[Entry]] = {}
    for entry in view.entries:
        for unit in entry.claim.units:
            by_unit.setdefault(unit, []).append(entry)
        if view.local and not entry.mapping and not sysfs.exists(entry.claim.address):
            missing.setdefault((entry.guest.vmid, entry.claim.source), []).append(entry)
    for (vmid, source), entries in missing.items():
        view.warn(
            f"{entries[0].guest.label} {source}: "
            f"{', '.join(e.claim.address for e in entries)} not on this node "
            "(no such device in sysfs)",
            vmid,
        )
    for unit in sorted(by_unit, key=_unit_order):
        entries = by_unit[unit]
        where = _unit_text(unit)
        # Siblings: a full passthrough binds the whole group, so other devices in it go too.
        by_device: dict[str, list[Entry]] = {}
        for entry in entries:
            by_device.setdefault(pci.device_of(entry.claim.address), []).append(entry)
        pairs: set[tuple[int, int]] = set()
        for device, mine_list in by_device.items() if len(by_device) > 1 else ():
            for mine in mine_list:
                if mine.claim.kind != EXCLUSIVE:
                    continue
                for other_device, others in by_device.items():
                    if other_device == device:
                        continue
                    for other in others:
                        pair = (mine.guest.vmid, other.guest.vmid)
                        if pair[0] == pair[1] or pair in pairs or pair[::-1] in pairs:
                            continue
                        pairs.add(pair)
                        view.warn(
                            f"{mine.guest.label} passes {mine.claim.address} and "
                            f"{other.guest.label} uses {other.claim.address}, both in {where}: "
                            "PVE binds the whole group to vfio-pci, so they cannot run at the "
                            "same time",
                            mine.guest.vmid,
                            other.guest.vmid,
                        )
        # onboot: only one of them can get the unit at boot; firm claims only (a mapping
        # with several alternatives can give each its own device).
        boot = [e for e in entries if e.guest.onboot and not e.guest.template and e.firm]
        guests = sorted({e.guest.vmid for e in boot})
        if len(guests) > 1 and any(e.claim.kind == EXCLUSIVE for e in boot):
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
                view.warn(
                    f"{_and(labels)} {'both' if len(labels) == 2 else 'all'} have onboot: 1 "
                    f"and conflict on {where}: only one of them can start at boot",
                    *conflicting,
                )


def _unit_order(unit: str) -> tuple[str, int, str]:
    kind, _, value = unit.partition(":")
    return (kind, int(value) if value.isdigit() else -1, value)


def _unit_text(unit: str) -> str:
    kind, _, value = unit.partition(":")
    if kind == "group":
        return f"IOMMU group {value}"
    if kind == "fn":
        return f"SR-IOV function {value}"
    return f"device {value}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- text views -------------------------------------------------------------------------------


def _guest_word(kind: str, vmid: int) -> str:
    return f"{'VM' if kind == QEMU else 'CT'} {vmid}"


def claimed_by(claims: list[Json]) -> str:
    """``VM 102, VM 104*, VM 106 (mdev), CT 200 (shared)`` — one item per guest, * = running."""
    items: list[str] = []
    seen: set[object] = set()
    for claim in claims:
        if claim["vmid"] in seen:
            continue
        seen.add(claim["vmid"])
        text = _guest_word(claim["type"], claim["vmid"])
        if claim["running"]:
            text += "*"
        extras = []
        if claim["template"]:
            extras.append("template")
        if claim["kind"] != EXCLUSIVE:
            extras.append(claim["kind"])
        if claim["mapping"]:
            extras.append(f"mapping {claim['mapping']}")
        if extras:
            text += f" ({', '.join(extras)})"
        items.append(text)
    return ", ".join(items)


def model_text(row: Json) -> str | None:
    vendor_name, device_name = row.get("vendor_name"), row.get("device_name")
    if isinstance(device_name, str) and device_name:
        # "GA102 [GeForce RTX 3090]" → "NVIDIA GeForce RTX 3090": the name people use
        short = device_name
        if "[" in device_name and device_name.endswith("]"):
            short = device_name[device_name.rindex("[") + 1 : -1]
        brand = _brand(str(vendor_name)) if vendor_name else ""
        return f"{brand} {short}".strip() if brand and brand not in short else short
    if row.get("vendor") and row.get("device"):
        ids = f"{row['vendor']}:{row['device']}"
        return f"{_brand(str(vendor_name))} {ids}" if vendor_name else ids
    if row.get("present") is False:
        return "not in sysfs"
    return None


_VENDOR_SUFFIXES = {
    "corporation", "corp.", "inc.", "inc", "co.", "ltd.", "ltd", "limited", "gmbh", "ag",
    "technology", "technologies", "electronics", "systems", "semiconductor", "microsystems",
}  # fmt: skip


def _brand(vendor_name: str) -> str:
    """The vendor as people say it: ``[AMD/ATI]``, ``NVIDIA Corporation`` → ``NVIDIA``."""
    if "[" in vendor_name and vendor_name.endswith("]"):
        return vendor_name[vendor_name.rindex("[") + 1 : -1]
    words = vendor_name.split(",")[0].split()
    while len(words) > 1 and words[-1].lower() in _VENDOR_SUFFIXES:
        words.pop()
    return " ".join(words)


def device_table(view: NodeView, data: Json) -> Table:
    rows = []
    guests = view.guests
    devices = data["devices"]
    for row in devices:
        group = row["iommu_group"] or None
        if group and row["group_members"]:
            group = f"{group} (+{', '.join(row['group_members'])})"
        held = []
        for vmid in row["held_by"]:
            guest = guests.get(vmid)
            held.append(guest.label if guest else f"VM {vmid}")
        if view.running is None:
            held_text: object = "unknown"
        else:
            held_text = held or None
        rows.append(
            {
                "device": row["address"],
                "model": model_text(row),
                "group": group,
                "driver": row["driver"],
                "held": held_text,
                "claimed": claimed_by(row["claims"]) or None,
            }
        )
    title = f"GPU groups on {view.node}"
    if not view.local:
        title += " (from configs only)"
    return Table(
        [
            ("device", "DEVICE"),
            ("model", "MODEL"),
            ("group", "GROUP"),
            ("driver", "DRIVER"),
            ("held", "HELD BY"),
            ("claimed", "CLAIMED BY"),
        ],
        rows,
        title=title,
    )


def _legend(node: Json) -> list[str]:
    devices = node["devices"]
    if not devices:
        return ["no GPU or passed-through PCI device found"]
    if any(c["running"] for d in devices for c in d["claims"]):
        return ["* = running"]
    return []


# ---- --cluster ---------------------------------------------------------------------------------


def cluster_report(inventory: Inventory) -> tuple[Json, list[Table], list[str]]:
    try:
        nodes = sorted(os.listdir(paths.host("etc/pve/nodes")))
    except OSError:
        nodes = []
    local = inventory.node
    views: list[NodeView] = []
    for node in [local] + [n for n in nodes if n != local]:
        if node == local:
            views.append(local_view(inventory))
        elif os.path.isdir(paths.host("etc/pve/nodes", node)):
            views.append(remote_view(node, views[0].mappings))
    reports = []
    tables = []
    notes: list[str] = []
    for view in views:
        report = node_report(view)
        report["sysfs"] = view.local
        reports.append(report)
        tables.append(device_table(view, report))
        notes.extend(f"warning: {view.node}: {w}" for w in report["warnings"])
        notes.extend(f"{view.node}: {note}" for note in view.notes)
    if len(views) > 1:
        notes.insert(
            0,
            "other nodes are read from their configs only: this host has no sysfs or runtime "
            "state for them, so a device's group is the iommugroup of a PCI mapping naming it "
            "for that node, else the device itself; HELD BY is unknown there",
        )
    if any(c["running"] for r in reports for d in r["devices"] for c in d["claims"]):
        notes.insert(0, "* = running")
    return {"node": local, "nodes": reports}, tables, notes


# ---- scan VMID --------------------------------------------------------------------------------


def guest_report(view: NodeView, guest: Guest) -> tuple[Json, list[Table], list[str]]:
    from pvegpuhook.plan import plan_free
    from pvegpuhook.settings import load_settings

    node_report(view)  # fills the warnings
    mine = view.entries_of(guest.vmid)
    needs = view.needs.get(guest.vmid, [])
    sysfs = view.sysfs
    need_data = []
    need_rows = []
    if guest.kind == QEMU:
        for need in needs:
            alternatives = []
            for index, alternative in enumerate(need.alternatives or [()]):
                alt = []
                for claim in alternative:
                    item = {
                        "address": claim.address,
                        "kind": claim.kind,
                        "units": sorted(claim.units, key=_unit_order),
                        "present": sysfs.exists(claim.address),
                    }
                    alt.append(item)
                    need_rows.append(
                        {
                            "source": need.source,
                            "mapping": need.mapping,
                            "alt": index + 1 if len(need.alternatives) > 1 else None,
                            "address": claim.address,
                            "kind": claim.kind,
                            "units": ", ".join(_unit_text(u) for u in item["units"]),
                            "present": item["present"],
                        }
                    )
                if alternative:
                    alternatives.append(alt)
            if not need.alternatives:
                need_rows.append(
                    {"source": need.source, "mapping": need.mapping, "address": "(unresolved)"}
                )
            need_data.append(
                {"source": need.source, "mapping": need.mapping, "alternatives": alternatives}
            )
    else:
        for entry in mine:
            need_data.append(
                {
                    "source": entry.claim.source,
                    "mapping": None,
                    "alternatives": [
                        [
                            {
                                "address": entry.claim.address,
                                "kind": entry.claim.kind,
                                "units": sorted(entry.claim.units, key=_unit_order),
                                "present": sysfs.exists(entry.claim.address),
                            }
                        ]
                    ],
                }
            )
            need_rows.append(
                {
                    "source": entry.claim.source,
                    "address": entry.claim.address,
                    "kind": entry.claim.kind,
                    "units": ", ".join(_unit_text(u) for u in sorted(entry.claim.units)),
                    "present": sysfs.exists(entry.claim.address),
                }
            )

    # one row per claim of another guest, with every claim of this guest it conflicts with
    conflicts: list[Json] = []
    listed: set[tuple[int, str, str]] = set()
    for theirs in view.entries:
        if theirs.guest.vmid == guest.vmid:
            continue
        hits = [m for m in mine if m.claim.conflicts_with(theirs.claim)]
        if not hits:
            continue
        key = (theirs.guest.vmid, theirs.claim.source, theirs.claim.address)
        if key in listed:
            continue  # the same address in several alternatives of a mapping
        listed.add(key)
        shared = set().union(*(theirs.claim.units & m.claim.units for m in hits))
        conflicts.append(
            {
                "vmid": theirs.guest.vmid,
                "type": theirs.guest.kind,
                "name": theirs.guest.name,
                "running": view.is_running(theirs.guest.vmid),
                "source": theirs.claim.source,
                "address": theirs.claim.address,
                "kind": theirs.claim.kind,
                "with": sorted({m.claim.address for m in hits}),
                "units": sorted(shared, key=_unit_order),
            }
        )
    conflicts.sort(key=lambda c: (c["vmid"], c["source"], c["address"]))

    would_stop: list[Json] = []
    refusal = None
    notes: list[str] = []
    if guest.kind == QEMU and needs and not guest.template:  # templates start without PCI
        settings = load_settings()
        plan = plan_free(guest, needs, view.holders, settings.protect)
        for stop in plan.stops:
            held = stop.holder.guest
            would_stop.append(
                {"vmid": held.vmid, "type": held.kind, "name": held.name, "address": stop.address}
            )
        if plan.refusal is not None:
            held = plan.refusal.holder.guest
            refusal = {
                "vmid": held.vmid,
                "address": plan.refusal.address,
                "reason": plan.refusal.reason,
            }
            notes.append(
                f"{guest.label} cannot get {plan.refusal.address} now: {held.label} "
                f"{plan.refusal.reason}; its stop-mode backup would fail"
            )
    running = view.is_running(guest.vmid)
    if guest.kind == LXC:
        notes.append(
            f"{guest.label} shares its GPUs through the host driver; "
            "vzdump never starts a stopped CT"
        )
    elif guest.template:
        notes.append(f"{guest.label} is a template: vzdump starts it without its PCI devices")
    elif running:
        notes.append(
            f"{guest.label} is running: it holds its devices; the hook has nothing to free for it"
        )
    elif would_stop:
        names = _and([_label(s) for s in would_stop])
        notes.append(
            f"to start {guest.label} now (also vzdump's stop-mode backup), {names} would be shut "
            "down and started again afterwards"
        )
    elif needs and refusal is None:
        notes.append(f"every device {guest.label} needs is free now")

    warnings = [message for message, vmids in view.warnings if guest.vmid in vmids]
    data = {
        "node": view.node,
        "guest": {
            "vmid": guest.vmid,
            "type": guest.kind,
            "name": guest.name,
            "running": running,
            "onboot": guest.onboot,
            "template": guest.template,
            "lock": guest.lock,
        },
        "needs": need_data,
        "conflicts": conflicts,
        "would_stop": would_stop,
        "refusal": refusal,
        "warnings": warnings,
    }
    state = "running" if running else "stopped"
    tables = [
        Table(
            [
                ("guest", "GUEST"),
                ("state", "STATE"),
                ("onboot", "ONBOOT"),
                ("template", "TEMPLATE"),
                ("lock", "LOCK"),
            ],
            [
                {
                    "guest": guest.label,
                    "state": state,
                    "onboot": guest.onboot,
                    "template": guest.template,
                    "lock": guest.lock,
                }
            ],
            title=f"{guest.label} on {view.node}",
        ),
        Table(
            [
                ("source", "KEY"),
                ("mapping", "MAPPING"),
                ("alt", "ALT"),
                ("address", "ADDRESS"),
                ("kind", "KIND"),
                ("units", "UNIT"),
                ("present", "IN SYSFS"),
            ],
            need_rows,
            title="Claims (as its next start sees them)",
        ),
        Table(
            [
                ("guest", "GUEST"),
                ("state", "STATE"),
                ("source", "KEY"),
                ("address", "ADDRESS"),
                ("kind", "KIND"),
                ("with", "CONFLICTS WITH"),
                ("units", "ON"),
            ],
            [
                {
                    "guest": describe(c["type"], c["vmid"], c["name"]),
                    "state": "running" if c["running"] else "stopped",
                    "source": c["source"],
                    "address": c["address"],
                    "kind": c["kind"],
                    "with": ", ".join(c["with"]),
                    "units": ", ".join(_unit_text(u) for u in c["units"]),
                }
                for c in conflicts
            ],
            title="Conflicts with other guests",
        ),
    ]
    if would_stop:
        tables.append(
            Table(
                [("guest", "GUEST"), ("address", "HOLDS")],
                [{"guest": _label(s), "address": s["address"]} for s in would_stop],
                title="Would be stopped to free its devices",
            )
        )
    notes += [f"warning: {w}" for w in warnings]
    return data, tables, notes


def _label(item: Json) -> str:
    return describe(item["type"], item["vmid"], item.get("name"))


# ---- pci.ids ----------------------------------------------------------------------------------


def _pci_ids_path() -> str | None:
    for relative in PCI_IDS_FILES:
        path = paths.host(relative)
        if os.path.isfile(path):
            return path
    return None


class PciNames:
    """Vendor and device names from the system's ``pci.ids`` (read once, only when needed)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._vendors: dict[str, str] | None = None
        self._devices: dict[tuple[str, str], str] = {}

    def _load(self) -> None:
        self._vendors = {}
        if self.path is None:
            return
        vendor = None
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.strip() or line.startswith("#"):
                        continue
                    if line.startswith("C "):
                        break  # device classes follow: no more vendors
                    if line.startswith("\t\t"):
                        continue  # subsystems
                    if line.startswith("\t"):
                        ident, _, name = line.strip().partition(" ")
                        if vendor is not None:
                            self._devices[(vendor, ident.lower())] = name.strip()
                        continue
                    ident, _, name = line.strip().partition(" ")
                    vendor = ident.lower()
                    self._vendors[vendor] = name.strip()
        except OSError:
            return

    def lookup(self, vendor: str | None, device: str | None) -> tuple[str | None, str | None]:
        if vendor is None:
            return None, None
        if self._vendors is None:
            self._load()
        assert self._vendors is not None
        return self._vendors.get(vendor), self._devices.get((vendor, device or ""))
