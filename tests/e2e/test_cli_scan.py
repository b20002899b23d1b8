"""``pve-gpu-hook scan`` and the output layer, against the simulator's fake node."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pvegpuhook import output
from pvegpuhook.cli import main
from tests.fronts import REPO, run_main, seed_node
from tests.sim.node import FakeNode

PCI_IDS = "# tiny pci.ids\n10de  NVIDIA Corporation\n\t2204  GA102 [GeForce RTX 3090]\n"


def seed(root: Path) -> FakeNode:
    """The seed's home lab without an override file (tests.fronts.seed_node)."""
    return seed_node(root, override="")


def scan(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(node.root))
    return run_main(capsys, "scan", *argv)


def scan_json(node: FakeNode, monkeypatch, capsys, *argv: str) -> dict:
    code, out, err = scan(node, monkeypatch, capsys, *argv, "--output-format", "json")
    assert code == 0, err
    assert out.count("\n") == 1  # json is one line
    return json.loads(out)


def device(data: dict, address: str) -> dict:
    found = [d for d in data["devices"] if d["address"] == address]
    assert len(found) == 1, [d["address"] for d in data["devices"]]
    return found[0]


def warnings_with(data: dict, *words: str) -> list[str]:
    return [w for w in data["warnings"] if all(word in w for word in words)]


# ---- the seed case ------------------------------------------------------------------------------


def test_seed_text_shows_who_fights_for_the_gpu(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    code, out, err = scan(node, monkeypatch, capsys)
    assert code == 0 and err == ""
    blocks = out.split("\n\n")
    assert len(blocks) == 2  # the devices, then who claims them: no legend, no warning
    devices, claims = (block.splitlines() for block in blocks)
    assert devices[0] == "PCI devices on pve1"
    assert devices[1].split() == ["DEVICE", "MODEL", "GROUP", "DRIVER", "POWER", "RESET", "HELD"]
    row = ["0000:01:00", "10de:2204", "14", "vfio-pci", "unknown", "unknown", "104"]
    assert devices[2].split() == row
    assert claims[0] == "Guests claiming them on pve1"
    header = claims[1].split()
    assert header == ["DEVICE", "VMID", "NAME", "STATE", "KEY", "KIND", "MAPPING", "USE"]
    rows = [dict(zip(header, line.split(), strict=True)) for line in claims[2:]]
    assert [(r["VMID"], r["NAME"], r["STATE"], r["USE"]) for r in rows] == [
        ("102", "vm102", "stopped", "-"),
        ("103", "vm103", "stopped", "-"),
        ("104", "win11", "running", "holds"),
        ("105", "vm105", "stopped", "-"),
    ]
    assert {r["DEVICE"] for r in rows} == {"0000:01:00"}
    assert "\x1b" not in out and "─" not in out  # piped: no colours, no box drawing
    # columns line up: every header starts where its cells start
    assert claims[1].index("NAME") == claims[2].index("vm102")


def test_seed_json(tmp_path, monkeypatch, capsys) -> None:
    data = scan_json(seed(tmp_path), monkeypatch, capsys)
    assert data["node"] == "pve1"
    assert data["warnings"] == []
    assert len(data["devices"]) == 1
    gpu = data["devices"][0]
    assert gpu["address"] == "0000:01:00"
    assert gpu["functions"] == ["0000:01:00.0", "0000:01:00.1"]
    assert (gpu["vendor"], gpu["device"]) == ("10de", "2204")
    assert gpu["vendor_name"] is None and gpu["device_name"] is None
    assert gpu["iommu_group"] == "14"
    assert gpu["driver"] == "vfio-pci"
    assert gpu["held_by"] == [104]
    claims = gpu["claims"]
    assert [c["vmid"] for c in claims] == [102, 103, 104, 105]
    assert {c["type"] for c in claims} == {"qemu"}
    assert {c["kind"] for c in claims} == {"exclusive"}
    assert {c["source"] for c in claims} == {"hostpci0"}
    assert [c["running"] for c in claims] == [False, False, True, False]
    assert all(c["mapping"] is None for c in claims)
    assert set(claims[0]) >= {"vmid", "type", "kind", "source", "mapping", "running"}
    assert [c["held"] for c in claims] == [False, False, True, False]
    assert {(c["alternative"], c["picked"]) for c in claims} == {(None, None)}
    assert gpu["power_state"] is None and gpu["reset_method"] is None  # older kernel: no files


def test_json_pretty_and_yaml_agree(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    data = scan_json(node, monkeypatch, capsys)
    code, out, _ = scan(node, monkeypatch, capsys, "--output-format", "json-pretty")
    assert code == 0 and json.loads(out) == data and '\n    "devices": [' in out
    code, out, _ = scan(node, monkeypatch, capsys, "--output-format", "yaml")
    assert code == 0 and yaml.safe_load(out) == data
    assert out.startswith("devices:\n")  # block style, keys sorted


def test_noheader(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_vm(106, hostpci=["01:00.0"], onboot=True)
    node.add_vm(107, hostpci=["01:00.0"], onboot=True)
    code, out, err = scan(node, monkeypatch, capsys, "--noheader")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("0000:01:00  10de:2204  14  ")
    assert "DEVICE" not in out and "PCI devices" not in out and "Guests" not in out
    assert "" not in lines  # no blank line, no legend, no warning: rows only
    assert [len(line.split()) for line in lines] == [7] + [8] * 6
    assert "warning: VM 106 and VM 107 both have onboot: 1" in err  # still said, on stderr


def test_piped_subprocess_is_plain_text(tmp_path) -> None:
    node = seed(tmp_path)
    env = dict(os.environ, PVE_GPU_HOOK_ROOT=str(node.root), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pvegpuhook", "scan"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "0000:01:00  10de:2204  14     vfio-pci  unknown  unknown  104" in proc.stdout
    assert "\x1b" not in proc.stdout and "│" not in proc.stdout and "─" not in proc.stdout


def test_pci_ids_names(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    path = tmp_path / "usr/share/hwdata/pci.ids"
    path.parent.mkdir(parents=True)
    path.write_text(PCI_IDS)
    data = scan_json(node, monkeypatch, capsys)
    gpu = data["devices"][0]
    assert gpu["vendor_name"] == "NVIDIA Corporation"
    assert gpu["device_name"] == "GA102 [GeForce RTX 3090]"
    _, out, _ = scan(node, monkeypatch, capsys)
    assert "0000:01:00  NVIDIA_GeForce_RTX_3090  14" in out  # piped: one awk field
    # usr/share/misc/pci.ids (pciutils) is preferred when both exist
    misc = tmp_path / "usr/share/misc/pci.ids"
    misc.parent.mkdir(parents=True)
    misc.write_text(PCI_IDS.replace("GA102 [GeForce RTX 3090]", "GA102"))
    assert scan_json(node, monkeypatch, capsys)["devices"][0]["device_name"] == "GA102"


def test_unclaimed_display_device_listed_and_ct_shared(tmp_path, monkeypatch, capsys) -> None:
    node = FakeNode(tmp_path)
    node.add_gpu("0000:01:00", group=14, functions=("0", "1"), nvidia_minor=0, drm=("renderD128",))
    node.add_pci_device("0000:00:02.0", group=1, vendor="8086", device="3e92", driver="i915")
    node.add_pci_device("0000:00:1f.3", group=9, class_="0x040300", vendor="8086", device="a348")
    node.add_ct(200, hostname="plex", dev=["/dev/dri/renderD128,gid=104"], running=True)
    node.add_ct(201, hostname="jelly", **{"lxc.cgroup2.devices.allow": "c 195:* rwm"})
    node.add_vm(102, hostpci=["01:00"])
    data = scan_json(node, monkeypatch, capsys)
    assert [d["address"] for d in data["devices"]] == ["0000:00:02", "0000:01:00"]
    igpu = device(data, "0000:00:02")
    assert igpu["claims"] == [] and igpu["driver"] == "i915" and igpu["iommu_group"] == "1"
    gpu = device(data, "0000:01:00")
    assert gpu["driver"] == "nvidia"
    assert gpu["held_by"] == [200]
    cts = [c for c in gpu["claims"] if c["type"] == "lxc"]
    assert [(c["vmid"], c["kind"], c["running"]) for c in cts] == [
        (200, "shared", True),
        (201, "shared", False),
    ]
    assert cts[0]["source"].startswith("dev0")
    assert cts[1]["source"].startswith("lxc.cgroup2.devices.allow")
    _, out, _ = scan(node, monkeypatch, capsys, "--noheader")
    rows = [line.split() for line in out.splitlines()]
    assert ["0000:01:00", "10de:2204", "14", "nvidia", "unknown", "unknown", "200"] in rows
    assert [r[1:8] for r in rows if r[0] == "0000:01:00" and len(r) == 8] == [
        ["102", "-", "stopped", "hostpci0", "exclusive", "-", "-"],
        ["200", "plex", "running", "dev0", "shared", "-", "holds"],
        ["201", "jelly", "stopped", "lxc.cgroup2.devices.allow", "shared", "-", "-"],
    ]


RECIPE = (
    "lxc.cgroup2.devices.allow: c 195:* rwm\n"
    "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file\n"
    "lxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind,optional,create=file\n"
)


def two_gpus(root: Path) -> FakeNode:
    node = FakeNode(root)
    node.add_gpu("0000:01:00", group=14, nvidia_minor=0, drm=("renderD128",))
    node.add_gpu("0000:02:00", group=15, nvidia_minor=1, drm=("renderD129",))
    return node


def test_ct_with_the_wildcard_recipe_is_shown_under_its_gpu_only(
    tmp_path, monkeypatch, capsys
) -> None:
    """``c 195:* rwm`` only allows the nodes; the mounted /dev/nvidia0 is the CT's use."""
    node = two_gpus(tmp_path)
    node.add_ct(200, RECIPE, hostname="plex", running=True, onboot=True)
    node.add_vm(102, hostpci=["02:00"], onboot=True)
    data = scan_json(node, monkeypatch, capsys)
    first, second = device(data, "0000:01:00"), device(data, "0000:02:00")
    assert [(c["vmid"], c["source"]) for c in first["claims"]] == [
        (200, "lxc.mount.entry (line 2)")
    ]
    assert first["held_by"] == [200]
    assert [c["vmid"] for c in second["claims"]] == [102]
    assert second["held_by"] == []
    assert warnings_with(data, "onboot") == []
    vm = scan_json(node, monkeypatch, capsys, "102")
    assert vm["conflicts"] == [] and vm["would_stop"] == []
    _, out, _ = scan(node, monkeypatch, capsys)
    assert "CT 200" not in next(line for line in out.splitlines() if "0000:02:00" in line)


# ---- warnings -----------------------------------------------------------------------------------


def test_onboot_conflict(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_vm(106, hostpci=["01:00.0"], onboot=True)
    node.add_vm(107, hostpci=["01:00.0"], onboot=True)
    node.add_vm(108, hostpci=["01:00.0"], onboot=False)
    data = scan_json(node, monkeypatch, capsys)
    found = warnings_with(data, "onboot: 1", "IOMMU group 14")
    assert found == [
        "VM 106 and VM 107 both have onboot: 1 and conflict on IOMMU group 14: only one of them "
        "can have it: whichever starts first (startup order, then VMID) takes 0000:01:00.0; at "
        "boot: VM 106 takes 0000:01:00.0; VM 107 cannot start: 0000:01:00.0 is taken by VM 106"
    ]
    _, out, _ = scan(node, monkeypatch, capsys)
    assert "warning: VM 106 and VM 107 both have onboot: 1" in out
    # the startup order decides, not the VMID
    path = tmp_path / "etc/pve/qemu-server/107.conf"
    path.write_text(path.read_text() + "startup: order=1\n")
    (found,) = warnings_with(scan_json(node, monkeypatch, capsys), "onboot: 1")
    assert found.endswith(
        "VM 107 takes 0000:01:00.0; VM 106 cannot start: 0000:01:00.0 is taken by VM 107"
    )


def test_onboot_cts_sharing_do_not_conflict(tmp_path, monkeypatch, capsys) -> None:
    node = FakeNode(tmp_path)
    node.add_gpu("0000:01:00", group=14, nvidia_minor=0, drm=("renderD128",))
    node.add_ct(200, dev=["/dev/dri/renderD128"], onboot=True)
    node.add_ct(201, dev=["/dev/dri/renderD128"], onboot=True)
    assert warnings_with(scan_json(node, monkeypatch, capsys), "onboot") == []
    node.add_vm(102, hostpci=["01:00"], onboot=True)  # vfio takes it from both CTs
    found = warnings_with(scan_json(node, monkeypatch, capsys), "onboot")
    assert len(found) == 1 and "VM 102, CT 200 and CT 201" in found[0]


def test_mapping_alternatives_and_templates(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_gpu("0000:02:00", group=15)
    node.set_mapping(
        "gpus\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=15\n"
    )
    # PVE gives each its own alternative at boot; which one is the boot order's choice
    node.add_vm(110, hostpci=["mapping=gpus"], onboot=True)
    node.add_vm(111, hostpci=["mapping=gpus"], onboot=True)
    node.add_vm(112, hostpci=["01:00"], template=True, onboot=True)
    data = scan_json(node, monkeypatch, capsys)
    assert warnings_with(data, "onboot") == [
        "VM 110 and VM 111 both have onboot: 1 and mapping gpus: whichever starts first "
        "(startup order, then VMID) takes 0000:01:00.0; at boot: VM 110 takes 0000:01:00.0; "
        "VM 111 takes 0000:02:00.0"
    ]
    assert [c["vmid"] for c in device(data, "0000:02:00")["claims"]] == [110, 111]
    # 01:00.0 is VM 104's now: a start now gets the second alternative
    assert [
        (c["vmid"], c["alternative"], c["picked"]) for c in device(data, "0000:02:00")["claims"]
    ] == [
        (110, 1, True),
        (111, 1, True),
    ]
    _, out, _ = scan(node, monkeypatch, capsys, "--noheader")
    rows = [line.split() for line in out.splitlines() if len(line.split()) == 8]
    assert [r[1:] for r in rows if r[1] in ("110", "112")] == [
        ["110", "-", "stopped", "hostpci0", "exclusive", "gpus", "alt"],
        ["112", "-", "template", "hostpci0", "exclusive", "-", "-"],
        ["110", "-", "stopped", "hostpci0", "exclusive", "gpus", "next"],
    ]
    detail = scan_json(node, monkeypatch, capsys, "110")
    assert [[c["address"] for c in alt] for alt in detail["needs"][0]["alternatives"]] == [
        ["0000:01:00.0"],
        ["0000:02:00.0"],
    ]
    assert detail["needs"][0]["picked"] == 1
    assert detail["would_stop"] == []  # the second alternative is free
    assert scan_json(node, monkeypatch, capsys, "112")["would_stop"] == []


def test_pending_hostpci_change(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_gpu("0000:02:00", group=15)
    node.add_vm(106, "hostpci0: 02:00\n\n[PENDING]\nhostpci0: 01:00\n")
    node.add_vm(107, "hostpci0: 02:00\nhostpci1: 01:00\n\n[PENDING]\ndelete: hostpci1\n")
    data = scan_json(node, monkeypatch, capsys)
    pending = warnings_with(data, "[PENDING]")
    assert len(pending) == 2
    assert "VM 106" in pending[0] and "hostpci0: 01:00" in pending[0]
    assert "VM 107" in pending[1] and "delete hostpci1" in pending[1]
    # claims are shown as the next start sees them (pending applied)
    assert 106 in [c["vmid"] for c in device(data, "0000:01:00")["claims"]]
    assert 107 not in [c["vmid"] for c in device(data, "0000:01:00")["claims"]]


def test_mapping_warnings(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.set_mapping(
        "gpu\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\n"
        "elsewhere\n"
        "\tmap node=pve2,path=0000:01:00.0,id=10de:2204,iommugroup=3\n"
        "\n"
        "gone\n"
        "\tmap node=pve1,path=0000:07:00.0,id=10de:2204,iommugroup=30\n"
    )
    node.add_vm(106, hostpci=["mapping=gpu,pcie=1"])
    node.add_vm(107, hostpci=["mapping=elsewhere"])
    node.add_vm(108, hostpci=["mapping=gone"])
    node.add_vm(109, hostpci=["mapping=nosuch"])
    node.add_vm(110, hostpci=["mapping=gone"])
    data = scan_json(node, monkeypatch, capsys)
    # a pci.cfg line at fault is reported once, against that line, naming its users
    assert warnings_with(data, "'elsewhere'") == [
        f"{tmp_path}/etc/pve/mapping/pci.cfg:4: mapping 'elsewhere' has no map line for node "
        "pve1: PVE cannot start VM 107 (mapping 'elsewhere')"
    ]
    assert warnings_with(data, "'gone'") == [
        f"{tmp_path}/etc/pve/mapping/pci.cfg:8: mapping 'gone' does not match this node's "
        "hardware (pci device '0000:07:00.0' not found): PVE refuses it ('PCI device mapping "
        "invalid (hardware probably changed)'); PVE cannot start VM 108 and VM 110 (mapping "
        "'gone')"
    ]
    assert len(warnings_with(data, "109.conf:", "pci.cfg has no mapping 'nosuch'")) == 1
    assert warnings_with(data, "'gpu'") == []
    mapped = [c for c in device(data, "0000:01:00")["claims"] if c["vmid"] == 106]
    assert mapped[0]["mapping"] == "gpu"
    assert scan_json(node, monkeypatch, capsys, "108")["warnings"] == warnings_with(data, "'gone'")


def test_mapping_file_read_as_pve_reads_it(tmp_path, monkeypatch, capsys) -> None:
    """A mapping runs up to a blank line (pve-common SectionConfig.pm): a header right after
    another mapping's lines is not a mapping, and its map lines belong to the one before."""
    node = seed(tmp_path)
    node.add_gpu("0000:02:00", group=15)
    node.set_mapping(
        "gpu\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "other\n"
        "\tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=15\n"
        "\tmap node=pve1,path=02:00.0,id=10de:2204\n"
    )
    node.add_vm(106, hostpci=["mapping=other"])
    node.add_vm(107, hostpci=["mapping=gpu"])
    data = scan_json(node, monkeypatch, capsys)
    pci_cfg = f"{tmp_path}/etc/pve/mapping/pci.cfg"
    assert warnings_with(data, "pci.cfg:") == [
        f"{pci_cfg}:3: 'other' ignored: PVE reads it as a line of mapping 'gpu', which runs up "
        "to the next blank line",
        f"{pci_cfg}:5: mapping 'gpu': map line ignored: path=02:00.0 is not a list of full PCI "
        "ids (0000:01:00.0;...)",
    ]
    assert len(warnings_with(data, "106.conf:1: hostpci0: PCI device mapping not found")) == 1
    assert [c["alternative"] for c in device(data, "0000:02:00")["claims"]] == [1]


def test_iommu_siblings(tmp_path, monkeypatch, capsys) -> None:
    node = FakeNode(tmp_path)
    node.add_gpu("0000:01:00", group=14, functions=("0", "1"))
    node.add_gpu("0000:02:00", group=14, vendor="1002", device="73bf")
    node.add_vm(102, hostpci=["01:00"])
    node.add_vm(103, hostpci=["02:00.0"])
    node.add_vm(104, hostpci=["01:00.0"])  # same device as 102: an ordinary conflict
    data = scan_json(node, monkeypatch, capsys)
    siblings = warnings_with(data, "both in IOMMU group 14")
    assert len(siblings) == 2
    assert all("VM 103" in w for w in siblings)
    assert device(data, "0000:01:00")["group_members"] == ["0000:02:00.0"]
    _, out, _ = scan(node, monkeypatch, capsys)
    note = "0000:01:00 shares IOMMU group 14 with 0000:02:00.0: a VM passing one through takes"
    assert note + " them all" in out


def test_device_missing_from_sysfs(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_vm(106, hostpci=["0000:09:00.0;0000:09:00.1"])
    data = scan_json(node, monkeypatch, capsys)
    found = warnings_with(data, "VM 106", "not in sysfs")
    assert found == [
        f"{tmp_path}/etc/pve/qemu-server/106.conf:1: hostpci0: no PCI device found for "
        "'0000:09:00.0' (not in sysfs): PVE cannot start VM 106, nor back it up while it is "
        "stopped"
    ]
    ghost = device(data, "0000:09:00")
    assert ghost["present"] is False and ghost["driver"] is None
    assert ghost["functions"] == ["0000:09:00.0", "0000:09:00.1"]
    _, out, _ = scan(node, monkeypatch, capsys)
    assert "0000:09:00  not_in_sysfs  -      -         -        -        -" in out


def test_pci_domain_of_more_than_four_digits(tmp_path, monkeypatch, capsys) -> None:
    """A VMD domain (PVE's $PCIRE takes 4 or more hex digits): claimed, held and mapped."""
    node = FakeNode(tmp_path)
    node.add_gpu("10000:e1:00", group=40, functions=("0", "1"))
    node.set_mapping("vmd\n\tmap node=pve1,path=10000:e1:00.0,id=10de:2204,iommugroup=40\n")
    node.add_vm(102, hostpci=["10000:e1:00,pcie=1"])
    node.add_vm(103, hostpci=["mapping=vmd"])
    node.add_vm(104, hostpci=["10000:e1:00.0"], running=True)
    data = scan_json(node, monkeypatch, capsys)
    gpu = device(data, "10000:e1:00")
    assert gpu["functions"] == ["10000:e1:00.0", "10000:e1:00.1"]
    assert gpu["iommu_group"] == "40" and gpu["present"] is True
    assert [(c["vmid"], c["address"]) for c in gpu["claims"]] == [
        (102, "10000:e1:00"),
        (103, "10000:e1:00.0"),
        (104, "10000:e1:00.0"),
    ]
    assert gpu["held_by"] == [104]
    assert data["warnings"] == []
    vm = scan_json(node, monkeypatch, capsys, "102")
    assert vm["would_stop"] == [
        {"vmid": 104, "type": "qemu", "name": None, "address": "10000:e1:00.0"}
    ]


def test_config_parse_warnings(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    path = tmp_path / "etc/pve/qemu-server/103.conf"
    path.write_text(path.read_text() + "this is no key value line\nhostpci1: zz:zz.9\n")
    data = scan_json(node, monkeypatch, capsys)
    assert len(warnings_with(data, "103.conf:", "cannot parse")) == 1
    assert warnings_with(data, "103.conf:", "hostpci1") == [
        f"{path}:4: hostpci1: PVE ignores this line (host=zz:zz.9: not PCI ids in lower-case "
        "hex (0000:01:00.0;...)): the VM starts without it"
    ]


def test_control_characters_escaped(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.stop(104)
    path = tmp_path / "etc/pve/qemu-server/104.conf"
    path.write_text(path.read_text().replace("name: win11", "name: evil\x1b[2J\x07"))
    node.start(104)
    code, out, _ = scan(node, monkeypatch, capsys)
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "  evil\\x1b[2J\\x07  running  " in out
    code, out, _ = scan(node, monkeypatch, capsys, "104")
    assert "\x1b" not in out and "evil\\x1b[2J" in out
    data = scan_json(node, monkeypatch, capsys)
    assert device(data, "0000:01:00")["claims"][2]["name"] == "evil\x1b[2J\x07"


# ---- scan VMID ----------------------------------------------------------------------------------


def test_scan_vmid(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    # by path: renderD128 exists only while the host driver has the GPU, and VM 104 runs on it
    node.add_ct(200, dev=["/dev/dri/by-path/pci-0000:01:00.0-render"])
    data = scan_json(node, monkeypatch, capsys, "102")
    assert data["guest"] == {
        "vmid": 102,
        "type": "qemu",
        "name": "vm102",
        "running": False,
        "onboot": False,
        "template": False,
        "lock": None,
    }
    assert data["needs"] == [
        {
            "source": "hostpci0",
            "mapping": None,
            "alternatives": [
                [
                    {
                        "address": "0000:01:00",
                        "kind": "exclusive",
                        "units": ["group:14"],
                        "present": True,
                        "held": False,
                    }
                ]
            ],
            "picked": 0,
            "failure": None,
        }
    ]
    assert [(c["vmid"], c["running"]) for c in data["conflicts"]] == [
        (103, False),
        (104, True),
        (105, False),
        (200, False),
    ]
    assert data["conflicts"][1]["with"] == ["0000:01:00"]
    assert data["conflicts"][1]["units"] == ["group:14"]
    assert [c["held"] for c in data["conflicts"]] == [False, True, False, False]
    assert data["would_stop"] == [
        {"vmid": 104, "type": "qemu", "name": "win11", "address": "0000:01:00.0"}
    ]
    assert data["refusal"] is None
    _, out, _ = scan(node, monkeypatch, capsys, "102")
    assert "VM 104 (win11) would be shut down" in out
    assert "Other guests claiming the same devices" in out


def test_scan_vmid_protected_holder(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.write_override("protect: [104]\n")
    data = scan_json(node, monkeypatch, capsys, "103")
    assert data["would_stop"] == []
    assert data["refusal"]["vmid"] == 104 and "protected" in data["refusal"]["reason"]


def test_scan_vmid_warnings_are_its_own(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_vm(106, hostpci=["0000:09:00.0"])
    assert scan_json(node, monkeypatch, capsys, "102")["warnings"] == []
    assert len(scan_json(node, monkeypatch, capsys, "106")["warnings"]) == 1


def test_running_ct_without_a_cgroup_dir_is_seen(tmp_path, monkeypatch, capsys) -> None:
    """A host without /sys/fs/cgroup/lxc/<vmid>: PVE's check_running reads /proc/net/unix."""
    node = FakeNode(tmp_path, ct_cgroup=False)
    node.add_gpu("0000:01:00", group=14, nvidia_minor=0, drm=("renderD128",))
    node.add_ct(200, hostname="plex", dev=["/dev/dri/renderD128"], running=True)
    node.add_vm(102, hostpci=["01:00"])
    assert not (node.root / "sys/fs/cgroup/lxc/200").exists()
    data = scan_json(node, monkeypatch, capsys)
    gpu = device(data, "0000:01:00")
    assert gpu["held_by"] == [200]
    assert [(c["vmid"], c["running"]) for c in gpu["claims"]] == [(102, False), (200, True)]
    vm = scan_json(node, monkeypatch, capsys, "102")
    assert [s["vmid"] for s in vm["would_stop"]] == [200]


def test_unknown_vmid(tmp_path, monkeypatch, capsys) -> None:
    code, out, err = scan(seed(tmp_path), monkeypatch, capsys, "999")
    assert code == 2 and out == ""
    assert err == "pve-gpu-hook: no guest 999 on this node\n"
    env = dict(os.environ, PVE_GPU_HOOK_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pvegpuhook", "scan", "999"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == "pve-gpu-hook: no guest 999 on this node\n"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---- --cluster ----------------------------------------------------------------------------------


def test_cluster(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.set_mapping(
        "gpu\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\tmap node=pve2,path=0000:03:00.0,id=10de:2204,iommugroup=22\n"
    )
    node.add_vm(301, node="pve2", hostpci=["mapping=gpu"], onboot=True)
    node.add_vm(302, node="pve2", hostpci=["03:00.0"], onboot=True)
    node.add_vm(303, node="pve2", hostpci=["04:00"])
    node.add_ct(304, node="pve2", dev=["/dev/dri/renderD128"])
    data = scan_json(node, monkeypatch, capsys, "--cluster")
    assert data["node"] == "pve1"
    assert [n["node"] for n in data["nodes"]] == ["pve1", "pve2"]
    pve1, pve2 = data["nodes"]
    assert pve1["sysfs"] is True and pve2["sysfs"] is False
    assert device(pve1, "0000:01:00")["held_by"] == [104]
    mapped = device(pve2, "0000:03:00")
    assert mapped["iommu_group"] == "22"
    assert [(c["vmid"], c["mapping"], c["running"]) for c in mapped["claims"]] == [
        (301, "gpu", None),
        (302, None, None),
    ]
    assert device(pve2, "0000:04:00")["iommu_group"] is None
    assert len(warnings_with(pve2, "VM 301 and VM 302", "IOMMU group 22")) == 1
    _, out, _ = scan(node, monkeypatch, capsys, "--cluster")
    assert "PCI devices on pve1" in out and "PCI devices on pve2 (from configs only)" in out
    assert "configs only" in out and "iommugroup" in out
    assert "pve2: CT 304 uses GPU device nodes" in out
    assert "0000:03:00  -      22     -       -      -      unknown" in out
    assert "0000:03:00  301   -     unknown  hostpci0  exclusive  gpu      -" in out


def test_cluster_and_vmid_is_usage_error(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = scan(seed(tmp_path), monkeypatch, capsys, "102", "--cluster")
    assert code == 2 and err.startswith("pve-gpu-hook: ") and err.count("\n") == 1


# ---- read-only ----------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
    return found


def test_scan_writes_nothing_and_runs_nothing(tmp_path, monkeypatch, capsys) -> None:
    node = seed(tmp_path)
    node.add_vm(106, hostpci=["0000:09:00.0"], onboot=True)
    node.add_ct(200, dev=["/dev/dri/renderD128"])
    marker = tmp_path / "COMMAND-RAN"
    for prog in ("qm", "pct", "ha-manager"):
        script = tmp_path / "usr/sbin" / prog
        script.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\n')
        script.chmod(0o755)
    before = _snapshot(tmp_path)
    time.sleep(0.01)
    for argv in ([], ["102"], ["200"], ["--cluster"], ["--output-format", "yaml"]):
        code, _, _ = scan(node, monkeypatch, capsys, *argv)
        assert code == 0
    assert not marker.exists()
    assert _snapshot(tmp_path) == before


# ---- the output layer ---------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    output.add_output_options(parser)
    return parser.parse_args(list(argv))


def test_output_options_defaults() -> None:
    args = _args()
    assert (args.output_format, args.noborder, args.noheader) == ("text", False, False)
    with pytest.raises(SystemExit):
        _args("--output-format", "xml")


def test_plain_table(capsys) -> None:
    table = output.Table(
        [("a", "NAME"), ("b", "VALUES"), ("c", "ON")],
        [{"a": "x\x1b[31m", "b": [1, 2], "c": True}, {"a": None, "b": [], "c": False}],
        title="Things",
    )
    output.emit(_args(), {"ignored": 1}, [table, table], ["warning: w\nx"])
    assert capsys.readouterr().out == (
        "Things\n"
        "NAME       VALUES  ON\n"
        "x\\x1b[31m  1, 2    yes\n"
        "-          -       no\n"
        "\n"
        "Things\n"
        "NAME       VALUES  ON\n"
        "x\\x1b[31m  1, 2    yes\n"
        "-          -       no\n"
        "\n"
        "warning: w\\x0ax\n"
    )
    output.emit(_args("--noheader"), {}, [table], [])
    assert capsys.readouterr().out == "x\\x1b[31m  1, 2  yes\n-          -     no\n"


def test_plain_cells_are_one_awk_field_each(capsys) -> None:
    table = output.Table(
        [("a", "A"), ("b", "B"), ("c", "C")],
        [{"a": "two words", "b": ["x y", 3], "c": ""}],
        title="Spaces",
        fields=True,
        empty="nothing",
    )
    output.emit(_args(), {}, [table])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[1:]] == [["A", "B", "C"], ["two_words", "x_y,3", "-"]]
    empty = output.Table([("a", "A")], [], title="None here", empty="no guest claims a device")
    output.emit(_args(), {}, [empty, table])
    assert capsys.readouterr().out.startswith("no guest claims a device\n\nSpaces\n")
    output.emit(_args("--noheader"), {}, [empty, table, table], ["warning: w"])
    out, err = capsys.readouterr()
    assert out == "two_words  x_y,3  -\n" * 2  # the rows only: no blank line, no note
    assert err == "no guest claims a device\nwarning: w\n"


def test_machine_formats(capsys) -> None:
    data = {"b": [1, None], "a": "x\x1b", "c": {"z": True}}
    versioned = {"format": 1, **data}  # every JSON/YAML object says its shape's version
    output.emit(_args("--output-format", "json"), data, [], ["ignored"])
    out = capsys.readouterr().out
    assert out == '{"a": "x\\u001b", "b": [1, null], "c": {"z": true}, "format": 1}\n'
    output.emit(_args("--output-format", "json-pretty"), data, [])
    assert json.loads(capsys.readouterr().out) == versioned
    output.emit(_args("--output-format", "yaml"), data, [])
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == versioned and "\x1b" not in out
    output.emit(_args("--output-format", "yaml"), {"s": "bad\udcff"}, [])
    assert yaml.safe_load(capsys.readouterr().out) == {"format": 1, "s": "bad\\udcff"}


def test_rich_on_a_terminal(monkeypatch, capsys) -> None:
    pytest.importorskip("rich")
    monkeypatch.setattr(output, "_isatty", lambda: True)
    table = output.Table([("a", "NAME")], [{"a": "[bold]x\x1b"}], title="T")
    output.emit(_args(), {}, [table], ["warning: w"])
    out = capsys.readouterr().out
    assert "[bold]x\\x1b" in out  # not read as rich markup, escapes escaped
    assert "NAME" in out and "T" in out and "warning: w" in out
    assert "─" in out
    output.emit(_args("--noborder", "--noheader"), {}, [table])
    out = capsys.readouterr().out
    assert "NAME" not in out and "─" not in out and "[bold]x" in out


# ---- scale --------------------------------------------------------------------------------------


def test_scan_time_with_1000_guests(tmp_path, monkeypatch, capsys) -> None:
    """Not a limit: prints the time of one scan on a node with 1,000 guests (run with -s)."""
    node = FakeNode(tmp_path)
    for gpu in range(8):
        node.add_gpu(f"0000:{gpu + 1:02x}:00", group=10 + gpu, functions=("0", "1"))
    qemu = tmp_path / "etc/pve/qemu-server"
    lxc = tmp_path / "etc/pve/lxc"
    for index in range(1000):
        vmid = 1000 + index
        if index % 5 == 4:
            (lxc / f"{vmid}.conf").write_text(
                f"hostname: ct{vmid}\nmemory: 512\nnet0: name=eth0,bridge=vmbr0\n"
            )
            continue
        gpu = index % 8 + 1
        (qemu / f"{vmid}.conf").write_text(
            f"name: vm{vmid}\nmemory: 4096\ncores: 4\nscsi0: local-lvm:vm-{vmid}-disk-0,size=32G\n"
            f"hostpci0: {gpu:02x}:00,pcie=1\nonboot: {int(index % 50 == 0)}\n"
            "\n[snap1]\nhostpci0: 0a:00\n"
        )
    node.start(1000)
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(tmp_path))
    start = time.perf_counter()
    assert main(["scan", "--output-format", "json"]) == 0
    seconds = time.perf_counter() - start
    data = json.loads(capsys.readouterr().out)
    assert sum(len(d["claims"]) for d in data["devices"]) == 800
    with capsys.disabled():
        print(f"\nscan of 1,000 guests (800 VMs on 8 GPUs): {seconds * 1000:.0f} ms")
