"""``pve-gpu-hook scan [VMID] [--cluster]``: which guests fight for which GPU on this node.

Read-only: it reads configs, the PCI mapping, sysfs and the runtime state under the root; it runs no
command and writes nothing. It prints text tables, or JSON with ``--output-format json`` (its shape
is below).

A device (``dddd:bb:dd``, all its functions together) is listed when some guest config claims it
(VM ``hostpciN``/``args`` full passthrough = ``exclusive``, VM ``mdev=`` = ``mdev``, CT device
nodes/cgroup rules = ``shared``), when a running guest holds it, or when it is a display device
(PCI class ``0x03xxxx``). Claims are read as the guest's *next start* sees its config: ``[PENDING]``
changes applied, as ``qm config`` shows it and as vzdump's paused start of a stopped VM uses it. A
``hostpciN`` value that fails PVE's format is not a claim: PVE drops that line (a warning says so).

A VM with a PCI mapping of several devices for this node (a pool) claims each of them as an
*alternative*; it holds, or gets at its next start, only one: the one its running QEMU holds, or
the one PVE would give it if it started now: the first alternative no running VM has reserved, or,
when every one is, the one the hook would free for its backup (the hook's planner chooses).

Text: the table of devices (``DEVICE MODEL GROUP DRIVER POWER RESET HELD``; POWER and RESET
are the first function's sysfs ``power_state`` and ``reset_method``, ``unknown`` when the kernel
has no such file, RESET ``none`` when it is empty; HELD lists the VMIDs holding the device now),
then the table of claims, one row per device and guest (``DEVICE VMID NAME STATE KEY KIND MAPPING
USE``; USE is ``holds`` where the guest holds that device now, ``next`` for the alternative of a
pool PVE gives a stopped guest at its next start, ``alt`` for its other alternatives). Piped, each
cell is one awk field::

    pve-gpu-hook scan --noheader | awk 'NF == 7 && $7 != "-" {print $1, "held by", $7}'

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
                  "power_state": "D0" | "D3cold" | ... | null,   # null: no such sysfs file
                  "reset_method": ["flr", "bus"] | [] | null,    # []: none; null: no such file
                  "claims": [{"vmid": 102, "type": "qemu" | "lxc", "name": str | null,
                              "kind": "exclusive" | "mdev" | "shared",
                              "source": "hostpci0" | "args" | "dev0 (line 7)" | ...,
                              "address": "0000:01:00", # as the config names it, normalised
                              "mapping": "gpu" | null, "onboot": bool, "template": bool,
                              "running": bool | null,  # the guest runs; null: unknown
                              "held": bool | null,     # it holds this very device now
                              "alternative": 0 | null, # index of the pool alternative this
                                                       # device is part of; null: not a pool
                              "picked": bool | null,   # a pool: the alternative it holds or
                                                       # gets at its next start; else null
                              "handover": bool}],      # its start shuts the holders down
                                                       # (pve-gpu-hook handover enable)
                  "held_by": [104]}],                  # running guests using it now
     "warnings": [str, ...]}

``scan --cluster``: ``{"node": <local node>, "nodes": [<one scan object per node, as above, plus
"sysfs": bool (false: groups come from the PCI mapping's iommugroup, else the device)>]}``.

``scan VMID``::

    {"node": "pve1",
     "guest": {"vmid", "type", "name", "running", "onboot", "template", "lock"},
     "needs": [{"source": "hostpci0", "mapping": str | null,
                "alternatives": [[{"address", "kind", "units": ["group:14"], "present": bool,
                                   "held": bool | null}]],
                "picked": 0 | null,                 # the alternative it holds / gets next
                "failure": str | null}],            # PVE's error when it will not start it
     "conflicts": [{"vmid", "type", "name", "running", "template", "source", "address", "kind",
                    "with": [<this guest's addresses>], "units": [...],
                    "held": bool | null}],          # that guest holds that address now
     "would_stop": [{"vmid", "type", "name", "address"}],   # running holders to shut down so
                                                            # it can start now; address: held
     "refusal": null | {"vmid", "address", "reason"},       # a holder that must not be stopped
     "warnings": [str, ...]}

Warnings (text: ``warning: ...`` lines after the tables): a line PVE's start dies on (a device
sysfs lacks, both or neither of ``host=``/``mapping=``, no IOMMU); a PCI mapping missing, without
an entry for the node, or whose ``map`` line no longer matches the hardware (reported once, against
its ``pci.cfg`` line, naming the guests using it); ``onboot: 1`` guests that can take each other's
device, with what the boot order does; a device in ``D3cold`` or without a reset method; a
``hostpci`` change waiting in ``[PENDING]``; a full passthrough of a device whose IOMMU group
another guest uses with a different device; every config line that cannot be parsed.

Exit status 0 (warnings are shown, not signalled); 2 for an unknown VMID or VMID with --cluster.
"""

from __future__ import annotations

import argparse
from typing import Any

from pvegpuhook import completion, pci
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_OK, EXIT_USAGE, ConfigError, GpuHookError
from pvegpuhook.findings import Finding, findings, join_and
from pvegpuhook.handover import is_ours
from pvegpuhook.inventory import Inventory
from pvegpuhook.model import Claim, Guest, GuestKind, Holder, Need, guest_label, start_failure
from pvegpuhook.nodeview import NodeView, cluster_views, local_view
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.pciids import PciNames, hex_id, model_name, pci_ids_path

Json = dict[str, Any]  # a JSON object of the documented shapes
DISPLAY_CLASS = "0x03"
USE_LEGEND = (
    "USE: holds = the guest holds that device now; next = of its mapping's devices, the one it "
    "gets if started now (the one the hook frees for its backup); alt = another one"
)
HANDOVER = "its start shuts the holders of its devices down (pve-gpu-hook handover enable)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="show the node's GPUs, which guests claim them and who holds them now",
        description=(
            "List the node's GPUs and other passed-through PCI devices with their IOMMU group, "
            "driver, power state and reset method, which guest holds each now, and every "
            "guest's claim on them (for a mapping with several devices: which one it holds or "
            "gets at its next start); warn about configurations that break backups or boots. "
            "With VMID: detail one guest, its conflicts and who would have to stop for it. "
            "Reads only; runs no command."
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
        tables = node_tables(view, node)
        notes = _notes(node) + [f"warning: {w}" for w in node["warnings"]]
    emit(args, data, tables, notes)
    return EXIT_OK


def _protect() -> frozenset[int]:
    """The guests the hook must not stop: they change which alternative the planner frees."""
    from pvegpuhook.settings import load_settings

    try:
        return load_settings().protect
    except ConfigError:
        return frozenset()  # status reports the invalid file; the picture stays useful


# ---- the node report --------------------------------------------------------------------------


def node_report(view: NodeView, found: list[Finding]) -> Json:
    """The JSON shape of one node (documented above) with the warnings ``found`` on it."""
    sysfs = view.sysfs
    devices: dict[str, Json] = {}
    addresses: dict[str, set[str]] = {}  # functions named by claims, for devices sysfs lacks
    chosen = view.chosen(_protect() if view.local else frozenset())

    def device(address: str) -> Json:
        key = pci.device_of(address)
        if key not in devices:
            devices[key] = {"address": key, "claims": [], "held_by": [], "_claimed": {}}
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
            # "01:00.0;01:00.1" on one line is one claim of the device
            if view.held(entry):
                seen[mark]["held"] = True
            continue
        guest = entry.guest
        pool = entry.need is not None and len(entry.need.alternatives) > 1
        index = chosen.get((guest.vmid, entry.claim.source)) if pool else None
        claim = {
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
            "held": view.held(entry),
            "alternative": entry.alternative if pool else None,
            "picked": (index == entry.alternative) if pool and index is not None else None,
            "handover": is_ours(guest.config.values().get("hookscript")),
        }
        seen[mark] = claim
        row["claims"].append(claim)
    for holder in view.holders:
        for held_claim in holder.claims:
            held = device(held_claim.address)["held_by"]
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
        row["claims"].sort(key=lambda c: (c["vmid"], c["source"]))
        row["held_by"].sort()
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
                "power_state": sysfs.power_state(first) if first else None,
                "reset_method": sysfs.reset_methods(first) if first else None,
            }
        )
        result.append(row)
    return {"node": view.node, "devices": result, "warnings": [f.message for f in found]}


# ---- text views -------------------------------------------------------------------------------


def model_text(row: Json) -> str | None:
    name = model_name(
        row.get("vendor"), row.get("device"), row.get("vendor_name"), row.get("device_name")
    )
    if name is None and row.get("present") is False:
        return "not in sysfs"
    return name


def _power(row: Json) -> str | None:
    if not row.get("present"):
        return None
    return row["power_state"] or "unknown"


def _reset(row: Json) -> object:
    if not row.get("present"):
        return None
    methods = row["reset_method"]
    if methods is None:
        return "unknown"
    return methods or "none"


def _state(claim: Json) -> str:
    if claim["template"]:
        return "template"
    if claim["running"] is None:
        return "unknown"
    return "running" if claim["running"] else "stopped"


def _use(claim: Json) -> str | None:
    if claim["held"]:
        return "holds"
    if claim["picked"] is True and not claim["running"]:
        return "next"
    if claim["alternative"] is not None:
        return "alt"
    return None


def key_of(source: str) -> str:
    """``dev0 (line 7)`` → ``dev0``: the config key a claim comes from."""
    return source.split(" (line ", 1)[0]


def node_tables(view: NodeView, data: Json) -> list[Table]:
    """The devices, then the claims, one row per device and guest."""
    where = view.node if view.local else f"{view.node} (from configs only)"
    device_rows = []
    claim_rows = []
    for row in data["devices"]:
        device_rows.append(
            {
                "device": row["address"],
                "model": model_text(row),
                "group": row["iommu_group"],
                "driver": row["driver"],
                "power": _power(row),
                "reset": _reset(row),
                "held": row["held_by"] if view.running is not None else "unknown",
            }
        )
        for claim in row["claims"]:
            claim_rows.append(
                {
                    "device": row["address"],
                    "vmid": claim["vmid"],
                    "name": claim["name"],
                    "state": _state(claim),
                    "key": key_of(claim["source"]),
                    "kind": claim["kind"],
                    "mapping": claim["mapping"],
                    "use": _use(claim),
                }
            )
    devices = Table(
        [
            ("device", "DEVICE"),
            ("model", "MODEL"),
            ("group", "GROUP"),
            ("driver", "DRIVER"),
            ("power", "POWER"),
            ("reset", "RESET"),
            ("held", "HELD"),
        ],
        device_rows,
        title=f"PCI devices on {where}",
        fields=True,
        wrap=("model", "reset"),
        empty=f"no GPU or passed-through PCI device found on {view.node}",
    )
    claims = Table(
        [
            ("device", "DEVICE"),
            ("vmid", "VMID"),
            ("name", "NAME"),
            ("state", "STATE"),
            ("key", "KEY"),
            ("kind", "KIND"),
            ("mapping", "MAPPING"),
            ("use", "USE"),
        ],
        claim_rows,
        title=f"Guests claiming them on {view.node}",
        fields=True,
        empty=f"no guest on {view.node} claims a PCI device",
    )
    return [devices, claims]


def _notes(node: Json) -> list[str]:
    notes = []
    for row in node["devices"]:
        if row["group_members"]:
            notes.append(
                f"{row['address']} shares IOMMU group {row['iommu_group']} with "
                f"{', '.join(row['group_members'])}: a VM passing one through takes them all"
            )
    handover = {c["vmid"]: c for d in node["devices"] for c in d["claims"] if c["handover"]}
    for claim in handover.values():
        label = guest_label(claim["type"], claim["vmid"])
        notes.append(f"{label} (hand-over): {HANDOVER}")
    if any(c["alternative"] is not None for d in node["devices"] for c in d["claims"]):
        notes.append(USE_LEGEND)
    return notes


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
        tables.extend(node_tables(view, report))
        notes.extend(f"{view.node}: {note}" for note in _notes(report) if note != USE_LEGEND)
        notes.extend(f"warning: {view.node}: {w}" for w in report["warnings"])
        notes.extend(f"{view.node}: {note}" for note in view.notes)
    if len(views) > 1:
        notes.insert(
            0,
            "other nodes are read from their configs only: this host has no sysfs or runtime "
            "state for them, so a device's group is the iommugroup of a PCI mapping naming it "
            "for that node, else the device itself; HELD and STATE are unknown there",
        )
    if any(
        c["alternative"] is not None for r in reports for d in r["devices"] for c in d["claims"]
    ):
        notes.insert(0, USE_LEGEND)
    return {"node": inventory.node, "nodes": reports}, tables, notes


# ---- scan VMID --------------------------------------------------------------------------------


def _group(units: list[str]) -> str | None:
    """The IOMMU group(s) of a claim as a table cell: ``14``; None without a group."""
    groups = [u.partition(":")[2] for u in units if u.startswith("group:")]
    return ",".join(groups) or None


def guest_report(view: NodeView, guest: Guest) -> tuple[Json, list[Table], list[str]]:
    from pvegpuhook.plan import plan_free

    protect = _protect()
    needs = view.needs.get(guest.vmid, [])
    running = view.is_running(guest.vmid)
    chosen = view.chosen(protect)
    # a CT's claims read like needs of one alternative each
    shown = needs or [Need(e.claim.source, [(e.claim,)]) for e in view.entries_of(guest.vmid)]
    holder = view.holder(guest.vmid)
    need_data = []
    need_rows: list[dict[str, object]] = []
    for need in shown:
        pool = len(need.alternatives) > 1
        picked = (
            chosen.get((guest.vmid, need.source)) if pool else (0 if need.alternatives else None)
        )
        alternatives = []
        for index, alternative in enumerate(need.alternatives):
            items = [_claim_item(view, claim, holder) for claim in alternative]
            alternatives.append(items)
            for item in items:
                if item["held"]:
                    use = "holds"
                elif pool and index == picked and not running:
                    use = "next"
                else:
                    use = "alt" if pool else None
                need_rows.append(
                    {
                        "source": key_of(need.source),
                        "mapping": need.mapping,
                        "alt": f"{index + 1}/{len(need.alternatives)}" if pool else None,
                        "address": item["address"],
                        "kind": item["kind"],
                        "group": _group(item["units"]),
                        "present": item["present"],
                        "use": use,
                    }
                )
        if not need.alternatives:
            need_rows.append({"source": need.source, "mapping": need.mapping})
        need_data.append(
            {
                "source": need.source,
                "mapping": need.mapping,
                "alternatives": alternatives,
                "picked": picked if need.alternatives else None,
                "failure": need.failure,
            }
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
            "held": view.held(c.theirs),
            "template": c.theirs.guest.template,
        }
        for c in view.conflicts_of(guest.vmid)
    ]

    would_stop: list[Json] = []
    refusal = None
    notes: list[str] = []
    failed = start_failure(needs)
    # a template starts without PCI devices; a VM PVE will not start has nothing to free
    startable = needs and not guest.template and not running and failed is None
    if guest.kind == GuestKind.QEMU and startable:
        plan = plan_free(guest, needs, view.holders, protect)
        for stop in plan.stops:
            held = stop.holder.guest
            would_stop.append(
                {
                    "vmid": held.vmid,
                    "type": held.kind,
                    "name": held.name,
                    "address": stop.address,
                }
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
    if guest.kind == GuestKind.LXC:
        notes.append(
            f"{guest.label} shares its GPUs through the host driver; "
            "vzdump never starts a stopped CT"
        )
    elif guest.template:
        notes.append(f"{guest.label} is a template: vzdump starts it without its PCI devices")
    elif failed is not None:
        notes.append(
            f"PVE will not start {guest.label}: {failed.source}: {failed.failure}; "
            "a backup while it is stopped fails too"
        )
    elif running and needs:
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
    if is_ours(guest.config.values().get("hookscript")):
        notes.append(f"{guest.label} (hand-over): {HANDOVER}")
    if any(len(n.alternatives) > 1 for n in shown):
        notes.append(USE_LEGEND)

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
    what = "uses no GPU device node" if guest.kind == GuestKind.LXC else "claims no PCI device"
    tables = [
        Table(
            [
                ("vmid", "VMID"),
                ("name", "NAME"),
                ("type", "TYPE"),
                ("state", "STATE"),
                ("onboot", "ONBOOT"),
                ("template", "TEMPLATE"),
                ("lock", "LOCK"),
            ],
            [
                {
                    "vmid": guest.vmid,
                    "name": guest.name,
                    "type": guest.kind.word,
                    "state": state,
                    "onboot": guest.onboot,
                    "template": guest.template,
                    "lock": guest.lock,
                }
            ],
            title=f"{guest.label} on {view.node}",
            fields=True,
        ),
        Table(
            [
                ("source", "KEY"),
                ("mapping", "MAPPING"),
                ("alt", "ALT"),
                ("address", "ADDRESS"),
                ("kind", "KIND"),
                ("group", "GROUP"),
                ("present", "IN_SYSFS"),
                ("use", "USE"),
            ],
            need_rows,
            title="Claims (as its next start sees them)",
            fields=True,
            empty=f"{guest.label} {what}",
        ),
        Table(
            [
                ("vmid", "VMID"),
                ("name", "NAME"),
                ("state", "STATE"),
                ("key", "KEY"),
                ("address", "ADDRESS"),
                ("kind", "KIND"),
                ("group", "GROUP"),
                ("holds", "HOLDS"),
            ],
            [
                {
                    "vmid": c["vmid"],
                    "name": c["name"],
                    "state": _state(c),
                    "key": key_of(c["source"]),
                    "address": c["address"],
                    "kind": c["kind"],
                    "group": _group(c["units"]),
                    "holds": c["held"],
                }
                for c in conflicts
            ],
            title="Other guests claiming the same devices",
            fields=True,
            empty=f"no other guest claims a device {guest.label} uses" if shown else None,
        ),
    ]
    if would_stop:
        tables.append(
            Table(
                [("vmid", "VMID"), ("name", "NAME"), ("address", "HOLDS")],
                [
                    {"vmid": s["vmid"], "name": s["name"], "address": s["address"]}
                    for s in would_stop
                ],
                title="Would be shut down to free its devices",
                fields=True,
            )
        )
    notes += [f"warning: {w}" for w in warnings]
    return data, tables, notes


def _claim_item(view: NodeView, claim: Claim, holder: Holder | None) -> Json:
    from pvegpuhook.plan import same_function

    claims = holder.claims if holder is not None else []
    return {
        "address": claim.address,
        "kind": claim.kind,
        "units": sorted(claim.units, key=pci.unit_order),
        "present": view.sysfs.exists(claim.address),
        "held": (
            None
            if view.running is None
            else any(same_function(claim.address, c.address) for c in claims)
        ),
    }


def _label(item: Json) -> str:
    return guest_label(item["type"], item["vmid"], item.get("name"))
