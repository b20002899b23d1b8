"""Self-tests of the PVE simulator: the fakes must behave like PVE before they judge the hook."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.sim import vzdump
from tests.sim.node import FakeNode, reboot
from tests.sim.pve import Pve, parse_config
from tests.sim.vzdump import run_job

BUSY_14 = (
    "kvm: -device vfio-pci,host=0000:00:1f.3,id=hostpci0,bus=pci.0,addr=0x10: "
    "vfio 0000:00:1f.3: failed to setup container for group 14: "
    "Failed to set iommu for container: Device or resource busy"
)


def cmd(node: FakeNode, prog: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a fake command the way the library does: absolute path, emptied environment."""
    return subprocess.run(
        [str(node.root / "usr/sbin" / prog), *map(str, args)],
        capture_output=True,
        text=True,
        env={},
        timeout=30,
        check=False,
    )


def gpu(node: FakeNode) -> None:
    """RTX card 01:00 (GPU + audio) in IOMMU group 14, NVIDIA minor 0, DRM card0/renderD128."""
    node.add_gpu(
        "0000:01:00",
        group=14,
        functions=("0", "1"),
        nvidia_minor=0,
        drm=("card0", "renderD128"),
    )


# ---- layout -----------------------------------------------------------------------------------


def test_skeleton_follows_the_file_contract(node: FakeNode) -> None:
    r = node.root
    assert (r / "etc/hostname").read_text() == "pve1\n"
    assert os.readlink(r / "etc/pve/qemu-server") == "nodes/pve1/qemu-server"
    assert os.readlink(r / "etc/pve/lxc") == "nodes/pve1/lxc"
    assert os.readlink(r / "etc/pve/local") == "nodes/pve1"
    for prog in ("qm", "pct", "ha-manager"):
        path = r / "usr/sbin" / prog
        assert os.access(path, os.X_OK)
        assert path.read_text().startswith(f"#!{sys.executable}\n")
    node.add_vm(105, "name: gaming\nmemory: 8192\n")
    node.add_ct(200, hostname="plex")
    node.add_vm(300, name="remote", node="pve2")
    vmlist = json.loads((r / "etc/pve/.vmlist").read_text())
    assert vmlist["ids"]["105"] == {"node": "pve1", "type": "qemu", "version": 1}
    assert vmlist["ids"]["200"]["type"] == "lxc"
    assert vmlist["ids"]["300"]["node"] == "pve2"
    assert (r / "etc/pve/qemu-server/105.conf").read_text() == "name: gaming\nmemory: 8192\n"
    assert (r / "etc/pve/nodes/pve2/qemu-server/300.conf").exists()
    assert not (r / "etc/pve/qemu-server/300.conf").exists()
    assert node.running_guests() == set()


def test_sysfs_layout(node: FakeNode) -> None:
    gpu(node)
    node.add_gpu("0000:03:00.4", group=30, vf_of="0000:03:00.0", functions=("4",))
    r = node.root
    dev = r / "sys/bus/pci/devices/0000:01:00.0"
    assert (dev / "vendor").read_text() == "0x10de\n"
    assert (dev / "class").read_text() == "0x030000\n"
    assert (r / "sys/bus/pci/devices/0000:01:00.1/class").read_text() == "0x040300\n"
    assert os.readlink(dev / "iommu_group") == "../../../../kernel/iommu_groups/14"
    assert (dev / "iommu_group").resolve() == (r / "sys/kernel/iommu_groups/14").resolve()
    members = sorted(os.listdir(r / "sys/kernel/iommu_groups/14/devices"))
    assert members == ["0000:01:00.0", "0000:01:00.1"]
    assert (r / "sys/kernel/iommu_groups/14/devices/0000:01:00.0").resolve() == dev.resolve()
    assert (dev / "driver").resolve().name == "nvidia"
    assert (r / "sys/class/drm/renderD128/device").resolve() == dev.resolve()
    assert (r / "sys/class/drm/renderD128/dev").read_text() == "226:128\n"
    info = (r / "proc/driver/nvidia/gpus/0000:01:00.0/information").read_text()
    assert "Device Minor: \t 0\n" in info
    vf = r / "sys/bus/pci/devices/0000:03:00.4"
    assert os.readlink(vf / "physfn") == "../0000:03:00.0"
    node.add_pci_device("0000:05:00.0", group=None, driver="vfio-pci")
    assert not (r / "sys/bus/pci/devices/0000:05:00.0/iommu_group").exists()


# ---- qm start: PCI checks ---------------------------------------------------------------------


def test_already_in_use_by_vmid_exact_message(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, name="win11", hostpci=["0000:01:00.0,pcie=1,x-vga=1"], running=True)
    node.add_vm(102, hostpci=["01:00.0"])
    res = cmd(node, "qm", "start", 102)
    assert res.returncode == 255
    assert res.stderr == "PCI device '0000:01:00.0' already in use by VMID '104'\n"
    assert not node.is_running(102)
    assert node.reservations() == {"0000:01:00.0": {"vmid": 104, "pid": node.vm_pid(104)}}
    [call] = node.calls("qm")
    assert call["argv"] == ["qm", "start", "102"] and call["exit"] == 255


def test_running_vm_runtime_files(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, name="win11", hostpci=["01:00,pcie=1"], running=True)
    r = node.root
    pid = int((r / "run/qemu-server/104.pid").read_text())
    assert pid >= 10000 and node.vm_pid(104) == pid
    argv = (r / f"proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[:5] == [b"/usr/bin/kvm", b"-id", b"104", b"-name", b"win11,debug-threads=on"]
    assert b"/var/run/qemu-server/104.pid" in argv
    assert (
        b"vfio-pci,host=0000:01:00.0,id=hostpci0.0,bus=ich9-pcie-port-1,addr=0x0.0,"
        b"multifunction=on" in argv
    )
    assert (r / "run/qemu-server/pci-id-reservations").read_text() == (
        f"0000:01:00.0 104 pid:{pid}\n0000:01:00.1 104 pid:{pid}\n"
    )
    # The whole group went to vfio-pci.
    assert node.driver("0000:01:00.0") == node.driver("0000:01:00.1") == "vfio-pci"
    res = cmd(node, "qm", "status", 104, "--verbose")
    assert res.returncode == 0
    assert "status: running\n" in res.stdout and "qmpstatus: running\n" in res.stdout
    assert "name: win11\n" in res.stdout
    assert cmd(node, "qm", "start", 104).stderr == "VM 104 already running\n"
    # Stopped: pid file, process, reservation gone; PVE does not rebind the host driver.
    assert cmd(node, "qm", "stop", 104).returncode == 0
    assert not (r / "run/qemu-server/104.pid").exists()
    assert not (r / f"proc/{pid}").exists()
    assert node.reservations() == {}
    assert node.driver("0000:01:00.0") == "vfio-pci"
    assert cmd(node, "qm", "status", 104).stdout == "status: stopped\n"


def test_short_id_means_every_function(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"], running=True)
    assert set(node.reservations()) == {"0000:01:00.0", "0000:01:00.1"}
    node.add_vm(103, hostpci=["0000:01:00.1"])
    res = cmd(node, "qm", "start", 103)
    assert res.stderr == "PCI device '0000:01:00.1' already in use by VMID '104'\n"


def test_semicolon_list_is_one_set(node: FakeNode) -> None:
    gpu(node)
    node.add_gpu("0000:02:00", group=15)
    node.add_vm(104, hostpci=["01:00.0;02:00.0"], running=True)
    assert set(node.reservations()) == {"0000:01:00.0", "0000:02:00.0"}
    node.add_vm(103, hostpci=["02:00.0"])
    assert "'0000:02:00.0' already in use by VMID '104'" in cmd(node, "qm", "start", 103).stderr
    node.add_vm(106, hostpci=["07:00.0"])
    assert cmd(node, "qm", "start", 106).stderr == "no PCI device found for '07:00.0'\n"


MAPPING = """\
    rtx
    \tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14
    \tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=15
    \tmap node=pve2,path=0000:09:00.0,id=10de:2204,iommugroup=3
    \tdescription two cards

    single
    \tmap node=pve1,path=0000:01:00,id=10de:2204,iommugroup=14
    """


def test_mapping_takes_the_first_free_alternative(node: FakeNode) -> None:
    gpu(node)
    node.add_gpu("0000:02:00", group=15)
    node.set_mapping(MAPPING)
    for vmid in (101, 102, 103):
        node.add_vm(vmid, hostpci=["mapping=rtx,pcie=1"])
    assert cmd(node, "qm", "start", 101).returncode == 0
    assert cmd(node, "qm", "start", 102).returncode == 0
    res = node.reservations()
    assert res["0000:01:00.0"]["vmid"] == 101 and res["0000:02:00.0"]["vmid"] == 102
    full = cmd(node, "qm", "start", 103)
    assert full.returncode == 255
    assert full.stderr == "could not find a free device for 'hostpci0'\n"
    # One alternative only: the plain reservation error; a short path covers all functions.
    node.add_vm(104, hostpci=["mapping=single"])
    assert cmd(node, "qm", "start", 104).stderr == (
        "PCI device '0000:01:00.0' already in use by VMID '101'\n"
    )
    node.stop(101)
    assert cmd(node, "qm", "start", 104).returncode == 0
    assert {k for k, v in node.reservations().items() if v["vmid"] == 104} == {
        "0000:01:00.0",
        "0000:01:00.1",
    }
    node.add_vm(105, hostpci=["mapping=nosuch"])
    assert cmd(node, "qm", "start", 105).stderr == "PCI device mapping not found for 'nosuch'\n"


def test_iommu_sibling_conflict_fails_like_qemu(node: FakeNode) -> None:
    gpu(node)
    node.add_pci_device("0000:00:1f.3", group=14, class_="0x040300", driver="snd_hda_intel")
    node.add_vm(104, hostpci=["01:00.0"], running=True)
    node.add_vm(103, hostpci=["00:1f.3"])
    res = cmd(node, "qm", "start", 103)
    assert res.returncode == 255
    assert res.stderr == BUSY_14 + "\nstart failed: QEMU exited with code 1\n"
    assert not node.is_running(103)
    assert set(node.reservations()) == {"0000:01:00.0"}  # 103's attempt left nothing
    assert node.driver("0000:00:1f.3") == "vfio-pci"  # 104's start bound the whole group


def test_running_ct_blocks_the_group(node: FakeNode) -> None:
    gpu(node)
    node.add_ct(200, hostname="plex", dev=["/dev/dri/renderD128,gid=104"], running=True)
    node.add_vm(102, hostpci=["01:00"])
    res = cmd(node, "qm", "start", 102)
    assert res.returncode == 255
    assert "vfio 0000:01:00.0: failed to setup container for group 14" in res.stderr
    node.stop(200)
    assert cmd(node, "qm", "start", 102).returncode == 0
    # And the other way round: the CT cannot start while a VM holds its GPU: its node is gone
    res = cmd(node, "pct", "start", 200)
    assert res.returncode == 255
    assert res.stderr.endswith("Device /dev/dri/renderD128 does not exist\n")


def test_stale_reservation_of_a_dead_pid_is_taken_over(node: FakeNode) -> None:
    gpu(node)
    (node.root / "run/qemu-server/pci-id-reservations").write_text("0000:01:00.0 104 pid:4242\n")
    node.add_vm(102, hostpci=["01:00.0"])
    res = cmd(node, "qm", "start", 102)
    assert res.returncode == 0
    assert "leftover PCI reservation found for 0000:01:00.0, lets take it..." in res.stderr
    assert node.reservations()["0000:01:00.0"]["vmid"] == 102


def test_args_vfio_device_is_not_reserved_but_conflicts_in_qemu(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, args="-device vfio-pci,host=01:00.0,x-vga=on", running=True)
    assert node.reservations() == {}  # PVE does not parse args
    node.add_vm(102, hostpci=["01:00.0"])
    res = cmd(node, "qm", "start", 102)
    assert res.returncode == 255
    assert "failed to setup container for group 14" in res.stderr


def test_mdev_shares_but_full_passthrough_excludes(node: FakeNode) -> None:
    node.add_gpu("0000:41:00", group=40, mdev_types=("nvidia-63",), mdev_instances=2)
    node.add_vm(110, hostpci=["41:00.0,mdev=nvidia-63"], running=True)
    node.add_vm(111, hostpci=["41:00.0,mdev=nvidia-63"], running=True)
    assert node.reservations() == {}  # mdevs are not reserved
    pid = node.vm_pid(110)
    cmdline = (node.root / f"proc/{pid}/cmdline").read_bytes()
    assert (
        b"vfio-pci,sysfsdev=/sys/bus/mdev/devices/00000000-0000-0000-0000-000000000110,"
        b"id=hostpci0,bus=pci.0,addr=0x10" in cmdline
    )
    node.add_vm(112, hostpci=["41:00.0,mdev=nvidia-63"])
    # qemu-server QemuServer.pm vm_start_nolock: each alternative's error is a warning
    assert cmd(node, "qm", "start", 112).stderr == (
        "pci device '0000:41:00.0' has no available instances of 'nvidia-63'\n"
        "could not create mediated device\n"
    )
    node.add_vm(120, hostpci=["41:00.0"])
    assert "failed to setup container for group 40" in cmd(node, "qm", "start", 120).stderr
    node.stop(110)
    node.stop(111)
    assert cmd(node, "qm", "start", 120).returncode == 0
    types = node.root / "sys/bus/pci/devices/0000:41:00.0/mdev_supported_types"
    assert node.driver("0000:41:00.0") == "vfio-pci" and not types.exists()
    node.stop(120)  # PVE never binds it back: still no mdev parent
    res = cmd(node, "qm", "start", 110)
    assert res.returncode == 255
    assert res.stderr == (
        "pci device '0000:41:00.0' does not support mediated devices \n"
        "could not create mediated device\n"
    )
    node.bind_host_driver("0000:41:00.0", "nvidia")  # its vendor driver again: a parent again
    assert (types / "nvidia-63/available_instances").read_text() == "2\n"
    assert cmd(node, "qm", "start", 110).returncode == 0


# ---- qm start: config handling ----------------------------------------------------------------


def test_pending_is_applied_on_start_including_delete(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(
        102,
        """
        name: old
        memory: 4096
        hostpci0: 02:00.0

        [PENDING]
        delete: name,hostpci0
        hostpci1: 01:00,pcie=1
        memory: 8192

        [before-upgrade]
        hostpci0: 02:00.0
        name: old
        """,
    )
    assert cmd(node, "qm", "config", 102).stdout == "hostpci1: 01:00,pcie=1\nmemory: 8192\n"
    assert cmd(node, "qm", "config", 102, "--current", 1).stdout.startswith("hostpci0: 02:00.0")
    assert cmd(node, "qm", "start", 102).returncode == 0
    cfg = parse_config(node.config_text(102))
    assert cfg.keys() == ["memory", "hostpci1"]
    assert cfg.get("memory") == "8192"
    assert cfg.section("PENDING") is None
    assert cfg.section("before-upgrade") is not None  # snapshots stay
    assert set(node.reservations()) == {"0000:01:00.0", "0000:01:00.1"}


def test_lock_refusal_and_skiplock(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(102, "lock: backup\nhostpci0: 01:00\n")
    res = cmd(node, "qm", "start", 102)
    assert (res.returncode, res.stderr) == (255, "VM is locked (backup)\n")
    assert cmd(node, "qm", "start", 102, "--skiplock").returncode == 0
    res = cmd(node, "qm", "shutdown", 102, "--timeout", 1)
    assert (res.returncode, res.stderr) == (255, "VM is locked (backup)\n")
    assert cmd(node, "qm", "shutdown", 102, "--skiplock", "--timeout", 1).returncode == 0
    assert not node.is_running(102)
    assert cmd(node, "qm", "unlock", 102).returncode == 0
    assert node.config_value(102, "lock") is None


def test_template_and_missing_config(node: FakeNode) -> None:
    node.add_vm(9000, template=True)
    res = cmd(node, "qm", "start", 9000)
    assert (res.returncode, res.stderr) == (255, "you can't start a vm if it's a template\n")
    res = cmd(node, "qm", "start", 777)
    assert res.returncode == 2
    assert res.stderr == "Configuration file 'nodes/pve1/qemu-server/777.conf' does not exist\n"
    node.add_vm(300, node="pve2")
    assert cmd(node, "qm", "start", 300).returncode == 2  # another node's guest
    res = cmd(node, "qm", "shutdown", 102, "--bogus")
    assert res.returncode == 255 and "Unknown option: bogus" in res.stderr


def test_start_faults(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"])
    node.set_fault(104, start_fails=True)
    res = cmd(node, "qm", "start", 104)
    assert (res.returncode, res.stderr) == (255, "start failed: QEMU exited with code 1\n")
    assert node.reservations() == {}
    node.set_fault(104, start_fails=None, start_delay=0.6, start_paused=True)
    proc = subprocess.Popen(
        [str(node.root / "usr/sbin/qm"), "start", "104"], env={}, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 5
    while not node.reservations() and time.monotonic() < deadline:
        time.sleep(0.02)
    # Between reservation and QEMU's start PVE holds a time-based reservation.
    assert "time" in node.reservations()["0000:01:00.0"]
    assert not node.is_running(104)
    assert proc.wait(timeout=10) == 0
    assert node.reservations()["0000:01:00.0"] == {"vmid": 104, "pid": node.vm_pid(104)}
    assert node.qmp_status(104) == "prelaunch"
    assert "qmpstatus: prelaunch" in cmd(node, "qm", "status", 104, "--verbose").stdout


def test_concurrent_starts_get_distinct_pids(node: FakeNode) -> None:
    for vmid in range(120, 126):
        node.add_vm(vmid)
    threads = [threading.Thread(target=cmd, args=(node, "qm", "start", v)) for v in range(120, 126)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pids = {node.vm_pid(v) for v in range(120, 126)}
    assert None not in pids and len(pids) == 6


# ---- qm shutdown / stop -----------------------------------------------------------------------


def test_shutdown_of_a_stopped_vm_says_not_running_and_exits_0(node: FakeNode) -> None:
    node.add_vm(105)
    res = cmd(node, "qm", "shutdown", 105)
    assert (res.returncode, res.stdout, res.stderr) == (0, "VM 105 not running\n", "")
    res = cmd(node, "qm", "stop", 105)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_ignore_shutdown_timeout_and_force_stop(node: FakeNode) -> None:
    node.add_vm(104, running=True)
    node.set_fault(104, ignore_shutdown=True)
    t0 = time.monotonic()
    res = cmd(node, "qm", "shutdown", 104, "--timeout", 1)
    assert time.monotonic() - t0 >= 1
    assert (res.returncode, res.stderr) == (255, "VM quit/powerdown failed - got timeout\n")
    assert node.is_running(104)
    res = cmd(node, "qm", "shutdown", 104, "--timeout", 1, "--forceStop", 1)
    assert res.returncode == 0 and not node.is_running(104)
    node.start(104)
    assert cmd(node, "qm", "stop", 104).returncode == 0  # a hard stop always works
    assert not node.is_running(104)


def test_shutdown_delay_and_paused_vm(node: FakeNode) -> None:
    node.add_vm(104, running=True)
    node.set_fault(104, shutdown_delay=0.3)
    t0 = time.monotonic()
    assert cmd(node, "qm", "shutdown", 104, "--timeout", 5).returncode == 0
    assert time.monotonic() - t0 >= 0.3 and not node.is_running(104)
    node.start(104, paused=True)
    res = cmd(node, "qm", "shutdown", 104)
    assert (res.returncode, res.stderr) == (255, "VM is paused - cannot shutdown\n")
    res = cmd(node, "qm", "shutdown", 104, "--forceStop", 1)
    assert res.returncode == 0 and "VM is paused - stop instead of shutdown" in res.stderr
    assert not node.is_running(104)


# ---- HA -------------------------------------------------------------------------------------


def test_ha_stop_and_start_are_asynchronous(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"], running=True)
    node.set_ha(104)
    node.set_fault(104, ha_delay=0.8)
    t0 = time.monotonic()
    res = cmd(node, "qm", "shutdown", 104, "--timeout", 5)  # capture_output: pipes must close
    assert time.monotonic() - t0 < 0.7
    assert (res.returncode, res.stdout) == (0, "Requesting HA stop for VM 104\n")
    assert node.is_running(104)  # the caller returned before the state changed
    assert "state stopped" in (node.root / "etc/pve/ha/resources.cfg").read_text()
    node.wait_settled()
    assert not node.is_running(104) and node.reservations() == {}
    res = cmd(node, "qm", "start", 104)
    assert res.stdout == "Requesting HA start for VM 104\n" and not node.is_running(104)
    assert "service vm:104 (pve1, starting)" in cmd(node, "ha-manager", "status").stdout
    node.wait_settled()
    assert node.is_running(104)
    workers = [c["argv"] for c in node.calls("ha-worker")]
    assert workers == [["ha-worker", "stop", "vm:104"], ["ha-worker", "start", "vm:104"]]


def test_ha_start_failure_only_reaches_the_log(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"], running=True)
    node.add_vm(102, hostpci=["01:00"])
    node.set_ha(102)
    node.set_fault(102, ha_delay=0.05)
    assert cmd(node, "qm", "start", 102).returncode == 0
    node.wait_settled()
    assert not node.is_running(102)
    [worker] = node.calls("ha-worker")
    assert worker["exit"] == 255
    assert worker["out"] == ["PCI device '0000:01:00.0' already in use by VMID '104'"]


# ---- containers -------------------------------------------------------------------------------


def two_gpus(node: FakeNode) -> None:
    gpu(node)
    node.add_gpu("0000:02:00", group=15, nvidia_minor=1, drm=("card1", "renderD129"))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("dev0: /dev/dri/renderD128,gid=104", {"0000:01:00.0"}),
        ("dev0: path=/dev/nvidia1,mode=0666", {"0000:02:00.0"}),
        ("dev1: /dev/dri/card1", {"0000:02:00.0"}),
        (
            "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file",
            {"0000:01:00.0"},
        ),
        (
            "lxc.mount.entry = /dev/nvidia1 dev/nvidia1 none bind,optional,create=file",
            {"0000:02:00.0"},
        ),
        (
            "lxc.mount.entry: /dev/dri dev/dri none bind,optional,create=dir",
            {"0000:01:00.0", "0000:02:00.0"},
        ),
        ("lxc.cgroup2.devices.allow: c 195:* rwm", {"0000:01:00.0", "0000:02:00.0"}),
        ("lxc.cgroup2.devices.allow: c 195:1 rwm", {"0000:02:00.0"}),
        ("lxc.cgroup2.devices.allow = c 226:128 rwm", {"0000:01:00.0"}),
        ("lxc.cgroup2.devices.allow: c 226:1 rwm", {"0000:02:00.0"}),
        ("lxc.cgroup2.devices.allow: c 195:255 rwm", set()),  # nvidiactl is no GPU
        ("lxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file", set()),
        # a wildcard rule permits the nodes the CT is given: they are what it holds
        (
            "lxc.cgroup2.devices.allow: c 195:* rwm\n"
            "lxc.mount.entry: /dev/nvidia1 dev/nvidia1 none bind,optional,create=file",
            {"0000:02:00.0"},
        ),
        (
            "lxc.cgroup2.devices.allow = c 226:* rwm\ndev0: /dev/dri/renderD128",
            {"0000:01:00.0"},
        ),
        (
            "lxc.cgroup2.devices.allow: c 195:* rwm\ndev0: /dev/dri/renderD128",
            {"0000:01:00.0", "0000:02:00.0"},
        ),
        (
            "lxc.cgroup2.devices.allow: c 195:* rwm\n"
            "lxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind,optional,create=file",
            {"0000:01:00.0", "0000:02:00.0"},
        ),
    ],
)
def test_ct_device_nodes_resolve_to_pci(node: FakeNode, line: str, expected: set[str]) -> None:
    two_gpus(node)
    assert node.pve.ct_devices(parse_config(f"hostname: plex\n{line}\n")) == expected


def test_ct_gpu_blocks_vm_through_cgroup_rule(node: FakeNode) -> None:
    two_gpus(node)
    node.add_ct(201, "lxc.cgroup2.devices.allow: c 195:* rwm\n", running=True)
    node.add_vm(102, hostpci=["02:00.0"])
    res = cmd(node, "qm", "start", 102)
    assert "failed to setup container for group 15" in res.stderr


def test_ct_with_the_wildcard_recipe_blocks_only_its_own_gpu(node: FakeNode) -> None:
    two_gpus(node)
    recipe = (
        "lxc.cgroup2.devices.allow: c 195:* rwm\n"
        "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file\n"
    )
    node.add_ct(201, recipe, running=True)
    node.add_vm(102, hostpci=["02:00.0"])
    node.add_vm(103, hostpci=["01:00.0"])
    assert cmd(node, "qm", "start", 102).returncode == 0
    res = cmd(node, "qm", "start", 103)
    assert "failed to setup container for group 14" in res.stderr


def test_pct_commands(node: FakeNode) -> None:
    node.add_ct(200, hostname="plex")
    r = node.root
    assert cmd(node, "pct", "status", 200).stdout == "status: stopped\n"
    res = cmd(node, "pct", "shutdown", 200)
    assert (res.returncode, res.stderr) == (255, "CT 200 not running\n")
    assert cmd(node, "pct", "start", 200).returncode == 0
    assert (r / "sys/fs/cgroup/lxc/200").is_dir()
    assert command_sockets(node) == ["200"]
    assert cmd(node, "pct", "status", 200).stdout == "status: running\n"
    assert cmd(node, "pct", "start", 200).stderr == "CT 200 already running\n"
    node.set_fault(200, ignore_shutdown=True)
    node.set_time_scale(0.1)  # 2 T + 5 s pass in 0.7 s
    res = cmd(node, "pct", "shutdown", 200, "--timeout", 1)
    assert res.returncode == 255
    assert res.stderr == (
        "command 'lxc-stop -n 200 --nokill --timeout 1' failed: exit code 1\n"
        "container did not stop\n"
    )
    res = cmd(node, "pct", "shutdown", 200, "--timeout", 1, "--forceStop", 1)
    assert res.returncode == 0  # lxc-stop without --nokill kills it after the timeout
    assert not (r / "sys/fs/cgroup/lxc/200").exists()
    assert command_sockets(node) == []
    node.add_ct(9001, template=True)
    assert cmd(node, "pct", "start", 9001).stderr == "you can't start a CT if it's a template\n"
    node.add_ct(202, "lock: backup\n")
    assert cmd(node, "pct", "start", 202).stderr == "CT is locked (backup)\n"
    node.set_ha(200)
    node.set_fault(200, ha_delay=0.05, ignore_shutdown=None)
    assert cmd(node, "pct", "start", 200).stdout == "Requesting HA start for CT 200\n"
    node.wait_settled()
    assert node.is_running(200)


def command_sockets(node: FakeNode) -> list[str]:
    """VMIDs of the LXC command sockets in /proc/net/unix, read as PVE's check_running does."""
    found = []
    for line in (node.root / "proc/net/unix").read_text().splitlines():
        m = re.match(r"^[a-f0-9]+:\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+\d+\s+(\S+)$", line)
        if m and (path := re.match(r"^@/var/lib/lxc/(\d+)/command$", m.group(1))):
            found.append(path.group(1))
    return found


def test_running_ct_has_a_command_socket_in_the_kernel_format(tmp_path: Path) -> None:
    """pve-container's check_running reads /proc/net/unix; the cgroup dir is only on some hosts."""
    node = FakeNode(tmp_path, ct_cgroup=False)
    lines = (node.root / "proc/net/unix").read_text().splitlines()
    assert lines[0] == "Num       RefCount Protocol Flags    Type St Inode Path"
    node.add_ct(200, running=True)
    node.add_ct(201, running=True)
    assert command_sockets(node) == ["200", "201"]
    line = (node.root / "proc/net/unix").read_text().splitlines()[-2]
    assert re.fullmatch(
        r"0{16}: 00000002 00000000 00010000 0001 01 +\d+ @/var/lib/lxc/200/command", line
    )
    assert not (node.root / "sys/fs/cgroup/lxc").exists()
    assert cmd(node, "pct", "status", 200).stdout == "status: running\n"
    node.stop(200)
    assert command_sockets(node) == ["201"]
    assert node.running_guests() == {201}
    reboot(node)
    assert command_sockets(node) == []
    assert (node.root / "proc/net/unix").read_text().startswith("Num ")
    # the same root as a cgroup v2 host again
    node = FakeNode(tmp_path)
    node.start(200)
    assert (node.root / "sys/fs/cgroup/lxc/200").is_dir() and command_sockets(node) == ["200"]


# ---- reboot -----------------------------------------------------------------------------------


def test_reboot_wipes_runtime_state_but_keeps_configs(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"], running=True, onboot=True)
    node.add_vm(102, "lock: backup\n", paused=True)
    node.add_ct(200, running=True, onboot=False)
    node.add_gpu("0000:41:00", group=40, mdev_types=("nvidia-63",), mdev_instances=2)
    node.add_vm(110, hostpci=["41:00.0,mdev=nvidia-63"], running=True)
    types = node.root / "sys/bus/pci/devices/0000:41:00.0/mdev_supported_types/nvidia-63"
    assert (types / "available_instances").read_text() == "1\n"
    (node.root / "var/lib/pve-gpu-hook").mkdir(parents=True)
    (node.root / "var/lib/pve-gpu-hook/state.json").write_text("{}")
    reboot(node)
    assert node.running_guests() == set()
    assert node.reservations() == {}
    assert not any(p.name.isdigit() for p in (node.root / "proc").iterdir())
    assert (node.root / "var/lib/pve-gpu-hook/state.json").exists()
    assert node.config_value(102, "lock") == "backup"
    assert node.driver("0000:01:00.0") == "nvidia"  # host driver again after boot
    assert (types / "available_instances").read_text() == "2\n"
    assert not any((node.root / "sys/bus/mdev/devices").iterdir())
    assert node.reboot(onboot=True) == []
    assert node.running_guests() == {104}


# ---- the vzdump driver ------------------------------------------------------------------------

HOOK = """#!{python}
import json, os, subprocess, sys
from pathlib import Path

root = Path({root!r})
args = sys.argv[1:]
key = " ".join(args[:1] + args[2:3])
actions = root / "hook-actions.json"
act = json.loads(actions.read_text()).get(key, {{}}) if actions.exists() else {{}}
for c in act.get("run", []):
    r = subprocess.run([str(root / "usr/sbin" / c[0]), *c[1:]], env={{}},
                       capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    sys.stdout.flush()
pidfile = root / "run/vzdump.pid"
rec = {{
    "args": args,
    "env": sorted(os.environ),
    "HOSTNAME": os.environ.get("HOSTNAME"),
    "VMTYPE": os.environ.get("VMTYPE"),
    "cts": sorted(l.split("/")[-2] for l in open(root / "proc/net/unix") if "lxc/" in l),
    "vms": sorted(p[:-4] for p in os.listdir(root / "run/qemu-server") if p.endswith(".pid")),
    "pidfile": pidfile.read_text() if pidfile.exists() else None,
}}
with open(root / "hook-record.jsonl", "a") as fh:
    fh.write(json.dumps(rec) + "\\n")
for line in act.get("say", []):
    print(line, flush=True)
for line in act.get("err", []):
    print(line, file=sys.stderr, flush=True)
if act.get("linger"):
    subprocess.Popen(["/bin/sleep", "30"])  # keeps our stdout/stderr open
sys.exit(act.get("exit", 0))
"""


class Hook:
    """A recording hook script: logs argv, env keys and guest states; scripted per phase."""

    def __init__(self, node: FakeNode) -> None:
        self.root = node.root
        path = node.root / "recording-hook"
        path.write_text(HOOK.format(python=sys.executable, root=str(node.root)))
        path.chmod(0o755)
        self.cmd = [str(path)]

    def on(self, key: str, **action: object) -> None:
        """Script the phase ``key`` ("backup-start 102", "job-end"): exit, say, err, run, linger."""
        path = self.root / "hook-actions.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[key] = action
        path.write_text(json.dumps(data))

    def records(self) -> list[dict]:
        path = self.root / "hook-record.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def hook(node: FakeNode) -> Hook:
    return Hook(node)


def test_stopped_vm_stop_mode_phases_and_environment(node: FakeNode, hook: Hook) -> None:
    gpu(node)
    node.add_vm(102, hostpci=["01:00"])
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert out.ok, out.log
    assert out.sequence() == [
        ("job-init", None),
        ("job-start", None),
        ("backup-start", 102),
        ("backup-end", 102),
        ("log-end", 102),
        ("job-end", None),
    ]
    assert out.guests[102].mode == "stop" and out.guests[102].kind == "qemu"
    recs = hook.records()
    assert recs[0]["args"] == ["job-init"]
    assert recs[2]["args"] == ["backup-start", "stop", "102"]
    job_env = {
        "DUMPDIR",
        "LC_ALL",
        "LVM_SUPPRESS_FD_WARNINGS",
        "PVE_GPU_HOOK_ROOT",
        "PYTHONPATH",
        "STOREID",
    }
    assert set(recs[0]["env"]) == job_env
    guest_env = job_env | {"LOGFILE", "TARGET", "VMTYPE"}  # no HOSTNAME: the VM has no name
    assert set(recs[2]["env"]) == guest_env
    assert all("PATH" not in r["env"] for r in recs)
    assert recs[2]["VMTYPE"] == "qemu" and recs[2]["HOSTNAME"] is None
    call = out.hook_calls[2]
    assert call.env["TARGET"].startswith("/var/lib/vz/dump/vzdump-qemu-102-")
    assert call.env["PVE_GPU_HOOK_ROOT"] == str(node.root)
    log = "\n".join(out.log)
    assert "INFO: starting kvm to execute backup task" in log
    assert "INFO: stopping kvm after backup task" in log
    assert not node.is_running(102)
    assert node.config_value(102, "lock") is None
    assert node.driver("0000:01:00.1") == "vfio-pci"  # the paused start bound the group


def test_stopped_vm_backup_fails_while_gpu_is_held(node: FakeNode, hook: Hook) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"], running=True)
    node.add_vm(102, name="gaming", hostpci=["01:00"])
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert not out.ok
    assert out.guests[102].error == "PCI device '0000:01:00.0' already in use by VMID '104'"
    assert out.phases(102) == ["backup-start", "backup-abort", "log-end"]
    assert hook.records()[2]["HOSTNAME"] == "gaming"
    assert (
        "ERROR: Backup of VM 102 failed - PCI device '0000:01:00.0' already in use by VMID '104'"
        in out.log
    )
    assert node.config_value(102, "lock") is None
    # A hook that frees the GPU at backup-start (through the fake qm, emptied env) fixes it.
    hook.on("backup-start 102", run=[["qm", "shutdown", "104", "--timeout", "5"]], say=["freed"])
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert out.ok, out.log
    assert "INFO: freed" in out.log
    assert not node.is_running(104)
    assert [c["argv"] for c in node.calls("qm")] == [["qm", "shutdown", "104", "--timeout", "5"]]


def test_pending_and_template_in_backup_start(node: FakeNode, hook: Hook) -> None:
    gpu(node)
    node.add_vm(104, hostpci=["01:00"], running=True)
    node.add_vm(9000, "template: 1\nhostpci0: 01:00\n")
    node.add_vm(103, "memory: 1024\n\n[PENDING]\nhostpci0: 01:00.1\n")
    out = run_job(node, [103, 9000], hook_cmd=hook.cmd)
    assert out.guests[9000].ok  # templates start with their disks only
    assert out.guests[103].error == "PCI device '0000:01:00.1' already in use by VMID '104'"
    assert node.config_value(103, "hostpci0") == "01:00.1"  # pending was applied first


def test_running_vm_stop_mode(node: FakeNode, hook: Hook) -> None:
    gpu(node)
    node.add_vm(104, name="win11", hostpci=["01:00"], running=True)
    old_pid = node.vm_pid(104)
    out = run_job(node, [104], hook_cmd=hook.cmd)
    assert out.ok, out.log
    assert out.phases(104) == [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ]
    by_phase = {r["args"][0]: r for r in hook.records()}
    assert by_phase["pre-stop"]["vms"] == ["104"]
    assert by_phase["backup-end"]["vms"] == ["104"]  # new QEMU, resumed at once
    assert node.is_running(104) and node.vm_pid(104) != old_pid
    assert node.qmp_status(104) == "running"
    assert node.config_value(104, "lock") is None


def test_running_vm_snapshot_and_suspend_mode(node: FakeNode, hook: Hook) -> None:
    node.add_vm(104, running=True)
    pid = node.vm_pid(104)
    out = run_job(node, [104], "snapshot", hook_cmd=hook.cmd)
    assert out.phases(104) == [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "backup-end",
        "log-end",
    ]
    out = run_job(node, [104], "suspend", hook_cmd=hook.cmd)
    assert out.ok
    assert out.phases(104) == [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ]
    assert node.vm_pid(104) == pid and node.qmp_status(104) == "running"


def test_containers_and_guest_order(node: FakeNode, hook: Hook) -> None:
    node.add_vm(110, running=False)
    node.add_ct(105, hostname="plex", running=True)
    node.add_ct(103)
    node.add_vm(101, running=True)
    node.add_vm(300, node="pve2")
    out = run_job(node, None, hook_cmd=hook.cmd, exclude=[101])
    assert out.ok, out.log
    assert list(out.guests) == [103, 105, 110]
    assert out.phases(103) == ["backup-start", "backup-end", "log-end"]
    assert out.phases(105) == [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ]
    recs = {(r["args"][0], r["args"][2]): r for r in hook.records() if len(r["args"]) == 3}
    assert recs[("backup-end", "105")]["cts"] == []  # stopped during its backup
    assert recs[("post-restart", "105")]["cts"] == ["105"]
    assert recs[("pre-stop", "105")]["HOSTNAME"] == "plex"
    assert recs[("backup-start", "103")]["HOSTNAME"] == "CT103"
    assert recs[("backup-start", "103")]["VMTYPE"] == "lxc"
    assert node.running_guests() == {101, 105}
    out = run_job(node, [105], "snapshot", hook_cmd=hook.cmd)
    assert out.phases(105) == [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "backup-end",
        "log-end",
    ]


def test_failure_path(node: FakeNode, hook: Hook) -> None:
    node.add_ct(105, running=True)
    node.add_vm(106)
    hook.on("backup-start 106", exit=1, say=["working"], err=["pve-gpu-hook: cannot free it"])
    hook.on("backup-end 105", exit=3)
    out = run_job(node, [105, 106], hook_cmd=hook.cmd)
    assert not out.ok
    # backup-end failed after the CT was stopped: the restart still happens, then backup-abort.
    assert out.phases(105) == [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "backup-abort",
        "log-end",
    ]
    assert node.is_running(105)
    assert out.phases(106) == ["backup-start", "backup-abort", "log-end"]
    assert out.guests[106].error == "pve-gpu-hook: cannot free it"
    assert "INFO: working" in out.log and "INFO: pve-gpu-hook: cannot free it" in out.log
    failed = [line for line in out.log if line.startswith("ERROR: Backup of VM 106 failed")]
    assert failed == [
        f"ERROR: Backup of VM 106 failed - command '{hook.cmd[0]} backup-start stop 106' "
        "failed: exit code 1"
    ]
    assert out.phases()[-1] == "job-end"
    assert node.config_value(105, "lock") is None and node.config_value(106, "lock") is None


def test_failing_pre_restart_in_cleanup_leaves_the_guest_off(node: FakeNode, hook: Hook) -> None:
    node.add_ct(105, running=True)
    hook.on("pre-restart 105", exit=1)
    out = run_job(node, [105], hook_cmd=hook.cmd)
    assert out.phases(105) == ["backup-start", "pre-stop", "backup-end", "pre-restart", "log-end"]
    assert not node.is_running(105)


def test_job_phase_failures(node: FakeNode, hook: Hook) -> None:
    node.add_vm(102)
    hook.on("job-init", exit=1)
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert not out.ok and out.phases() == ["job-init"]
    hook.on("job-init")
    hook.on("job-start", exit=1)
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert not out.ok and out.phases() == ["job-init", "job-start", "job-abort"]
    hook.on("job-start")
    hook.on("job-end", exit=1)
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert not out.ok
    assert out.phases()[-2:] == ["job-end", "job-abort"]
    hook.on("job-end")
    hook.on("log-end 102", exit=1)
    hook.on("backup-abort 102", exit=1)
    assert run_job(node, [102], hook_cmd=hook.cmd).ok  # log-end failure is a warning only


def test_abort_during_backup(node: FakeNode, hook: Hook) -> None:
    gpu(node)
    node.add_vm(102, hostpci=["01:00"])
    node.add_vm(103)
    out = run_job(node, [102, 103], hook_cmd=hook.cmd, abort_during=102)
    assert out.aborted and not out.ok
    assert out.sequence()[2:] == [
        ("backup-start", 102),
        ("backup-abort", 102),
        ("log-end", 102),
        ("job-abort", None),
    ]
    assert out.guests[102].error == "interrupted by signal"
    assert 103 not in out.guests
    assert not node.is_running(102) and node.reservations() == {}
    assert node.config_value(102, "lock") is None


def test_crash_leaves_lock_and_paused_qemu(node: FakeNode, hook: Hook) -> None:
    gpu(node)
    node.add_vm(102, hostpci=["01:00"])
    out = run_job(node, [102], hook_cmd=hook.cmd, crash_after=("backup-start", 102))
    assert out.crashed and not out.ok
    assert out.phases()[-1] == "backup-start"
    assert node.config_value(102, "lock") == "backup"
    assert not node.is_running(102)
    # The next job trips over the leftover lock, as in PVE.
    out = run_job(node, [102], hook_cmd=hook.cmd)
    assert out.guests[102].error == "VM is locked (backup)"
    assert out.phases(102) == ["backup-abort", "log-end"]
    cmd(node, "qm", "unlock", 102)
    out = run_job(node, [102], hook_cmd=hook.cmd, crash_after=("archive", 102))
    assert out.crashed and node.qmp_status(102) == "prelaunch"
    assert set(node.reservations()) == {"0000:01:00.0", "0000:01:00.1"}


def test_ha_managed_guest_is_refused_in_stop_mode(node: FakeNode, hook: Hook) -> None:
    node.add_vm(104, name="ha", running=True)
    node.set_ha(104)
    out = run_job(node, [104], hook_cmd=hook.cmd)
    assert out.guests[104].error == (
        "Cannot execute a backup with stop mode on a HA managed and enabled Service. "
        "Use snapshot mode or disable the Service."
    )
    assert out.phases(104) == ["backup-abort", "log-end"]
    rec = hook.records()[2]
    assert rec["args"] == ["backup-abort", "stop", "104"] and rec["VMTYPE"] is None
    assert node.config_value(104, "lock") is None and node.is_running(104)
    assert run_job(node, [104], "snapshot", hook_cmd=hook.cmd).ok


def test_hook_leaving_pipes_open_is_reported_not_hung(
    node: FakeNode, hook: Hook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vzdump, "PIPE_GRACE", 0.5)
    hook.on("job-start", linger=True, say=["bye"])
    t0 = time.monotonic()
    out = run_job(node, [], hook_cmd=hook.cmd)
    assert time.monotonic() - t0 < 10
    assert not out.ok
    assert out.errors == ["job-start: hook left its output pipes open"]
    assert "INFO: bye" in out.log


def test_output_order_and_no_hook(node: FakeNode, hook: Hook) -> None:
    node.add_vm(102)
    hook.on("backup-start 102", say=["one"], err=["two"])
    out = run_job(node, [102], hook_cmd=hook.cmd)
    i = out.log.index("INFO: one")
    assert out.log[i + 1] == "INFO: two"
    assert out.hook_calls[2].stdout == ["one"] and out.hook_calls[2].stderr == ["two"]
    plain = run_job(node, [102], hook_cmd=[])
    assert plain.ok and plain.hook_calls == []


# ---- the job's identity: pid file, UPID, task log, guest logs (docs/pve-facts.md §3) -----------


def task_log(node: FakeNode, upid: str) -> list[str]:
    return (
        (node.root / f"var/log/pve/tasks/{upid.split(':')[4][7]}/{upid}").read_text().splitlines()
    )


def test_job_identity_as_pve_writes_it(node: FakeNode, hook: Hook) -> None:
    node.add_vm(150, name="plain")
    node.add_ct(151, hostname="web", running=True)
    hook.on("job-init", say=["job-init says hello"])
    options = {"notes-template": "{{guestname}}: it's nightly", "quiet": "1"}
    out = run_job(node, [151, 150], hook_cmd=hook.cmd, job_options=options)
    assert out.ok, out.log
    # UPID:<node>:<pid>:<pstart>:<starttime>:vzdump:<id>:<user>: (pve-common PVE/UPID.pm)
    _, name, pid, pstart, started, kind, vmid, user, end = out.upid.split(":")
    assert (name, kind, vmid, user, end) == ("pve1", "vzdump", "", "root@pam", "")
    assert int(pid, 16) == out.worker and len(pstart) == len(started) == 8
    # the pid file: after the node lock (not at job-init), gone after a fully successful job
    pidfiles = {r["args"][0]: r["pidfile"] for r in hook.records()}
    assert pidfiles["job-init"] is None
    assert pidfiles["job-start"] == pidfiles["log-end"] == pidfiles["job-end"] == out.upid
    assert not (node.root / "run/vzdump.pid").exists()
    assert not (node.root / f"proc/{out.worker}").exists()  # the worker has ended
    # the task log: job-init output before the job line, the options in any order
    lines = task_log(node, out.upid)
    assert lines[0] == "INFO: job-init says hello"
    assert lines[1].startswith("INFO: starting new backup job: vzdump 151 150 --")
    words = shlex.split(lines[1].split(": ", 2)[2])
    assert dict(zip(words[3::2], words[4::2], strict=True)) == {
        "--mode": "stop",
        "--storage": "local",
        "--notes-template": "{{guestname}}: it's nightly",
        "--quiet": "1",
    }
    assert lines[-1] == "TASK OK"
    # each guest's log: its own lines with a time stamp, ending with its duration
    guest = (node.root / "var/log/vzdump/lxc-151.log").read_text().splitlines()
    assert guest[0].endswith(" INFO: Starting Backup of VM 151 (lxc)")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO: status = running", guest[1])
    assert re.search(r" INFO: Finished Backup of VM 151 \(00:00:0\d\)$", guest[-1])
    assert not any("Backup started at" in line for line in guest)  # task log only


def test_a_one_guest_job_and_a_waiting_job(node: FakeNode, hook: Hook) -> None:
    node.add_vm(150)
    lock = os.open(node.root / "run/vzdump.lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another job holds the node lock
    threading.Timer(1.5, os.close, [lock]).start()
    out = run_job(node, [150], hook_cmd=hook.cmd, rng=random.Random(1))
    assert out.ok and out.upid.endswith(":vzdump:150:root@pam:")  # the VMID of a 1-guest job
    lines = task_log(node, out.upid)
    assert lines[:2] == ["INFO: trying to get global lock - waiting...", "INFO: got global lock"]
    assert lines[2].startswith("INFO: starting new backup job: vzdump 150 --")


def test_pid_file_stays_after_a_failed_job_and_a_crash(node: FakeNode, hook: Hook) -> None:
    node.add_vm(150)
    hook.on("backup-start 150", exit=1)
    failed = run_job(node, [150], hook_cmd=hook.cmd)
    assert not failed.ok
    assert (node.root / "run/vzdump.pid").read_text() == failed.upid
    assert task_log(node, failed.upid)[-1] == "TASK ERROR: job errors"
    hook.on("backup-start 150")
    crashed = run_job(node, [150], hook_cmd=hook.cmd, crash_after=("backup-start", 150))
    assert crashed.crashed
    assert (node.root / "run/vzdump.pid").read_text() == crashed.upid
    assert not (node.root / f"proc/{crashed.worker}").exists()
    assert not task_log(node, crashed.upid)[-1].startswith("TASK")  # nobody wrote its end
    assert node.config_value(150, "lock") == "backup"  # left by the killed vzdump
    cmd(node, "qm", "unlock", 150)
    hung = run_job(node, [150], hook_cmd=hook.cmd, hang_after=("backup-start", 150))
    assert (node.root / "run/vzdump.pid").read_text() == hung.upid
    assert (
        node.root / f"proc/{hung.worker}/cmdline"
    ).read_bytes() == f"task {hung.upid}\0".encode()


def test_guest_log_survives_an_early_failure(node: FakeNode, hook: Hook) -> None:
    """The HA refusal comes before vzdump opens the guest's log: the old one stays."""
    node.add_vm(150, running=True)
    node.set_fault(150, backup_delay=1.2)
    assert run_job(node, [150], "snapshot", hook_cmd=()).ok
    log = node.root / "var/log/vzdump/qemu-150.log"
    before = log.read_text()
    assert re.search(r"Finished Backup of VM 150 \(00:00:0[1-3]\)\n$", before)
    node.set_ha(150)
    refused = run_job(node, [150], "stop", hook_cmd=hook.cmd)
    assert "Cannot execute a backup with stop mode on a HA managed" in (
        refused.guests[150].error or ""
    )
    assert log.read_text() == before


def test_job_line_options_follow_perls_random_order(node: FakeNode) -> None:
    node.add_vm(150)
    lines = set()
    for seed in range(8):
        out = run_job(node, None, hook_cmd=(), exclude=[101], rng=random.Random(seed))
        line = next(x for x in out.log if "starting new backup job" in x)
        words = shlex.split(line.split(": ", 2)[2])
        assert words[0] == "vzdump" and dict(zip(words[1::2], words[2::2], strict=True)) == {
            "--mode": "stop",
            "--storage": "local",
            "--all": "1",
            "--exclude": "101",
        }
        lines.add(line)
    assert len(lines) > 1


# ---- start and shutdown time limits (docs/pve-facts.md §8) -------------------------------------


def test_config_aware_timeout_as_qemu_server() -> None:
    def cat(text: str, resume: bool = False) -> int:
        return Pve.config_aware_timeout(parse_config(text), resume)

    assert cat("") == 30
    assert (
        cat("memory: 16384\nhostpci0: 01:00\nnet0: virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0\n") == 125
    )
    assert cat("memory: 65536\nhostpci0: 01:00\nnet0: virtio,bridge=vmbr0\n") == 261
    assert cat("memory: current=131072\nhostpci3: 01:00\nnet0: e\nnet1: e\n") == 522
    assert cat("memory: 4096\nhugepages: 2\n") == 150
    assert cat("memory: 4096\n", resume=True) == 300


def test_start_reserves_for_its_timeout_and_fails_after_it(node: FakeNode) -> None:
    gpu(node)
    node.add_vm(107, memory="65536", hostpci=["01:00"], net0="virtio,bridge=vmbr0")
    node.set_time_scale(0.1)
    node.set_fault(107, start_delay=10)  # 1 s
    started = threading.Thread(target=cmd, args=(node, "qm", "start", 107))
    started.start()
    deadline = time.monotonic() + 5
    while not node.reservations() and time.monotonic() < deadline:
        time.sleep(0.01)
    # PCI.pm reserve_pci_usage: time:<now + config_aware_timeout + 5>, scaled: 266 * 0.1 s
    entry = node.reservations()["0000:01:00.0"]
    assert entry["vmid"] == 107 and time.time() + 24 <= entry["time"] <= time.time() + 28
    started.join()
    assert node.is_running(107) and "pid" in node.reservations()["0000:01:00.0"]
    node.stop(107)
    node.set_fault(107, start_delay=300)  # more than PVE allows (261)
    t0 = time.monotonic()
    res = cmd(node, "qm", "start", 107, "--timeout", 20)  # qm start --timeout replaces it
    assert 2 <= time.monotonic() - t0 < 10
    assert res.returncode == 255
    assert res.stderr == "start failed: command '/usr/bin/kvm -id 107 ...' failed: got timeout\n"
    assert not node.is_running(107) and node.reservations() == {}


def test_qm_shutdown_with_the_guest_agent_can_take_twice_the_timeout(node: FakeNode) -> None:
    node.set_time_scale(0.1)
    node.add_vm(104, running=True, agent="1")
    # the agent answers guest-shutdown after 8 s; the VM powers off 8 s later
    node.set_fault(104, agent_reply_delay=8, shutdown_delay=16)
    t0 = time.monotonic()
    res = cmd(node, "qm", "shutdown", 104, "--timeout", 10)
    assert res.returncode == 0 and time.monotonic() - t0 >= 1.6
    assert not node.is_running(104)
    # the same guest without the agent: the 16 s exceed the 10 s of polling
    node.add_vm(105, running=True)
    node.set_fault(105, shutdown_delay=16)
    res = cmd(node, "qm", "shutdown", 105, "--timeout", 10)
    assert (res.returncode, res.stderr) == (255, "VM quit/powerdown failed - got timeout\n")
    # an agent that does not answer within the timeout: the command fails
    node.start(104)
    node.set_fault(104, agent_reply_delay=12, shutdown_delay=30)
    res = cmd(node, "qm", "shutdown", 104, "--timeout", 10)
    assert (res.returncode, res.stderr) == (255, "VM quit/powerdown failed\n")
    # an agent that is not running: a warning after its 3 s ping, then ACPI
    node.set_fault(104, agent_down=True, agent_reply_delay=None, shutdown_delay=2)
    res = cmd(node, "qm", "shutdown", 104, "--timeout", 10)
    assert res.returncode == 0 and "QEMU Guest Agent is not running" in res.stderr


def test_qm_shutdown_without_timeout_uses_startup_down(node: FakeNode) -> None:
    node.set_time_scale(0.1)
    node.add_vm(104, running=True, startup="order=1,down=5")
    node.set_fault(104, shutdown_delay=8)
    res = cmd(node, "qm", "shutdown", 104)
    assert (res.returncode, res.stderr) == (255, "VM quit/powerdown failed - got timeout\n")
    assert cmd(node, "qm", "shutdown", 104, "--timeout", 10).returncode == 0


def test_pct_shutdown_can_take_twice_the_timeout_and_more(node: FakeNode) -> None:
    node.set_time_scale(0.1)
    node.add_ct(200, running=True)
    node.set_fault(200, shutdown_delay=20)  # lxc-stop gives up at 10 s, the poll sees it at 20
    res = cmd(node, "pct", "shutdown", 200, "--timeout", 10)
    assert res.returncode == 0 and "lxc-stop -n 200 --nokill --timeout 10" in res.stderr
    assert not node.is_running(200)
    node.start(200)
    node.set_fault(200, shutdown_delay=30)  # beyond 2 T + 5
    res = cmd(node, "pct", "shutdown", 200, "--timeout", 10)
    assert res.returncode == 255 and res.stderr.endswith("container did not stop\n")
