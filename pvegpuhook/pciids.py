"""Vendor and device names from the system's ``pci.ids`` (``pciutils``/``hwdata``), for ``scan``."""

from __future__ import annotations

import os

from pvegpuhook import paths

PCI_IDS_FILES = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")


def pci_ids_path() -> str | None:
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


def hex_id(text: str | None) -> str | None:
    """A sysfs ``vendor``/``device`` value (``0x10de``) as pci.ids writes it (``10de``)."""
    if not text:
        return None
    text = text.strip().lower().removeprefix("0x")
    return text if text and all(c in "0123456789abcdef" for c in text) else None


def model_name(
    vendor: str | None, device: str | None, vendor_name: str | None, device_name: str | None
) -> str | None:
    """The name people use: ``GA102 [GeForce RTX 3090]`` of ``NVIDIA Corporation`` →
    ``NVIDIA GeForce RTX 3090``; without a name, the ids (``NVIDIA 10de:2204``)."""
    if device_name:
        short = device_name
        if "[" in device_name and device_name.endswith("]"):
            short = device_name[device_name.rindex("[") + 1 : -1]
        brand = _brand(vendor_name) if vendor_name else ""
        return f"{brand} {short}".strip() if brand and brand not in short else short
    if vendor and device:
        ids = f"{vendor}:{device}"
        return f"{_brand(vendor_name)} {ids}" if vendor_name else ids
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
