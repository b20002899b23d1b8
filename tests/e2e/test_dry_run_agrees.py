"""`pve-gpu-hook dry-run` predicts what the hook then does: same planner, same walk of the job.

For each end-to-end scenario, the forecast (JSON) is compared with the simulated night: who was
stopped for which guest, which backups failed, and who runs afterwards. Faults a forecast cannot
know (a guest ignoring ACPI, a start that fails) are not part of this comparison.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_hook import MAPPING
from tests.fronts import FAST, cli, seed_node
from tests.sim.node import FakeNode
from tests.sim.vzdump import JobOutcome, run_job

Scenario = Callable[[Path], tuple[FakeNode, list[int] | None]]


def seed(root: Path) -> tuple[FakeNode, list[int] | None]:
    return seed_node(root), None


def seed_after_job(root: Path) -> tuple[FakeNode, list[int] | None]:
    return seed_node(root, FAST + "restart: after-job\n"), None


def id_forms(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    for vmid, form in enumerate(["01:00", "01:00.1", "host=0000:01:00.0", "01:00.0;01:00.1"], 120):
        node.add_vm(vmid, hostpci=[form])
    return node, [120, 121, 122, 123]


def sibling_and_second_line(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.add_pci_device("0000:02:00.0", group=14, class_="0x0c0330", driver="xhci_hcd")
    node.add_gpu("0000:03:00", group=15, functions=("0",))
    node.add_vm(120, hostpci=["02:00.0"])
    node.add_vm(121, hostpci=["03:00.0", "01:00.0"])
    node.add_vm(122, hostpci=["03:00.0"])
    return node, [120, 121, 122]


def pending_and_snapshots(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.add_vm(120, "name: pend\n\n[PENDING]\nhostpci0: 01:00.0\n")
    node.add_vm(121, "name: snap\n\n[before]\nhostpci0: 01:00.0\n")
    return node, [120, 121]


def mappings(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(106, hostpci=["02:00.0"], running=True)
    node.add_vm(120, hostpci=["mapping=gpu"])
    return node, [120]


def mapping_free(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(120, hostpci=["mapping=gpu"])
    return node, [120]


def mdev(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = FakeNode(root)
    node.write_override(FAST)
    node.add_gpu("0000:03:00", group=20, functions=("0",), mdev_types=("nvidia-35",))
    node.add_vm(130, hostpci=["03:00.0,mdev=nvidia-35"], running=True)
    node.add_vm(131, hostpci=["03:00.0,mdev=nvidia-35"])
    node.add_vm(132, hostpci=["03:00.0"])
    return node, None


def mdev_after_whole(root: Path, override: str = FAST) -> tuple[FakeNode, list[int] | None]:
    """131's backup binds GPU 03:00 to vfio-pci and PVE never binds it back: 132's mdev cannot
    be created after it, unless the restart of 130 (an mdev holder, stopped for 131) gave the
    GPU back to its driver in between (docs/pve-facts.md §5). 133, with no mdev, is not
    concerned."""
    node = FakeNode(root)
    node.write_override(override)
    node.add_gpu("0000:03:00", group=20, functions=("0",), mdev_types=("nvidia-35",))
    node.add_vm(130, hostpci=["03:00.0,mdev=nvidia-35"], running=True)
    node.add_vm(131, hostpci=["03:00.0"])
    node.add_vm(132, hostpci=["03:00.0,mdev=nvidia-35"])
    node.add_vm(133, hostpci=["03:00.0"])
    return node, [131, 132, 133]


def mdev_after_whole_no_holder(root: Path) -> tuple[FakeNode, list[int] | None]:
    node, vmids = mdev_after_whole(root)
    node.stop(130)
    return node, vmids


def mdev_after_whole_after_job(root: Path) -> tuple[FakeNode, list[int] | None]:
    return mdev_after_whole(root, FAST + "restart: after-job\n")


def containers(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.stop(104)
    node.bind_host_driver("0000:01:00.0", "nvidia")
    node.add_ct(200, dev=["/dev/dri/renderD128"], running=True)
    node.add_ct(201, "lxc.cgroup2.devices.allow: c 195:0 rwm\n", running=True)
    return node, None


def template_and_plain(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.add_vm(9000, hostpci=["01:00.0"], template=True)
    node.add_vm(150)
    return node, [150, 9000]


def protected(root: Path) -> tuple[FakeNode, list[int] | None]:
    return seed_node(root, FAST + "protect: [104]\n"), None


def force_stop(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root, "shutdown_timeout: 1\nstart_timeout: 5\nforce_stop: true\n")
    node.set_fault(104, ignore_shutdown=True)
    return node, [102, 103]


def ha_holder(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.set_ha(104)
    return node, [102, 105]


def ha_states(root: Path) -> tuple[FakeNode, list[int] | None]:
    """vzdump refuses stop mode by the job's mode and the HA state ``started`` only
    (pve-manager PVE/VZDump.pm exec_backup_task; pve-ha-manager HA/Config.pm vm_is_ha_managed)."""
    node = seed_node(root)
    node.set_ha(102)  # a stopped guest: refused in a stop-mode job, backed up in a snapshot job
    res = node.pve.ha_resources()
    res["vm:103"] = {"state": "ignored"}  # out of HA's hands: backed up in either mode
    res["vm:105"] = {"state": "stopped"}  # not "started": not refused either
    node.pve.write_ha_resources(res)
    return node, [102, 103, 105]


def running_mapped_guest(root: Path) -> tuple[FakeNode, list[int] | None]:
    """A running mapped VM restarted by vzdump in stop mode picks its device anew."""
    node = seed_node(root, FAST + "restart: after-job\n")
    node.stop(104)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(107, hostpci=["01:00.0"], running=True)
    node.add_vm(109, hostpci=["mapping=gpu"], running=True)  # gets 02:00.0
    node.add_vm(101, hostpci=["01:00.0"])
    return node, [101, 109]


def mapped_holder_waits(root: Path) -> tuple[FakeNode, list[int] | None]:
    """Job-aware: 107 stays down for 111; 109, needed by 110 only, would take 107's device if
    it started after 110 (its mapping's first free one), so it waits for 107."""
    node = seed_node(root)
    node.stop(104)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(107, hostpci=["01:00.0"], running=True)
    node.add_vm(109, hostpci=["mapping=gpu"], running=True)  # gets 02:00.0
    node.add_vm(101, hostpci=["01:00.0", "02:00.0"])
    node.add_vm(110, hostpci=["02:00.0"])
    node.add_vm(111, hostpci=["01:00.0"])
    return node, [101, 110, 111]


# ---- backups that fail whatever the hook does: the forecast says so, the hook stops nobody ----


def missing_device(root: Path) -> tuple[FakeNode, list[int] | None]:
    """hostpci0 is held by VM 104, hostpci1 is not in sysfs: PVE's start dies on hostpci1."""
    node = seed_node(root)
    node.add_vm(120, hostpci=["01:00.0", "09:00.0"])
    return node, [120, 102]


def mapping_out_of_date(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.set_mapping(MAPPING.replace("id=10de:2204,iommugroup=14", "id=10de:2206,iommugroup=14"))
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.add_vm(106, hostpci=["02:00.0"], running=True)
    node.add_vm(120, hostpci=["mapping=gpu"])
    return node, [120]


def mapping_elsewhere(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.set_mapping("gpu\n\tmap node=pve2,path=0000:01:00.0,id=10de:2204,iommugroup=3\n")
    node.add_vm(120, hostpci=["mapping=gpu"])
    return node, [120]


def mapping_file_broken(root: Path) -> tuple[FakeNode, list[int] | None]:
    """Its map lines lack id=: PVE drops them, and with them the mapping."""
    node = seed_node(root)
    node.set_mapping("gpu\n\tmap node=pve1,path=0000:01:00.0,iommugroup=14\n")
    node.add_vm(120, hostpci=["mapping=gpu"])
    return node, [120]


def host_and_mapping(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = seed_node(root)
    node.set_mapping(MAPPING)
    node.add_vm(120, hostpci=["host=01:00.0,mapping=gpu"])
    return node, [120]


def no_iommu(root: Path) -> tuple[FakeNode, list[int] | None]:
    node = FakeNode(root, iommu=False)
    node.write_override(FAST)
    node.add_gpu("0000:01:00", group=None, functions=("0", "1"))
    node.add_vm(102, hostpci=["01:00"])
    node.add_vm(103, args="-device vfio-pci,host=0000:01:00.0")
    node.add_vm(104)
    return node, None


def line_pve_drops(root: Path) -> tuple[FakeNode, list[int] | None]:
    """A hostpci value failing PVE's format: PVE starts the VM without it, nobody must stop."""
    node = seed_node(root)
    node.add_vm(120, hostpci=["01:00.0,pcie=maybe"])
    node.add_vm(121, hostpci=["01:00.0, pcie=1"])
    return node, [120, 121]


def running_vm_mapping_broken(root: Path) -> tuple[FakeNode, list[int] | None]:
    """pci.cfg changed under a running mapped VM: stop mode restarts it, and that start fails."""
    node = seed_node(root)
    node.stop(104)
    node.add_gpu("0000:02:00", group=15, functions=("0",))
    node.set_mapping(MAPPING)
    node.add_vm(120, hostpci=["mapping=gpu"], running=True)
    node.set_mapping(MAPPING.replace("iommugroup=14", "iommugroup=41"))
    return node, [120]


SCENARIOS: dict[str, Scenario] = {
    "ha-states": ha_states,
    "running-mapped-guest": running_mapped_guest,
    "mapped-holder-waits": mapped_holder_waits,
    "missing-device": missing_device,
    "mapping-out-of-date": mapping_out_of_date,
    "mapping-elsewhere": mapping_elsewhere,
    "mapping-file-broken": mapping_file_broken,
    "host-and-mapping": host_and_mapping,
    "no-iommu": no_iommu,
    "line-pve-drops": line_pve_drops,
    "running-vm-mapping-broken": running_vm_mapping_broken,
    "seed": seed,
    "seed-after-job": seed_after_job,
    "id-forms": id_forms,
    "sibling-and-second-line": sibling_and_second_line,
    "pending-and-snapshots": pending_and_snapshots,
    "mapping-busy": mappings,
    "mapping-free": mapping_free,
    "mdev": mdev,
    "mdev-after-whole": mdev_after_whole,
    "mdev-after-whole-no-holder": mdev_after_whole_no_holder,
    "mdev-after-whole-after-job": mdev_after_whole_after_job,
    "containers": containers,
    "template-and-plain": template_and_plain,
    "protected": protected,
    "force-stop": force_stop,
    "ha-holder": ha_holder,
}

STOP_LINE = re.compile(
    r"^\S+ backup-start (\d+) (?:VM|CT) (\d+)(?: \([^)]*\))? (?:shut down|stopped hard)"
)


def stops_in_log(node: FakeNode) -> dict[int, list[int]]:
    """Who the hook stopped for whom, from its own log file."""
    found: dict[int, list[int]] = {}
    log = node.root / "var/log/pve-gpu-hook.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        match = STOP_LINE.match(line)
        if match:
            found.setdefault(int(match.group(1)), []).append(int(match.group(2)))
    return found


def restarts_in(job: JobOutcome) -> dict[int, list[int | None]]:
    """Holder → the guest whose hook phase started it again (None: job-end or job-abort)."""
    found: dict[int, list[int | None]] = {}
    for call in job.hook_calls:
        for line in call.lines:
            match = re.search(r"(?:VM|CT) (\d+) (?:\([^)]*\) )?started again", line)
            if match:
                found.setdefault(int(match.group(1)), []).append(call.vmid)
    return found


@pytest.mark.parametrize("mode", ["stop", "snapshot"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dry_run_matches_the_night(tmp_path: Path, name: str, mode: str) -> None:
    node, vmids = SCENARIOS[name](tmp_path)
    selection = [str(v) for v in vmids] if vmids else ["--all"]
    before = sorted(p.name for p in node.root.rglob("*"))
    result = cli(node, "dry-run", *selection, "--mode", mode, "--output-format", "json")
    assert result.returncode in (0, 1), result.stderr
    assert sorted(p.name for p in node.root.rglob("*")) == before  # wrote nothing
    assert node.calls() == []  # ran nothing
    forecast = json.loads(result.stdout)

    job = run_job(node, vmids, mode=mode)
    node.wait_settled()
    actual_stops = stops_in_log(node)
    for guest in forecast["guests"]:
        vmid = guest["vmid"]
        predicted = sorted(s["vmid"] for s in guest["stops"])
        assert predicted == sorted(actual_stops.get(vmid, [])), (vmid, guest, job.log)
        assert (guest["outcome"] != "fail") == job.guests[vmid].ok, (vmid, guest, job.log)
    assert forecast["ok"] == all(g.ok for g in job.guests.values())
    predicted_back: dict[int, list[int | None]] = {}
    for guest in forecast["guests"]:
        for holder in guest["restarted_after"]:
            predicted_back.setdefault(holder, []).append(guest["vmid"])
    for holder in forecast["restarted_at_job_end"]:
        predicted_back.setdefault(holder, []).append(None)
    assert predicted_back == restarts_in(job), (forecast, job.log)
    assert (result.returncode == 0) == forecast["ok"]
