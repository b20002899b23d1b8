"""What a guest's config claims of the node's PCI devices (see :mod:`pvegpuhook.model`).

A VM's ``hostpciN`` line (or raw ``args`` vfio-pci device) is one :class:`~pvegpuhook.model.Need`;
a CT's device nodes and cgroup rules are ``shared`` claims. Readers return the problems they find
with what they read (``file:line: ...``), never into a list shared between callers.
"""

from __future__ import annotations

from pvegpuhook import pci
from pvegpuhook.model import Claim, ClaimKind, Need
from pvegpuhook.pveconf import GuestConfig, PciMapping, is_number, split_options


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
        and the problems of its config lines that name them."""
        values = config.values(with_pending)
        needs: list[Need] = []
        warnings: list[str] = []
        for index in range(16):
            key = f"hostpci{index}"
            value = values.get(key)
            if value is None:
                continue
            where = f"{config.path}:{config.line_of(key, with_pending) or '?'}"
            first, options = split_options(value)
            kind = ClaimKind.MDEV if options.get("mdev") else ClaimKind.EXCLUSIVE
            if "mapping" in options:
                name = options["mapping"]
                mapping = self._mappings().get(name)
                if mapping is None:
                    warnings.append(f"{where}: {key}: PCI mapping {name!r} does not exist")
                    needs.append(Need(key, [], mapping=name))
                    continue
                alternatives = [
                    self._claims(entry.paths, kind, key, where, warnings)
                    for entry in mapping.for_node(self.node)
                ]
                if not alternatives:
                    warnings.append(
                        f"{where}: {key}: PCI mapping {name!r} has no entry for node {self.node}"
                    )
                needs.append(Need(key, [a for a in alternatives if a], mapping=name))
                continue
            host = options.get("host", first)
            if not host:
                warnings.append(f"{where}: {key}: no host= or mapping=, ignored")
                continue
            claims = self._claims(host.split(";"), kind, key, where, warnings)
            if claims:
                needs.append(Need(key, [claims]))
        args = values.get("args")
        if args and "vfio-pci" in args:
            where = f"{config.path}:{config.line_of('args', with_pending) or '?'}"
            ids = vfio_hosts(split_args(args))
            claims = self._claims(ids, ClaimKind.EXCLUSIVE, "args", where, warnings)
            needs.extend(Need("args", [(c,)]) for c in claims)
        return needs, warnings

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
