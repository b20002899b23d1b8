"""What a guest's config claims of the node's PCI devices (see :mod:`pvegpuhook.model`).

A VM's ``hostpciN`` line (or raw ``args`` vfio-pci device) is one :class:`~pvegpuhook.model.Need`;
a CT's device nodes and cgroup rules are ``shared`` claims. Readers return the problems they find
with what they read (``file:line: ...``), never into a list shared between callers.
"""

from __future__ import annotations

from pvegpuhook import paths, pci
from pvegpuhook.model import MDEV_UNAVAILABLE, Claim, ClaimKind, Need
from pvegpuhook.pveconf import (
    GuestConfig,
    MapEntry,
    PciMapping,
    is_boolean,
    is_number,
    parse_property_string,
    printable,
    split_options,
)

# qemu-server PCI.pm $hostpci_fmt: the keys of a hostpciN value and what each must look like
HOSTPCI_KEYS = (
    "host", "mapping", "rombar", "romfile", "pcie", "x-vga", "legacy-igd", "mdev",
    "vendor-id", "device-id", "sub-vendor-id", "sub-device-id", "driver",
)  # fmt: skip
_BOOLEAN_KEYS = ("rombar", "pcie", "x-vga", "legacy-igd")
_PCIRE = r"(?:[a-f0-9]{4,}:)?[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?"
_ID = (r"0x[0-9a-fA-F]{4}", "a hex id like 0x10de")
_FORMATS = {  # key: (pattern, what a value must be)
    "host": (f"{_PCIRE}(?:;{_PCIRE})*", "PCI ids in lower-case hex (0000:01:00.0;...)"),
    "mapping": (r"[a-zA-Z][a-zA-Z0-9_-]+", "a mapping name"),  # pve-configid
    "romfile": (r"[^,;]+", "a file name"),
    "mdev": (r"[^/.:]+", "an mdev type"),
    "vendor-id": _ID,
    "device-id": _ID,
    "sub-vendor-id": _ID,
    "sub-device-id": _ID,
    "driver": (r"vfio|keep", "vfio or keep"),
}


def hostpci_options(value: str) -> tuple[dict[str, str], str | None]:
    """A ``hostpciN`` value's options, or why PVE rejects it when it reads the config (its
    schema check, qemu-server QemuServer.pm parse_vm_config → check_type): PVE then warns
    ``unable to parse value of 'hostpciN'`` and drops the line."""
    import re

    options, error = parse_property_string(value, HOSTPCI_KEYS, default_key="host")
    if error is not None:
        return options, error
    for key, text in options.items():
        if key in _BOOLEAN_KEYS:
            if not is_boolean(text):
                return options, f"{key}={text}: not a boolean (1, 0, yes, no...)"
        elif not re.fullmatch(_FORMATS[key][0], text):
            return options, f"{key}={text}: not {_FORMATS[key][1]}"
    return options, None


def invalid_map_entry(sysfs: pci.Sysfs, mapping: PciMapping, entry: MapEntry) -> str | None:
    """Why PVE finds a ``map`` line of this node out of date with the hardware, or None
    (pve-guest-common Mapping/PCI.pm assert_valid: each path must exist; ``id``,
    ``subsystem-id`` and ``mdev`` must match sysfs, ``iommugroup`` too for the first path; a
    property sysfs has must be configured and one it lacks must not be)."""
    import re

    configured = {
        "id": entry.id,
        "iommugroup": entry.iommugroup,
        "mdev": "1" if mapping.mdev else "0",
        "subsystem-id": entry.subsystem_id,
    }
    for index, path in enumerate(entry.paths):
        if not re.search(r"\.[a-f0-9]", path, re.IGNORECASE):
            path += ".0"  # a whole device: its first function
        if not sysfs.functions(path):
            return f"pci device '{path}' not found"
        expected = sysfs.mapping_facts(path)
        for prop in sorted(expected):
            if prop == "iommugroup" and index > 0:
                continue
            want, have = expected[prop], configured[prop]
            if want is None and have is None:
                continue
            if have is None:
                return f"missing expected property '{prop}' for device '{path}'"
            if want is None:
                return f"unexpected property '{prop}' configured for device '{path}'"
            if want.replace("0x", "") != have.replace("0x", ""):
                return f"'{prop}' does not match for '{mapping.name}' ({want} != {have})"
    return None


class ClaimReader:
    """Turns config entries into claims, with the node's sysfs and PCI mappings at hand."""

    def __init__(
        self, sysfs: pci.Sysfs, node: str, mappings: dict[str, PciMapping] | None = None
    ) -> None:
        self.sysfs = sysfs
        self.node = node
        self.mappings = mappings
        self.mapping_warnings: list[str] = []  # problems of pci.cfg itself, once it is read

    def _mappings(self) -> dict[str, PciMapping]:
        if self.mappings is None:
            from pvegpuhook.pveconf import load_pci_mapping

            self.mappings, self.mapping_warnings = load_pci_mapping()
        return self.mappings

    def _claims(
        self, ids: list[str], kind: ClaimKind, source: str, where: str, warnings: list[str]
    ) -> tuple[Claim, ...]:
        claims = []
        for raw in ids:
            address = pci.normalize(raw)
            if address is None:
                warnings.append(f"{where}: {source}: {raw!r} is not a PCI address, ignored")
                continue
            claims.append(Claim(address, self.sysfs.units(address), kind, source))
        return tuple(claims)

    def vm_needs(self, config: GuestConfig, with_pending: bool) -> tuple[list[Need], list[str]]:
        """Every passthrough need of a VM (``hostpci0..15`` and raw ``args`` vfio-pci devices),
        and the problems of its config lines that name them.

        A ``hostpciN`` value failing PVE's format is dropped, as PVE drops it when it reads the
        config (the VM starts without it): a warning, no need. A need PVE will refuse at the
        start (a device sysfs lacks, an unusable mapping) carries that as its ``failure``.
        """
        values = config.values(with_pending)
        needs: list[Need] = []
        warnings: list[str] = []
        for index in range(16):
            key = f"hostpci{index}"
            value = values.get(key)
            if value is None:
                continue
            where = f"{config.path}:{config.line_of(key, with_pending) or '?'}"
            options, error = hostpci_options(value)
            if error is not None:
                why = printable(error)
                warnings.append(
                    f"{where}: {key}: PVE ignores this line ({why}): the VM starts without it"
                )
                continue
            need = self._hostpci_need(key, options, where, warnings)
            if need is not None:
                needs.append(need)
        self._assigned_once(needs)
        args = values.get("args")
        if args and "vfio-pci" in args:
            where = f"{config.path}:{config.line_of('args', with_pending) or '?'}"
            ids = vfio_hosts(split_args(args))
            for claim in self._claims(ids, ClaimKind.EXCLUSIVE, "args", where, warnings):
                failure = None
                if self.sysfs.local and not self.sysfs.exists(claim.address):
                    failure = f"QEMU cannot open vfio {claim.address}: no such host device"
                needs.append(Need("args", [(claim,)], failure=failure, blame=where))
        return needs, warnings

    def _hostpci_need(
        self, key: str, options: dict[str, str], where: str, warnings: list[str]
    ) -> Need | None:
        """One valid ``hostpciN`` line as PVE's start reads it (qemu-server PCI.pm
        parse_hostpci): its alternatives, and the error PVE dies with, if any."""
        kind = ClaimKind.MDEV if options.get("mdev") else ClaimKind.EXCLUSIVE
        host, name = options.get("host"), options.get("mapping")
        if host is not None and name is not None:
            return Need(key, [], name, failure="Cannot set both 'host' and 'mapping'.", blame=where)
        if name is not None:
            return self._mapped_need(key, name, kind, where, warnings)
        if host is None:
            return Need(key, [], failure="Either 'host' or 'mapping' must be set.", blame=where)
        claims = self._claims(host.split(";"), kind, key, where, warnings)
        if not claims:
            return None
        need = Need(key, [claims], blame=where)
        need.failure = self._missing(host.split(";"), kind)
        return need

    def _mapped_need(
        self, key: str, name: str, kind: ClaimKind, where: str, warnings: list[str]
    ) -> Need:
        mapping = self._mappings().get(name)
        entries = mapping.for_node(self.node) if mapping is not None else []
        alternatives = [self._claims(e.paths, kind, key, where, warnings) for e in entries]
        need = Need(key, [a for a in alternatives if a], mapping=name, blame=where)
        if mapping is None or not entries:
            # pci.cfg is at fault when it has the mapping: blame its line, not the guest's
            if mapping is None:
                why = f"{paths.host(paths.PCI_MAPPING)} has no mapping {name!r}"
            else:
                need.blame = f"{paths.host(paths.PCI_MAPPING)}:{mapping.line}"
                why = (
                    f"PVE ignores mapping {name!r}: {mapping.dropped}"
                    if mapping.dropped
                    else f"mapping {name!r} has no map line for node {self.node}"
                )
            need.failure = f"PCI device mapping not found for '{name}' ({why})"
            return need
        if not self.sysfs.local:
            return need
        for entry in entries:  # PVE checks every alternative before it chooses one
            problem = invalid_map_entry(self.sysfs, mapping, entry)
            if problem is None:
                problem = self._missing(entry.paths, kind)
            else:
                problem = f"PCI device mapping invalid (hardware probably changed): {problem}"
            if problem is not None:
                need.failure = problem
                need.blame = f"{paths.host(paths.PCI_MAPPING)}:{entry.line}"
                break
        return need

    def _missing(self, ids: list[str], kind: ClaimKind) -> str | None:
        """PVE's error for ids sysfs lacks (a prefix match, as SysFSTools.pm lspci), for an
        mdev of several functions, or of a function that is no mdev parent now; None when the
        start can use them."""
        if not self.sysfs.local:
            return None
        found: list[str] = []
        for raw in ids:
            address = pci.normalize(raw)
            functions = self.sysfs.functions(address) if address is not None else []
            if not functions:
                return f"no PCI device found for '{raw}'"
            found += functions
        if kind != ClaimKind.MDEV:
            return None
        if len(found) > 1:
            return "cannot use mediated device with multifunction device"
        if self.sysfs.mapping_facts(found[0])["mdev"] != "1":
            # its vendor driver makes it an mdev parent; vfio-pci, which a full passthrough
            # of it left behind, does not (docs/pve-facts.md §5)
            driver = self.sysfs.driver(found[0]) or "no driver"
            return (
                f"{MDEV_UNAVAILABLE}: pci device '{found[0]}' does not support mediated devices "
                f"(bound to {driver})"
            )
        return None

    def _assigned_once(self, needs: list[Need]) -> None:
        """A function given by two ``hostpciN`` lines of one alternative each: PVE's start dies
        (qemu-server PCI.pm choose_hostpci_devices)."""
        if not self.sysfs.local:
            return
        used: set[str] = set()
        for need in needs:
            if len(need.alternatives) != 1 or need.failure is not None:
                continue
            claims = need.alternatives[0]
            if any(c.kind == ClaimKind.MDEV for c in claims):
                continue
            for claim in claims:
                for function in self.sysfs.functions(claim.address):
                    if function in used:
                        need.failure = f"device '{function}' assigned more than once"
                    used.add(function)

    def ct_claims(self, config: GuestConfig, with_pending: bool = False) -> list[Claim]:
        """GPUs a CT uses through the host driver: the GPU device nodes it passes (``devN``) or
        mounts (``lxc.mount.entry``), and the devices its cgroup rules name.

        A cgroup rule is a permission, not a use: PVE hands raw ``lxc.*`` lines to LXC unchanged,
        and a process can only hold a GPU it has a device node for. So a wildcard rule (``c
        195:* rwm``, ``c 226:* rwm``) stands for every GPU of that major only in a CT that names
        no GPU node of that major itself (it may then make its own nodes); next to named nodes
        it only allows them. A rule for one minor (``c 195:1 rwm``) names that one GPU.
        """
        entries = config.raw_entries(with_pending)
        named: set[int] = set()  # majors of the GPU nodes the CT passes or mounts
        for key, value, _ in entries:
            node = _node_of(key, value)
            major = pci.gpu_node_major(node) if node is not None else None
            if major is not None:
                named.add(major)
        claims: list[Claim] = []
        for key, value, line in entries:
            node = _node_of(key, value)
            if node is not None:
                functions = self.sysfs.node_functions(node)
            elif key in ("lxc.cgroup2.devices.allow", "lxc.cgroup.devices.allow"):
                functions = self._cgroup_rule(value, named)
            else:
                continue
            source = f"{key} (line {line})"
            for function in functions:
                claims.append(Claim(function, self.sysfs.units(function), ClaimKind.SHARED, source))
        return claims

    def _cgroup_rule(self, value: str, named: set[int]) -> list[str]:
        parts = value.split()
        if len(parts) < 2 or parts[0] != "c":
            return []
        major, _, minor = parts[1].partition(":")
        if not is_number(major):
            return []
        if minor == "*":
            return [] if int(major) in named else self.sysfs.char_functions(int(major), None)
        if is_number(minor):
            return self.sysfs.char_functions(int(major), int(minor))
        return []


def _node_of(key: str, value: str) -> str | None:
    """The host device node a CT config entry passes (``devN``) or bind-mounts (its source)."""
    if key.startswith("dev") and is_number(key[3:]):
        first, options = split_options(value)
        return options.get("path", first or "")
    if key == "lxc.mount.entry":
        words = value.split()
        return words[0] if words else ""
    return None


def split_args(text: str) -> list[str]:
    """``args:`` as QEMU gets it: PVE splits it like a shell would (quotes allowed)."""
    import shlex

    try:
        return shlex.split(text)
    except ValueError:  # unbalanced quotes: QEMU would not start anyway; read what we can
        return text.split()


def vfio_hosts(argv: list[str]) -> list[str]:
    """PCI addresses of ``-device vfio-pci,host=...`` / ``sysfsdev=/sys/bus/pci/devices/...``."""
    found: list[str] = []
    for index, word in enumerate(argv):
        if word != "-device" or index + 1 >= len(argv):
            continue
        spec = argv[index + 1]
        if not spec.startswith("vfio-pci,"):
            continue
        for option in spec.split(",")[1:]:
            key, _, value = option.partition("=")
            if key == "host":
                found.append(value)
            elif key == "sysfsdev" and value.startswith("/sys/bus/pci/devices/"):
                found.append(value.rstrip("/").rsplit("/", 1)[1])
    return found
