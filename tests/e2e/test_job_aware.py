"""Job-aware restarts (the default): a holder is shut down once per job and started right after
the last backup of the job that needs its GPU, read from the job's own files as PVE writes them
(the simulator's vzdump writes the pid file, the task log and the per-guest logs)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.test_fidelity_hook import add_mapped_pair
from tests.fronts import FAST, commands, hook_lines, records, seed_node
from tests.sim.node import FakeNode
from tests.sim.vzdump import JobOutcome, run_job


def cycles(node: FakeNode, vmid: int) -> tuple[int, int]:
    """(shutdowns, starts) the hook asked of ``vmid``."""
    shutdowns = [c for c in commands(node, "shutdown") if c[2] == str(vmid)]
    starts = [c for c in commands(node, "start") if c[2] == str(vmid)]
    return len(shutdowns), len(starts)


def started_at(job: JobOutcome, label: str) -> list[tuple[str, int | None]]:
    """The hook calls whose output says ``label`` was started again."""
    return [
        (c.phase, c.vmid)
        for c in job.hook_calls
        if any(f"{label} started again" in line for line in c.lines)
    ]


def test_the_seeds_night_shuts_the_desktop_down_once(tmp_path: Path) -> None:
    node = seed_node(tmp_path)  # no restart: key, so the default: job-aware
    job = run_job(node, [102, 103, 105], "stop")
    assert job.ok, job.log
    assert cycles(node, 104) == (1, 1)
    assert started_at(job, "VM 104 (win11)") == [("log-end", 105)]
    assert node.running_guests() == {104} and records(node) == []
    lines = hook_lines(job)
    assert any(
        "VM 104 (win11) shut down in" in line and "started again after the backup of VM 105" in line
        for line in lines
    ), lines
    # said after 102, the backup it was stopped for; after 103 in the log file only
    assert sum("VM 104 (win11) stays down" in line for line in lines) == 1
    summary = [line for line in lines if "this job:" in line]
    assert summary and "1 shutdown/boot cycle(s)" in summary[0], lines


def test_guests_without_passthrough_in_between_do_not_bring_it_back(tmp_path: Path) -> None:
    """vzdump --all: CTs and VMs without a GPU between the needers, a short expected wait."""
    node = seed_node(tmp_path, FAST)
    node.add_vm(101, name="web")  # before any needer
    node.add_ct(100, hostname="dns", running=True)
    node.add_vm(1021, name="db", running=True)  # after 105 in vzdump's ascending order
    node.add_vm(1030, name="plain")
    node.add_ct(1040, hostname="files")
    node.add_vm(1050, name="late-gpu", hostpci=["01:00,pcie=1"])  # needs the GPU after them
    job = run_job(node, None, "stop")  # --all
    assert job.ok, job.log
    assert cycles(node, 104) == (1, 1)
    assert started_at(job, "VM 104 (win11)") == [("log-end", 1050)]
    assert node.running_guests() == {100, 104, 1021}


def test_a_long_gap_starts_the_holder_in_between(tmp_path: Path) -> None:
    """The guests between two needers took an hour last time: longer than keep_down_max."""
    node = seed_node(tmp_path, FAST + "keep_down_max: 600\n")
    node.add_vm(1030, name="big-fileserver")
    node.add_vm(1050, name="late-gpu", hostpci=["01:00,pcie=1"])
    log = tmp_path / "var/log/vzdump/qemu-1030.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("2026-11-29 01:00:00 INFO: Finished Backup of VM 1030 (01:02:03)\n")
    job = run_job(node, [102, 103, 105, 1030, 1050], "stop")
    assert job.ok, job.log
    assert cycles(node, 104) == (2, 2)
    assert started_at(job, "VM 104 (win11)") == [("log-end", 105), ("log-end", 1050)]


def test_after_guest_still_cycles_once_per_needing_backup(tmp_path: Path) -> None:
    node = seed_node(tmp_path, FAST + "restart: after-guest\n")
    job = run_job(node, [102, 103, 105], "stop")
    assert job.ok
    assert cycles(node, 104) == (3, 3)
    assert started_at(job, "VM 104 (win11)") == [
        ("log-end", 102),
        ("log-end", 103),
        ("log-end", 105),
    ]


def test_an_abort_after_103_starts_104_once(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, [102, 103, 105], "stop", abort_during=103)
    assert not job.ok
    assert cycles(node, 104) == (1, 1)
    assert started_at(job, "VM 104 (win11)") == [("job-abort", None)]
    assert node.is_running(104) and records(node) == []


def test_a_job_it_cannot_learn_behaves_as_after_guest_and_says_so_once(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, [102, 103, 105], "stop", pid_file=False)
    assert job.ok
    assert cycles(node, 104) == (3, 3)
    assert node.is_running(104) and records(node) == []
    said = [line for line in hook_lines(job) if "cannot learn this job's guests" in line]
    assert len(said) == 1, hook_lines(job)


def test_a_pool_job_is_followed_too(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_pool("gpu-vms", [102, 103, 105])
    job = run_job(node, None, "stop", pool="gpu-vms")
    assert job.ok, job.log
    assert cycles(node, 104) == (1, 1)
    assert started_at(job, "VM 104 (win11)") == [("log-end", 105)]


def test_the_holders_own_backup_in_the_job(tmp_path: Path) -> None:
    """104 is in the job too, between the needers: it is backed up as the stopped guest it is
    then, and runs again at the end as before the job."""
    node = seed_node(tmp_path)
    job = run_job(node, [102, 103, 104, 105], "snapshot")
    assert job.ok, job.log
    assert cycles(node, 104) == (1, 1)
    assert node.running_guests() == {104} and records(node) == []
    assert job.guests[104].mode == "stop"  # vzdump found it stopped: a stopped guest's backup


def test_a_mapped_holder_waits_for_the_holder_kept_down_whose_device_it_would_take(
    tmp_path: Path,
) -> None:
    """Both holders go down for 101. The mapped 109 is needed again by 110 only, 107 by 111:
    after 110, 109's start would take the first free device of its mapping
    (choose_hostpci_devices, qemu-server PVE/QemuServer/PCI.pm), 107's own 01:00.0, and 107
    could not start again after 111. So 109 waits, and both start after 111, 107 first."""
    node = seed_node(tmp_path)
    add_mapped_pair(node)
    node.add_vm(101, hostpci=["01:00.0", "02:00.0"])
    node.add_vm(110, hostpci=["02:00.0"])
    node.add_vm(111, hostpci=["01:00.0"])
    job = run_job(node, [101, 110, 111], "stop")
    assert job.ok, job.log
    assert cycles(node, 107) == (1, 1) and cycles(node, 109) == (1, 1)
    assert started_at(job, "VM 107 (holder)") == [("log-end", 111)]
    assert started_at(job, "VM 109 (mapped)") == [("log-end", 111)]
    waits = [line for line in hook_lines(job) if "VM 109 (mapped) stays down: its start" in line]
    assert len(waits) == 1 and "0000:01:00.0 (mapping gpu0)" in waits[0], hook_lines(job)
    reservations = node.reservations()
    assert reservations["0000:01:00.0"]["vmid"] == 107
    assert reservations["0000:02:00.0"]["vmid"] == 109
    assert node.running_guests() == {107, 109} and records(node) == []
