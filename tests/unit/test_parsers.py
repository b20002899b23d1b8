"""Unit tests of the readers: PCI ids and sysfs, PVE config files, claims, runtime state.

Every host path is read under ``PVE_GPU_HOOK_ROOT``; the fixtures build a small fake node in
``tmp_path`` (sysfs PCI devices with IOMMU groups, DRM and NVIDIA device nodes, pid files, /proc).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pvegpuhook import pci, pveconf, runtime
from pvegpuhook.claims import ClaimReader, vfio_hosts
from pvegpuhook.model import Claim, ClaimKind, Need
from pvegpuhook.pveconf import (
    parse_guest_config,
    parse_ha_resources,
    parse_pci_mapping,
    split_options,
    startup_order,
)

VM_CONF = "/etc/pve/qemu-server/102.conf"
CT_CONF = "/etc/pve/lxc/200.conf"


# --------------------------------------------------------------------------------------------
# Fake node tree


def add_function(
    root: Path,
    address: str,
    *,
    group: str | None = None,
    driver: str | None = None,
    physfn: str | None = None,
) -> None:
    """A PCI function in ``sys/bus/pci/devices`` with the links sysfs would have."""
    device = root / "sys/bus/pci/devices" / address
    device.mkdir(parents=True)
    (device / "vendor").write_text("0x10de\n")
    (device / "device").write_text("0x2204\n")
    if group is not None:
        members = root / "sys/kernel/iommu_groups" / group / "devices"
        members.mkdir(parents=True, exist_ok=True)
        (members / address).symlink_to(f"../../../../bus/pci/devices/{address}")
        (device / "iommu_group").symlink_to(f"../../../../kernel/iommu_groups/{group}")
    if driver is not None:
        (device / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
    if physfn is not None:
        (device / "physfn").symlink_to(f"../{physfn}")


def add_drm(root: Path, name: str, target: str) -> None:
    """``sys/class/drm/<name>/device`` → ``target`` (a PCI function or another drm name)."""
    directory = root / "sys/class/drm" / name
    directory.mkdir(parents=True)
    (directory / "device").symlink_to(f"../../../bus/pci/devices/{target}")


def add_nvidia(root: Path, address: str, minor: int) -> None:
    directory = root / "proc/driver/nvidia/gpus" / address
    directory.mkdir(parents=True)
    (directory / "information").write_text(
        f"Model: \t\t NVIDIA GeForce RTX 3090\nIRQ:   \t\t 130\nDevice Minor: \t {minor}\n"
    )


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_host(root: Path) -> Path:
    """A node with two GPUs (groups 14 and 16), a NIC (group 15) and an SR-IOV card (no IOMMU
    groups: the PF falls back to its device, the VF is its own unit)."""
    add_function(root, "0000:01:00.0", group="14", driver="vfio-pci")
    add_function(root, "0000:01:00.1", group="14", driver="snd_hda_intel")
    add_function(root, "0000:02:00.0", group="15", driver="igb")
    add_function(root, "0000:03:00.0")
    add_function(root, "0000:03:00.2", physfn="0000:03:00.0")
    add_function(root, "0000:04:00.0", group="16", driver="nvidia")
    add_function(root, "0000:04:00.1", group="16")
    add_drm(root, "card0", "0000:01:00.0")
    add_drm(root, "renderD128", "0000:01:00.0")
    add_drm(root, "card1", "0000:04:00.0")
    add_drm(root, "renderD129", "0000:04:00.0")
    connector = root / "sys/class/drm/card1-HDMI-A-1"
    connector.mkdir(parents=True)
    (connector / "device").symlink_to("../card1")
    (root / "sys/class/drm/version").write_text("drm 1.1.0 20060810\n")
    add_nvidia(root, "0000:01:00.0", 0)
    add_nvidia(root, "0000:04:00.0", 1)
    # behind an Intel VMD controller: a PCI domain of 5 hex digits
    add_function(root, "10000:e1:00.0", group="40", driver="nvme")
    add_function(root, "10000:e1:00.1", group="40")
    return root


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_host(tmp_path_factory.mktemp("node"))


@pytest.fixture
def host(shared_tree: Path, at_root: Callable[[Path], Path]) -> Path:
    """The fake node, built once per module: tests using it must not write into it."""
    return at_root(shared_tree)


@pytest.fixture
def fresh_host(host_root: Path) -> Path:
    """A private copy of the fake node for tests that add files to it."""
    return build_host(host_root)


# --------------------------------------------------------------------------------------------
# pci.normalize / device_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("01:00", "0000:01:00"),
        ("01:00.0", "0000:01:00.0"),
        ("0000:01:00.0", "0000:01:00.0"),
        ("0000:01:00", "0000:01:00"),
        ("0001:af:1f.7", "0001:af:1f.7"),
        ("0000:0A:1F.3", "0000:0a:1f.3"),
        ("01:00.1", "0000:01:00.1"),
        ("  05:00.0\n", "0000:05:00.0"),
        # PVE's $PCIRE takes a domain of 4 or more hex digits (VMD: 10000)
        ("10000:e1:00.0", "10000:e1:00.0"),
        ("10000:E1:00", "10000:e1:00"),
        ("abcdef:01:1f.7", "abcdef:01:1f.7"),
    ],
)
def test_normalize_accepts_every_pve_id_form(text: str, expected: str) -> None:
    assert pci.normalize(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "1:0",
        "1:00.0",
        "01:0.0",
        "01:00.8",
        "01:00.a",
        "01:00.",
        "01:00.00",
        "zz:00.0",
        "0000:01:00.0.1",
        "000:01:00.0",
        "0000:01:00:00.0",
        "1000g:01:00.0",
        "10000:e1:0.0",
        "10000:e1:00.8",
        "01",
        "01:00.0;02:00.0",
        "host=01:00.0",
        "ｆｆ:00.0",
    ],
)
def test_normalize_rejects_junk(text: str) -> None:
    assert pci.normalize(text) is None


@pytest.mark.parametrize(
    ("address", "device"),
    [
        ("0000:01:00.1", "0000:01:00"),
        ("0000:01:00", "0000:01:00"),
        ("0001:af:1f.7", "0001:af:1f"),
        ("10000:e1:00.1", "10000:e1:00"),
    ],
)
def test_device_of(address: str, device: str) -> None:
    assert pci.device_of(address) == device


# --------------------------------------------------------------------------------------------
# pci.Sysfs


@pytest.mark.parametrize(
    ("function", "unit"),
    [
        ("0000:01:00.0", "group:14"),
        ("0000:01:00.1", "group:14"),
        ("0000:02:00.0", "group:15"),
        ("0000:03:00.2", "fn:0000:03:00.2"),  # a VF without a group is its own unit
        ("0000:03:00.0", "dev:0000:03:00"),  # no group: the whole device
    ],
)
def test_sysfs_unit(host: Path, function: str, unit: str) -> None:
    assert pci.Sysfs().unit(function) == unit


@pytest.mark.parametrize(
    ("address", "functions"),
    [
        ("0000:01:00", ["0000:01:00.0", "0000:01:00.1"]),
        ("0000:01:00.1", ["0000:01:00.1"]),
        ("0000:03:00", ["0000:03:00.0", "0000:03:00.2"]),
        ("0000:09:00", []),
        ("0000:09:00.0", []),
        ("0000:01:0", []),  # a prefix is not a device
        ("10000:e1:00", ["10000:e1:00.0", "10000:e1:00.1"]),
        ("10000:e1:00.1", ["10000:e1:00.1"]),
        ("0000:e1:00", []),  # another domain
    ],
)
def test_sysfs_functions(host: Path, address: str, functions: list[str]) -> None:
    assert pci.Sysfs().functions(address) == functions
    assert pci.Sysfs().exists(address) is bool(functions)


@pytest.mark.parametrize(
    ("address", "units"),
    [
        ("0000:01:00", {"group:14"}),
        ("0000:01:00.0", {"group:14"}),
        ("0000:04:00", {"group:16"}),
        ("0000:03:00", {"dev:0000:03:00", "fn:0000:03:00.2"}),
        ("0000:09:00.0", {"dev:0000:09:00"}),  # unknown to sysfs: falls back to the device
        ("0000:09:00", {"dev:0000:09:00"}),
        ("10000:e1:00", {"group:40"}),
        ("10000:e2:00.0", {"dev:10000:e2:00"}),
    ],
)
def test_sysfs_units(host: Path, address: str, units: set[str]) -> None:
    assert pci.Sysfs().units(address) == frozenset(units)


def test_sysfs_without_any_sysfs_falls_back_to_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(tmp_path))
    sysfs = pci.Sysfs()
    assert sysfs.all_functions() == []
    assert sysfs.units("0000:01:00.0") == frozenset({"dev:0000:01:00"})
    assert sysfs.node_functions("/dev/dri/renderD128") == []
    assert sysfs.node_functions("/dev/nvidia0") == []
    assert sysfs.char_functions(195, None) == []
    assert sysfs.char_functions(226, None) == []


def test_sysfs_attributes(host: Path) -> None:
    sysfs = pci.Sysfs()
    assert sysfs.all_functions()[:2] == ["0000:01:00.0", "0000:01:00.1"]
    assert sysfs.driver("0000:01:00.0") == "vfio-pci"
    assert sysfs.driver("0000:01:00.1") == "snd_hda_intel"
    assert sysfs.driver("0000:03:00.0") is None
    assert sysfs.driver("0000:09:00.0") is None
    assert sysfs.is_vf("0000:03:00.2") is True
    assert sysfs.is_vf("0000:03:00.0") is False
    assert sysfs.attribute("0000:01:00.0", "vendor") == "0x10de"
    assert sysfs.attribute("0000:01:00.0", "missing") is None
    assert sysfs.group_members("14") == ["0000:01:00.0", "0000:01:00.1"]
    assert sysfs.group_members("99") == []
    assert sysfs.mdev_capable("0000:01:00.0") is False


def test_sysfs_drm_and_nvidia(host: Path) -> None:
    sysfs = pci.Sysfs()
    assert sysfs.drm_names() == ["card0", "card1", "renderD128", "renderD129"]
    assert sysfs.drm_device("renderD128") == "0000:01:00.0"
    assert sysfs.drm_device("renderD200") is None
    assert sysfs.nvidia_minors() == {0: "0000:01:00.0", 1: "0000:04:00.0"}


def test_nvidia_information_without_minor_is_ignored(fresh_host: Path) -> None:
    gpus = "proc/driver/nvidia/gpus"
    write(fresh_host, f"{gpus}/0000:05:00.0/information", "Model: x\nDevice Minor: ?\n")
    write(fresh_host, f"{gpus}/junk/information", "Device Minor: 7\n")
    assert pci.Sysfs().nvidia_minors() == {0: "0000:01:00.0", 1: "0000:04:00.0"}


@pytest.mark.parametrize(
    ("node", "functions"),
    [
        ("/dev/dri/renderD128", ["0000:01:00.0"]),
        ("/dev/dri/card0", ["0000:01:00.0"]),
        ("/dev/dri/card1", ["0000:04:00.0"]),
        ("/dev/dri/renderD200", []),
        ("/dev/dri", ["0000:01:00.0", "0000:04:00.0"]),
        ("/dev/dri/", ["0000:01:00.0", "0000:04:00.0"]),
        ("/dev/dri/by-path/pci-0000:01:00.0-render", ["0000:01:00.0"]),
        ("/dev/dri/by-path/pci-0000:04:00.0-card", ["0000:04:00.0"]),
        ("/dev/dri/by-path/pci-junk-render", []),
        ("/dev/dri/by-path/pci-10000:e1:00.0-card", ["10000:e1:00.0"]),
        ("/dev/nvidia0", ["0000:01:00.0"]),
        ("/dev/nvidia1", ["0000:04:00.0"]),
        ("/dev/nvidia7", []),
        ("/dev/nvidiactl", []),
        ("/dev/nvidia-uvm", []),
        ("/dev/nvidia-caps", []),
        ("/dev/net/tun", []),
        ("", []),
    ],
)
def test_node_functions(host: Path, node: str, functions: list[str]) -> None:
    assert pci.Sysfs().node_functions(node) == functions


@pytest.mark.parametrize(
    ("major", "minor", "functions"),
    [
        (195, None, ["0000:01:00.0", "0000:04:00.0"]),
        (195, 0, ["0000:01:00.0"]),
        (195, 1, ["0000:04:00.0"]),
        (195, 255, []),  # nvidiactl
        (226, None, ["0000:01:00.0", "0000:04:00.0"]),
        (226, 128, ["0000:01:00.0"]),
        (226, 129, ["0000:04:00.0"]),
        (226, 0, ["0000:01:00.0"]),
        (226, 1, ["0000:04:00.0"]),
        (226, 5, []),
        (10, 200, []),
        (10, None, []),
    ],
)
def test_char_functions(host: Path, major: int, minor: int | None, functions: list[str]) -> None:
    found = pci.Sysfs().char_functions(major, minor)
    assert sorted(found) == functions
    assert len(set(found)) == len(found)


# --------------------------------------------------------------------------------------------
# pveconf.parse_guest_config

VM_TEXT = """\
#my%20description
boot: order=scsi0
hostpci0: 01:00,pcie=1,x-vga=1
name: vm102
memory: 4096
onboot: 1
memory: 8192
[PENDING]
hostpci1: 02:00.0
delete: hostpci0, onboot
[snap1]
hostpci0: 04:00.0
hostpci2: 04:00.0
parent: x
snaptime: 1700000000
[special:cloudinit]
hostpci3: 04:00.0
"""


def test_guest_config_main_section_only() -> None:
    config = parse_guest_config(VM_TEXT, VM_CONF)
    assert config.values() == {
        "boot": "order=scsi0",
        "hostpci0": "01:00,pcie=1,x-vga=1",
        "name": "vm102",
        "memory": "8192",  # the last occurrence wins
        "onboot": "1",
    }
    assert config.warnings == []


def test_guest_config_pending_overlay() -> None:
    config = parse_guest_config(VM_TEXT, VM_CONF)
    assert config.values(with_pending=True) == {
        "boot": "order=scsi0",
        "name": "vm102",
        "memory": "8192",
        "hostpci1": "02:00.0",
    }
    assert config.pending_delete == {"hostpci0", "onboot"}
    assert config.has_pending("hostpci")
    assert config.has_pending("onboot")  # through delete
    assert not config.has_pending("net")
    assert not config.has_pending("hostpci2")  # only in a snapshot


def test_guest_config_line_of() -> None:
    config = parse_guest_config(VM_TEXT, VM_CONF)
    assert config.line_of("hostpci0") == 3
    assert config.line_of("memory") == 7  # the line that wins
    assert config.line_of("hostpci1") is None  # pending only
    assert config.line_of("hostpci2") is None  # snapshot only
    assert config.line_of("nothing") is None


def test_lxc_pending_section_and_overrides() -> None:
    text = (
        "hostname: ct200\n"
        "dev0: /dev/dri/renderD128,gid=104\n"
        "memory: 512\n"
        "[pve:pending]\n"
        "memory: 1024\n"
        "dev1: /dev/nvidia0\n"
        "delete: dev0\n"
        "[before-upgrade]\n"
        "dev2: /dev/nvidia1\n"
    )
    config = parse_guest_config(text, CT_CONF)
    assert config.values() == {
        "hostname": "ct200",
        "dev0": "/dev/dri/renderD128,gid=104",
        "memory": "512",
    }
    assert config.values(with_pending=True) == {
        "hostname": "ct200",
        "memory": "1024",
        "dev1": "/dev/nvidia0",
    }
    assert [k for k, _, _ in config.raw_entries(with_pending=True)] == [
        "hostname",
        "memory",
        "dev1",
    ]


@pytest.mark.parametrize("section", ["[snap1]", "[special:cloudinit]", "[vzdump]", "[Snap-2]"])
def test_sections_other_than_pending_are_ignored(section: str) -> None:
    text = f"name: a\n{section}\nhostpci0: 01:00.0\nname: b\ndelete: name\n"
    config = parse_guest_config(text, VM_CONF)
    assert config.values() == {"name": "a"}
    assert config.values(with_pending=True) == {"name": "a"}
    assert config.warnings == []


@pytest.mark.parametrize("line", ["[ snap ]", "[oops", "[1snap]", "[]"])
def test_a_broken_section_header_is_warned_and_the_section_goes_on(line: str) -> None:
    """PVE starts a section only at ``[name]``; it warns about other lines and reads on."""
    config = parse_guest_config(f"name: a\n{line}\nhostpci0: 01:00.0\n", VM_CONF)
    assert config.values() == {"name": "a", "hostpci0": "01:00.0"}
    assert [w.split(": ")[0] for w in config.warnings] == [f"{VM_CONF}:2"]


def test_lxc_raw_keys_with_both_separators_repeat() -> None:
    text = (
        "arch: amd64\n"
        "lxc.cgroup2.devices.allow: c 195:* rwm\n"
        "lxc.cgroup2.devices.allow: c 226:128 rwm\n"
        "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file\n"
        "lxc.mount.entry = /dev/dri dev/dri none bind,optional,create=dir\n"
        "lxc.mount.entry=/dev/fuse dev/fuse none bind,create=file\n"
        "lxc.apparmor.profile: unconfined\n"
    )
    config = parse_guest_config(text, CT_CONF)
    assert config.warnings == []
    assert config.values() == {"arch": "amd64"}  # lxc.* keys are not single-valued
    assert config.raw_entries() == [
        ("arch", "amd64", 1),
        ("lxc.cgroup2.devices.allow", "c 195:* rwm", 2),
        ("lxc.cgroup2.devices.allow", "c 226:128 rwm", 3),
        ("lxc.mount.entry", "/dev/nvidia0 dev/nvidia0 none bind,optional,create=file", 4),
        ("lxc.mount.entry", "/dev/dri dev/dri none bind,optional,create=dir", 5),
        ("lxc.mount.entry", "/dev/fuse dev/fuse none bind,create=file", 6),
        ("lxc.apparmor.profile", "unconfined", 7),
    ]


def test_comments_blank_lines_and_whitespace() -> None:
    text = "# a comment: with colon\n\n   \n  # indented comment\nname:   spaced   \r\n"
    config = parse_guest_config(text, VM_CONF)
    assert config.values() == {"name": "spaced"}
    assert config.warnings == []


@pytest.mark.parametrize(
    "bad",
    [
        "this is not a config line",
        ": x",
        ":",
        "Name: upper case key",
        "HOSTPCI0: 01:00.0",
        "hostpci0 01:00.0",
        "1abc: starts with a digit",
        "key with space: x",
        "\x00\x01\x02 binary \ufffd\ufffd",
        "x" * 100_000,
        "=value",
        "lxc.mount.entry",
    ],
)
def test_garbage_line_warns_with_path_and_line(bad: str) -> None:
    config = parse_guest_config(f"name: ok\n{bad}\nmemory: 1\n", VM_CONF)
    assert config.values() == {"name": "ok", "memory": "1"}
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith(f"{VM_CONF}:2: ")
    assert len(config.warnings[0]) < 200  # a long line is shortened in the warning


def test_binary_file_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "999.conf"
    path.write_bytes(bytes(range(256)) * 8 + b"\nhostpci0: 01:00.0\n" + b"\xff\xfe\x00" * 50)
    text = pveconf.read_text(str(path))
    assert text is not None
    config = parse_guest_config(text, str(path))
    assert config.values()["hostpci0"] == "01:00.0"
    assert config.warnings
    assert all(w.startswith(f"{path}:") for w in config.warnings)


def test_read_text_missing_file(tmp_path: Path) -> None:
    assert pveconf.read_text(str(tmp_path / "nope.conf")) is None


def test_line_numbers_count_newlines_only() -> None:
    text = "name: a\x0cb\nhostpci0: 01:00.0\nfoo bar\n"
    config = parse_guest_config(text, VM_CONF)
    assert config.values()["name"] == "a\x0cb"
    assert config.line_of("hostpci0") == 2
    assert config.warnings == [f"{VM_CONF}:3: cannot parse 'foo bar', line ignored"]


@pytest.mark.parametrize(
    "delete", ["!hostpci0", "hostpci1,!hostpci0", "hostpci1;hostpci0", "hostpci1 hostpci0"]
)
def test_pending_delete_like_pve(delete: str) -> None:
    text = f"hostpci0: 01:00.0\nname: a\n[PENDING]\ndelete: {delete}\n"
    config = parse_guest_config(text, VM_CONF)
    assert "hostpci0" not in config.values(with_pending=True)


# --------------------------------------------------------------------------------------------
# pveconf small parsers


@pytest.mark.parametrize(
    ("value", "first", "options"),
    [
        ("01:00.0,pcie=1,x-vga=1", "01:00.0", {"pcie": "1", "x-vga": "1"}),
        ("host=01:00.0;02:00.0,rombar=0", None, {"host": "01:00.0;02:00.0", "rombar": "0"}),
        ("mapping=gpu,mdev=nvidia-35", None, {"mapping": "gpu", "mdev": "nvidia-35"}),
        ("01:00", "01:00", {}),
        (" 01:00.0 , pcie = 1 ,, ", "01:00.0", {"pcie": "1"}),
        ("01:00.0,legacy-igd", "01:00.0", {"legacy-igd": ""}),
        ("", None, {}),
    ],
)
def test_split_options(value: str, first: str | None, options: dict[str, str]) -> None:
    assert split_options(value) == (first, options)


@pytest.mark.parametrize(
    ("value", "order"),
    [
        ("order=2,up=30", 2),
        ("up=30,order=7,down=60", 7),
        ("3", 3),
        ("up=30", None),
        ("order=x", None),
        ("order=-1", None),
        ("junk", None),
        ("", None),
        (None, None),
    ],
)
def test_startup_order(value: str | None, order: int | None) -> None:
    assert startup_order(value) == order


PCI_CFG = """\
gpu
\tdescription RTX 3090 pool
\tmap id=10de:2204,iommugroup=14,node=pve1,path=0000:01:00.0,subsystem-id=1458:403b
\tmap id=10de:2204,iommugroup=16,node=pve2,path=0000:04:00.0
\tmap id=10de:2204,iommugroup=16,node=pve1,path=0000:04:00.0;0000:04:00.1

vgpu
\tmdev 1
\tmap node=pve1,path=0000:01:00.0,id=10de:2204

broken
\tmap path=0000:02:00.0,id=10de:2204
\tmap node=pve1,id=10de:2204
\tmap node=pve1,path=02:00.0,id=10de:2204
\tmap node=pve1,path=0000:02:00.0,id=10de:2204,color=red

nomdev
\tmdev 0
\tmap node=pve1,path=0000:02:00.0,id=10de:2204
notes
\tmap node=pve1,path=0000:04:00.0,id=10de:2204

bad!name
\tmap node=pve1,path=0000:04:00.0,id=10de:2204
"""


def test_pci_mapping_alternatives_in_order() -> None:
    """As PVE reads pci.cfg (SectionConfig.pm parse_config, Mapping/PCI.pm): a mapping runs up to
    a blank line, a map line failing its format is dropped, a mapping left without one too."""
    mappings, warnings = parse_pci_mapping(PCI_CFG, "/etc/pve/mapping/pci.cfg")
    assert sorted(mappings) == ["broken", "gpu", "nomdev", "vgpu"]
    # kept for its line, with why PVE ignores it: a guest using it is blamed on that line
    assert (mappings["broken"].dropped, mappings["broken"].line) == ("it has no valid map line", 11)
    assert mappings["broken"].entries == []
    assert [m.dropped for n, m in sorted(mappings.items()) if n != "broken"] == [None] * 3
    gpu = mappings["gpu"]
    assert gpu.line == 1
    assert [e.paths for e in gpu.for_node("pve1")] == [
        ["0000:01:00.0"],
        ["0000:04:00.0", "0000:04:00.1"],
    ]
    assert [e.iommugroup for e in gpu.for_node("pve1")] == ["14", "16"]
    assert [e.line for e in gpu.for_node("pve1")] == [3, 5]
    assert [e.paths for e in gpu.for_node("pve2")] == [["0000:04:00.0"]]
    assert gpu.for_node("pve3") == []
    assert gpu.mdev is False
    assert mappings["vgpu"].mdev is True
    assert mappings["nomdev"].mdev is False
    # "notes" has no blank line before it: PVE reads it and its map line into "nomdev"
    assert [e.line for e in mappings["nomdev"].entries] == [19, 21]
    assert warnings == [
        "/etc/pve/mapping/pci.cfg:12: mapping 'broken': map line ignored: node= is missing",
        "/etc/pve/mapping/pci.cfg:13: mapping 'broken': map line ignored: path= is missing",
        "/etc/pve/mapping/pci.cfg:14: mapping 'broken': map line ignored: path=02:00.0 is not a "
        "list of full PCI ids (0000:01:00.0;...)",
        "/etc/pve/mapping/pci.cfg:15: mapping 'broken': map line ignored: invalid key in "
        "comma-separated list property: color",
        "/etc/pve/mapping/pci.cfg:20: 'notes' ignored: PVE reads it as a line of mapping "
        "'nomdev', which runs up to the next blank line",
        "/etc/pve/mapping/pci.cfg:23: 'bad!name' is not a valid mapping name: ignored",
    ]


def test_pci_mapping_warning_escapes_what_a_terminal_does_not_print() -> None:
    text = "gpu\n\tmap node=pve1,path=0000:01:00.0,id=10de:2204,c\u0085olor=1\n"
    _, warnings = parse_pci_mapping(text, "/etc/pve/mapping/pci.cfg")
    assert "invalid key in comma-separated list property: c\\x85olor" in warnings[0]
    assert all(w.isprintable() for w in warnings)


def test_pci_mapping_property_before_header() -> None:
    text = (
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204\n# comment\n"
        "gpu\n\tmap node=pve1,path=0000:01:00.0,id=10de:2204\n"
    )
    mappings, warnings = parse_pci_mapping(text, "/p/pci.cfg")
    assert len(warnings) == 1
    assert warnings[0].startswith("/p/pci.cfg:1: ")
    assert [e.paths for e in mappings["gpu"].for_node("pve1")] == [["0000:01:00.0"]]


def test_pci_mapping_tab_between_key_and_value() -> None:
    text = "gpu\n\tmap\tnode=pve1,path=0000:01:00.0,id=10de:2204\n"
    mappings, _ = parse_pci_mapping(text, "/p")
    assert [e.paths for e in mappings["gpu"].for_node("pve1")] == [["0000:01:00.0"]]


def test_ha_resources() -> None:
    text = (
        "vm: 104\n"
        "\tstate started\n"
        "\tgroup prefer-pve1\n"
        "\n"
        "ct: 200\n"
        "\tstate stopped\n"
        "  vm: 999\n"
        "vm: abc\n"
        "vm:\n"
        "group: 105\n"
    )
    assert parse_ha_resources(text) == {104: "started", 200: "stopped"}
    assert parse_ha_resources("") == {}
    states = (
        "vm: 101\nvm: 102\n\tstate enabled\nct: 103\n\tstate ignored\nvm: 104\n\tstate disabled\n"
    )
    assert parse_ha_resources(states) == {
        101: "started",  # no state: started
        102: "started",
        103: "ignored",
        104: "disabled",
    }


@pytest.mark.parametrize(
    ("hostname", "node"),
    [("pve1.example.com\n", "pve1"), ("pve2\n", "pve2"), ("  pve3  \n", "pve3")],
)
def test_node_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostname: str, node: str
) -> None:
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(tmp_path))
    write(tmp_path, "etc/hostname", hostname)
    assert pveconf.node_name() == node


# --------------------------------------------------------------------------------------------
# claims

Shape = list[tuple[str, list[list[tuple[str, list[str], str]]]]]


def shape(needs: list[Need]) -> Shape:
    """Needs as plain data: (source, [[(address, units, kind), ...] per alternative])."""
    return [
        (n.source, [[(c.address, sorted(c.units), c.kind) for c in alt] for alt in n.alternatives])
        for n in needs
    ]


def vm_needs(text: str, *, with_pending: bool = False, node: str = "pve1") -> list[Need]:
    reader = ClaimReader(pci.Sysfs(), node)
    needs, _ = reader.vm_needs(parse_guest_config(text, VM_CONF), with_pending=with_pending)
    return needs


EXCLUSIVE, MDEV, SHARED = ClaimKind.EXCLUSIVE, ClaimKind.MDEV, ClaimKind.SHARED


G14 = ["group:14"]
G15 = ["group:15"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hostpci0: 01:00.0", [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]])]),
        (
            "hostpci0: 0000:01:00.0,pcie=1,x-vga=1",
            [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]])],
        ),
        ("hostpci0: host=01:00.0,rombar=0", [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]])]),
        ("hostpci0: 01:00,pcie=1", [("hostpci0", [[("0000:01:00", G14, EXCLUSIVE)]])]),
        ("hostpci0: 01:00.1", [("hostpci0", [[("0000:01:00.1", G14, EXCLUSIVE)]])]),
        ("hostpci0: 01:00.0,mdev=nvidia-35", [("hostpci0", [[("0000:01:00.0", G14, MDEV)]])]),
        (
            "hostpci0: host=01:00.0;02:00.0,rombar=0",
            [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE), ("0000:02:00.0", G15, EXCLUSIVE)]])],
        ),
        ("hostpci3: 02:00.0", [("hostpci3", [[("0000:02:00.0", G15, EXCLUSIVE)]])]),
        (
            "hostpci0: 01:00.0\nhostpci1: 02:00.0",
            [
                ("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]]),
                ("hostpci1", [[("0000:02:00.0", G15, EXCLUSIVE)]]),
            ],
        ),
        (
            "hostpci1: 02:00.0\nhostpci0: 01:00.0",
            [
                ("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]]),
                ("hostpci1", [[("0000:02:00.0", G15, EXCLUSIVE)]]),
            ],
        ),
        ("hostpci0: 03:00.2", [("hostpci0", [[("0000:03:00.2", ["fn:0000:03:00.2"], EXCLUSIVE)]])]),
        (
            "hostpci0: 10000:e1:00,pcie=1",
            [("hostpci0", [[("10000:e1:00", ["group:40"], EXCLUSIVE)]])],
        ),
        (
            "args: -device vfio-pci,sysfsdev=/sys/bus/pci/devices/10000:e1:00.1",
            [("args", [[("10000:e1:00.1", ["group:40"], EXCLUSIVE)]])],
        ),
        ("hostpci0: 03:00.0", [("hostpci0", [[("0000:03:00.0", ["dev:0000:03:00"], EXCLUSIVE)]])]),
        ("hostpci0: 09:00.0", [("hostpci0", [[("0000:09:00.0", ["dev:0000:09:00"], EXCLUSIVE)]])]),
        (
            "args: -device vfio-pci,host=02:00.0,id=x",
            [("args", [[("0000:02:00.0", G15, EXCLUSIVE)]])],
        ),
        (
            "args: -cpu host -device vfio-pci,sysfsdev=/sys/bus/pci/devices/0000:02:00.0",
            [("args", [[("0000:02:00.0", G15, EXCLUSIVE)]])],
        ),
        (
            "args: -device vfio-pci,host=01:00.0 -device vfio-pci,host=02:00.0",
            [
                ("args", [[("0000:01:00.0", G14, EXCLUSIVE)]]),
                ("args", [[("0000:02:00.0", G15, EXCLUSIVE)]]),
            ],
        ),
        ("args: -device virtio-net-pci,host=02:00.0", []),
        ("args: -cpu host,kvm=off", []),
        ("hostpci16: 01:00.0", []),  # PVE has hostpci0..15 only
        (
            "hostpci0: 01:00.0\n[snap1]\nhostpci1: 02:00.0",
            [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]])],
        ),
        (
            "hostpci0: 01:00.0\n[special:cloudinit]\nhostpci1: 02:00.0",
            [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]])],
        ),
        ("name: nogpu\nmemory: 2048", []),
    ],
)
def test_vm_needs(host: Path, text: str, expected: Shape) -> None:
    assert shape(vm_needs(text)) == expected


def test_sibling_functions_share_the_group_unit(host: Path) -> None:
    gpu = vm_needs("hostpci0: 01:00.0")[0].claims()[0]
    audio = vm_needs("hostpci0: 01:00.1")[0].claims()[0]
    other = vm_needs("hostpci0: 04:00.0")[0].claims()[0]
    assert gpu.units == audio.units == frozenset({"group:14"})
    assert gpu.conflicts_with(audio)
    assert not gpu.conflicts_with(other)


@pytest.mark.parametrize(
    ("text", "warned"),
    [
        ("hostpci0: zz:00.0", "PVE ignores this line (host=zz:00.0: not PCI ids"),
        ("hostpci0: host=01:00.0;junk", "PVE ignores this line (host=01:00.0;junk: not PCI ids"),
        ("hostpci0: 0A:00.0", "PVE ignores this line (host=0A:00.0: not PCI ids"),
        ("hostpci0: 01:00.0,pcie=maybe", "PVE ignores this line (pcie=maybe: not a boolean"),
        ("hostpci0: 01:00.0, pcie=1", "invalid key in comma-separated list property:  pcie"),
        ("hostpci0: 01:00.0,pcie", "duplicate key in comma-separated list property: host"),
        ("hostpci0: 01:00.0,colour=red", "invalid key in comma-separated list property: colour"),
        ("args: -device vfio-pci,host=1:0", "'1:0' is not a PCI address"),
        # a character no terminal prints is escaped: the warning stays one printable line
        ("hostpci0: \U00018cd6", "PVE ignores this line (host=\\U00018cd6: not PCI ids"),
        ("hostpci0: 01:00.0,x\u200by=1", "invalid key in comma-separated list property: x\\u200by"),
    ],
)
def test_vm_needs_bad_ids_warn(host: Path, text: str, warned: str) -> None:
    """A hostpci value failing PVE's format is dropped when PVE reads the config: no need."""
    reader = ClaimReader(pci.Sysfs(), "pve1")
    needs, warnings = reader.vm_needs(parse_guest_config(text, VM_CONF), with_pending=False)
    assert needs == []
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{VM_CONF}:1: ")
    assert warned in warnings[0]
    assert warnings[0].isprintable()
    # a second guest's reading starts with none: warnings are not shared between calls
    assert reader.vm_needs(parse_guest_config("", VM_CONF), with_pending=False) == ([], [])


def test_pending_hostpci_only_with_pending(host: Path) -> None:
    text = "hostpci0: 01:00.0\n[PENDING]\nhostpci1: 02:00.0\n"
    assert [n.source for n in vm_needs(text)] == ["hostpci0"]
    assert [n.source for n in vm_needs(text, with_pending=True)] == ["hostpci0", "hostpci1"]


def test_pending_hostpci_change_replaces_current(host: Path) -> None:
    text = "hostpci0: 01:00.0\n[PENDING]\nhostpci0: 02:00.0\n"
    assert shape(vm_needs(text)) == [("hostpci0", [[("0000:01:00.0", G14, EXCLUSIVE)]])]
    assert shape(vm_needs(text, with_pending=True)) == [
        ("hostpci0", [[("0000:02:00.0", G15, EXCLUSIVE)]])
    ]


def test_pending_delete_of_hostpci(host: Path) -> None:
    text = "hostpci0: 01:00.0\nhostpci1: 02:00.0\n[PENDING]\ndelete: hostpci0\n"
    assert [n.source for n in vm_needs(text)] == ["hostpci0", "hostpci1"]
    assert [n.source for n in vm_needs(text, with_pending=True)] == ["hostpci1"]


@pytest.fixture
def mapped(fresh_host: Path) -> Path:
    write(fresh_host, "etc/pve/mapping/pci.cfg", PCI_CFG)
    return fresh_host


def test_mapping_alternatives_in_pci_cfg_order(mapped: Path) -> None:
    needs = vm_needs("hostpci0: mapping=gpu,pcie=1")
    assert [n.mapping for n in needs] == ["gpu"]
    assert shape(needs) == [
        (
            "hostpci0",
            [
                [("0000:01:00.0", G14, EXCLUSIVE)],
                [
                    ("0000:04:00.0", ["group:16"], EXCLUSIVE),
                    ("0000:04:00.1", ["group:16"], EXCLUSIVE),
                ],
            ],
        )
    ]


def test_mapping_for_another_node(mapped: Path) -> None:
    assert shape(vm_needs("hostpci0: mapping=gpu", node="pve2")) == [
        ("hostpci0", [[("0000:04:00.0", ["group:16"], EXCLUSIVE)]])
    ]


def test_mapping_with_mdev(mapped: Path) -> None:
    assert shape(vm_needs("hostpci0: mapping=vgpu,mdev=nvidia-35")) == [
        ("hostpci0", [[("0000:01:00.0", G14, MDEV)]])
    ]


@pytest.mark.parametrize(
    ("text", "node", "failure", "blame"),
    [
        ("hostpci0: mapping=nope", "pve1", "pci.cfg has no mapping 'nope'", f"{VM_CONF}:1"),
        # pci.cfg has the mapping: its line is at fault, not the guest's
        (
            "hostpci0: mapping=gpu",
            "pve3",
            "mapping 'gpu' has no map line for node pve3",
            "/etc/pve/mapping/pci.cfg:1",
        ),
        (
            "hostpci0: mapping=broken",
            "pve1",
            "PVE ignores mapping 'broken': it has no valid map line",
            "/etc/pve/mapping/pci.cfg:11",
        ),
    ],
)
def test_unusable_mapping_is_a_need_without_alternatives(
    mapped: Path, text: str, node: str, failure: str, blame: str
) -> None:
    reader = ClaimReader(pci.Sysfs(), node)
    needs, warnings = reader.vm_needs(parse_guest_config(text, VM_CONF), with_pending=False)
    name = text.split("=")[1]
    assert [(n.source, n.alternatives, n.mapping) for n in needs] == [("hostpci0", [], name)]
    assert warnings == []
    assert needs[0].failure is not None
    assert needs[0].failure.startswith(f"PCI device mapping not found for '{name}' (")
    assert failure in needs[0].failure
    assert needs[0].blame == (blame if blame == f"{VM_CONF}:1" else f"{mapped}{blame}")


@pytest.mark.parametrize(
    ("text", "failure"),
    [
        ("hostpci0: 09:00.0", "no PCI device found for '09:00.0'"),
        ("hostpci0: 01:00.0;09:00", "no PCI device found for '09:00'"),
        ("hostpci0: pcie=1,x-vga=1", "Either 'host' or 'mapping' must be set."),
        ("hostpci0: host=01:00.0,mapping=gpu", "Cannot set both 'host' and 'mapping'."),
        ("hostpci0: 01:00,mdev=nvidia-35", "cannot use mediated device with multifunction device"),
        ("hostpci0: 01:00.0\nhostpci1: 01:00", "device '0000:01:00.0' assigned more than once"),
        ("args: -device vfio-pci,host=09:00.0", "QEMU cannot open vfio 0000:09:00.0"),
    ],
)
def test_start_failures(host: Path, text: str, failure: str) -> None:
    """Lines PVE reads but its start dies on (qemu-server PCI.pm parse_hostpci): a need whose
    failure is PVE's own error, blamed on the guest config's line."""
    reader = ClaimReader(pci.Sysfs(), "pve1")
    needs, warnings = reader.vm_needs(parse_guest_config(text, VM_CONF), with_pending=False)
    assert warnings == []
    failed = [n for n in needs if n.failure is not None]
    assert len(failed) == 1 and failed[0].failure is not None
    assert failed[0].failure.startswith(failure)
    assert failed[0].blame == f"{VM_CONF}:{len(needs)}"


MAP_LINE = "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (MAP_LINE, None),
        (MAP_LINE.replace("0000:01:00.0", "0000:01:00"), None),  # a whole device: its .0
        (MAP_LINE.replace("01:00.0", "07:00.0"), "pci device '0000:07:00.0' not found"),
        (
            MAP_LINE.replace("2204", "2206"),
            "'id' does not match for 'gpu' (10de:2204 != 10de:2206)",
        ),
        (MAP_LINE.replace("10de:2204", "10DE:2204"), "'id' does not match for 'gpu'"),
        (MAP_LINE.replace("=14", "=15"), "'iommugroup' does not match for 'gpu' (14 != 15)"),
        (
            MAP_LINE.replace(",iommugroup=14", ""),
            "missing expected property 'iommugroup' for device '0000:01:00.0'",
        ),
        (
            MAP_LINE.replace("0000:01:00.0", "0000:03:00.0").replace(",iommugroup=14", ""),
            None,  # no IOMMU group in sysfs, none configured
        ),
        (
            MAP_LINE.replace("0000:01:00.0", "0000:03:00.0"),
            "unexpected property 'iommugroup' configured for device '0000:03:00.0'",
        ),
        (
            MAP_LINE.replace("0000:01:00.0", "0000:01:00.0;0000:04:00.0"),
            None,  # the group of the first path only
        ),
    ],
)
def test_map_line_checked_against_the_hardware(
    fresh_host: Path, line: str, problem: str | None
) -> None:
    """PVE's assert_valid (pve-guest-common Mapping/PCI.pm) before every start of a mapped VM."""
    write(fresh_host, "etc/pve/mapping/pci.cfg", "gpu\n" + line)
    reader = ClaimReader(pci.Sysfs(), "pve1")
    needs, _ = reader.vm_needs(parse_guest_config("hostpci0: mapping=gpu", VM_CONF), False)
    if problem is None:
        assert needs[0].failure is None
        return
    assert needs[0].failure is not None
    assert needs[0].failure.startswith("PCI device mapping invalid (hardware probably changed): ")
    assert problem in needs[0].failure
    assert needs[0].blame == f"{fresh_host}/etc/pve/mapping/pci.cfg:2"


def test_mapping_file_warnings_reach_the_reader(mapped: Path) -> None:
    reader = ClaimReader(pci.Sysfs(), "pve1")
    assert reader.mapping_warnings == []  # not read yet
    _, warnings = reader.vm_needs(parse_guest_config("hostpci0: mapping=gpu", VM_CONF), False)
    assert not any("map line" in w for w in warnings)  # pci.cfg's own, not this guest's
    assert sum("map line ignored" in w for w in reader.mapping_warnings) == 4


def test_mapping_file_missing(host: Path) -> None:
    reader = ClaimReader(pci.Sysfs(), "pve1")
    needs, warnings = reader.vm_needs(parse_guest_config("hostpci0: mapping=gpu", VM_CONF), False)
    assert [(n.source, n.alternatives) for n in needs] == [("hostpci0", [])]
    assert warnings == [] and needs[0].failure is not None
    assert reader.mapping_warnings == []


def test_mappings_given_to_the_reader(host: Path) -> None:
    mappings, _ = parse_pci_mapping("gpu\n\tmap node=pve1,path=0000:02:00.0,id=10de:2204\n", "/x")
    reader = ClaimReader(pci.Sysfs(), "pve1", mappings)
    needs, _ = reader.vm_needs(parse_guest_config("hostpci0: mapping=gpu", VM_CONF), False)
    assert shape(needs) == [("hostpci0", [[("0000:02:00.0", G15, EXCLUSIVE)]])]


def test_mapping_with_a_long_pci_domain(host: Path) -> None:
    text = "vmd\n\tmap node=pve1,path=10000:e1:00.0;10000:e1:00.1,id=10de:2204,iommugroup=40\n"
    mappings, warnings = parse_pci_mapping(text, "/x")
    assert warnings == []
    reader = ClaimReader(pci.Sysfs(), "pve1", mappings)
    needs, warnings = reader.vm_needs(parse_guest_config("hostpci0: mapping=vmd", VM_CONF), False)
    assert warnings == []
    assert shape(needs) == [
        (
            "hostpci0",
            [
                [
                    ("10000:e1:00.0", ["group:40"], EXCLUSIVE),
                    ("10000:e1:00.1", ["group:40"], EXCLUSIVE),
                ]
            ],
        )
    ]


def test_nvidia_gpu_in_a_long_pci_domain(fresh_host: Path) -> None:
    write(fresh_host, "proc/driver/nvidia/gpus/10000:e1:00.0/information", "Device Minor: 2\n")
    assert pci.Sysfs().nvidia_minors()[2] == "10000:e1:00.0"


def test_args_quoted_device(host: Path) -> None:
    needs = vm_needs("args: -device 'vfio-pci,host=02:00.0,id=gpu'")
    assert shape(needs) == [("args", [[("0000:02:00.0", G15, EXCLUSIVE)]])]


def claim(kind: str, units: set[str]) -> Claim:
    return Claim("0000:01:00.0", frozenset(units), kind, "test")


@pytest.mark.parametrize(
    ("kind_a", "kind_b", "conflict"),
    [
        (EXCLUSIVE, EXCLUSIVE, True),
        (EXCLUSIVE, MDEV, True),
        (MDEV, EXCLUSIVE, True),
        (EXCLUSIVE, SHARED, True),
        (SHARED, EXCLUSIVE, True),
        (MDEV, MDEV, False),
        (MDEV, SHARED, False),
        (SHARED, MDEV, False),
        (SHARED, SHARED, False),
    ],
)
def test_conflict_matrix(kind_a: str, kind_b: str, conflict: bool) -> None:
    a = claim(kind_a, {"group:14", "group:15"})
    b = claim(kind_b, {"group:15", "group:16"})
    assert a.conflicts_with(b) is conflict
    assert b.conflicts_with(a) is conflict
    # disjoint units never conflict, whatever the kinds
    assert claim(kind_a, {"group:14"}).conflicts_with(claim(kind_b, {"group:16"})) is False


def test_need_claims_flattens_alternatives() -> None:
    a, b, c = claim(EXCLUSIVE, {"group:1"}), claim(EXCLUSIVE, {"group:2"}), claim(MDEV, {"x"})
    need = Need("hostpci0", [(a, b), (c,)], mapping="gpu")
    assert need.claims() == [a, b, c]
    assert "exclusive" in repr(a)


ADDR0 = "0000:01:00.0"
ADDR1 = "0000:04:00.0"


@pytest.mark.parametrize(
    ("line", "functions"),
    [
        ("dev0: /dev/dri/renderD128,gid=104", [ADDR0]),
        ("dev1: path=/dev/nvidia0", [ADDR0]),
        ("dev2: /dev/nvidia1,uid=0,gid=0,mode=0666", [ADDR1]),
        ("dev3: /dev/nvidiactl", []),
        ("dev4: /dev/dri/card1", [ADDR1]),
        ("dev5: /dev/net/tun", []),
        ("lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file", [ADDR0]),
        ("lxc.mount.entry = /dev/dri dev/dri none bind,optional,create=dir", [ADDR0, ADDR1]),
        (
            "lxc.mount.entry: /dev/dri/by-path/pci-0000:04:00.0-render dev/dri/renderD129 "
            "none bind,optional,create=file",
            [ADDR1],
        ),
        ("lxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file", []),
        ("lxc.mount.entry:", []),
        ("lxc.cgroup2.devices.allow: c 195:* rwm", [ADDR0, ADDR1]),
        ("lxc.cgroup2.devices.allow: c 195:1 rwm", [ADDR1]),
        ("lxc.cgroup2.devices.allow: c 226:128 rwm", [ADDR0]),
        ("lxc.cgroup2.devices.allow = c 226:1 rwm", [ADDR1]),
        ("lxc.cgroup2.devices.allow: c 226:* rwm", [ADDR0, ADDR1]),
        ("lxc.cgroup.devices.allow: c 195:0 rwm", [ADDR0]),
        ("lxc.cgroup2.devices.allow: a", []),
        ("lxc.cgroup2.devices.allow: b 195:0 rwm", []),
        ("lxc.cgroup2.devices.allow: c 10:200 rwm", []),
        ("lxc.cgroup2.devices.allow: c *:* m", []),
        ("lxc.cgroup2.devices.allow: c 195:x rwm", []),
        ("lxc.cgroup2.devices.allow: junk", []),
        ("lxc.cgroup2.devices.deny: c 195:* rwm", []),
        ("mp0: /dev/dri,mp=/dev/dri", []),
        ("hostname: ct200", []),
    ],
)
def test_ct_claims(host: Path, line: str, functions: list[str]) -> None:
    reader = ClaimReader(pci.Sysfs(), "pve1")
    config = parse_guest_config(f"arch: amd64\n{line}\n", CT_CONF)
    claims = reader.ct_claims(config)
    assert sorted(c.address for c in claims) == functions
    assert all(c.kind == SHARED for c in claims)
    assert all(c.source.endswith("(line 2)") for c in claims)
    assert all(c.units == pci.Sysfs().units(c.address) for c in claims)


NVIDIA_ALL = "lxc.cgroup2.devices.allow: c 195:* rwm"
DRM_ALL = "lxc.cgroup2.devices.allow: c 226:* rwm"
MOUNT = "lxc.mount.entry: {} dev/{} none bind,optional,create=file"


@pytest.mark.parametrize(
    ("lines", "used"),
    [
        # the common recipe: the wildcard allows, the mounted or passed node is the use
        ([NVIDIA_ALL, MOUNT.format("/dev/nvidia0", "nvidia0")], {ADDR0: [3]}),
        ([MOUNT.format("/dev/nvidia1", "nvidia1"), NVIDIA_ALL], {ADDR1: [2]}),
        ([NVIDIA_ALL, "dev0: /dev/nvidia1,gid=44"], {ADDR1: [3]}),
        ([DRM_ALL, "dev0: /dev/dri/renderD128,gid=104"], {ADDR0: [3]}),
        ([DRM_ALL, "dev0: /dev/dri/card1"], {ADDR1: [3]}),
        (
            [DRM_ALL, MOUNT.format("/dev/dri/by-path/pci-0000:04:00.0-render", "dri/renderD129")],
            {ADDR1: [3]},
        ),
        # the /dev/dri directory names every DRM node
        ([DRM_ALL, MOUNT.format("/dev/dri", "dri")], {ADDR0: [3], ADDR1: [3]}),
        # the "key = value" form of raw LXC keys
        (
            [
                "lxc.cgroup2.devices.allow = c 195:* rwm",
                "lxc.mount.entry = /dev/nvidia1 dev/nvidia1 none bind,optional,create=file",
            ],
            {ADDR1: [3]},
        ),
        # no GPU node of that major named: the CT may make its own, so it may use them all
        ([NVIDIA_ALL], {ADDR0: [2], ADDR1: [2]}),
        (
            [
                NVIDIA_ALL,
                MOUNT.format("/dev/nvidiactl", "nvidiactl"),
                MOUNT.format("/dev/nvidia-uvm", "nvidia-uvm"),
            ],
            {ADDR0: [2], ADDR1: [2]},
        ),
        ([NVIDIA_ALL, "dev0: /dev/dri/renderD128"], {ADDR0: [2, 3], ADDR1: [2]}),
        ([DRM_ALL, "dev0: /dev/nvidia1"], {ADDR0: [2], ADDR1: [2, 3]}),
        # a node of that major that this host lacks still says which GPU the CT wants
        ([NVIDIA_ALL, "dev0: /dev/nvidia7"], {}),
        # a rule for one minor names that one GPU, wildcard or not
        (
            [
                NVIDIA_ALL,
                "lxc.cgroup2.devices.allow: c 195:1 rwm",
                MOUNT.format("/dev/nvidia0", "x"),
            ],
            {ADDR0: [4], ADDR1: [3]},
        ),
        (
            ["lxc.cgroup2.devices.allow: c 195:1 rwm", "dev0: /dev/nvidia0"],
            {ADDR0: [3], ADDR1: [2]},
        ),
        ([NVIDIA_ALL, DRM_ALL, "dev0: /dev/dri/renderD129"], {ADDR0: [2], ADDR1: [2, 4]}),
    ],
)
def test_ct_claims_wildcard_rule_is_a_permission(
    host: Path, lines: list[str], used: dict[str, list[int]]
) -> None:
    reader = ClaimReader(pci.Sysfs(), "pve1")
    config = parse_guest_config("arch: amd64\n" + "\n".join(lines) + "\n", CT_CONF)
    found: dict[str, list[int]] = {}
    for claim in reader.ct_claims(config):
        found.setdefault(claim.address, []).append(int(claim.source.split("line ")[1][:-1]))
    assert found == used


def test_ct_claims_wildcard_rule_with_a_node_in_pending(host: Path) -> None:
    text = f"{NVIDIA_ALL}\n[pve:pending]\ndev0: /dev/nvidia1\n"
    reader = ClaimReader(pci.Sysfs(), "pve1")
    config = parse_guest_config(text, CT_CONF)
    assert sorted(c.address for c in reader.ct_claims(config)) == [ADDR0, ADDR1]
    assert [c.address for c in reader.ct_claims(config, with_pending=True)] == [ADDR1]


@pytest.mark.parametrize(
    ("node", "major"),
    [
        ("/dev/nvidia0", 195),
        ("/dev/nvidia12", 195),
        ("/dev/nvidiactl", None),
        ("/dev/nvidia-uvm", None),
        ("/dev/nvidia-caps/nvidia-cap1", None),
        ("/dev/dri", 226),
        ("/dev/dri/", 226),
        ("/dev/dri/card0", 226),
        ("/dev/dri/renderD128", 226),
        ("/dev/dri/by-path/pci-0000:01:00.0-render", 226),
        ("/dev/driver", None),
        ("/dev/net/tun", None),
        ("", None),
    ],
)
def test_gpu_node_major(node: str, major: int | None) -> None:
    assert pci.gpu_node_major(node) == major


def test_ct_claims_pending(host: Path) -> None:
    text = "dev0: /dev/nvidia0\n[pve:pending]\ndev1: /dev/nvidia1\ndelete: dev0\n"
    reader = ClaimReader(pci.Sysfs(), "pve1")
    config = parse_guest_config(text, CT_CONF)
    assert [c.address for c in reader.ct_claims(config)] == [ADDR0]
    assert [c.address for c in reader.ct_claims(config, with_pending=True)] == [ADDR1]


def test_ct_claim_conflicts_with_vm_passthrough_of_the_group(host: Path) -> None:
    reader = ClaimReader(pci.Sysfs(), "pve1")
    ct = reader.ct_claims(parse_guest_config("dev0: /dev/dri/renderD128", CT_CONF))[0]
    audio = vm_needs("hostpci0: 01:00.1")[0].claims()[0]  # same IOMMU group 14
    other_ct = reader.ct_claims(parse_guest_config("dev0: /dev/nvidia0", CT_CONF))[0]
    assert ct.conflicts_with(audio)
    assert not ct.conflicts_with(other_ct)


@pytest.mark.parametrize(
    ("argv", "hosts"),
    [
        (["-device", "vfio-pci,host=02:00.0,id=x"], ["02:00.0"]),
        (["-device", "vfio-pci,sysfsdev=/sys/bus/pci/devices/0000:02:00.0/"], ["0000:02:00.0"]),
        (["-device", "vfio-pci,id=x,host=0000:05:00.1"], ["0000:05:00.1"]),
        (["-device", "vfio-pci,sysfsdev=/elsewhere/0000:02:00.0"], []),
        (["-device", "virtio-net-pci,host=02:00.0"], []),
        (["-device", "vfio-pci-nohotplug,host=02:00.0"], []),
        (["vfio-pci,host=02:00.0"], []),
        (["-cpu", "host", "-device"], []),
        (
            ["-device", "vfio-pci,host=01:00.0", "-m", "1", "-device", "vfio-pci,host=02:00.0"],
            ["01:00.0", "02:00.0"],
        ),
        ([], []),
    ],
)
def test_vfio_hosts(argv: list[str], hosts: list[str]) -> None:
    assert vfio_hosts(argv) == hosts


# --------------------------------------------------------------------------------------------
# runtime


def qemu_argv(vmid: int) -> list[str]:
    return [
        "/usr/bin/kvm",
        "-id",
        str(vmid),
        "-name",
        f"vm{vmid},debug-threads=on",
        "-pidfile",
        f"/var/run/qemu-server/{vmid}.pid",
        "-daemonize",
    ]


def add_process(root: Path, pid: int, argv: list[str]) -> None:
    write(root, f"proc/{pid}/cmdline", "\0".join(argv) + "\0")


def add_vm(root: Path, vmid: int, pid: int, argv: list[str] | None = None) -> None:
    write(root, f"run/qemu-server/{vmid}.pid", f"{pid}\n")
    add_process(root, pid, qemu_argv(vmid) if argv is None else argv)


def test_qemu_cmdline_of_a_running_vm(host_root: Path) -> None:
    add_vm(host_root, 104, 4242)
    assert runtime.qemu_cmdline(104) == qemu_argv(104)
    assert runtime.vm_running(104)
    assert runtime.running("qemu", 104)


@pytest.mark.parametrize(
    ("pid_text", "argv"),
    [
        ("4242\n", None),  # pid file but no /proc entry: QEMU is gone
        ("abc\n", qemu_argv(104)),
        ("", qemu_argv(104)),
        ("-1\n", qemu_argv(104)),
        ("42 42\n", qemu_argv(104)),
        ("../4242\n", qemu_argv(104)),
        ("4242\n", qemu_argv(105)),  # pid reused by another VM's QEMU
        ("4242\n", qemu_argv(1040)),
        ("4242\n", ["/usr/bin/vim", "/var/run/qemu-server/104.pid"]),  # not a QEMU
        ("4242\n", ["/bin/bash", "-c", "sleep 100"]),
        ("4242\n", []),  # a kernel thread or zombie: empty cmdline
    ],
)
def test_vm_not_running(host_root: Path, pid_text: str, argv: list[str] | None) -> None:
    write(host_root, "run/qemu-server/104.pid", pid_text)
    if argv is not None:
        write(host_root, "proc/4242/cmdline", "\0".join(argv) + ("\0" if argv else ""))
    assert runtime.qemu_cmdline(104) is None
    assert not runtime.vm_running(104)


def test_vm_without_pid_file_is_not_running(host_root: Path) -> None:
    add_process(host_root, 4242, qemu_argv(104))
    assert not runtime.vm_running(104)


def test_qemu_system_binary_counts(host_root: Path) -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-pidfile", "/run/qemu-server/104.pid"]
    add_vm(host_root, 104, 77, argv)
    assert runtime.qemu_cmdline(104) == argv


def test_ct_running_by_cgroup_only_without_proc_net_unix(host_root: Path) -> None:
    (host_root / "sys/fs/cgroup/lxc/200").mkdir(parents=True)
    write(host_root, "sys/fs/cgroup/lxc/300", "not a directory")
    assert runtime.ct_running(200)
    assert runtime.running("lxc", 200)
    assert not runtime.ct_running(201)
    assert not runtime.ct_running(300)


UNIX = "Num       RefCount Protocol Flags    Type St Inode Path\n"


def unix_line(path: str = "", inode: int = 41234, address: str = "0" * 16) -> str:
    """A /proc/net/unix line as the kernel writes it (net/unix/af_unix.c unix_seq_show)."""
    return f"{address}: 00000002 00000000 00010000 0001 01 {inode:5d}" + (
        f" {path}" if path else ""
    )


@pytest.mark.parametrize(
    ("lines", "running"),
    [
        ([], []),
        ([unix_line("@/var/lib/lxc/200/command")], [200]),
        (
            [unix_line("@/var/lib/lxc/201/command", 7), unix_line("@/var/lib/lxc/200/command")],
            [200, 201],
        ),
        # a listening socket and a connection to it show the same path
        (
            [unix_line("@/var/lib/lxc/200/command"), unix_line("@/var/lib/lxc/200/command", 9)],
            [200],
        ),
        ([unix_line("@/var/lib/lxc/200/command", address="ffff9a8a4c7d2400")], [200]),
        ([unix_line("/var/lib/lxc/200/command")], []),  # not the abstract socket
        ([unix_line("@/var/lib/lxc/200/monitor-sock")], []),
        ([unix_line("@/var/lib/lxc/abc/command")], []),
        ([unix_line("@/var/lib/lxc/200/command@")], []),
        ([unix_line("@/var/lib/lxc/200/command") + " extra"], []),
        (["0000: 00000002 @/var/lib/lxc/200/command"], []),
        ([unix_line("@/var/lib/lxc/200/command", address="ABCD")], []),
        ([unix_line("@/var/lib/lxc/200/command", address="")], []),
        ([unix_line("@/var/lib/lxc/200/command").replace("41234", "x")], []),
        ([unix_line(), unix_line("/run/systemd/private"), "garbage"], []),
    ],
)
def test_running_cts_from_proc_net_unix(
    host_root: Path, lines: list[str], running: list[int]
) -> None:
    """PVE's check_running: the CT's command socket in /proc/net/unix, cgroup or not."""
    write(host_root, "proc/net/unix", UNIX + "".join(line + "\n" for line in lines))
    (host_root / "sys/fs/cgroup/lxc/300").mkdir(parents=True)  # a cgroup is not a running CT
    assert runtime.running_cts() == running
    assert [v for v in (200, 201, 300) if runtime.ct_running(v)] == running
    assert runtime.running("lxc", 200) is (200 in running)


def test_vm_candidates_and_running_cts(host_root: Path) -> None:
    assert runtime.vm_candidates() == []
    assert runtime.running_cts() == []
    for name in ("104.pid", "102.pid", "foo.pid", "103.conf", "105.pid.tmp"):
        write(host_root, f"run/qemu-server/{name}", "1\n")
    for name in ("201", "200", "lxc.monitor", "lxc.pivot"):
        (host_root / "sys/fs/cgroup/lxc" / name).mkdir(parents=True)
    write(host_root, "sys/fs/cgroup/lxc/300", "file")
    assert runtime.vm_candidates() == [102, 104]
    assert runtime.running_cts() == [200, 201]


def test_reservations(host_root: Path) -> None:
    add_process(host_root, 4242, qemu_argv(104))
    now = int(time.time())
    lines = [
        "0000:01:00.0 104 pid:4242",
        "0000:01:00.1 104 pid:4242",
        "0000:02:00.0 105 pid:999",  # dead pid
        f"0000:04:00.0 106 time:{now + 100}",  # reserved for a starting VM
        f"0000:04:00.1 107 time:{now - 100}",  # expired
        f"0000:0A:00.0 112 time:{now + 100}",
        f"10000:e1:00.0 114 time:{now + 100}",
        "garbage",
        "",
        "0000:05:00.0 abc pid:4242",
        "0000:05:00.0 108 foo:4242",
        "0000:05:00.0 109 pid:x",
        "0000:05:00.0 110 time:never",
        "0000:05:00.0 111 pid:4242 extra",
        "0000:05:00.0 113",
    ]
    write(host_root, "run/qemu-server/pci-id-reservations", "\n".join(lines) + "\n")
    assert runtime.reservations() == {
        104: ["0000:01:00.0", "0000:01:00.1"],
        106: ["0000:04:00.0"],
        112: ["0000:0a:00.0"],
        114: ["10000:e1:00.0"],
    }


def test_reservations_absent_or_empty(host_root: Path) -> None:
    assert runtime.reservations() == {}
    write(host_root, "run/qemu-server/pci-id-reservations", "")
    assert runtime.reservations() == {}
