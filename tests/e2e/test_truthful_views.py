"""Every answer is true: scan and dry-run say when a backup will fail and why, show mapping pools
as they are, the GPU's own health, and print tables that fit a console and parse with awk."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.e2e.test_hook import MAPPING
from tests.fronts import FAST, REPO, cli, commands, hook_lines, seed_node
from tests.sim.node import FakeNode
from tests.sim.vzdump import run_job
from tools.demo import build_demo_node

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def dry_run(node: FakeNode, *argv: str) -> tuple[int, dict]:
    result = cli(node, "dry-run", *argv, "--output-format", "json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def guest(data: dict, vmid: int) -> dict:
    return next(g for g in data["guests"] if g["vmid"] == vmid)


# ---- item 2: dry-run predicts failures; the hook says why and stops nobody ----------------------


def test_missing_device_fails_the_forecast_and_the_hook_stops_nobody(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(120, name="broken", hostpci=["01:00.0", "09:00.0"])  # 01:00.0 is VM 104's
    code, data = dry_run(node, "120", "--mode", "stop")
    assert code == 1 and data["ok"] is False
    forecast = guest(data, 120)
    assert forecast["outcome"] == "fail" and forecast["stops"] == []
    assert forecast["reason"] == "vzdump will fail: hostpci1: no PCI device found for '09:00.0'"
    assert [n["failure"] for n in forecast["needs"]] == [None, "no PCI device found for '09:00.0'"]
    text = cli(node, "dry-run", "120")
    assert text.returncode == 1
    assert "VM 120 (broken): fail: vzdump will fail: hostpci1: no PCI device found" in text.stdout

    job = run_job(node, [120], mode="stop")
    assert not job.guests[120].ok
    assert "no PCI device found for '09:00.0'" in (job.guests[120].error or "")
    said = [line for line in hook_lines(job) if "PVE will not start" in line]
    conf = node.root / "etc/pve/qemu-server/120.conf"
    assert said == [
        f"INFO: pve-gpu-hook: warning: {conf}:3: hostpci1: PVE will not start VM 120 (broken): "
        "no PCI device found for '09:00.0'; its backup fails, so no guest is stopped for it"
    ]
    assert commands(node, "shutdown") == [] and node.running_guests() == {104}


def test_no_iommu(tmp_path: Path) -> None:
    node = FakeNode(tmp_path, iommu=False)
    node.write_override(FAST)
    node.add_gpu("0000:01:00", group=None)
    node.add_vm(102, hostpci=["01:00"])
    code, data = dry_run(node, "102")
    assert code == 1
    assert guest(data, 102)["reason"] == (
        "vzdump will fail: hostpci0: cannot prepare PCI pass-through, IOMMU not present"
    )
    scan = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    assert [w for w in scan["warnings"] if w.startswith("no IOMMU")] == [
        f"no IOMMU: {tmp_path}/sys/class/iommu is empty (IOMMU off in the firmware or on the "
        "kernel command line): PVE starts no VM with a PCI device ('cannot prepare PCI "
        "pass-through, IOMMU not present'), so VM 102 cannot start, nor be backed up while stopped"
    ]
    job = run_job(node, [102])
    assert job.guests[102].error == "cannot prepare PCI pass-through, IOMMU not present"


def test_line_pve_drops_stops_nobody(tmp_path: Path) -> None:
    """A hostpci value failing PVE's format: PVE reads the config without it and starts the VM
    without the device, so nobody must stop for it (the hook used to stop VM 104)."""
    node = seed_node(tmp_path)
    node.add_vm(120, hostpci=["01:00.0,pcie=maybe"])
    code, data = dry_run(node, "120")
    assert code == 0 and guest(data, 120)["stops"] == [] and guest(data, 120)["needs"] == []
    assert any("PVE ignores this line (pcie=maybe: not a boolean" in w for w in data["warnings"])
    job = run_job(node, [120], mode="stop")
    assert job.guests[120].ok
    assert commands(node, "shutdown") == []


def test_broken_mapping_is_blamed_on_its_pci_cfg_line(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING.replace("path=0000:02:00.0", "path=0000:07:00.0"))
    node.add_vm(120, hostpci=["mapping=gpu"])
    node.add_vm(121, hostpci=["mapping=gpu"])
    code, data = dry_run(node, "120", "121")
    assert code == 1
    failure = (
        "PCI device mapping invalid (hardware probably changed): "
        "pci device '0000:07:00.0' not found"
    )
    assert guest(data, 120)["reason"] == f"vzdump will fail: hostpci0: {failure}"
    pci_cfg = f"{tmp_path}/etc/pve/mapping/pci.cfg:3"
    assert not any("PVE will not start" in w for w in data["warnings"])  # a reason, not a warning
    text = cli(node, "dry-run", "120").stdout
    assert f"VM 120: fail: vzdump will fail: hostpci0: {failure} ({pci_cfg})" in text
    scan = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    blamed = [w for w in scan["warnings"] if "0000:07:00.0" in w]
    assert len(blamed) == 1 and blamed[0].startswith(f"{pci_cfg}: mapping 'gpu' does not match")
    assert blamed[0].endswith("PVE cannot start VM 120 and VM 121 (mapping 'gpu')")
    job = run_job(node, [120])
    assert not job.guests[120].ok and commands(node, "shutdown") == []


def test_mapping_pve_ignores_is_blamed_on_its_pci_cfg_line(tmp_path: Path) -> None:
    """A mapping whose only map line fails its format (no id=) is dropped by PVE: its users
    fail with 'mapping not found', and the line to fix is pci.cfg's, said once; a mapping
    without a line for this node likewise."""
    node = seed_node(tmp_path)
    node.set_mapping(
        "gpu\n\tmap node=pve1,path=0000:01:00.0,iommugroup=14\n"
        "\nother\n\tmap node=pve2,path=0000:01:00.0,id=10de:2204\n"
    )
    node.add_vm(120, hostpci=["mapping=gpu"])
    node.add_vm(121, hostpci=["mapping=gpu"])
    node.add_vm(122, hostpci=["mapping=other"])
    pci_cfg = f"{tmp_path}/etc/pve/mapping/pci.cfg"
    scan = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    assert [w for w in scan["warnings"] if "'gpu'" in w or "'other'" in w] == [
        f"{pci_cfg}:2: mapping 'gpu': map line ignored: id= is missing",
        f"{pci_cfg}:1: mapping 'gpu': PVE ignores it, it has no valid map line; PVE cannot start "
        "VM 120 and VM 121 (mapping 'gpu')",
        f"{pci_cfg}:4: mapping 'other' has no map line for node pve1: PVE cannot start VM 122 "
        "(mapping 'other')",
    ]
    assert not any("qemu-server/12" in w for w in scan["warnings"])  # not the guests' lines
    code, data = dry_run(node, "120", "122")
    assert code == 1
    assert guest(data, 120)["reason"] == (
        "vzdump will fail: hostpci0: PCI device mapping not found for 'gpu' (PVE ignores mapping "
        "'gpu': it has no valid map line)"
    )
    text = cli(node, "dry-run", "120", "122").stdout
    assert f"it has no valid map line) ({pci_cfg}:1)" in text
    assert f"has no map line for node pve1) ({pci_cfg}:4)" in text
    job = run_job(node, [120], mode="stop")
    assert not job.guests[120].ok and commands(node, "shutdown") == []
    assert "PCI device mapping not found for 'gpu'" in (job.guests[120].error or "")
    said = [line for line in hook_lines(job) if "PVE will not start" in line]
    assert len(said) == 1 and said[0].startswith(
        f"INFO: pve-gpu-hook: warning: {pci_cfg}:1: hostpci0: PVE will not start VM 120"
    )


def test_template_is_backed_up_without_its_devices(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(9000, name="tpl", hostpci=["01:00.0"], template=True)
    code, data = dry_run(node, "9000")
    assert code == 0
    assert guest(data, 9000)["outcome"] == "ok"
    assert guest(data, 9000)["reason"] == "template: backed up without its devices"
    text = cli(node, "dry-run", "9000").stdout
    assert "VM 9000 (tpl): ok: template: backed up without its devices" in text
    assert "skip" not in text


# ---- the GPU's own health -----------------------------------------------------------------------


def test_power_state_and_reset_method(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.set_pci_attribute("0000:01:00.0", "power_state", "D0")
    node.set_pci_attribute("0000:01:00.0", "reset_method", "flr bus")
    node.add_gpu("0000:02:00", group=15, power_state="D3cold", reset_method="bus")
    node.add_gpu("0000:03:00", group=16, power_state="D0", reset_method="", vendor="1002")
    node.add_vm(110, hostpci=["02:00"])
    node.add_vm(111, name="amd", hostpci=["03:00"], running=True)
    node.add_vm(112, hostpci=["03:00"])
    scan = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    devices = {d["address"]: d for d in scan["devices"]}
    assert (devices["0000:01:00"]["power_state"], devices["0000:01:00"]["reset_method"]) == (
        "D0",
        ["flr", "bus"],
    )
    assert devices["0000:02:00"]["power_state"] == "D3cold"
    assert devices["0000:03:00"]["reset_method"] == []
    warnings = [w for w in scan["warnings"] if "D3cold" in w or "reset method" in w]
    assert warnings == [
        "0000:02:00 is in power state D3cold: the next start of a VM with it may fail with "
        "'Unable to change power state from D3cold to D0, device inaccessible' (passed through "
        "by VM 110)",
        "0000:03:00 has no reset method (its reset_method is empty): a VM that stops may leave it "
        "unusable until the host reboots (as with the AMD reset bug), so a guest shut down to "
        "free it may not start again (passed through by VM 111 and VM 112)",
    ]
    rows = {
        line.split()[0]: line.split()
        for line in cli(node, "scan", "--noheader").stdout.splitlines()
        if len(line.split()) == 7
    }
    assert rows["0000:01:00"][4:6] == ["D0", "flr,bus"]
    assert rows["0000:02:00"][4:6] == ["D3cold", "bus"]
    assert rows["0000:03:00"][4:6] == ["D0", "none"]
    node.set_pci_attribute("0000:01:00.0", "power_state", None)
    node.set_pci_attribute("0000:01:00.0", "reset_method", None)
    rows = [line.split() for line in cli(node, "scan", "--noheader").stdout.splitlines()]
    assert ["0000:01:00", "10de:2204", "14", "vfio-pci", "unknown", "unknown", "104"] in rows

    # tonight's job: 110's backup starts a GPU in D3cold; 111 is shut down for 112's backup
    code, data = dry_run(node, "110", "112", "--mode", "stop")
    assert code == 0  # warned, not failed: a device in D3cold may come back
    tonight = [w for w in data["warnings"] if "tonight" in w]
    assert len(tonight) == 2
    assert tonight[0].startswith("warning: 0000:02:00 is in power state D3cold")
    assert tonight[0].endswith("(tonight: the backup of VM 110 starts it)")
    assert tonight[1].startswith("warning: 0000:03:00 has no reset method")
    assert tonight[1].endswith(
        "(tonight: VM 111 (amd) is shut down to free it; the backup of VM 112 starts it)"
    )


# ---- item 5: mapping pools shown as they are ----------------------------------------------------


def pool_node(root: Path) -> FakeNode:
    """Two cards in one mapping; VM 105 (mapped) runs and holds the first; VM 104 holds nothing
    now; VM 106 is mapped and stopped; VM 102 passes the second card through."""
    node = seed_node(root)
    node.stop(104)
    node.add_gpu("0000:41:00", group=40, functions=("0", "1"))
    node.set_mapping(
        "gpu\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\tmap node=pve1,path=0000:41:00.0,id=10de:2204,iommugroup=40\n"
    )
    node.add_vm(105, name="mapped-run", hostpci=["mapping=gpu"], running=True)
    node.add_vm(106, name="mapped-off", hostpci=["mapping=gpu"])
    node.add_vm(107, hostpci=["41:00.0"])
    return node


def test_running_mapped_vm_is_shown_on_the_card_it_holds(tmp_path: Path) -> None:
    node = pool_node(tmp_path)
    data = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    devices = {d["address"]: d for d in data["devices"]}
    assert devices["0000:01:00"]["held_by"] == [105] and devices["0000:41:00"]["held_by"] == []
    claims = {(c["vmid"], address): c for address, d in devices.items() for c in d["claims"]}
    assert (claims[(105, "0000:01:00")]["held"], claims[(105, "0000:41:00")]["held"]) == (
        True,
        False,
    )
    assert claims[(105, "0000:01:00")]["picked"] is True
    # VM 106 would get the second card now: the first is VM 105's
    assert claims[(106, "0000:41:00")]["picked"] is True
    assert claims[(106, "0000:01:00")]["picked"] is False
    rows = [
        line.split()
        for line in cli(node, "scan", "--noheader").stdout.splitlines()
        if len(line.split()) == 8
    ]
    use = {(r[0], r[1]): r[7] for r in rows}
    assert use[("0000:01:00", "105")] == "holds" and use[("0000:41:00", "105")] == "alt"
    assert use[("0000:41:00", "106")] == "next" and use[("0000:01:00", "106")] == "alt"

    # scan 107: VM 105 runs, but it does not hold 107's card
    detail = json.loads(cli(node, "scan", "107", "--output-format", "json").stdout)
    assert [(c["vmid"], c["running"], c["held"]) for c in detail["conflicts"]] == [
        (105, True, False),
        (106, False, False),
    ]
    assert detail["would_stop"] == []
    text = cli(node, "scan", "107").stdout
    assert "every device VM 107 needs is free now" in text


def test_dry_run_says_which_alternative_it_gets(tmp_path: Path) -> None:
    node = pool_node(tmp_path)
    code, data = dry_run(node, "106", "--mode", "stop")
    assert code == 0
    forecast = guest(data, 106)
    assert forecast["needs"] == [
        {
            "source": "hostpci0",
            "mapping": "gpu",
            "alternatives": [["0000:01:00.0"], ["0000:41:00.0"]],
            "picked": 1,
            "failure": None,
        }
    ]
    assert forecast["devices"] == ["0000:01:00.0", "0000:41:00.0"]  # every address it names
    text = cli(node, "dry-run", "106", "105").stdout
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:3].isdigit()}
    assert rows["106"][3] == "0000:41:00.0" and rows["105"][3] == "0000:01:00.0"
    assert (
        "VM 106 (mapped-off) gets 0000:41:00.0 of mapping gpu (hostpci0; alternative 2 of 2; "
        "the others: 0000:01:00.0)"
    ) in text
    assert "VM 105 (mapped-run) holds 0000:01:00.0 of mapping gpu" in text
    # when both cards are taken, the one the hook frees is the one shown
    node.start(107)
    code, data = dry_run(node, "106", "--mode", "stop")
    assert guest(data, 106)["needs"][0]["picked"] == 0
    assert guest(data, 106)["stops"] == [{"vmid": 105, "address": "0000:01:00.0"}]


def test_stop_mode_restart_of_a_mapped_vm_shows_the_device_it_comes_back_with(
    tmp_path: Path,
) -> None:
    """vzdump restarts a running VM backed up in stop mode, and PVE then takes the mapping's first
    free device: dry-run shows that one, with the hook's own words, not the one held now."""
    node = seed_node(tmp_path, FAST + "restart: after-job\n")
    node.stop(104)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(107, hostpci=["01:00.0"], running=True)
    node.add_vm(109, hostpci=["mapping=gpu"], running=True)  # 01:00.0 is 107's: it gets 02:00.0
    node.add_vm(101, hostpci=["01:00.0"])
    # the hook stops 107 for 101 and starts it again before vzdump restarts 109
    text = cli(node, "dry-run", "101", "109", "--mode", "stop").stdout
    assert (
        "VM 109: VM 107 is started again before vzdump restarts it, to take its device back first"
    ) in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:3].isdigit()}
    assert rows["109"][3] == "0000:02:00.0"
    node.stop(107)  # now 01:00.0 is free: the restart takes it
    move = (
        "VM 109 will take 0000:01:00.0 (mapping gpu: PVE takes the first free device; it held "
        "0000:02:00.0) at vzdump's restart"
    )
    text = cli(node, "dry-run", "109", "--mode", "stop").stdout
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:3].isdigit()}
    assert rows["109"][3] == "0000:01:00.0"
    assert move in text and "holds" not in text
    code, data = dry_run(node, "109", "--mode", "stop")
    assert code == 0 and guest(data, 109)["needs"][0]["picked"] == 0
    job = run_job(node, [109], mode="stop")
    assert job.guests[109].ok
    assert f"INFO: pve-gpu-hook: note: {move}" in hook_lines(job)


# ---- item 6 (scan): onboot guests that can take each other's device -----------------------------


def test_boot_order_decides_who_gets_the_card(tmp_path: Path) -> None:
    node = pool_node(tmp_path)
    node.stop(105)
    for vmid, order in ((104, 2), (105, 1)):
        path = tmp_path / f"etc/pve/qemu-server/{vmid}.conf"
        path.write_text(path.read_text() + f"onboot: 1\nstartup: order={order}\n")
    data = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    found = [w for w in data["warnings"] if "onboot" in w]
    assert found == [
        "VM 104 (win11) and VM 105 (mapped-run) both have onboot: 1 and can take each other's "
        "device: whichever starts first (startup order, then VMID) takes 0000:01:00.0; at boot: "
        "VM 105 (mapped-run) takes 0000:01:00.0; VM 104 (win11) cannot start: 0000:01:00.0 is "
        "taken by VM 105 (mapped-run)"
    ]
    # the simulator's boot agrees
    failures = node.reboot(onboot=True)
    assert node.running_guests() == {105}
    assert failures == ["104: PCI device '0000:01:00.0' already in use by VMID '105'"]


# ---- item 7: tables that fit, and parse with awk ------------------------------------------------


def run_in_terminal(node: FakeNode, columns: int, *argv: str) -> str:
    """The command in a pseudo-terminal of ``columns`` columns, as an admin sees it."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of that size, no COLUMNS to override it
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(TERM="xterm", PVE_GPU_HOOK_ROOT=str(node.root), PYTHONPATH=str(REPO))
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "pvegpuhook", *argv], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


def values(data: object, keys: tuple[str, ...]) -> list[object]:
    """Every value of those keys anywhere in a JSON document."""
    found: list[object] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += [value] if key in keys else values(value, keys)
    elif isinstance(data, list):
        for item in data:
            found += values(item, keys)
    return found


@pytest.fixture
def demo(tmp_path: Path) -> FakeNode:
    node = build_demo_node(tmp_path)
    node.add_gpu("0000:41:00", group=40, functions=("0", "1"))
    node.set_mapping(
        "gpu\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\tmap node=pve1,path=0000:41:00.0,id=10de:2204,iommugroup=40\n"
    )
    node.add_vm(107, name="mapped-a", hostpci=["mapping=gpu"], onboot=True)
    node.add_vm(108, name="mapped-b", hostpci=["mapping=gpu"], onboot=True, running=True)
    return node


@pytest.mark.parametrize("columns", [80, 160])
@pytest.mark.parametrize(
    "argv", [["scan"], ["scan", "107"], ["dry-run", "--all", "--mode", "stop"]]
)
def test_terminal_tables_never_cut_an_address_or_vmid(
    demo: FakeNode, columns: int, argv: list[str]
) -> None:
    out = run_in_terminal(demo, columns, *argv)
    assert "…" not in out and "..." not in out
    for line in out.splitlines():
        assert len(line.rstrip()) <= columns, line
    words = set(re.findall(r"[\w:.-]+", out))
    machine = json.loads(cli(demo, *argv, "--output-format", "json").stdout)
    if argv == ["scan"]:  # the claims table names each device, not the function claimed
        shown = json.dumps([d["address"] for d in machine["devices"]])
    else:
        shown = json.dumps(list(values(machine, ("address", "devices", "with"))))
    addresses = set(re.findall(r"0000:[0-9a-f]{2}:[0-9a-f]{2}(?:\.[0-7])?", shown))
    vmids = {"102", "103", "104", "105", "106", "107", "108", "200", "9000"}  # claim a GPU
    if argv[0] == "dry-run":
        vmids.add("110")
    elif argv == ["scan", "107"]:
        vmids -= {"106", "200"}
    assert addresses and addresses <= words, addresses - words  # every one printed whole
    assert vmids <= words, vmids - words
    if columns == 160:
        assert "─" in out  # the rich table, not the plain fallback
    rows = [set(line.split()) for line in out.splitlines()]
    if argv == ["scan"]:  # one line per device and guest claiming it, however narrow
        for device in machine["devices"]:
            for claim in device["claims"]:
                assert any({device["address"], str(claim["vmid"])} <= r for r in rows), claim
    elif argv[0] == "dry-run":  # one line per guest, with its outcome
        for forecast in machine["guests"]:
            assert any({str(forecast["vmid"]), forecast["outcome"]} <= r for r in rows)


LONG_NAME = "a-very-long-guest-name-for-the-windows-gaming-machine"


@pytest.mark.parametrize(
    ("argv", "whole"),
    [
        (["scan"], {"0000:01:00", "0000:41:00", "102", "104", "123456789", LONG_NAME}),
        (["scan", "123456789"], {"0000:01:00.0", "0000:41:00.0", "0000:41:00.1", "123456789"}),
        (["dry-run", "--all"], {"0000:41:00.0,0000:41:00.1", "102", "104", "123456789"}),
    ],
)
def test_long_names_never_cut_an_address_or_vmid(
    tmp_path: Path, argv: list[str], whole: set[str]
) -> None:
    """A 53-character name and a 9-digit VMID at 80 columns: rich used to shrink every other
    column to fit the name (``00`` for 0000:01:00, ``12345`` for the VMID); a table whose whole
    cells do not fit is printed plain, which the terminal wraps."""
    node = seed_node(tmp_path)
    node.add_gpu("0000:41:00", group=40, functions=("0", "1"))
    node.set_mapping(
        "gpu-pool-with-a-long-name\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\tmap node=pve1,path=0000:41:00.0,id=10de:2204,iommugroup=40\n"
    )
    node.add_vm(123456789, name=LONG_NAME, hostpci=["mapping=gpu-pool-with-a-long-name", "41:00.1"])
    out = run_in_terminal(node, 80, *argv)
    assert "…" not in out
    words = set(out.split())
    assert whole <= words, whole - words
    if argv[0] == "dry-run":  # one row per guest, the VMID first
        rows = [line.split()[:2] for line in out.splitlines()]
        assert ["123456789", LONG_NAME] in rows and ["104", "win11"] in rows


def test_piped_output_is_one_awk_field_per_column(demo: FakeNode) -> None:
    for argv in (["scan"], ["dry-run", "--all"]):
        text = cli(demo, *argv).stdout
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if len(lines) < 3 or not lines[1].isupper():
                continue  # notes, not a table
            header = lines[1].split()
            for line in lines[2:]:
                assert len(line.split()) == len(header), (header, line)
    awk = subprocess.run(
        ["awk", 'NF == 8 && $8 == "holds" {print $1, $2}'],
        input=cli(demo, "scan", "--noheader").stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    assert awk.stdout.splitlines() == [
        "0000:00:02 200",
        "0000:01:00 104",
        "0000:41:00 108",
    ]
    awk = subprocess.run(
        ["awk", '{print $1 ":" $5}'],
        input=cli(demo, "dry-run", "--all", "--mode", "stop", "--noheader").stdout,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "102:104" in awk.stdout.split() and "9000:-" in awk.stdout.split()


def test_noheader_prints_rows_only(demo: FakeNode) -> None:
    for argv in (["scan"], ["dry-run", "--all"], ["scan", "107"]):
        result = cli(demo, *argv, "--noheader")
        lines = result.stdout.splitlines()
        assert lines and "" not in lines, argv
        assert not any(line.startswith(("USE:", "warning:", "PCI devices")) for line in lines)
        assert not any(word in result.stdout for word in ("VMID", "DEVICE", "OUTCOME"))
    assert (
        "warning: VM 107 (mapped-a) and VM 108 (mapped-b)" in cli(demo, "scan", "--noheader").stderr
    )


def test_empty_result_is_a_sentence(demo: FakeNode) -> None:
    out = cli(demo, "scan", "110").stdout
    assert "VM 110 (pihole) claims no PCI device" in out
    assert "KEY" not in out and "ADDRESS" not in out  # no empty table headers
    empty = FakeNode(demo.root.parent / "empty")
    assert cli(empty, "scan").stdout.splitlines() == [
        "no GPU or passed-through PCI device found on pve1",
        "",
        "no guest on pve1 claims a PCI device",
    ]
