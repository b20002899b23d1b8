"""Hand the GPU over: ``pve-gpu-hook start VMID``, and the guest hookscript that does the same at
every start of a guest (``handover enable``), over the simulator's ``qm start``, which runs the
hookscript as qemu-server's vm_start does (docs/pve-facts.md §10).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.fronts import FAST, cli, commands, install_guest_hook, records, seed_node
from tests.sim.node import FakeNode
from tests.sim.vzdump import run_job

SNIPPETS_STORAGE = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup,snippets

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images
"""
OUR_VOLID = "local:snippets/pve-gpu-hook-guest-hook"


def log_lines(node: FakeNode) -> list[str]:
    path = node.root / "var/log/pve-gpu-hook.log"
    return path.read_text().splitlines() if path.exists() else []


# ---- pve-gpu-hook start VMID --------------------------------------------------------------------


def test_start_shuts_the_holder_down_and_starts_the_guest(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    result = cli(node, "start", "102")
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.running_guests() == {102}  # 104 stays off: the admin chose 102
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "104"]]
    assert commands(node, "stop") == []  # never killed
    assert [c[:3] for c in commands(node, "start")] == [["qm", "start", "102"]]
    lines = result.stdout.splitlines()
    holder_lines = [line for line in lines if line.startswith("VM 104")]
    assert len(holder_lines) == 1 and "shut down in" in holder_lines[0], lines
    assert "it stays off" in holder_lines[0]
    assert lines[-1].startswith("VM 102 (vm102): started")
    assert records(node) == []  # nothing to start again: nothing recorded
    assert any("handover 102" in line and "VM 104" in line for line in log_lines(node))


def test_start_dry_run_changes_nothing(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    result = cli(node, "start", "102", "--dry-run", "--output-format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["result"] == "would-start"
    assert [(h["vmid"], h["action"]) for h in data["holders"]] == [(104, "would-shut-down")]
    assert node.calls() == []
    assert node.running_guests() == {104}


def test_a_protected_holder_refuses_and_nobody_is_stopped(tmp_path: Path) -> None:
    """Two holders, the second protected: decided before anyone is stopped."""
    node = seed_node(tmp_path, FAST + "protect: [106]\n")
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.add_vm(106, name="nas", hostpci=["02:00.0"], running=True)
    node.add_vm(120, name="both", hostpci=["01:00.0", "02:00.0"])
    result = cli(node, "start", "120")
    assert result.returncode == 1
    assert "VM 106 (nas): is protected" in result.stdout
    assert "nobody was stopped" in result.stdout
    assert node.calls() == []
    assert node.running_guests() == {104, 106}


def test_a_start_pve_will_fail_stops_nobody(tmp_path: Path) -> None:
    """VM 131 passes GPU 03:00 through whole, so it is on vfio-pci, where no mdev can be
    created (docs/pve-facts.md §5): shutting 131 down would not let VM 130's mdev start."""
    node = FakeNode(tmp_path)
    node.add_gpu("0000:03:00", group=20, mdev_types=("nvidia-35",))
    node.write_override(FAST)
    node.add_vm(130, name="vgpu", hostpci=["03:00.0,mdev=nvidia-35"])
    node.add_vm(131, name="whole", hostpci=["03:00.0"], running=True)
    result = cli(node, "start", "130")
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith("VM 130 (vgpu): PVE will not start it: ")
    assert "130.conf:2: hostpci0: could not create mediated device: pci device" in line
    assert "does not support mediated devices (bound to vfio-pci); nobody was stopped" in line
    assert node.calls() == [] and node.running_guests() == {131}


def test_a_ct_holder_is_shut_down_for_a_vm(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.stop(104)
    node.bind_host_driver("0000:01:00.0", "nvidia")
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"], running=True)
    result = cli(node, "start", "103", "--output-format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["result"] == "started"
    assert [(h["vmid"], h["type"], h["action"]) for h in data["holders"]] == [
        (200, "lxc", "shut-down")
    ]
    assert [c[:3] for c in commands(node, "shutdown")] == [["pct", "shutdown", "200"]]
    assert node.running_guests() == {103}


def test_a_mapping_pool_with_a_free_device_stops_nobody(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(
        "gpu\n"
        "\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14\n"
        "\tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=15\n"
    )
    node.add_vm(120, name="pooled", hostpci=["mapping=gpu"])
    result = cli(node, "start", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert commands(node, "shutdown") == []
    assert node.running_guests() == {104, 120}
    assert "0000:02:00.0" in node.reservations()


def test_a_holder_that_does_not_shut_down_is_not_killed_and_the_guest_not_started(
    tmp_path: Path,
) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\n")
    node.set_fault(104, ignore_shutdown=True)
    result = cli(node, "start", "102")
    assert result.returncode == 1
    assert "did not shut down within 1 s" in result.stdout
    assert commands(node, "stop") == [] and commands(node, "start") == []
    assert node.running_guests() == {104}


def test_an_ha_holder_is_shut_down_by_us_and_left_stopped_in_ha(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.set_ha(104)
    result = cli(node, "start", "102")
    assert result.returncode == 0, result.stdout + result.stderr
    node.wait_settled()
    assert node.running_guests() == {102}
    assert node.pve.ha_state(104) == "stopped"  # HA keeps it off instead of taking the GPU back
    assert "HA resource vm:104 set to stopped" in result.stdout


def test_start_of_a_running_or_unknown_guest(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    running = cli(node, "start", "104")
    assert running.returncode == 0 and "runs already" in running.stdout
    unknown = cli(node, "start", "999")
    assert unknown.returncode == 2 and "no guest 999" in unknown.stderr
    assert node.calls() == []


# ---- the guest hookscript -----------------------------------------------------------------------


def hand_over_node(tmp_path: Path, override: str = FAST) -> FakeNode:
    node = seed_node(tmp_path, override)
    node.set_storage(SNIPPETS_STORAGE)
    install_guest_hook(node)
    return node


def test_handover_enable_then_a_plain_qm_start_hands_the_gpu_over(tmp_path: Path) -> None:
    node = hand_over_node(tmp_path)
    enabled = cli(node, "handover", "enable", "102")
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    assert node.config_value(102, "hookscript") == OUR_VOLID
    snippet = node.root / "var/lib/vz/snippets/pve-gpu-hook-guest-hook"
    assert os.readlink(snippet) == str(node.root / "usr/share/pve-gpu-hook/guest-hook")
    # the admin starts 102 from the GUI: PVE's own start, our hookscript's pre-start inside it
    start = node.root / "usr/sbin/qm"
    code = os.spawnv(os.P_WAIT, str(start), [str(start), "start", "102"])
    assert code == 0, node.calls()
    assert node.running_guests() == {102}
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "104"]]
    assert commands(node, "stop") == []
    call = next(c for c in node.calls("qm") if c["argv"][:3] == ["qm", "start", "102"])
    assert any("VM 104 (win11): shut down in" in line for line in call["out"]), call["out"]


def test_the_hookscript_refusal_aborts_the_start_as_pve_says_it(tmp_path: Path) -> None:
    node = hand_over_node(tmp_path, FAST + "protect: [104]\n")
    assert cli(node, "handover", "enable", "102").returncode == 0
    qm = node.root / "usr/sbin/qm"
    code = os.spawnv(os.P_WAIT, str(qm), [str(qm), "start", "102"])
    assert code != 0
    call = next(c for c in node.calls("qm") if c["argv"][:3] == ["qm", "start", "102"])
    assert any(
        "hookscript error for 102 on pre-start: command "
        "'/var/lib/vz/snippets/pve-gpu-hook-guest-hook 102 pre-start' failed: exit code 1" in line
        for line in call["out"]
    ), call["out"]
    assert node.running_guests() == {104}
    assert commands(node, "shutdown") == []


def test_the_hookscript_does_nothing_at_vzdumps_backup_start(tmp_path: Path) -> None:
    """vzdump starts a stopped VM paused for its backup, with lock: backup: the same pre-start.
    The vzdump hook frees the GPU then, and starts the holder again afterwards."""
    node = hand_over_node(tmp_path)
    assert cli(node, "handover", "enable", "102").returncode == 0
    job = run_job(node, [102])
    assert job.ok, job.log
    assert node.running_guests() == {104}  # started again by the vzdump hook
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "104"]]
    assert any("lock: backup" in line and "nothing to do" in line for line in log_lines(node))


def test_the_hookscript_without_the_vzdump_hook_stops_nobody_for_a_backup(tmp_path: Path) -> None:
    """Without the vzdump hook, vzdump's paused start fails on the busy GPU: the hookscript did
    not take the GPU from the running guest for a backup."""
    node = hand_over_node(tmp_path)
    assert cli(node, "handover", "enable", "102").returncode == 0
    job = run_job(node, [102], hook_cmd=[])
    assert not job.ok
    assert node.running_guests() == {104}
    assert commands(node, "shutdown") == []


def test_pve_gpu_hook_start_with_the_hookscript_enabled(tmp_path: Path) -> None:
    node = hand_over_node(tmp_path)
    assert cli(node, "handover", "enable", "102").returncode == 0
    result = cli(node, "start", "102")
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.running_guests() == {102}
    assert len(commands(node, "shutdown")) == 1


def test_handover_enable_refuses_another_hookscript(tmp_path: Path) -> None:
    node = hand_over_node(tmp_path)
    mine = node.root / "var/lib/vz/snippets/mine.sh"
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.write_text("#!/bin/sh\nexit 0\n")
    mine.chmod(0o755)
    node.add_vm(
        103, name="vm103", hostpci=["01:00,pcie=1,x-vga=1"], hookscript="local:snippets/mine.sh"
    )
    result = cli(node, "handover", "enable", "103")
    assert result.returncode == 1
    assert "local:snippets/mine.sh" in result.stderr and "one hookscript" in result.stderr
    assert node.config_value(103, "hookscript") == "local:snippets/mine.sh"
    assert cli(node, "handover", "disable", "103").returncode == 1  # not ours: left alone
    assert node.config_value(103, "hookscript") == "local:snippets/mine.sh"


def test_handover_enable_without_a_snippets_storage_explains(tmp_path: Path) -> None:
    node = seed_node(tmp_path)  # a fresh PVE: 'local' holds no snippets
    install_guest_hook(node)
    result = cli(node, "handover", "enable", "102")
    assert result.returncode == 1
    assert "pvesm set local --content iso,vztmpl,backup,snippets" in result.stderr
    assert node.config_value(102, "hookscript") is None


def test_handover_disable(tmp_path: Path) -> None:
    node = hand_over_node(tmp_path)
    assert cli(node, "handover", "enable", "102").returncode == 0
    result = cli(node, "handover", "disable", "102")
    assert result.returncode == 0, result.stderr
    assert node.config_value(102, "hookscript") is None
    qm = node.root / "usr/sbin/qm"
    assert os.spawnv(os.P_WAIT, str(qm), [str(qm), "start", "102"]) != 0  # PVE's own refusal
    assert node.running_guests() == {104} and commands(node, "shutdown") == []


def test_scan_shows_which_guests_have_the_hand_over(tmp_path: Path) -> None:
    node = hand_over_node(tmp_path)
    assert cli(node, "handover", "enable", "103").returncode == 0
    data = json.loads(cli(node, "scan", "--output-format", "json").stdout)
    claims = [c for d in data["devices"] for c in d["claims"]]
    assert {c["vmid"]: c["handover"] for c in claims} == {
        102: False,
        103: True,
        104: False,
        105: False,
    }
    text = cli(node, "scan").stdout
    assert "VM 103 (hand-over)" in text and "VM 102 (hand-over)" not in text


def test_a_hand_over_during_a_backup_job_is_not_the_jobs(tmp_path: Path) -> None:
    """status reads the last job from the log: a refused hand-over in the middle of a job is no
    failure of that job."""
    node = seed_node(tmp_path, FAST + "protect: [104]\n")
    (node.root / "var/log/pve-gpu-hook.log").write_text(
        "2026-11-30T01:00:00+00:00 job-start - called: job-start\n"
    )
    assert cli(node, "start", "102").returncode == 1
    with (node.root / "var/log/pve-gpu-hook.log").open("a") as log:
        log.write("2026-11-30T01:00:09+00:00 job-end - called: job-end\n")
    data = json.loads(cli(node, "status", "--output-format", "json").stdout)
    assert data["last_job"]["result"] == "ok", data["last_job"]
    assert not any("handover" in str(a) for a in data["last_job"]["actions"])
