"""PCI addresses and what sysfs says about them: functions, IOMMU groups, drivers, device nodes.

The unit of exclusivity is the IOMMU group, because PVE binds the whole group to vfio-pci when a VM
starts. Without sysfs information we fall back to the whole device (every function of
``dddd:bb:dd``); an SR-IOV virtual function is its own unit.
"""

from __future__ import annotations

import os

from pvegpuhook import paths
from pvegpuhook.pveconf import is_number, read_text

TYPE_CHECKING = False  # typing costs ~7 ms of import on the hook path
if TYPE_CHECKING:
    from collections.abc import Iterable

IOMMU_CLASS = "sys/class/iommu"
NVIDIA_MAJOR = 195
DRM_MAJOR = 226
_HEX = "0123456789abcdef"


def _is_hex(text: str, width: int) -> bool:
    return len(text) == width and all(c in _HEX for c in text)


def normalize(text: str) -> str | None:
    """``01:00`` → ``0000:01:00``, ``1:00.0``-style junk → None, ``0000:01:00.1`` unchanged.

    Returns the full function address, or the device address when no function is given. A domain
    has at least 4 hex digits, as in PVE's ``$PCIRE`` (qemu-server PVE/QemuServer/PCI.pm) and
    sysfs: VMD domains such as ``10000:e1:00.0`` have 5 (docs/pve-facts.md §5).
    """
    text = text.strip().lower()
    parts = text.split(":")
    if len(parts) == 2:
        parts.insert(0, "0000")
    if len(parts) != 3:
        return None
    domain, bus, rest = parts
    slot, dot, function = rest.partition(".")
    if not (_is_hex(domain, max(4, len(domain))) and _is_hex(bus, 2) and _is_hex(slot, 2)):
        return None
    if dot and not (len(function) == 1 and function in "01234567"):
        return None
    return f"{domain}:{bus}:{slot}.{function}" if dot else f"{domain}:{bus}:{slot}"


def device_of(address: str) -> str:
    """``0000:01:00.1`` → ``0000:01:00``."""
    return address.partition(".")[0]


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


class Sysfs:
    """Read-only, cached view of the node's PCI devices under the root."""

    local = True  # this host's own sysfs (another node's is not seen: see nodeview)

    def __init__(self) -> None:
        self._devices_dir = paths.host("sys/bus/pci/devices")
        self._all: list[str] | None = None
        self._units: dict[str, str] = {}
        self._nvidia: dict[int, str] | None = None

    def all_functions(self) -> list[str]:
        if self._all is None:
            try:
                self._all = sorted(os.listdir(self._devices_dir))
            except OSError:
                self._all = []
        return self._all

    def exists(self, address: str) -> bool:
        if "." in address:
            return os.path.isdir(os.path.join(self._devices_dir, address))
        return bool(self.functions(address))

    def functions(self, address: str) -> list[str]:
        """Every function a (short or full) address stands for that sysfs knows."""
        if "." in address:
            return [address] if os.path.isdir(os.path.join(self._devices_dir, address)) else []
        prefix = address + "."
        return [a for a in self.all_functions() if a.startswith(prefix)]

    def unit(self, function: str) -> str:
        """The exclusivity unit of a function: ``group:N``, ``fn:<addr>`` (VF) or ``dev:<addr>``."""
        cached = self._units.get(function)
        if cached is not None:
            return cached
        base = os.path.join(self._devices_dir, function)
        group = _link_name(os.path.join(base, "iommu_group"))
        if group is not None:
            unit = f"group:{group}"
        elif os.path.lexists(os.path.join(base, "physfn")):
            unit = f"fn:{function}"
        else:
            unit = f"dev:{device_of(function)}"
        self._units[function] = unit
        return unit

    def units(self, address: str) -> frozenset[str]:
        """Units of a short or full address; an address sysfs lacks falls back to its device."""
        functions = self.functions(address)
        if not functions:
            return frozenset({f"dev:{device_of(address)}"})
        return frozenset(self.unit(f) for f in functions)

    def group_members(self, group: str) -> list[str]:
        try:
            return sorted(os.listdir(paths.host("sys/kernel/iommu_groups", group, "devices")))
        except OSError:
            return []

    def driver(self, function: str) -> str | None:
        return _link_name(os.path.join(self._devices_dir, function, "driver"))

    def attribute(self, function: str, name: str) -> str | None:
        value = read_text(os.path.join(self._devices_dir, function, name))
        return value.strip() if value is not None else None

    def iommu_present(self) -> bool:
        """Whether the kernel has an IOMMU: PVE's own test (pve-common SysFSTools.pm
        check_iommu_support: ``/sys/class/iommu/`` holds an entry), which its start of any VM with
        a ``hostpciN`` device requires (qemu-server PCI.pm prepare_pci_device)."""
        try:
            return any(not name.startswith(".") for name in os.listdir(paths.host(IOMMU_CLASS)))
        except OSError:
            return False

    def power_state(self, function: str) -> str | None:
        """``D0``, ``D3hot``, ``D3cold``... (``power_state``); None when sysfs has no such file."""
        return self.attribute(function, "power_state")

    def reset_methods(self, function: str) -> list[str] | None:
        """The reset methods the kernel would use, in order (``reset_method``: ``flr bus``...);
        ``[]`` when the file is empty (no method left), None when there is no such file."""
        value = self.attribute(function, "reset_method")
        return None if value is None else value.split()

    def mapping_facts(self, function: str) -> dict[str, str | None]:
        """What PVE compares a PCI mapping's ``map`` line with (pve-common SysFSTools.pm
        pci_device_info, verbose): ``id``, ``iommugroup``, ``subsystem-id``, ``mdev``."""
        vendor = (self.attribute(function, "vendor") or "").removeprefix("0x")
        device = (self.attribute(function, "device") or "").removeprefix("0x")
        sub_vendor = self.attribute(function, "subsystem_vendor")
        sub_device = self.attribute(function, "subsystem_device")
        group = _link_name(os.path.join(self._devices_dir, function, "iommu_group"))
        mdev = self.mdev_capable(function) or os.path.isdir(
            os.path.join(self._devices_dir, function, "nvidia")
        )
        return {
            "id": f"{vendor}:{device}",
            "iommugroup": str(int(group)) if group is not None and is_number(group) else None,
            "mdev": "1" if mdev else "0",
            "subsystem-id": (
                f"{sub_vendor.removeprefix('0x')}:{sub_device.removeprefix('0x')}"
                if sub_vendor is not None and sub_device is not None
                else None
            ),
        }

    def is_vf(self, function: str) -> bool:
        return os.path.lexists(os.path.join(self._devices_dir, function, "physfn"))

    def mdev_capable(self, function: str) -> bool:
        return os.path.isdir(os.path.join(self._devices_dir, function, "mdev_supported_types"))

    # Device nodes used by containers → PCI functions.

    def drm_device(self, name: str) -> str | None:
        """``card0`` / ``renderD128`` → PCI function, through ``/sys/class/drm/<name>/device``."""
        return _link_name(paths.host("sys/class/drm", name, "device"))

    def drm_names(self) -> list[str]:
        try:
            names = os.listdir(paths.host("sys/class/drm"))
        except OSError:
            return []
        return sorted(n for n in names if n.startswith(("card", "renderD")) and "-" not in n)

    def nvidia_minors(self) -> dict[int, str]:
        """``/dev/nvidiaN`` minor → PCI function (``/proc/driver/nvidia/gpus/*/information``)."""
        if self._nvidia is None:
            self._nvidia = {}
            base = paths.host("proc/driver/nvidia/gpus")
            try:
                gpus = os.listdir(base)
            except OSError:
                gpus = []
            for gpu in sorted(gpus):
                for line in (read_text(os.path.join(base, gpu, "information")) or "").splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() == "Device Minor" and is_number(value.strip()):
                        address = normalize(gpu)
                        if address:
                            self._nvidia[int(value.strip())] = address
        return self._nvidia

    def node_functions(self, node: str) -> list[str]:
        """PCI functions behind a device node path as used in a CT config (may be empty)."""
        node = node.strip()
        if node.startswith("/dev/dri/by-path/pci-"):
            address = normalize(node[len("/dev/dri/by-path/pci-") :].rsplit("-", 1)[0])
            return [address] if address else []
        if node.rstrip("/") == "/dev/dri":
            return self._dedupe(self.drm_device(n) for n in self.drm_names())
        if node.startswith("/dev/dri/"):
            found = self.drm_device(node[len("/dev/dri/") :])
            return [found] if found else []
        if node.startswith("/dev/nvidia") and is_number(node[len("/dev/nvidia") :]):
            found = self.nvidia_minors().get(int(node[len("/dev/nvidia") :]))
            return [found] if found else []
        return []

    def char_functions(self, major: int, minor: int | None) -> list[str]:
        """PCI functions behind a cgroup device rule ``c MAJOR:MINOR`` (minor None = ``*``)."""
        if major == NVIDIA_MAJOR:
            minors = self.nvidia_minors()
            if minor is None:
                return self._dedupe(minors.values())
            found = minors.get(minor)
            return [found] if found else []
        if major == DRM_MAJOR:
            if minor is None:
                return self._dedupe(self.drm_device(n) for n in self.drm_names())
            name = f"card{minor}" if minor < 128 else f"renderD{minor}"
            found = self.drm_device(name)
            return [found] if found else []
        return []

    @staticmethod
    def _dedupe(items: Iterable[str | None]) -> list[str]:
        seen: list[str] = []
        for item in items:
            if item and item not in seen:
                seen.append(item)
        return seen


def gpu_node_major(node: str) -> int | None:
    """The major of the GPU device nodes a path names, by name: 195 for ``/dev/nvidia<N>``, 226
    for ``/dev/dri`` and what is in it (``card*``, ``renderD*``, ``by-path``); None for other
    nodes (``/dev/nvidiactl``, ``/dev/nvidia-uvm``: no GPU of their own)."""
    node = node.strip()
    if node.rstrip("/") == "/dev/dri" or node.startswith("/dev/dri/"):
        return DRM_MAJOR
    if node.startswith("/dev/nvidia") and is_number(node[len("/dev/nvidia") :]):
        return NVIDIA_MAJOR
    return None


def unit_order(unit: str) -> tuple[str, int, str]:
    """Sort key of a unit (``group:9`` before ``group:14``)."""
    kind, _, value = unit.partition(":")
    return (kind, int(value) if value.isdigit() else -1, value)


def unit_text(unit: str) -> str:
    """A unit as an admin reads it: ``IOMMU group 14``, ``SR-IOV function ...``, ``device ...``."""
    kind, _, value = unit.partition(":")
    if kind == "group":
        return f"IOMMU group {value}"
    if kind == "fn":
        return f"SR-IOV function {value}"
    return f"device {value}"
