"""End to end: the real hook, called by the simulated vzdump on a fake PVE node.

Each test states a night an admin could have and checks the only things that matter to them:
every backup that can succeed does, and every guest ends in the power state it had before.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from tests.fronts import (
    FAST,
    cli,
    commands,
    hook,
    hook_lines,
    read_state,
    records,
    seed_node,
    write_state,
)
from tests.sim.node import FakeNode, reboot
from tests.sim.vzdump import JobOutcome, run_job


def assert_clean(node: FakeNode) -> None:
    assert records(node) == []


# --- the seed's case ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stop", "snapshot", "suspend"])
def test_seed_night_every_backup_succeeds_and_only_104_runs(tmp_path: Path, mode: str) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, mode=mode)
    assert job.ok, job.log
    assert all(g.ok for g in job.guests.values())
    # the seed's defect: it booted every backed-up guest at job end
    assert node.running_guests() == {104}
    # gracefully: shutdown with a timeout, never a hard stop
    assert commands(node, "stop") == []
    shutdowns = commands(node, "shutdown")
    assert shutdowns and all(c[:3] == ["qm", "shutdown", "104"] for c in shutdowns)
    assert all("--timeout" in c for c in shutdowns)
    assert_clean(node)


@pytest.mark.parametrize(("restart", "cycles"), [("after-guest", 3), ("after-job", 1)])
def test_the_night_in_numbers(tmp_path: Path, restart: str, cycles: int) -> None:
    """The job's tally (job.json) counts holders, shutdown/boot cycles and downtime."""
    node = seed_node(tmp_path, FAST + f"restart: {restart}\n")
    before = time.time()
    job = run_job(node, mode="stop")
    assert job.ok, job.log
    tally = json.loads((node.root / "var/lib/pve-gpu-hook/job.json").read_text())
    assert {s["vmid"] for s in tally["stops"]} == {104}
    assert [s["for_vmid"] for s in tally["stops"]] == [102, 103, 105][:cycles]
    assert all(s["back"] is not None and not s["failed"] for s in tally["stops"])
    assert all(before <= s["at"] <= s["back"] <= time.time() for s in tally["stops"])
    assert tally["end_phase"] == "job-end" and tally["ended"] >= tally["stops"][-1]["back"]


def test_seed_night_task_log_says_who_was_stopped_for_whom(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, [102], mode="stop")
    lines = hook_lines(job)
    assert any("VM 104 (win11) shut down" in line and "VM 102" in line for line in lines)
    assert any("VM 104 (win11) started again" in line for line in lines)
    # one concise line per action, and the night in one line at job end: that one reaches the
    # notification (log-end's lines reach only the task log)
    assert len(lines) == 3
    assert "this job: 1 guest(s) shut down to free a GPU, 1 shutdown/boot cycle(s)" in lines[2]
    assert "VM 104 (win11) shut down once for 102" in lines[2]


def test_a_forced_stop_says_how_long_it_really_took(tmp_path: Path) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nforce_stop: true\n")
    node.set_fault(104, ignore_shutdown=True)
    job = run_job(node, [102])
    assert job.ok, job.log
    [line] = [x for x in hook_lines(job) if "stopped hard" in x]
    seconds = float(line.split(" in ", 1)[1].split(" s", 1)[0])
    assert seconds >= 1.0  # the shutdown's timeout, then the stop: not "in 0 s"


def test_a_failed_restart_is_said_once(tmp_path: Path) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 3\nstart_timeout: 1\n")
    node.set_fault(104, start_fails=True)
    job = run_job(node, [102])
    calls = {c.phase: c for c in job.hook_calls if c.vmid in (None, 102)}
    said = [x for x in calls["log-end"].lines if "did not start" in x]
    assert len(said) == 1 and "record kept" in said[0]  # the task log, as it happens
    # job-end tries again: the same failure is not said again line for line, but its one
    # closing line carries it for the notification (which gets no log-end output)
    end = calls["job-end"]
    assert end.exit_code == 1
    assert not any("record kept" in x for x in end.lines)
    assert [x for x in end.lines if "did not start" in x] == [end.lines[-1]]
    assert any("1 failed restart(s)" in x for x in end.lines)
    assert calls["job-abort"].lines == []  # vzdump's job-abort after the failed job-end


def test_without_the_hook_the_backup_fails_like_in_real_life(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, [102], hook_cmd=())
    assert not job.guests[102].ok
    assert "already in use by VMID '104'" in (job.guests[102].error or "")


def test_after_job_restart_keeps_holder_off_until_job_end(tmp_path: Path) -> None:
    node = seed_node(tmp_path, FAST + "restart: after-job\n")
    job = run_job(node, [102, 103, 105], mode="stop")
    assert job.ok, job.log
    assert len(commands(node, "shutdown")) == 1  # stopped once for the three backups
    assert len(commands(node, "start")) == 1
    assert node.running_guests() == {104}
    ends = [c for c in job.hook_calls if c.phase == "job-end"]
    assert any("started again" in line for line in ends[0].lines)


def test_repeated_jobs_behave_the_same(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    for _ in range(3):
        job = run_job(node, mode="stop")
        assert job.ok
        assert node.running_guests() == {104}
        assert_clean(node)
    assert len(commands(node, "shutdown")) == 3  # once per job (restart: job-aware)


# --- what counts as the same device ---------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "01:00",
        "01:00.0",
        "0000:01:00.0",
        "host=01:00.0",
        "01:00.1",  # the audio function: same IOMMU group
        "0000:01:00.0;0000:01:00.1",
        "01:00.0,pcie=1,x-vga=1,rombar=0",
        "0000:01:00,pcie=1",
    ],
)
def test_every_id_form_frees_the_gpu(tmp_path: Path, target: str) -> None:
    node = seed_node(tmp_path)
    node.add_vm(120, name="target", hostpci=[target])
    job = run_job(node, [120])
    assert job.ok, job.log
    assert node.running_guests() == {104}
    assert commands(node, "shutdown")


def test_pci_domain_of_more_than_four_digits(tmp_path: Path) -> None:
    """A VMD domain: PVE takes ids with a domain of 4 or more hex digits, so must the hook."""
    node = FakeNode(tmp_path)
    node.write_override(FAST)
    node.add_gpu("10000:e1:00", group=40, functions=("0", "1"))
    node.add_gpu("10000:e2:00", group=41, functions=("0",))
    node.set_mapping(
        "vmd\n"
        "\tmap node=pve1,path=10000:e1:00.0,id=10de:2204,iommugroup=40\n"
        "\tmap node=pve1,path=10000:e2:00.0,id=10de:2204,iommugroup=41\n"
    )
    node.add_vm(104, hostpci=["10000:e1:00.0,pcie=1"], running=True)
    node.add_vm(105, hostpci=["mapping=vmd"], running=True)  # gets e2:00.0
    node.add_vm(120, hostpci=["10000:e1:00,pcie=1"])
    node.add_vm(121, hostpci=["mapping=vmd"])
    job = run_job(node, [120, 121])
    assert job.ok, job.log
    # 104 stays down for 121 (job-aware), whose mapping then takes the free e1:00.0
    assert sorted(c[:3] for c in commands(node, "shutdown")) == [["qm", "shutdown", "104"]]
    assert node.running_guests() == {104, 105}
    assert_clean(node)


def test_iommu_sibling_device_is_freed(tmp_path: Path) -> None:
    """A different device in the same IOMMU group: PVE does not check, QEMU fails cryptically."""
    node = seed_node(tmp_path)
    node.add_pci_device("0000:02:00.0", group=14, class_="0x0c0330", driver="xhci_hcd")
    node.add_vm(120, hostpci=["02:00.0"])
    assert not run_job(node, [120], hook_cmd=()).guests[120].ok  # without the hook
    job = run_job(node, [120])
    assert job.ok, job.log
    assert node.running_guests() == {104}


def test_other_group_is_left_alone(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.add_vm(120, hostpci=["02:00.0"])
    job = run_job(node, [120])
    assert job.ok
    assert commands(node) == []


def test_second_hostpci_line_counts(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.add_vm(120, hostpci=["02:00.0", "01:00.0"])  # hostpci1 is the shared one
    job = run_job(node, [120])
    assert job.ok, job.log
    assert commands(node, "shutdown")[0][:3] == ["qm", "shutdown", "104"]


def test_high_hostpci_index_alone(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(120, "hostpci7: 01:00.0\n")
    assert run_job(node, [120]).ok
    assert node.running_guests() == {104}


def test_pending_hostpci_is_what_the_backup_start_uses(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(120, "name: pend\n\n[PENDING]\nhostpci0: 01:00.0\n")
    job = run_job(node, [120])
    assert job.ok, job.log
    assert commands(node, "shutdown")


def test_pending_delete_of_hostpci_needs_nothing(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(120, "hostpci0: 01:00.0\n\n[PENDING]\ndelete: hostpci0\n")
    job = run_job(node, [120])
    assert job.ok, job.log
    assert commands(node) == []


def test_snapshot_sections_are_not_the_current_config(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(
        120,
        "name: snappy\nparent: before\n\n[before]\nhostpci0: 01:00.0\nsnaptime: 1700000000\n"
        "\n[special:cloudinit]\nhostpci1: 01:00.0\n",
    )
    job = run_job(node, [120])
    assert job.ok
    assert commands(node) == []


# --- mappings -----------------------------------------------------------------------------

MAPPING = """\
gpu
\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14
\tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=15
\tmap node=pve2,path=0000:01:00.0,id=10de:2204,iommugroup=3
"""


def test_mapping_with_a_free_alternative_stops_nobody(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(120, hostpci=["mapping=gpu,pcie=1"])
    job = run_job(node, [120])
    assert job.ok, job.log
    assert commands(node) == []


def test_mapping_with_every_alternative_busy_frees_one(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(106, name="other", hostpci=["02:00.0"], running=True)
    node.add_vm(120, hostpci=["mapping=gpu"])
    job = run_job(node, [120])
    assert job.ok, job.log
    assert len(commands(node, "shutdown")) == 1  # one alternative is enough
    assert node.running_guests() == {104, 106}


def test_mapping_held_alternative_of_a_running_mapped_vm(tmp_path: Path) -> None:
    """The running holder uses the mapping too: its process says which alternative it got."""
    node = seed_node(tmp_path)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(106, hostpci=["mapping=gpu"], running=True)  # gets 02:00.0: 01:00.0 is taken
    node.add_vm(120, hostpci=["02:00.0"])
    job = run_job(node, [120])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "106"]]


def two_gpu_node(root: Path) -> FakeNode:
    """GPUs 01:00 (group 14) and 02:00 (group 15), both in PCI mapping ``gpu``."""
    node = FakeNode(root)
    node.write_override(FAST)
    node.add_gpu("0000:01:00", group=14, functions=("0", "1"), nvidia_minor=0, drm=("renderD128",))
    node.add_gpu("0000:02:00", group=15, functions=("0", "1"), nvidia_minor=1, drm=("renderD129",))
    node.set_mapping(MAPPING)
    return node


def test_mapping_taken_twice_frees_the_second_gpu_too(tmp_path: Path) -> None:
    """PVE's choose_hostpci_devices gives hostpci1 the alternative hostpci0 did not take."""
    node = two_gpu_node(tmp_path)
    node.add_vm(120, name="render", hostpci=["mapping=gpu,pcie=1", "mapping=gpu,pcie=1"])
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD129,gid=104"], running=True)
    job = run_job(node, [120])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "shutdown")] == [["pct", "shutdown", "200"]]
    assert node.running_guests() == {200}
    assert node.driver("0000:02:00.0") == "nvidia"  # given back before the CT started
    assert_clean(node)


def test_running_vm_with_a_mapping_taken_twice_in_stop_mode(tmp_path: Path) -> None:
    """vzdump's restart of the VM gives each line the alternative it had: nothing moves."""
    node = two_gpu_node(tmp_path)
    node.add_vm(120, hostpci=["mapping=gpu", "mapping=gpu"], running=True)
    held = sorted(a for a, r in node.reservations().items() if r["vmid"] == 120)
    job = run_job(node, [120], "stop")
    assert job.ok, job.log
    assert hook_lines(job) == []
    assert sorted(a for a, r in node.reservations().items() if r["vmid"] == 120) == held


def test_mapping_taken_twice_with_the_first_gpu_reserved(tmp_path: Path) -> None:
    """hostpci0 takes the free 02:00.0, so hostpci1 can only have 01:00.0, which VM 106 holds."""
    node = two_gpu_node(tmp_path)
    node.add_vm(106, hostpci=["01:00"], running=True)
    node.add_vm(120, hostpci=["mapping=gpu", "mapping=gpu"])
    job = run_job(node, [120])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "shutdown")] == [["qm", "shutdown", "106"]]
    assert node.running_guests() == {106}
    assert_clean(node)


# --- kinds of holders ---------------------------------------------------------------------


def test_mdev_guests_share_the_parent(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.add_gpu("0000:03:00", group=20, functions=("0",), mdev_types=("nvidia-35",))
    node.write_override(FAST)
    node.add_vm(130, hostpci=["03:00.0,mdev=nvidia-35"], running=True)
    node.add_vm(131, hostpci=["03:00.0,mdev=nvidia-35"])
    job = run_job(node, [131])
    assert job.ok, job.log
    assert commands(node) == []


def test_full_passthrough_excludes_mdev_users(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.add_gpu("0000:03:00", group=20, functions=("0",), mdev_types=("nvidia-35",))
    node.write_override(FAST)
    node.add_vm(130, hostpci=["03:00.0,mdev=nvidia-35"], running=True)
    node.add_vm(131, hostpci=["03:00.0"])
    job = run_job(node, [131])
    assert job.ok, job.log
    assert node.running_guests() == {130}
    assert commands(node, "shutdown")[0][:3] == ["qm", "shutdown", "130"]


def test_container_holder_is_shut_down_and_started_again(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.stop(104)
    node.bind_host_driver("0000:01:00.0", "nvidia")  # 104 left it on vfio-pci
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"], running=True)
    node.add_ct(201, "lxc.cgroup2.devices.allow: c 195:* rwm\n", running=True)
    node.add_ct(202, hostname="nogpu", running=True)
    job = run_job(node, [102])
    assert job.ok, job.log
    assert sorted(c[:3] for c in commands(node, "shutdown")) == [
        ["pct", "shutdown", "200"],
        ["pct", "shutdown", "201"],
    ]
    assert node.running_guests() == {200, 201, 202}


NVIDIA_RECIPE = """\
lxc.cgroup2.devices.allow: c 195:* rwm
lxc.cgroup2.devices.allow: c 508:* rwm
lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file
lxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind,optional,create=file
lxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file
"""
DRM_RECIPE = """\
lxc.cgroup2.devices.allow = c 226:* rwm
lxc.mount.entry = /dev/dri/renderD128 dev/dri/renderD128 none bind,optional,create=file
"""


@pytest.mark.parametrize("recipe", [NVIDIA_RECIPE, DRM_RECIPE], ids=["nvidia", "dri"])
def test_wildcard_cgroup_rule_is_no_use_of_the_other_gpu(tmp_path: Path, recipe: str) -> None:
    """The common recipe: a rule that allows every GPU, and one GPU mounted. The CT uses that
    one; a backup that needs the other GPU leaves it alone, one that needs its own stops it."""
    node = two_gpu_node(tmp_path)
    node.add_ct(200, recipe, hostname="plex", running=True)
    node.add_vm(120, hostpci=["02:00,pcie=1"])
    node.add_vm(121, hostpci=["01:00,pcie=1"])
    job = run_job(node, [120])
    assert job.ok, job.log
    assert commands(node) == []
    job = run_job(node, [121])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "shutdown")] == [["pct", "shutdown", "200"]]
    assert node.running_guests() == {200}
    assert_clean(node)


def test_containers_do_not_free_for_each_other(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.stop(104)
    node.bind_host_driver("0000:01:00.0", "nvidia")
    node.add_ct(200, dev=["/dev/dri/renderD128"], running=True)
    node.add_ct(201, dev=["/dev/dri/renderD128"])
    job = run_job(node, [201])
    assert job.ok
    assert commands(node) == []


def test_prelaunch_holder_is_found(tmp_path: Path) -> None:
    """The seed grepped `qm status` for 'running' and missed prelaunch/paused guests."""
    node = seed_node(tmp_path)
    node.stop(104)
    node.add_vm(107, hostpci=["01:00.0"], paused=True)
    assert node.qmp_status(107) in ("prelaunch", "paused")
    job = run_job(node, [102])
    assert not job.guests[102].ok  # found, but a paused VM cannot shut down gracefully
    assert "VM 107 could not be shut down: VM is paused" in (job.guests[102].error or "")
    assert commands(node, "shutdown")[0][:3] == ["qm", "shutdown", "107"]
    node.write_override(FAST + "force_stop: true\n")
    assert run_job(node, [102]).ok
    assert [c[:3] for c in commands(node, "stop")] == [["qm", "stop", "107"]]


def test_template_needs_nothing(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(9000, name="tpl", hostpci=["01:00.0"], template=True)
    job = run_job(node, [9000])
    assert job.ok, job.log
    assert commands(node) == []


def test_running_target_needs_nothing(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, [104], mode="stop")
    assert job.ok
    assert commands(node) == []
    assert node.running_guests() == {104}


def test_guest_without_gpu_and_container_backups_need_nothing(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(150, name="plain")
    node.add_ct(250, dev=["/dev/dri/renderD128"])
    job = run_job(node, [150, 250], mode="stop")
    assert job.ok
    assert commands(node) == []


# --- holders that do not cooperate ----------------------------------------------------------


def test_holder_ignoring_shutdown_fails_only_that_backup(tmp_path: Path) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 0\n")
    node.add_vm(150, name="plain")
    node.set_fault(104, ignore_shutdown=True)
    job = run_job(node, [102, 150])
    assert not job.guests[102].ok
    assert job.guests[150].ok
    error = job.guests[102].error or ""
    assert "pve-gpu-hook: cannot free 0000:01:00.0 for VM 102" in error
    assert "VM 104 (win11) did not shut down within 1 s" in error
    assert node.running_guests() == {104}
    assert commands(node, "stop") == []
    assert_clean(node)


def test_holder_ignoring_shutdown_with_force_stop(tmp_path: Path) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 1\nstart_timeout: 5\nforce_stop: true\n")
    node.set_fault(104, ignore_shutdown=True)
    job = run_job(node, [102])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "stop")] == [["qm", "stop", "104"]]
    assert node.running_guests() == {104}


def test_protected_holder_fails_clearly_and_is_untouched(tmp_path: Path) -> None:
    node = seed_node(tmp_path, FAST + "protect: [104]\n")
    job = run_job(node, [102, 103])
    assert not job.guests[102].ok and not job.guests[103].ok
    assert "VM 104 (win11) is protected" in (job.guests[102].error or "")
    assert commands(node) == []
    assert node.running_guests() == {104}


def test_locked_holder_is_not_touched(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.add_vm(107, hostpci=["01:00.0"], lock="snapshot")
    node.stop(104)
    node.start(107)
    job = run_job(node, [102])
    assert not job.guests[102].ok
    assert "is locked (snapshot)" in (job.guests[102].error or "")
    assert commands(node) == []


def test_ha_managed_holder(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    node.set_ha(104)
    node.set_fault(104, ha_delay=0.5)
    job = run_job(node, [102, 103])
    assert job.ok, job.log
    node.wait_settled()
    assert node.running_guests() == {104}
    assert_clean(node)


def test_failed_restart_is_kept_reported_and_fails_job_end(tmp_path: Path) -> None:
    node = seed_node(tmp_path, "shutdown_timeout: 3\nstart_timeout: 1\n")
    node.set_fault(104, start_fails=True)
    job = run_job(node, [102])
    assert job.guests[102].ok  # the backup itself worked
    assert not job.ok  # but job-end failed, so the notification says so
    end = next(c for c in job.hook_calls if c.phase == "job-end")
    assert end.exit_code != 0
    assert any("VM 104 (win11)" in line for line in end.lines)
    assert [r["vmid"] for r in records(node)] == [104]
    assert records(node)[0]["status"] == "start-failed"
    assert 104 not in node.running_guests()
    # the admin fixes the guest, then recovers
    node.clear_faults(104)
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.running_guests() == {104}
    assert_clean(node)


# --- aborts, crashes, reboots -------------------------------------------------------------


def test_job_abort_puts_the_holder_back(tmp_path: Path) -> None:
    node = seed_node(tmp_path, FAST + "restart: after-job\n")
    job = run_job(node, [102, 103], abort_during=102)
    assert job.aborted
    assert "job-abort" in job.phases()
    assert node.running_guests() == {104}
    assert_clean(node)


def test_crash_then_recover(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    job = run_job(node, [102], crash_after=("backup-start", 102))
    assert job.crashed
    assert 104 not in node.running_guests()
    [record] = records(node)
    assert record["vmid"] == 104 and record["for_vmid"] == 102
    # the paused QEMU of 102 died with the host: nothing holds the GPU any more
    node.stop(102)
    result = cli(node, "recover")
    assert result.returncode == 0, result.stderr
    assert "VM 104 (win11)" in result.stdout
    assert node.running_guests() == {104}
    again = cli(node, "recover")
    assert again.returncode == 0
    assert "nothing to recover" in again.stdout
    assert len(commands(node, "start")) == 1


def test_running_ct_without_a_cgroup_dir(tmp_path: Path) -> None:
    """A host without /sys/fs/cgroup/lxc/<vmid>: PVE sees a running CT by its command socket in
    /proc/net/unix (pve-container check_running), and so must the hook, dry-run and recover."""
    node = FakeNode(tmp_path, ct_cgroup=False)
    node.write_override(FAST)
    node.add_gpu("0000:01:00", group=14, functions=("0", "1"), nvidia_minor=0, drm=("renderD128",))
    node.add_ct(200, hostname="plex", dev=["/dev/dri/renderD128,gid=104"], running=True)
    node.add_vm(102, hostpci=["01:00,pcie=1"])
    forecast = cli(node, "dry-run", "102", "--output-format", "json")
    assert '"stops": [{"address": "0000:01:00.0", "vmid": 200}]' in forecast.stdout
    job = run_job(node, [102])
    assert job.ok, job.log
    assert [c[:3] for c in commands(node, "shutdown")] == [["pct", "shutdown", "200"]]
    assert node.running_guests() == {200}
    assert_clean(node)
    # killed mid-job; the admin starts the CT by hand; recover sees it runs
    job = run_job(node, [102], crash_after=("backup-start", 102))
    assert [r["vmid"] for r in records(node)] == [200]
    node.stop(102)
    node.start(200)
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr
    assert records(node) == []
    assert len(commands(node, "start")) == 1  # the hook's own restart after the first job


def test_recover_reports_a_conflict_instead_of_stopping_anyone(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    run_job(node, [102], crash_after=("archive", 102))  # 102's paused QEMU holds the GPU
    assert node.is_running(102)
    result = cli(node, "recover")
    assert result.returncode == 1
    assert "held by VM 102" in result.stdout
    assert commands(node, "start") == [] and len(commands(node, "shutdown")) == 1
    assert [r["vmid"] for r in records(node)] == [104]


def test_crash_then_next_job_reports_and_restarts(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    run_job(node, [102], crash_after=("backup-start", 102))
    node.stop(102)
    job = run_job(node, [103])
    start = next(c for c in job.hook_calls if c.phase == "job-start")
    assert any("VM 104 (win11) is still off" in line for line in start.lines)
    assert job.ok, job.log
    assert node.running_guests() == {104}
    assert_clean(node)


def test_host_reboot_mid_job_then_recover(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    run_job(node, [102], crash_after=("backup-start", 102))
    reboot(node)
    assert node.running_guests() == set()
    assert [r["vmid"] for r in records(node)] == [104]  # state survives the reboot
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.running_guests() == {104}  # 102, 103, 105 were off before: stay off


# --- bad input ----------------------------------------------------------------------------


def test_garbage_in_configs_is_skipped_with_file_and_line(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    path = node.root / "etc/pve/qemu-server/102.conf"
    path.write_text(path.read_text() + "this is not a key\n\x1b[31mred: x\n\xff\xfe junk\n")
    job = run_job(node, [102])
    assert job.ok, job.log
    warnings = [line for line in hook_lines(job) if "warning" in line]
    assert any("102.conf:" in line and "cannot parse" in line for line in warnings)
    assert all("\x1b" not in line for line in job.log)
    assert node.running_guests() == {104}


def test_invalid_yaml_stops_nobody_but_still_restarts(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    run_job(node, [102], crash_after=("backup-start", 102))  # a leftover: 104 is off
    node.stop(102)
    node.start(104)
    node.write_override("shutdown_timeout: [oops\n")
    job = run_job(node, [103])
    assert not job.guests[103].ok
    error = job.guests[103].error or ""
    assert "config.yaml:1" in error and "stopping nobody" in error
    assert commands(node, "shutdown")[1:] == []  # only the first night's shutdown
    assert node.running_guests() == {104}
    assert_clean(node)  # the leftover record of the running 104 is dropped at job end


def test_invalid_yaml_leftover_still_restarted_at_job_end(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    run_job(node, [102], crash_after=("backup-start", 102))
    node.stop(102)
    node.write_override("restart: sometimes\n")
    job = run_job(node, [105])
    assert node.running_guests() == {104}
    assert job.guests[105].ok  # nothing held the GPU: an invalid file stops nobody anyway
    assert_clean(node)


@pytest.mark.parametrize("phase", ["job-whatever", "backup-new-phase", "x"])
def test_unknown_phases_are_tolerated(tmp_path: Path, phase: str) -> None:
    node = seed_node(tmp_path)
    assert hook(node, phase).returncode == 0
    assert hook(node, phase, "stop", "102").returncode == 0
    assert commands(node) == []


@pytest.mark.parametrize("vmid", ["../1", "100;reboot", "-1", "99", "1000000000", "0102", "１０２"])
def test_bad_vmids_are_refused(tmp_path: Path, vmid: str) -> None:
    node = seed_node(tmp_path)
    result = hook(node, "backup-start", "stop", vmid)
    assert result.returncode == 2
    assert "invalid VMID" in result.stderr
    assert commands(node) == []
    # where failing would keep vzdump from restarting a guest, the hook never fails
    assert hook(node, "pre-restart", "stop", vmid).returncode == 0


def test_hook_finds_qm_without_path(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    result = hook(node, "backup-start", "stop", "102")
    assert result.returncode == 0, result.stderr
    assert 104 not in node.running_guests()
    assert hook(node, "log-end", "stop", "102").returncode == 0
    assert node.running_guests() == {104}


def test_state_files_are_private(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    run_job(node, [102], crash_after=("backup-start", 102))
    state_dir = node.root / "var/lib/pve-gpu-hook"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "state.json").stat().st_mode) == 0o600
    log = node.root / "var/log/pve-gpu-hook.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert not (Path("/tmp") / "gpu-backup-state").exists()


def test_state_dir_symlink_is_refused_and_nobody_is_stopped(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state_dir = node.root / "var/lib/pve-gpu-hook"
    if state_dir.exists():
        os.rmdir(state_dir)
    state_dir.symlink_to(elsewhere)
    job = run_job(node, [102])
    assert not job.guests[102].ok
    assert node.running_guests() == {104}
    assert list(elsewhere.iterdir()) == []


def test_container_gets_its_gpu_back_from_vfio(tmp_path: Path) -> None:
    """After the VM's backup the GPU stays on vfio-pci (PVE never binds it back): without the
    host driver the CT's /dev/dri node is missing and `pct start` fails."""
    node = FakeNode(tmp_path)
    node.write_override(FAST)
    node.add_gpu("0000:00:02", group=2, vendor="8086", driver="i915", drm=("renderD128",))
    node.add_vm(106, name="plex", hostpci=["00:02.0"])
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"], running=True)
    job = run_job(node, [106])
    assert job.ok, job.log
    assert node.running_guests() == {200}
    assert node.driver("0000:00:02.0") == "i915"
    assert_clean(node)
    # the same night without the hook's help: the CT's start fails on the missing node
    node.stop(200)
    node.start(106)
    node.stop(106)
    assert node.driver("0000:00:02.0") == "vfio-pci"
    result = cli(node, "recover")
    assert "nothing to recover" in result.stdout
    with pytest.raises(Exception, match="renderD128 does not exist"):
        node.pve.ct_start(200)


def hung_job(node: FakeNode) -> JobOutcome:
    """The hook is killed right after it shut VM 104 down for VM 102's backup, and vzdump then
    hangs (a dead storage, say): its worker still runs, 104 waits for that job."""
    job = run_job(
        node,
        [102, 103],
        env_extra={"PVE_GPU_HOOK_CRASH_AT": "after-shutdown"},
        env_at=("backup-start", 102),
        hang_after=("backup-start", 102),
    )
    assert job.crashed and 104 not in node.running_guests()
    return job


def test_recover_leaves_the_running_jobs_guests_to_it(tmp_path: Path) -> None:
    """A holder stopped by the backup job that still runs: starting it now would take the GPU
    back from the backup that needs it. The job is known by its UPID (pid and start time)."""
    node = seed_node(tmp_path)
    job = hung_job(node)
    result = cli(node, "recover")
    assert result.returncode == 1
    assert f"stopped by the backup job running now ({job.upid})" in result.stdout
    assert 104 not in node.running_guests()
    [record] = records(node)
    assert record["upid"] == job.upid and record["job"] == job.worker
    node.end_process(job.worker)  # the job ended (or was killed) without starting it again
    assert cli(node, "recover").returncode == 0
    assert node.running_guests() == {104}


def test_recover_does_not_take_a_reused_pid_for_the_job(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    hung_job(node)
    [record] = records(node)
    node.end_process(record["job"])  # the job is gone; another process gets its pid
    node.spawn_process(["/usr/sbin/cron", "-f"], pid=record["job"])
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout
    assert node.running_guests() == {104}


def test_recover_after_a_reboot_does_not_take_the_pid_for_the_job(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    hung_job(node)
    [record] = records(node)
    node.reboot()
    node.spawn_process(["/usr/bin/kvm", "-id", "110"], pid=record["job"])  # its pid, anew
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout
    assert node.running_guests() == {104}


def test_recover_reads_records_of_older_releases_by_pid(tmp_path: Path) -> None:
    """A record written before the UPID was recorded: the job's pid alone, as before."""
    node = seed_node(tmp_path)
    hung_job(node)
    path = node.root / "var/lib/pve-gpu-hook/state.json"
    [record] = read_state(path)
    record.pop("upid", None)
    record["job"] = pid = node.spawn_process(["vzdump"])
    write_state(path, [record])
    result = cli(node, "recover")
    assert result.returncode == 1
    assert f"stopped by the backup job running now (pid {pid})" in result.stdout
    node.end_process(pid)
    assert cli(node, "recover").returncode == 0
    assert node.running_guests() == {104}


def test_recover_force_starts_the_running_jobs_guests(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    hung_job(node)
    assert cli(node, "recover", "--force").returncode == 0
    assert node.running_guests() == {104}
