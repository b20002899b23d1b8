"""The metrics file over the simulator: what node_exporter's textfile collector reads after a
backup night, a crash and ``recover``, parsed with prometheus_client's text parser (the collector
parses it with Prometheus' own; docs/pve-facts.md §11).

The hook runs as vzdump runs it (a process with an emptied environment), the admin command as
typed in a root shell. The node has Debian's textfile directory when ``prometheus-node-exporter``
is installed (:meth:`FakeNode.install_node_exporter`), and some nodes have not.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pvegpuhook import __version__
from pvegpuhook.registration import HOOK_PATH
from tests.fronts import cli, records, seed_node, write_state
from tests.sim.node import FakeNode, reboot
from tests.sim.vzdump import run_job

NAME = "pve-gpu-hook.prom"
CRASH_AT = "PVE_GPU_HOOK_CRASH_AT"
OTHER = "apt.prom"  # another collector's file in the same directory
OTHER_TEXT = "# HELP apt_upgrades_pending Apt packages pending updates.\napt_upgrades_pending 3\n"
Samples = dict[str, list[tuple[dict[str, str], float]]]


def node_with_exporter(root: Path) -> FakeNode:
    """The seed's lab, registered, with prometheus-node-exporter installed next to it."""
    node = seed_node(root)
    node.write_vzdump_conf("# vzdump default settings\n")
    hook = root / HOOK_PATH.lstrip("/")
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    directory = node.install_node_exporter()
    (directory / OTHER).write_text(OTHER_TEXT)
    result = cli(node, "register")
    assert result.returncode == 0, result.stdout + result.stderr
    return node


def scrape(node: FakeNode, *, settled: bool = True) -> Samples:
    """The file as the collector sees it, after the checks that make it skip a file.

    ``settled=False`` scrapes while a writer may be at work (a detached watcher): its temp file
    may exist then, but the collector must not be able to read it.
    """
    directory = node.root / "var/lib/prometheus/node-exporter"
    path = directory / NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # the collector reads every *.prom file, dot-files too: a temp file must not look like one,
    # none may be left once the writers are done, and the other collector's file is as it was
    names = sorted(p.name for p in directory.iterdir())
    assert [n for n in names if n.endswith(".prom")] == [OTHER, NAME]
    if settled:
        assert names == [OTHER, NAME]
    assert (directory / OTHER).read_text() == OTHER_TEXT
    got: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.documentation and family.type == "gauge", family.name
        assert family.name.startswith("pve_gpu_hook_")
        for sample in family.samples:
            assert sample.timestamp is None  # the collector skips a file with one
        got[family.name] = [(dict(s.labels), s.value) for s in family.samples]
    return got


def value(got: Samples, name: str) -> float:
    (labels, number), *others = got[f"pve_gpu_hook_{name}"]
    assert labels == {} and not others
    return number


def waiting(got: Samples) -> dict[str, tuple[dict[str, str], float]]:
    """The per-guest series, by VMID."""
    series = got.get("pve_gpu_hook_guest_waiting_since_timestamp_seconds", [])
    return {labels["vmid"]: (labels, since) for labels, since in series}


CRASHES = {
    # the host goes down while 102 is backed up, and boots again: 104 is off, recorded
    "host-crash-during-the-backup": ({}, ("archive", 102), True),
    # the hook killed right after 104 went down, before it noted that, and vzdump with it: only
    # what was written before the shutdown tells
    "hook-killed-after-the-shutdown": ({CRASH_AT: "after-shutdown"}, ("backup-start", 102), False),
}


@pytest.mark.parametrize("crash", CRASHES, ids=list(CRASHES))
def test_a_night_a_crash_and_recover(tmp_path: Path, crash: str) -> None:
    node = node_with_exporter(tmp_path)

    began = time.time()
    night = run_job(node, [102, 103, 105])
    assert night.ok, night.log
    got = scrape(node)
    assert value(got, "guests_waiting") == 0
    assert waiting(got) == {}
    assert value(got, "last_job_holders_stopped") == 1  # 104 gave its GPU to all of them
    assert value(got, "last_job_shutdown_cycles") == 1  # once (restart: job-aware)
    assert value(got, "last_job_failed_restarts") == 0
    assert value(got, "last_job_success") == 1
    assert 0 < value(got, "last_job_holder_downtime_seconds") < time.time() - began
    night_end = value(got, "last_job_end_timestamp_seconds")
    assert began <= night_end <= time.time()
    assert value(got, "registered") == 1
    assert value(got, "state_corrupt") == 0
    assert got["pve_gpu_hook_build_info"] == [({"version": __version__}, 1)]

    env, where, host_down = CRASHES[crash]
    stopped_after = time.time()
    job = run_job(node, [102], crash_after=where, env_extra=env, env_at=("backup-start", 102))
    assert job.crashed
    if host_down:
        reboot(node)  # 102's paused QEMU is gone with it
    assert 104 not in node.running_guests()
    assert [r["vmid"] for r in records(node)] == [104]
    got = scrape(node)
    assert value(got, "guests_waiting") == 1
    labels, since = waiting(got)["104"]
    assert labels == {"vmid": "104", "type": "qemu", "name": "win11", "for_vmid": "102"}
    assert stopped_after <= since <= time.time()
    # the crashed job never ended: the last job is still the night's
    assert value(got, "last_job_end_timestamp_seconds") == night_end
    assert value(got, "last_job_holders_stopped") == 1

    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr
    assert 104 in node.running_guests()
    got = scrape(node)
    assert value(got, "guests_waiting") == 0
    assert waiting(got) == {}
    assert value(got, "last_job_end_timestamp_seconds") == night_end
    assert value(got, "state_corrupt") == 0


def test_without_the_collector_nothing_is_written(tmp_path: Path) -> None:
    node = seed_node(tmp_path)  # no prometheus-node-exporter
    assert run_job(node, [102, 103]).ok
    assert run_job(node, [102], crash_after=("backup-start", 102)).crashed
    assert cli(node, "recover").returncode == 0
    assert not (tmp_path / "var/lib/prometheus").exists()
    assert node.running_guests() == {104}


def test_a_job_that_stopped_nobody_is_the_last_job(tmp_path: Path) -> None:
    """A job without GPU backups leaves no tally, but its end is the last job's end; on a node
    where the hook never acted (no state at all) too."""
    node = node_with_exporter(tmp_path)
    state_dir = tmp_path / "var/lib/pve-gpu-hook"
    assert not (state_dir / "job.json").exists() and not (state_dir / "state.json").exists()
    began = time.time()
    assert run_job(node, [104], mode="snapshot").ok  # the running holder: nothing to do
    got = scrape(node)
    assert began <= value(got, "last_job_end_timestamp_seconds") <= time.time()
    assert value(got, "last_job_success") == 1
    assert value(got, "last_job_holders_stopped") == 0
    assert value(got, "last_job_shutdown_cycles") == 0

    node.set_fault(104, start_fails=True)
    node.write_override("shutdown_timeout: 3\nstart_timeout: 1\n")
    assert not run_job(node, [102]).ok  # 104 does not come back
    got = scrape(node)
    assert value(got, "last_job_success") == 0
    assert value(got, "last_job_failed_restarts") == 1
    assert value(got, "guests_waiting") == 1

    # the admin fixes 104; the next job stops nobody and starts it at its end
    node.clear_faults(104)
    assert run_job(node, [103]).ok
    assert 104 in node.running_guests()
    got = scrape(node)
    assert value(got, "last_job_failed_restarts") == 0
    assert value(got, "last_job_success") == 1
    assert value(got, "guests_waiting") == 0


def test_a_holder_powering_off_late_is_watched_then_started(tmp_path: Path) -> None:
    """A shutdown that timed out may still take effect (docs/pve-facts.md §8): the guest runs,
    so it is not waiting; it is watched, and when it goes down the watcher starts it and says so.
    """
    node = node_with_exporter(tmp_path)
    node.write_override("shutdown_timeout: 1\nstart_timeout: 5\nshutdown_watch: 60\n")
    node.set_fault(104, ignore_shutdown=True)
    job = run_job(node, [102])
    assert not job.guests[102].ok  # the shutdown timed out: that backup fails
    assert node.is_running(104) and [r["status"] for r in records(node)] == ["stop-failed"]
    got = scrape(node)
    assert value(got, "guests_waiting") == 0
    assert value(got, "guests_watched") == 1
    assert value(got, "last_job_success") == 1  # nothing was left off at its end
    node.stop(104)  # the request took effect after all: it powers off
    deadline = time.monotonic() + 60
    # the watcher drops the record, then writes the file: wait for both
    while time.monotonic() < deadline and (
        records(node)
        or not node.is_running(104)
        or value(scrape(node, settled=False), "guests_watched")
    ):
        time.sleep(0.2)
    assert node.is_running(104) and not records(node), node.calls()
    got = scrape(node)  # written by the watcher
    assert value(got, "guests_waiting") == 0
    assert value(got, "guests_watched") == 0


def test_registration_and_damaged_state_are_shown(tmp_path: Path) -> None:
    node = node_with_exporter(tmp_path)
    assert value(scrape(node), "registered") == 1  # written by register
    assert cli(node, "unregister").returncode == 0
    assert value(scrape(node), "registered") == 0
    assert cli(node, "register").returncode == 0
    assert value(scrape(node), "registered") == 1

    state = tmp_path / "var/lib/pve-gpu-hook/state.json"
    state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_state(state, [{"vmid": 105, "kind": "qemu", "name": "vm105", "since": 1.0}])
    state.write_text(state.read_text()[:-20] + "\n")  # a torn write
    run_job(node, [102])
    got = scrape(node)
    assert value(got, "state_corrupt") == 1
    assert value(got, "guests_waiting") == 0  # nothing intact to wait for; corrupt says look


def test_readable_without_root(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to read as another user")
    node = node_with_exporter(tmp_path)
    assert run_job(node, [102]).ok
    directory = tmp_path / "var/lib/prometheus/node-exporter"
    # as the collector's unprivileged user; cwd is set before privileges are dropped, so the
    # test's private temp directories above it do not get in the way
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", NAME],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "pve_gpu_hook_guests_waiting 0" in result.stdout
