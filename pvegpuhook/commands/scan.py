"""``pve-gpu-hook scan [VMID] [--cluster]``: which guests fight for which GPU on this node.

Read-only: it reads configs, the PCI mapping, sysfs and the runtime state under the root; it runs no
command and writes nothing.

A device (``dddd:bb:dd``, all its functions together) is listed when some guest config claims it
(VM ``hostpciN``/``args`` full passthrough = ``exclusive``, VM ``mdev=`` = ``mdev``, CT device
nodes/cgroup rules = ``shared``), when a running guest holds it, or when it is a display device
(PCI class ``0x03xxxx``). Claims are read as the guest's *next start* sees its config: ``[PENDING]``
changes applied, as ``qm config`` shows it and as vzdump's paused start of a stopped VM uses it.

JSON shape of ``scan`` (keys sorted by ``emit``)::

    {"format": 1, "node": "pve1",
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
                              "running": bool | null,  # null: unknown (another node)
                              "handover": bool}],  # its start shuts the holders down
                                                   # (pve-gpu-hook handover enable)
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
from typing import Any

from pvegpuhook import completion, pci
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_OK, EXIT_USAGE, GpuHookError
from pvegpuhook.findings import Finding, findings, join_and
from pvegpuhook.handover import is_ours
from pvegpuhook.inventory import Inventory
from pvegpuhook.model import Claim, ClaimKind, Guest, GuestKind, Need, guest_label
from pvegpuhook.nodeview import NodeView, cluster_views, local_view
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.pciids import PciNames, hex_id, model_name, pci_ids_path

Json = dict[str, Any]  # a JSON object of the documented shapes
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
        node = node_report(view, findings(view))
        data = node
        tables = [device_table(view, node)]
        notes = _legend(node) + [f"warning: {w}" for w in node["warnings"]]
    emit(args, data, tables, notes)
    return EXIT_OK


# ---- the node report --------------------------------------------------------------------------


def node_report(view: NodeView, found: list[Finding]) -> Json:
    """The JSON shape of one node (documented above) with the warnings ``found`` on it."""
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
                "handover": is_ours(guest.config.values().get("hookscript")),
            }
        )
    for holder in view.holders:
        for claim in holder.claims:
            held = device(claim.address)["held_by"]
            if holder.vmid not in held:
                held.append(holder.vmid)

    names = PciNames(pci_ids_path()) if view.local else None
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
        vendor = hex_id(sysfs.attribute(first, "vendor")) if first else None
        device_id = hex_id(sysfs.attribute(first, "device")) if first else None
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
    return {"node": view.node, "devices": result, "warnings": [f.message for f in found]}


# ---- text views -------------------------------------------------------------------------------


def claimed_by(claims: list[Json]) -> str:
    """``VM 102 (hand-over), VM 104*, VM 106 (mdev), CT 200 (shared)`` — one item per guest,
    * = running; hand-over: its start shuts the holders down."""
    items: list[str] = []
    seen: set[object] = set()
    for claim in claims:
        if claim["vmid"] in seen:
            continue
        seen.add(claim["vmid"])
        text = guest_label(claim["type"], claim["vmid"])
        if claim["running"]:
            text += "*"
        extras = []
        if claim["template"]:
            extras.append("template")
        if claim["kind"] != ClaimKind.EXCLUSIVE:
            extras.append(claim["kind"])
        if claim["mapping"]:
            extras.append(f"mapping {claim['mapping']}")
        if claim.get("handover"):
            extras.append("hand-over")
        if extras:
            text += f" ({', '.join(extras)})"
        items.append(text)
    return ", ".join(items)


def model_text(row: Json) -> str | None:
    name = model_name(
        row.get("vendor"), row.get("device"), row.get("vendor_name"), row.get("device_name")
    )
    if name is None and row.get("present") is False:
        return "not in sysfs"
    return name


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
            held.append(guest.label if guest else guest_label(GuestKind.QEMU, vmid))
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
    views = cluster_views(inventory)
    reports = []
    tables = []
    notes: list[str] = []
    for view in views:
        report = node_report(view, findings(view))
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
    return {"node": inventory.node, "nodes": reports}, tables, notes


# ---- scan VMID --------------------------------------------------------------------------------


def guest_report(view: NodeView, guest: Guest) -> tuple[Json, list[Table], list[str]]:
    from pvegpuhook.plan import plan_free
    from pvegpuhook.settings import load_settings

    needs = view.needs.get(guest.vmid, [])
    # a CT's claims read like needs of one alternative each
    shown = needs or [Need(e.claim.source, [(e.claim,)]) for e in view.entries_of(guest.vmid)]
    need_data = []
    need_rows: list[dict[str, object]] = []
    for need in shown:
        alternatives = []
        for index, alternative in enumerate(need.alternatives):
            items = [_claim_item(view, claim) for claim in alternative]
            alternatives.append(items)
            for item in items:
                units = ", ".join(pci.unit_text(u) for u in item["units"])
                alt = index + 1 if len(need.alternatives) > 1 else None
                need_rows.append({**item, "source": need.source, "mapping": need.mapping})
                need_rows[-1].update(alt=alt, units=units)
        if not need.alternatives:
            need_rows.append(
                {"source": need.source, "mapping": need.mapping, "address": "(unresolved)"}
            )
        need_data.append(
            {"source": need.source, "mapping": need.mapping, "alternatives": alternatives}
        )
    conflicts = [
        {
            "vmid": c.theirs.guest.vmid,
            "type": c.theirs.guest.kind,
            "name": c.theirs.guest.name,
            "running": view.is_running(c.theirs.guest.vmid),
            "source": c.theirs.claim.source,
            "address": c.theirs.claim.address,
            "kind": c.theirs.claim.kind,
            "with": c.mine,
            "units": sorted(c.units, key=pci.unit_order),
        }
        for c in view.conflicts_of(guest.vmid)
    ]

    would_stop: list[Json] = []
    refusal = None
    notes: list[str] = []
    if guest.kind == GuestKind.QEMU and needs and not guest.template:  # templates start without PCI
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
    if guest.kind == GuestKind.LXC:
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
        names = join_and([_label(s) for s in would_stop])
        notes.append(
            f"to start {guest.label} now (also vzdump's stop-mode backup), {names} would be shut "
            "down and started again afterwards"
        )
    elif needs and refusal is None:
        notes.append(f"every device {guest.label} needs is free now")

    warnings = [f.message for f in findings(view) if guest.vmid in f.vmids]
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
                    "guest": guest_label(c["type"], c["vmid"], c["name"]),
                    "state": "running" if c["running"] else "stopped",
                    "source": c["source"],
                    "address": c["address"],
                    "kind": c["kind"],
                    "with": ", ".join(c["with"]),
                    "units": ", ".join(pci.unit_text(u) for u in c["units"]),
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


def _claim_item(view: NodeView, claim: Claim) -> Json:
    return {
        "address": claim.address,
        "kind": claim.kind,
        "units": sorted(claim.units, key=pci.unit_order),
        "present": view.sysfs.exists(claim.address),
    }


def _label(item: Json) -> str:
    return guest_label(item["type"], item["vmid"], item.get("name"))
