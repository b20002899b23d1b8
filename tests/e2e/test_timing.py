"""Time limits as PVE's own, over the simulator (docs/pve-facts.md §8).

The hook waits for a ``qm``/``pct`` command as long as PVE may take, derived from the guest's
config as PVE derives it, and never kills one; it runs them in their own session, so that a
"Stop" of the backup task in the GUI does not cut a restart in half.

Minutes of PVE time play in seconds: the fake PVE runs on a scaled clock
(``FakeNode.set_time_scale``), and so does the hook, called in this process with its clock
scaled the same way (:func:`scaled_hook_clock`).
"""

from __future__ import annotations

import subprocess
import time
import types
from pathlib import Path

import pytest

from pvegpuhook import act, phases
from tests.fronts import cli, commands, hook_lines, records, seed_node, wait_for
from tests.sim.node import FakeNode
from tests.sim.vzdump import INPROCESS, run_job

SCALE = 0.02  # real seconds per simulated second: 100 s of PVE time take 2 s


def scaled_hook_clock(monkeypatch: pytest.MonkeyPatch, scale: float = SCALE) -> None:
    """The hook's clock (its deadlines, and those of the commands it waits for) runs at the fake
    PVE's scale; it sleeps in real time."""
    origin = time.monotonic()

    def monotonic() -> float:
        return origin + (time.monotonic() - origin) / scale

    clock = types.ModuleType("time")
    clock.__dict__.update(time.__dict__)
    clock.monotonic = monotonic  # type: ignore[attr-defined]
    monkeypatch.setattr(act, "time", clock)
    monkeypatch.setattr(phases, "time", clock)
    monkeypatch.setattr(subprocess, "_time", monotonic)  # Popen.wait(timeout=...), run(timeout=...)


def big_gpu_holder(tmp_path: Path, override: str) -> FakeNode:
    """The seed's node, with the desktop VM 104 a 64 GiB GPU VM with one network device:
    PVE allows its start 64 * 4 + 5 = 261 s (config_aware_timeout)."""
    node = seed_node(tmp_path, override)
    node.stop(104)
    node.add_vm(
        104,
        name="win11",
        hostpci=["0000:01:00.0,pcie=1"],
        memory="65536",
        net0="virtio=BC:24:11:00:00:04,bridge=vmbr0",
    )
    node.start(104)
    return node


def start_calls(node: FakeNode, vmid: int) -> list[dict]:
    return [c for c in node.calls("qm") if c["argv"][1:3] == ["start", str(vmid)]]


def test_a_big_gpu_vm_that_starts_slowly_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its start takes 200 s, within PVE's 261 s: not a failure, and ``qm start`` not killed
    (the hook used to give up after start_timeout, 120 s, and kill it at 150 s)."""
    node = big_gpu_holder(tmp_path, "shutdown_timeout: 120\n")
    node.set_time_scale(SCALE)
    scaled_hook_clock(monkeypatch)
    node.set_fault(104, start_delay=200)
    job = run_job(node, [102], hook_cmd=INPROCESS)
    assert job.ok, hook_lines(job)
    assert node.running_guests() == {104}
    assert records(node) == []
    [start] = start_calls(node, 104)
    assert start["exit"] == 0  # it ran to its end
    assert start["t_end"] - start["t"] >= 200 * SCALE
    assert any("VM 104 (win11) started again" in line for line in hook_lines(job))


def test_a_start_longer_than_pve_allows_is_left_running_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest hookscript that takes 450 s at pre-start (PVE does not bound it): the hook stops
    waiting, says so, keeps the record, and never kills ``qm start``; the guest comes up, and
    ``recover`` then drops the record."""
    node = big_gpu_holder(tmp_path, "shutdown_timeout: 120\nrestart: after-job\n")
    node.set_time_scale(SCALE)
    scaled_hook_clock(monkeypatch)
    node.set_fault(104, hookscript_delay=450)
    job = run_job(node, [102], hook_cmd=INPROCESS)
    assert job.guests[102].ok
    assert not job.ok  # job-end says a guest is not back
    end = "\n".join(line for c in job.hook_calls if c.phase == "job-end" for line in c.lines)
    # 331 s (261 s and PVE's waits), in the task log's rounding
    assert "VM 104 (win11) still starting after 6 min" in end
    assert "it may still come up; record kept until it runs" in end
    assert wait_for(lambda: node.is_running(104), 15)  # PVE's worker finished the start
    # not killed: it ran to its end (job-abort's second try waited for its lock in vain)
    assert wait_for(lambda: 0 in [c["exit"] for c in start_calls(node, 104)], 15)
    # the record waits for a phase that sees the guest run (job-abort, if it came late enough)
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr
    assert records(node) == []
    assert node.running_guests() == {104}


def test_a_stop_of_the_backup_task_does_not_cut_a_restart_in_half(tmp_path: Path) -> None:
    """The GUI's Stop during the holder's restart: SIGTERM to the task's process group, SIGKILL
    a second later. The hook dies, the ``qm start`` it ran must not: the guest comes up."""
    node = seed_node(tmp_path)
    node.set_fault(104, start_delay=3, task_stop=1)
    job = run_job(node, [102, 103])
    assert job.crashed  # vzdump's worker was killed too
    # 102's log-end keeps 104 down for 103 (job-aware); 103's starts it and is stopped
    assert [c.exit_code for c in job.hook_calls if c.phase == "log-end"] == [0, -15]
    assert "job-abort" in job.phases()  # run in the second before the SIGKILL, then killed
    assert wait_for(lambda: node.is_running(104), 15)
    assert wait_for(lambda: {c["exit"] for c in start_calls(node, 104)} >= {0}, 15)
    assert node.running_guests() == {104}
    # the record waits for a phase that sees the guest run: here the admin's recover
    result = cli(node, "recover")
    assert "VM 104 (win11)  running: record dropped" in result.stdout
    assert records(node) == []


def test_a_guests_own_shutdown_timeout_is_used_when_longer(tmp_path: Path) -> None:
    """``startup: down=300``: its PVE shutdown timeout, longer than shutdown_timeout (3 s)."""
    node = seed_node(tmp_path)
    node.set_time_scale(0.1)
    node.stop(104)
    node.add_vm(104, name="win11", hostpci=["0000:01:00.0,pcie=1"], startup="order=1,down=300")
    node.start(104)
    node.set_fault(104, shutdown_delay=8)  # more than 3 s, well within 300 s
    job = run_job(node, [102])
    assert job.ok, hook_lines(job)
    [shutdown] = commands(node, "shutdown")
    assert shutdown == ["qm", "shutdown", "104", "--timeout", "300"]
    assert node.running_guests() == {104}


@pytest.mark.parametrize("holder", ["vm-with-agent", "container"])
def test_a_shutdown_may_take_twice_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder: str
) -> None:
    """``qm shutdown --timeout 180`` with the guest agent: up to 180 s for the agent's answer,
    then up to 180 s for the power-off; ``pct shutdown``: lxc-stop's 180 s, then up to 185 s for
    the container's end. The hook waits for the command (it used to give up after 210 s)."""
    node = FakeNode(tmp_path)
    node.write_override("shutdown_timeout: 180\n")
    node.add_gpu("0000:00:02", group=2, vendor="8086", driver="i915", drm=("renderD128",))
    node.add_vm(106, name="plex", hostpci=["00:02.0"])
    if holder == "container":
        node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"], running=True)
        node.set_fault(200, shutdown_delay=300)
    else:
        node.add_vm(200, name="desk", hostpci=["00:02.0"], agent="1", running=True)
        node.set_fault(200, agent_reply_delay=170, shutdown_delay=300)
    node.set_time_scale(SCALE)
    scaled_hook_clock(monkeypatch)
    job = run_job(node, [106], hook_cmd=INPROCESS)
    assert job.ok, hook_lines(job)
    [shutdown] = [c for c in node.calls() if c["argv"][1] == "shutdown"]
    assert shutdown["exit"] == 0 and shutdown["t_end"] - shutdown["t"] >= 300 * SCALE
    assert node.running_guests() == {200}
