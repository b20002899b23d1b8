"""Real-host fidelity of the hook's actions: behaviours of Proxmox VE that a simulator written
from our own assumptions missed (docs/pve-facts.md §5, §8, §9). Each test runs the real hook on
the simulator, which models the PVE function named in its comments.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.fronts import (
    FAST,
    cli,
    commands,
    hook,
    hook_lines,
    records,
    seed_node,
    wait_for,
    write_state,
)
from tests.sim.node import FakeNode
from tests.sim.vzdump import run_job


def ha_state(node: FakeNode, vmid: int) -> str | None:
    return node.pve.ha_state(vmid)


# ---- 1. a CT's GPU is never taken back from a running VM ----------------------------------------


def ct_on_the_gpu(tmp_path: Path) -> FakeNode:
    """VM 102 and 103 pass the GPU through; CT 200 uses it through the host driver."""
    node = seed_node(tmp_path, FAST + "restart: after-job\n")
    node.stop(104)
    node.bind_host_driver("0000:01:00.0", "nvidia")
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"], running=True)
    return node


def test_a_ct_is_not_given_back_a_gpu_a_running_vm_took(tmp_path: Path) -> None:
    node = ct_on_the_gpu(tmp_path)
    assert hook(node, "backup-start", "stop", "102").returncode == 0
    assert 200 not in node.running_guests()
    node.start(102, paused=True)  # vzdump's paused start binds the GPU to vfio-pci ...
    node.stop(102)  # ... and PVE never binds it back
    node.start(103)  # meanwhile an admin (or HA, or onboot) starts VM 103 on the GPU
    end = hook(node, "job-end")
    assert end.returncode == 1
    assert "CT 200 (jellyfin) not started again: 0000:01:00" in end.stdout
    assert "VM 103" in end.stdout
    # never unbound from vfio-pci under VM 103's QEMU: the write would block, or pull the GPU
    assert node.kernel_faults() == []
    assert node.driver("0000:01:00.0") == "vfio-pci" and node.is_running(103)
    assert [r["vmid"] for r in records(node)] == [200]
    node.stop(103)
    assert cli(node, "recover").returncode == 0
    assert node.driver("0000:01:00.0") == "nvidia" and node.is_running(200)
    assert node.kernel_faults() == []


# ---- 2. a holder that powers off after its shutdown timed out ---------------------------------


def test_a_holder_powering_off_late_is_started_again(tmp_path: Path) -> None:
    """`qm shutdown` gives up, the request stays delivered, the guest goes down later."""
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 60\n")
    node.set_fault(104, ignore_shutdown=True, late_poweroff=2)
    job = run_job(node, [102])
    assert not job.guests[102].ok  # the shutdown timed out: that backup fails clearly
    assert "it may still power off" in (job.guests[102].error or "")
    assert commands(node, "stop") == []  # never killed
    # the record is kept, watched after the job: when 104 goes down it is started again
    assert [(r["vmid"], r["status"]) for r in records(node)] in ([(104, "stop-failed")], [])
    assert wait_for(lambda: node.calls("guest")), "the guest never powered off"
    assert wait_for(lambda: node.is_running(104) and not records(node)), node.calls()
    assert any(c["argv"][:3] == ["qm", "start", "104"] for c in node.calls())


def test_a_watch_ends_only_after_its_records_window(tmp_path: Path) -> None:
    """job-end rounds the watch's seconds down: a watch ending a moment before a record's window
    must not leave that record behind (a running guest listed as waiting until the next job)."""
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 4\n")
    record = {
        "vmid": 104,
        "kind": "qemu",
        "name": "win11",
        "for_vmid": 102,
        "addresses": ["0000:01:00.0"],
        "since": time.time() - 1,  # its window ends 3 s from now
        "status": "stop-failed",
    }
    state = tmp_path / "var/lib/pve-gpu-hook/state.json"
    state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_state(state, [record])
    result = cli(node, "recover", "--watch", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert records(node) == [] and node.is_running(104)
    assert commands(node, "start") == []  # it ran all along


def test_recover_after_a_killed_job_watches_a_holder_that_may_still_power_off(
    tmp_path: Path,
) -> None:
    """vzdump dies before its job-end, which would have started the watcher: the admin's plain
    `recover` finds the holder still inside its window and leaves it to a watcher of its own."""
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 60\n")
    node.set_fault(104, ignore_shutdown=True, late_poweroff=4)
    job = run_job(node, [102], crash_after=("backup-start", 102))
    assert job.crashed
    assert [(r["vmid"], r["status"]) for r in records(node)] == [(104, "stop-failed")]
    result = cli(node, "recover")
    assert result.returncode == 1, result.stdout + result.stderr  # not done yet: said so
    assert "watching" in result.stdout and "watched until" in result.stdout
    assert [r["vmid"] for r in records(node)] == [104]  # the record stays while it may go down
    assert wait_for(lambda: node.calls("guest")), "the guest never powered off"
    assert wait_for(lambda: node.is_running(104) and not records(node)), node.calls()
    assert commands(node, "stop") == []


def test_a_container_powering_off_late_is_started_again(tmp_path: Path) -> None:
    """lxc-stop --nokill has the same shape (pve-container PVE/LXC.pm vm_stop)."""
    node = ct_on_the_gpu(tmp_path)
    node.write_override("shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 60\n")
    node.set_fault(200, ignore_shutdown=True, late_poweroff=2)
    job = run_job(node, [102])
    assert not job.guests[102].ok
    assert wait_for(lambda: node.calls("guest")), "the container never powered off"
    assert wait_for(lambda: node.is_running(200) and not records(node)), node.calls()


def test_a_holder_still_running_after_the_watch_keeps_running(tmp_path: Path) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 3\n")
    node.set_fault(104, ignore_shutdown=True)
    run_job(node, [102])
    assert wait_for(lambda: not records(node)), records(node)  # dropped once the watch ended
    assert node.running_guests() == {104}
    assert commands(node, "stop") == [] and commands(node, "start") == []


# ---- 3. HA-managed holders are shut down gracefully, as configured --------------------------


def test_ha_holder_is_taken_out_of_has_hands_and_given_back(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.set_ha(104)
    job = run_job(node, [102])
    assert job.ok, job.log
    node.wait_settled()
    ha_calls = [c[1:] for c in commands(node) if c[0] == "ha-manager"]
    assert ha_calls == [
        ["set", "vm:104", "--state", "ignored"],
        ["set", "vm:104", "--state", "started"],
    ]
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "104"]]
    assert node.calls("ha-worker") == [
        c for c in node.calls("ha-worker") if c["argv"][1] == "start"
    ]
    assert node.running_guests() == {104} and ha_state(node, 104) == "started"
    assert any("set to ignored" in line for line in hook_lines(job))
    assert records(node) == []


def test_ha_vm_ignoring_shutdown_is_not_killed_without_force_stop(tmp_path: Path) -> None:
    """HA's own stop forces a VM that ignores ACPI (HA/Resources/PVEVM.pm shutdown)."""
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 0\n")
    node.set_ha(104)
    node.set_fault(104, ignore_shutdown=True)
    job = run_job(node, [102])
    node.wait_settled()
    assert not job.guests[102].ok
    assert node.running_guests() == {104}  # still running: never killed
    assert not any(c["argv"][1] == "stop" for c in node.calls("ha-worker"))
    assert ha_state(node, 104) == "started"  # given back to HA as it was
    assert records(node) == []


def test_ha_container_ignoring_shutdown_is_not_left_in_ha_error(tmp_path: Path) -> None:
    """HA's stop of a CT does not force it: a timeout leaves the service in error (PVECT.pm)."""
    node = ct_on_the_gpu(tmp_path)
    node.write_override("shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 0\n")
    node.set_ha(200)
    node.set_fault(200, ignore_shutdown=True)
    run_job(node, [102])
    node.wait_settled()
    assert node.is_running(200)
    assert node.pve.ha_service_status(200) != "error"
    assert ha_state(node, 200) == "started"


def test_ha_state_survives_a_second_try_at_a_stubborn_holder(tmp_path: Path) -> None:
    """Two backups need the GPU of an HA CT that ignores its shutdown: the second try finds it
    'ignored' (set by the first) and must still give back 'started' (found by the soak)."""
    node = ct_on_the_gpu(tmp_path)  # restart: after-job: the record lasts the whole job
    node.write_override(
        "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 15\nrestart: after-job\n"
    )
    node.set_ha(200)
    node.set_fault(200, ignore_shutdown=True)
    job = run_job(node, [102, 103])
    assert not job.guests[102].ok and not job.guests[103].ok
    assert len([c for c in commands(node, "shutdown") if c[2] == "200"]) == 2
    # the watch ends with the window of the second try: the record goes, HA gets it back
    assert wait_for(lambda: not records(node), 60)
    node.wait_settled()
    assert node.is_running(200) and ha_state(node, 200) == "started"


def test_ha_state_is_given_back_by_recover_after_a_crash(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.set_ha(104)
    node.set_fault(104, kill_caller=True)  # the hook dies during the shutdown
    run_job(node, [102], crash_after=("backup-start", 102))
    assert wait_for(lambda: not node.is_running(104))
    assert ha_state(node, 104) == "ignored"
    assert cli(node, "recover").returncode == 0
    node.wait_settled()
    assert node.is_running(104) and ha_state(node, 104) == "started"
    assert records(node) == []


def test_ha_holder_started_on_another_node_is_resolved_once(tmp_path: Path) -> None:
    """crs ha-rebalance-on-start: HA may start it elsewhere (HA/Manager.pm)."""
    node = seed_node(tmp_path, FAST + "restart: after-job\n")
    node.add_vm(900, node="pve2")  # the cluster has a second node
    node.set_ha(104)
    node.set_fault(104, ha_rebalance_to="pve2")
    job = run_job(node, [102])
    assert job.ok, job.log
    assert records(node) == []
    assert any("HA started it on node pve2" in line for line in hook_lines(job))
    again = run_job(node, [103])  # the next night does not fail on it
    assert again.ok, again.log


# ---- 6. a GPU added in [PENDING] to a running VM backed up in stop mode ------------------------


def test_pending_gpu_on_a_running_vm_fails_its_backup_clearly(tmp_path: Path) -> None:
    """vzdump's shutdown applies pending changes, then starts it paused with the new GPU
    (qemu-server _do_vm_stop: vm_stop_cleanup with apply_pending)."""
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15)
    node.add_vm(106, name="ws", hostpci=["02:00.0"], running=True)
    # the admin adds the shared GPU to the running VM: PVE keeps it pending until its next start
    conf = node.pve.conf_path("qemu", 106)
    conf.write_text(conf.read_text() + "\n[PENDING]\nhostpci1: 01:00.0\n")
    job = run_job(node, [106], mode="stop")
    assert not job.guests[106].ok
    error = job.guests[106].error or ""
    assert "pve-gpu-hook: VM 106" in error and "[PENDING]" in error and "VM 104" in error
    assert node.running_guests() == {104, 106}  # both as before: nobody was stopped
    assert commands(node, "shutdown") == []


# ---- 9. a VM that is starting right now --------------------------------------------------------


def test_a_holder_that_is_starting_is_waited_for_then_shut_down(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.stop(104)
    node.set_fault(104, start_delay=2)
    starting = node.start_async(104)
    assert wait_for(lambda: any(r.get("vmid") == 104 for r in node.reservations().values()))
    job = run_job(node, [102])
    starting.wait(30)
    assert job.ok, job.log
    assert not any("is currently reserved" in line for line in job.log)
    assert any("is starting right now" in line for line in hook_lines(job))
    assert node.running_guests() == {104}
    assert records(node) == []


def test_a_container_that_is_starting_is_waited_for_then_shut_down(tmp_path: Path) -> None:
    """`pct start` resolves the CT's device nodes under its config lock (pve-container
    API2/LXC/Status.pm vm_start): taken for stopped, CT 200 would come up with the nodes of a GPU
    that VM 102's start binds to vfio-pci, run without it, and fail its next start."""
    node = seed_node(tmp_path)
    node.stop(104)
    node.bind_host_driver("0000:01:00.0", "nvidia")
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"])
    node.set_fault(200, start_delay=3)
    starting = node.start_async(200)
    assert wait_for(lambda: node.ct_start_under_way(200))
    job = run_job(node, [102])
    starting.wait(30)
    assert job.ok, job.log
    assert any("CT 200 (jellyfin) is starting right now" in line for line in hook_lines(job))
    assert any(c["argv"][:3] == ["pct", "shutdown", "200"] for c in node.calls())
    assert node.running_guests() == {200}
    assert node.driver("0000:01:00.0") == "nvidia"  # its GPU back under the CT's nodes
    assert records(node) == []


# ---- 11. a running mapped guest restarted by vzdump takes the device the hook freed -------------

POOL = """\
gpu0
\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14
\tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=15
"""


def add_mapped_pair(node: FakeNode) -> None:
    """VM 107 on 01:00.0 and VM 109 on ``mapping=gpu0`` (01:00.0 | 02:00.0), both running: 109
    got 02:00.0, the first device of its mapping nobody reserved. The seed's 104 is off."""
    node.stop(104)
    node.add_gpu("0000:02:00", group=15)
    node.set_mapping(POOL)
    node.add_vm(107, name="holder", hostpci=["01:00.0"], running=True)
    node.add_vm(109, name="mapped", hostpci=["mapping=gpu0"], running=True)
    assert node.reservations()["0000:02:00.0"]["vmid"] == 109


def test_a_mapped_guest_restarted_by_vzdump_keeps_its_device(tmp_path: Path) -> None:
    """choose_hostpci_devices picks at every start, also vzdump's restart in stop mode
    (qemu-server PVE/QemuServer/PCI.pm): VM 109 would move to the device freed from 107."""
    node = seed_node(tmp_path, FAST + "restart: after-job\n")
    add_mapped_pair(node)
    node.add_vm(101, hostpci=["01:00.0"])
    job = run_job(node, [101, 109], mode="stop")
    assert job.ok, job.log
    assert node.running_guests() == {107, 109}
    reservations = node.reservations()
    assert reservations["0000:01:00.0"]["vmid"] == 107
    assert reservations["0000:02:00.0"]["vmid"] == 109
    assert records(node) == []


def test_a_holder_powering_off_late_gets_its_device_before_a_mapped_guest(
    tmp_path: Path,
) -> None:
    """107's shutdown timed out, and it powered off while 110 was backed up; the mapped 109,
    stopped for 110, would take the first free device of its mapping at its start
    (choose_hostpci_devices), 107's own, and 107 could not start again."""
    node = seed_node(
        tmp_path,
        "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 60\nrestart: after-guest\n",
    )
    add_mapped_pair(node)
    node.add_vm(101, hostpci=["01:00.0"])
    node.add_vm(110, hostpci=["02:00.0"])
    node.set_fault(107, ignore_shutdown=True)
    assert hook(node, "backup-start", "stop", "101").returncode == 1  # 107 did not go down
    assert hook(node, "log-end", "stop", "101").returncode == 0
    assert [(r["vmid"], r["status"]) for r in records(node)] == [(107, "stop-failed")]
    assert hook(node, "backup-start", "stop", "110").returncode == 0  # 109 shut down
    node.pve.late_poweroff_worker("qemu", 107, 0)  # the request stayed delivered
    assert hook(node, "log-end", "stop", "110").returncode == 0
    assert node.running_guests() == {107, 109}
    reservations = node.reservations()
    assert reservations["0000:01:00.0"]["vmid"] == 107
    assert reservations["0000:02:00.0"]["vmid"] == 109
    assert records(node) == []
    assert commands(node, "stop") == []


# ---- 13. mdev parents and vfio-pci ------------------------------------------------------------


def mdev_gpu(tmp_path: Path) -> FakeNode:
    """GPU 03:00 is an mdev parent while nvidia has it (group 20); VM 130 runs on an mdev of it,
    VM 131 passes it through whole."""
    node = FakeNode(tmp_path)
    node.add_gpu("0000:03:00", group=20, mdev_types=("nvidia-35",))
    node.write_override(FAST)
    node.add_vm(130, name="vgpu", hostpci=["03:00.0,mdev=nvidia-35"], running=True)
    node.add_vm(131, name="whole", hostpci=["03:00.0"])
    return node


def test_an_mdev_holder_gets_its_parent_back_from_vfio_pci(tmp_path: Path) -> None:
    """131's paused start binds the GPU to vfio-pci, where it has no mdev_supported_types,
    and PVE never binds it back (pci_create_mdev_device, cleanup_pci_devices): 130's mdev
    could not be created again. The hook gives the GPU back to the driver 130 had."""
    node = mdev_gpu(tmp_path)
    job = run_job(node, [131])
    assert job.ok, job.log
    assert commands(node, "shutdown")[0][:3] == ["qm", "shutdown", "130"]
    assert node.running_guests() == {130}
    assert node.driver("0000:03:00.0") == "nvidia"
    log = (node.root / "var/log/pve-gpu-hook.log").read_text()
    assert "0000:03:00.0 given back to nvidia for VM 130 (vgpu)" in log
    assert records(node) == [] and node.kernel_faults() == []


def test_an_mdev_backup_gets_the_parent_a_down_holders_record_knows(tmp_path: Path) -> None:
    """130 stays down from 131's backup to 133's (one shutdown for the night); 132's mdev in
    between needs the GPU on nvidia, which 130's record knows: it is given back for 132."""
    node = mdev_gpu(tmp_path)
    node.add_vm(132, name="vgpu2", hostpci=["03:00.0,mdev=nvidia-35"])
    node.add_vm(133, name="whole2", hostpci=["03:00.0"])
    job = run_job(node, [131, 132, 133])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "130"]]
    said = "0000:03:00.0 given back to nvidia (as VM 130 (vgpu) had it), so that the mdev of VM 132"
    assert any(said in line for line in job.log), job.log
    assert node.running_guests() == {130} and node.driver("0000:03:00.0") == "nvidia"
    assert records(node) == [] and node.kernel_faults() == []


def test_an_mdev_vm_on_a_parent_left_on_vfio_pci_fails_its_backup_clearly(tmp_path: Path) -> None:
    """Nobody ran on an mdev of the GPU, so nobody's record knows its driver: after 131's backup
    it stays on vfio-pci, and PVE cannot create 132's mdev. The hook says so, and stops nobody
    for a start that fails whatever it does."""
    node = mdev_gpu(tmp_path)
    node.stop(130)
    node.add_vm(132, name="vgpu2", hostpci=["03:00.0,mdev=nvidia-35"])
    node.add_vm(104, name="other", hostpci=["03:00.0,mdev=nvidia-35"])
    job = run_job(node, [131, 132])
    assert job.guests[131].ok
    assert not job.guests[132].ok and job.guests[132].error == "could not create mediated device"
    said = [line for line in job.log if "PVE will not start VM 132 (vgpu2)" in line]
    assert said and "pci device '0000:03:00.0' does not support mediated devices" in said[0]
    assert "(bound to vfio-pci)" in said[0]
    assert commands(node, "shutdown") == [] and node.running_guests() == set()


def test_a_vm_whose_mdev_cannot_be_created_is_refused_before_it_takes_a_cts_gpu(
    tmp_path: Path,
) -> None:
    """PVE prepares hostpci0 (binding 01:00 to vfio-pci, away from CT 200's nvidia) before it
    finds that hostpci1's mdev cannot be created (vm_start_nolock): the start fails after
    taking the CT's GPU. The hook refuses that backup before vzdump starts the VM."""
    node = mdev_gpu(tmp_path)
    node.stop(130)
    node.pve.set_driver("0000:03:00.0", "vfio-pci")  # as 131's last backup left it
    node.add_gpu("0000:01:00", group=14, nvidia_minor=0, drm=("renderD128",))
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128"], running=True)
    node.add_vm(133, hostpci=["01:00.0", "03:00.0,mdev=nvidia-35"])
    job = run_job(node, [133])
    assert not job.guests[133].ok
    refusal = [line for line in job.log if "VM 133: vzdump will fail: hostpci1" in line]
    assert refusal and "its backup is refused before vzdump starts it" in refusal[0], job.log
    assert not node.calls("qm") and commands(node, "shutdown") == []
    assert node.running_guests() == {200} and node.driver("0000:01:00.0") == "nvidia"
    assert node.kernel_faults() == []


def test_a_holder_pve_will_not_start_again_is_not_shut_down(tmp_path: Path) -> None:
    """VM 111 passes a GPU of a mapping marked ``mdev 1`` through whole: its start bound the GPU
    to vfio-pci, which makes the mapping out of date for PVE (Mapping/PCI.pm assert_valid), so
    111 could not start again once stopped. 112's backup fails instead; 111 keeps running."""
    node = FakeNode(tmp_path)
    node.write_override(FAST)
    node.add_gpu("0000:03:00", group=20, mdev_types=("nvidia-35",))
    node.set_mapping(
        "gpu\n\tmdev 1\n\tmap node=pve1,path=0000:03:00.0,id=10de:2204,iommugroup=20\n"
    )
    node.add_vm(111, name="whole", hostpci=["mapping=gpu"], running=True)
    node.add_vm(112, hostpci=["03:00.0"])
    job = run_job(node, [112])
    assert not job.guests[112].ok
    said = [
        line for line in job.log if "cannot free 0000:03:00.0 for VM 112: VM 111 (whole)" in line
    ]
    assert (
        said
        and "could not be started again: PVE will not start it (hostpci0: PCI device "
        "mapping invalid (hardware probably changed): 'mdev' does not match"
        in said[0]
    ), job.log
    assert commands(node, "shutdown") == [] and node.running_guests() == {111}
    assert records(node) == []
