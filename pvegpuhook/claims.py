"""What a guest's config claims of the node's PCI devices.

A VM's ``hostpciN`` line is one *need*: a list of alternatives (more than one only for a
``mapping=`` with several ``map`` lines for this node: PVE takes the first free one), each a tuple
of claims. A claim names an address, the units it occupies and how:

- ``exclusive``: full passthrough (vfio-pci); conflicts with any other use of the unit.
- ``mdev``: a mediated device of the parent; only a full passthrough of the parent excludes it.
- ``shared``: a CT using the GPU through the host driver; shared with CTs and mdevs.
"""

from __future__ import annotations

from pvegpuhook import pci
from pvegpuhook.pveconf import GuestConfig, PciMapping, is_number, split_options

EXCLUSIVE = "exclusive"
MDEV = "mdev"
SHARED = "shared"


class Claim:
    __slots__ = ("address", "units", "kind", "source")

    def __init__(self, address: str, units: frozenset[str], kind: str, source: str) -> None:
        self.address = address
        self.units = units
        self.kind = kind
        self.source = source

    def conflicts_with(self, other: Claim) -> bool:
        if EXCLUSIVE not in (self.kind, other.kind):
            return False
        return not self.units.isdisjoint(other.units)

    def __repr__(self) -> str:
        return f"Claim({self.address}, {sorted(self.units)}, {self.kind}, {self.source})"


class Need:
    """One passthrough line of a VM: satisfied when any one alternative is free."""

    __slots__ = ("source", "alternatives", "mapping")

    def __init__(
        self, source: str, alternatives: list[tuple[Claim, ...]], mapping: str | None = None
    ) -> None:
        self.source = source
        self.alternatives = alternatives
        self.mapping = mapping

    def claims(self) -> list[Claim]:
        return [c for alt in self.alternatives for c in alt]


class ClaimReader:
    """Turns config entries into claims, with the node's sysfs and PCI mappings at hand."""

    def __init__(
        self, sysfs: pci.Sysfs, node: str, mappings: dict[str, PciMapping] | None = None
    ) -> None:
        self.sysfs = sysfs
        self.node = node
        self.mappings = mappings
        self.warnings: list[str] = []

    def _mappings(self) -> dict[str, PciMapping]:
        if self.mappings is None:
            from pvegpuhook.pveconf import load_pci_mapping

            self.mappings, warnings = load_pci_mapping()
            self.warnings.extend(warnings)
        return self.mappings

    def _claims(self, ids: list[str], kind: str, source: str, where: str) -> tuple[Claim, ...]:
        claims = []
        for raw in ids:
            address = pci.normalize(raw)
            if address is None:
                self.warnings.append(f"{where}: {source}: {raw!r} is not a PCI address, ignored")
                continue
            claims.append(Claim(address, self.sysfs.units(address), kind, source))
        return tuple(claims)

    def vm_needs(self, config: GuestConfig, with_pending: bool) -> list[Need]:
        """Every passthrough need of a VM (``hostpci0..15`` and raw ``args`` vfio-pci devices)."""
        values = config.values(with_pending)
        needs: list[Need] = []
        for index in range(16):
            key = f"hostpci{index}"
            value = values.get(key)
            if value is None:
                continue
            where = f"{config.path}:{config.line_of(key, with_pending) or '?'}"
            first, options = split_options(value)
            kind = MDEV if options.get("mdev") else EXCLUSIVE
            if "mapping" in options:
                name = options["mapping"]
                mapping = self._mappings().get(name)
                if mapping is None:
                    self.warnings.append(f"{where}: {key}: PCI mapping {name!r} does not exist")
                    needs.append(Need(key, [], mapping=name))
                    continue
                alternatives = [
                    self._claims(entry.paths, kind, key, where)
                    for entry in mapping.for_node(self.node)
                ]
                if not alternatives:
                    self.warnings.append(
                        f"{where}: {key}: PCI mapping {name!r} has no entry for node {self.node}"
                    )
                needs.append(Need(key, [a for a in alternatives if a], mapping=name))
                continue
            host = options.get("host", first)
            if not host:
                self.warnings.append(f"{where}: {key}: no host= or mapping=, ignored")
                continue
            claims = self._claims(host.split(";"), kind, key, where)
            if claims:
                needs.append(Need(key, [claims]))
        args = values.get("args")
        if args and "vfio-pci" in args:
            where = f"{config.path}:{config.line_of('args', with_pending) or '?'}"
            ids = vfio_hosts(split_args(args))
            claims = self._claims(ids, EXCLUSIVE, "args", where)
            needs.extend(Need("args", [(c,)]) for c in claims)
        return needs

    def ct_claims(self, config: GuestConfig, with_pending: bool = False) -> list[Claim]:
        """GPUs a CT uses through the host driver (devN, bind mounts, cgroup rules)."""
        claims: list[Claim] = []
        for key, value, line in config.raw_entries(with_pending):
            functions: list[str] = []
            if key.startswith("dev") and is_number(key[3:]):
                first, options = split_options(value)
                node = options.get("path", first or "")
                functions = self.sysfs.node_functions(node)
            elif key == "lxc.mount.entry":
                source = value.split()[0] if value.split() else ""
                functions = self.sysfs.node_functions(source)
            elif key in ("lxc.cgroup2.devices.allow", "lxc.cgroup.devices.allow"):
                functions = self._cgroup_rule(value)
            else:
                continue
            source = f"{key} (line {line})"
            for function in functions:
                claims.append(Claim(function, self.sysfs.units(function), SHARED, source))
        return claims

    def _cgroup_rule(self, value: str) -> list[str]:
        parts = value.split()
        if len(parts) < 2 or parts[0] != "c":
            return []
        major, _, minor = parts[1].partition(":")
        if not is_number(major):
            return []
        if minor == "*":
            return self.sysfs.char_functions(int(major), None)
        if is_number(minor):
            return self.sysfs.char_functions(int(major), int(minor))
        return []


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
