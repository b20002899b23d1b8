"""Crash tests: the hook killed at every step, host reboots, a full disk, damaged state files.

Every test starts from a node in a known power state, injects one fault, lets things go on (the
rest of the job, a new job, ``recover``, a reboot) and checks the only promises that matter: every
guest ends in the power state it had before the job, and the state file never loses a record
(a guest that was running and is now off has a record) nor holds one twice. A record is gone
only once its guest runs again.

The hook is killed through the crash points of ``pvegpuhook.crashpoints``
(``PVE_GPU_HOOK_CRASH_AT``), or by the fake ``qm``/``pct`` while a shutdown is under way
(fault ``kill_caller``). vzdump sees a killed hook as a failed call with exit code -9 and goes on;
with ``crash_after`` vzdump dies as well.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pvegpuhook.timing import shutdown_wait
from tests.fronts import REPO, cli, commands, read_state, records, seed_node, write_state
from tests.sim.node import FakeNode, reboot
from tests.sim.vzdump import DEFAULT_HOOK, HookCall, JobOutcome, run_hook_process, run_job

SHUTDOWN_TIMEOUT = 2
SHORT = f"shutdown_timeout: {SHUTDOWN_TIMEOUT}\nstart_timeout: 5\n"
AFTER_JOB = SHORT + "restart: after-job\n"
SETTLE = shutdown_wait("lxc", SHUTDOWN_TIMEOUT)  # how long an interrupted shutdown may take
CRASH_AT = "PVE_GPU_HOOK_CRASH_AT"
STATE_DIR = "var/lib/pve-gpu-hook"
TARGET = 106  # needs both GPUs: VM 104 holds the first, CT 110 the second
NEXT = 103  # a later job's guest: needs the first GPU only
WIN11, PLEX = 104, 110


# --- nodes and observations -------------------------------------------------------------------


def gpu_pair_node(root: Path, override: str = SHORT, *, onboot: bool = False) -> FakeNode:
    """The seed's lab plus a second GPU used by a running CT, and a VM that needs both GPUs.
    ``onboot``: the CT starts at boot (like a media server would); VM 104 does not."""
    node = seed_node(root, override)
    node.add_gpu("0000:02:00", group=15, functions=("0",), nvidia_minor=1, drm=("renderD129",))
    node.add_ct(
        PLEX,
        hostname="plex",
        dev=["/dev/dri/renderD129,gid=104"],
        running=True,
        onboot=True if onboot else None,
    )
    node.add_vm(TARGET, name="both", hostpci=["01:00,pcie=1", "02:00"])
    return node


def state_path(node: FakeNode) -> Path:
    return node.root / STATE_DIR / "state.json"


def recorded(node: FakeNode, before: set[int]) -> dict[int, str]:
    """The records as {vmid: status}, after checking that none is duplicated or lost."""
    vmids = [r["vmid"] for r in records(node)]
    assert len(vmids) == len(set(vmids)), f"duplicated record: {vmids}"
    running = node.running_guests()
    lost = before - running - set(vmids)
    assert not lost, f"guests {sorted(lost)} were running, are off, and have no record"
    return {r["vmid"]: r["status"] for r in records(node)}


def assert_settled(node: FakeNode, before: set[int]) -> None:
    """Every guest in its pre-job power state, no record left, no temp file of a killed writer."""
    assert node.running_guests() == before
    assert records(node) == []
    leftovers = [p.name for p in (node.root / STATE_DIR).glob(".*tmp-*")]
    assert leftovers == []


def age_records(node: FakeNode, seconds: float) -> None:
    """Let ``seconds`` pass for the records: an interrupted shutdown is over by then."""
    path = state_path(node)
    entries = read_state(path)
    for record in entries:
        record["since"] -= seconds
    write_state(path, entries)


def call_hook(node: FakeNode, *args: str, env: dict[str, str] | None = None) -> HookCall:
    """One hook call as vzdump makes it (emptied environment), plus ``env``."""
    base = {"LC_ALL": "C", "PVE_GPU_HOOK_ROOT": str(node.root), "PYTHONPATH": str(REPO)}
    if len(args) > 1:
        base["VMTYPE"] = "qemu"
    call = run_hook_process([*DEFAULT_HOOK, *args], {**base, **(env or {})}, 60)
    call.args = list(args)
    return call


def killed(job: JobOutcome, phase: str, vmid: int | None) -> HookCall:
    """The call that died by SIGKILL: vzdump saw exit code -9."""
    [call] = [c for c in job.hook_calls if c.phase == phase and c.vmid == vmid]
    assert call.exit_code == -9, (call.exit_code, call.lines)
    return call


def said(job: JobOutcome, phase: str) -> str:
    return "\n".join(line for c in job.hook_calls if c.phase == phase for line in c.lines)


def wait_down(node: FakeNode, vmid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while node.is_running(vmid):
        assert time.monotonic() < deadline, f"{vmid} still runs"
        time.sleep(0.05)


def started(node: FakeNode) -> list[str]:
    """VMIDs of every ``qm/pct start`` so far."""
    return [argv[2] for argv in commands(node, "start")]


def recover_now(node: FakeNode, before: set[int]) -> None:
    """``recover`` right away. The record of a running guest whose shutdown was interrupted
    (``stopping``) stays until that shutdown must be over: it may still take the guest down."""
    settling = {
        vmid
        for vmid, status in recorded(node, before).items()
        if status == "stopping" and node.is_running(vmid)
    }
    result = cli(node, "recover")
    if settling:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "interrupted shutdown may still be under way" in result.stdout
        assert settling <= set(recorded(node, before))
        assert not {str(vmid) for vmid in settling} & set(started(node))
        age_records(node, SETTLE + 1)
        result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr


def next_job(node: FakeNode, before: set[int]) -> None:
    """The next night's job: job-start names every guest still off, job-end starts it."""
    down = {vmid for vmid in recorded(node, before) if not node.is_running(vmid)}
    job = run_job(node, [NEXT])
    assert job.ok, job.log
    for vmid in down:
        assert f" {vmid} (" in said(job, "job-start") and "is still off" in said(job, "job-start")
        assert f" {vmid} (" in said(job, "job-end") and "started again" in said(job, "job-end")


FOLLOW_UPS = {"recover": recover_now, "next-job": next_job}


# --- 1. the hook killed at every crash point ----------------------------------------------------


@dataclass(frozen=True)
class Crash:
    point: str
    phase: str  # the hook call that is killed
    left: dict[int, str]  # records right after the kill (vzdump dead too)
    down: frozenset[int] = frozenset()  # holders off right after the kill
    left_if_continued: dict[int, str] = field(default_factory=dict)  # after the rest of the job

    @property
    def vmid(self) -> int | None:
        return None if self.phase.startswith("job-") else TARGET

    @property
    def override(self) -> str:
        return AFTER_JOB if self.phase == "job-end" else SHORT


BOTH_STOPPED = {WIN11: "stopped", PLEX: "stopped"}
CRASHES = [
    Crash("before-record", "backup-start", {}),
    # a stopping record of a running guest: its shutdown might still be under way (settling)
    Crash("after-record", "backup-start", {WIN11: "stopping"}, frozenset(), {WIN11: "stopping"}),
    Crash("after-shutdown", "backup-start", {WIN11: "stopping"}, frozenset({WIN11})),
    Crash("state-rename", "backup-start", {}),  # the first record never reached the file
    *(
        Crash(point, phase, BOTH_STOPPED, frozenset({PLEX}))  # 104 started, 110 not yet
        for phase in ("log-end", "job-end")
        for point in ("start-issued", "after-start", "state-rename")  # rename: 104's drop
    ),
]


# vzdump dead too: what is left must be put back by the next job or by recover. vzdump going on:
# its next phases put things back themselves, recover then finds at most a settling record.
RUNS = [
    *((crash, "dies", follow_up) for crash in CRASHES for follow_up in sorted(FOLLOW_UPS)),
    *((crash, "continues", "recover") for crash in CRASHES),
]


@pytest.mark.parametrize(
    ("crash", "vzdump", "follow_up"),
    RUNS,
    ids=[f"{c.point}@{c.phase}-vzdump-{v}-then-{f}" for c, v, f in RUNS],
)
def test_hook_killed_at_every_step(
    tmp_path: Path, crash: Crash, vzdump: str, follow_up: str
) -> None:
    node = gpu_pair_node(tmp_path, crash.override)
    before = node.running_guests()
    where = (crash.phase, crash.vmid)
    job = run_job(
        node,
        [TARGET],
        env_extra={CRASH_AT: crash.point},
        env_at=where,
        crash_after=where if vzdump == "dies" else None,
    )
    killed(job, *where)
    # a failed log-end is only a warning: job-end put everything back
    assert job.ok == (vzdump == "continues" and crash.phase == "log-end"), job.log
    if vzdump == "dies":
        assert job.crashed
        assert recorded(node, before) == crash.left
        assert before - node.running_guests() == crash.down
    else:
        assert not job.crashed
        assert recorded(node, before) == crash.left_if_continued
        if crash.phase == "backup-start":  # that guest's backup failed with our exit code
            assert "exit code -9" in (job.guests[TARGET].error or "")
        elif crash.phase == "log-end":
            assert "WARN: hook 'log-end' failed: exit code -9" in job.log
        else:
            assert "job-abort" in job.phases()  # job-end failed: vzdump runs job-abort too
        if not crash.left_if_continued:
            assert node.running_guests() == before
    FOLLOW_UPS[follow_up](node, before)
    assert_settled(node, before)
    assert not node.is_running(TARGET)


def test_recover_killed_at_every_step_then_recover_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = gpu_pair_node(tmp_path)
    before = node.running_guests()
    assert run_job(node, [TARGET], crash_after=("backup-start", TARGET)).crashed
    for point in ("start-issued", "after-start", "state-rename"):  # each kills it at 104
        monkeypatch.setenv(CRASH_AT, point)
        assert cli(node, "recover").returncode == -9
        assert recorded(node, before) == BOTH_STOPPED  # 104 runs: dropped by the next one
        node.stop(WIN11)  # back to what the crashed job left, for the next crash point
    monkeypatch.delenv(CRASH_AT)
    recover_now(node, before)
    assert_settled(node, before)


# --- 2. killed while a shutdown is under way -----------------------------------------------------

# the guest takes 3 s to shut down: long enough for the next steps to find it still running
SLOW_SHUTDOWN = "shutdown_timeout: 4\nstart_timeout: 5\n"
SHUTDOWN_DELAY = 3


@pytest.mark.parametrize("holder", [WIN11, PLEX])
def test_killed_during_shutdown_recover_waits_for_it(tmp_path: Path, holder: int) -> None:
    node = gpu_pair_node(tmp_path, SLOW_SHUTDOWN)
    before = node.running_guests()
    node.set_fault(holder, kill_caller=True, shutdown_delay=SHUTDOWN_DELAY)
    call = call_hook(node, "backup-start", "stop", str(TARGET))
    assert call.exit_code == -9
    # the hook died; the shutdown it asked for goes on: the guest still runs, its record says so
    assert node.is_running(holder)
    assert recorded(node, before)[holder] == "stopping"
    status = cli(node, "status", "--output-format", "json")
    assert status.returncode == 1
    waiting = json.loads(status.stdout)["waiting"]
    assert {w["vmid"]: w["status"] for w in waiting}[holder] == "stopping"
    early = cli(node, "recover")
    assert early.returncode == 1, early.stdout + early.stderr
    assert "interrupted shutdown may still be under way" in early.stdout
    assert holder in recorded(node, before)  # not dropped although the guest runs right now
    assert str(holder) not in started(node)
    wait_down(node, holder)
    assert recorded(node, before)[holder] == "stopping"
    late = cli(node, "recover")
    assert late.returncode == 0, late.stdout + late.stderr
    assert_settled(node, before)


def test_killed_during_shutdown_then_the_job_goes_on(tmp_path: Path) -> None:
    """vzdump goes on with the next guest while the interrupted shutdown is still under way."""
    node = seed_node(tmp_path, SLOW_SHUTDOWN)
    before = node.running_guests()
    node.set_fault(WIN11, kill_caller=True, shutdown_delay=SHUTDOWN_DELAY)
    job = run_job(node, [102, NEXT])
    killed(job, "backup-start", 102)
    assert not job.guests[102].ok
    log_end = next(c for c in job.hook_calls if c.phase == "log-end" and c.vmid == 102)
    assert any("interrupted shutdown may still be under way" in line for line in log_end.lines)
    assert job.guests[NEXT].ok, job.log  # it waited for the shutdown and then took the GPU
    assert started(node) == [str(WIN11)]
    assert_settled(node, before)


def test_killed_during_shutdown_the_job_ends_first(tmp_path: Path) -> None:
    """The job ends while the guest is still going down: nobody can start it yet, so job-end
    keeps the record and fails the job; the next job (or recover) starts it."""
    node = seed_node(tmp_path, SLOW_SHUTDOWN)
    before = node.running_guests()
    node.set_fault(WIN11, kill_caller=True, shutdown_delay=SHUTDOWN_DELAY)
    job = run_job(node, [102])
    killed(job, "backup-start", 102)
    [end] = [c for c in job.hook_calls if c.phase == "job-end"]
    assert end.exit_code == 1 and "VM 104 (win11)" in end.lines[-1], end.lines
    assert "job-abort" in job.phases()
    assert recorded(node, before) == {WIN11: "stopping"}
    wait_down(node, WIN11)
    assert recorded(node, before) == {WIN11: "stopping"}
    next_job(node, before)
    assert_settled(node, before)


# --- 3. the host reboots mid-job ---------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    name: str
    crash_after: tuple[str, int | None]
    point: str | None = None  # a crash point of the hook call vzdump dies after
    onboot: bool = False  # VM 104 too starts at boot


MOMENTS = [
    Moment("holders-stopped", ("backup-start", TARGET)),
    Moment("while-archiving", ("archive", TARGET)),  # the target's paused QEMU holds both GPUs
    Moment("shutdown-not-begun", ("backup-start", TARGET), "after-record"),
    Moment("start-not-confirmed", ("log-end", TARGET), "start-issued"),
    Moment("record-drop-not-renamed", ("log-end", TARGET), "state-rename"),
    Moment("recorded-guest-started-at-boot", ("backup-start", TARGET), onboot=True),
]


@pytest.mark.parametrize("moment", MOMENTS, ids=lambda m: m.name)
def test_host_reboot_mid_job_then_recover(tmp_path: Path, moment: Moment) -> None:
    node = gpu_pair_node(tmp_path, onboot=True)
    if moment.onboot:
        node.add_vm(WIN11, name="win11", hostpci=["0000:01:00.0,pcie=1"], onboot=True)
    before = node.running_guests()
    env = {CRASH_AT: moment.point} if moment.point else None
    job = run_job(
        node, [TARGET], crash_after=moment.crash_after, env_extra=env, env_at=moment.crash_after
    )
    assert job.crashed
    kept = recorded(node, before)
    assert WIN11 in kept
    assert reboot(node, onboot=True) == []
    # /var/lib survives; run, proc and cgroups do not; onboot guests start
    assert recorded(node, before) == kept
    assert node.running_guests() == ({WIN11, PLEX} if moment.onboot else {PLEX})
    result = cli(node, "recover")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_settled(node, before)


# --- 4. a full disk while writing state --------------------------------------------------------

FULL_DISK = '''\
"""Test fault: the file system of the state directory is full (ENOSPC on every write there),
in the hook phases named by FULL_DISK_PHASES (all when empty)."""
import errno
import os
import sys

_state_dir = os.path.join(os.path.realpath(os.environ["PVE_GPU_HOOK_ROOT"]), "{state}") + os.sep
_write = os.write


def _write_to_full_disk(fd, data):
    try:
        target = os.readlink(f"/proc/self/fd/{{fd}}")
    except OSError:
        target = ""
    if target.startswith(_state_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _write(fd, data)


_phases = os.environ.get("FULL_DISK_PHASES", "").split()
if not _phases or sys.argv[1:2] and sys.argv[1] in _phases:
    os.write = _write_to_full_disk
'''


def full_disk(tmp_path: Path, phases: str = "") -> dict[str, str]:
    """Hook environment in which writes under the state directory fail with ENOSPC."""
    site = tmp_path / "full-disk"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FULL_DISK.format(state=STATE_DIR))
    return {"PYTHONPATH": f"{site}:{REPO}", "FULL_DISK_PHASES": phases}


def test_full_disk_at_backup_start_keeps_old_state_and_stops_nobody(tmp_path: Path) -> None:
    node = gpu_pair_node(tmp_path / "node")
    before = node.running_guests()
    run_job(node, [102], crash_after=("backup-start", 102))  # a leftover: 104 is off
    old = state_path(node).read_bytes()
    disk = full_disk(tmp_path)
    shutdowns = len(commands(node, "shutdown"))
    call = call_hook(node, "backup-start", "stop", str(TARGET), env=disk)
    assert call.exit_code == 1
    message = f"pve-gpu-hook: cannot write {state_path(node)}: No space left on device"
    assert call.lines == [message]  # one clear line, naming the state file
    assert state_path(node).read_bytes() == old  # the old state survives, byte for byte
    assert node.is_running(PLEX)  # the holder is not stopped without a record
    assert len(commands(node, "shutdown")) == shutdowns
    assert sorted(p.name for p in (node.root / STATE_DIR).iterdir()) == [
        "job.json",
        "state.json",
    ]  # no temp file left
    # the whole job on the full disk: that backup fails clearly, the leftover is still put back
    job = run_job(node, [TARGET], env_extra=disk)
    assert job.guests[TARGET].error == message
    assert len(commands(node, "shutdown")) == shutdowns
    assert_settled(node, before)


def test_full_disk_at_restart_still_starts_every_holder(tmp_path: Path) -> None:
    """The backup filled the disk (DUMPDIR is on the root file system by default)."""
    node = gpu_pair_node(tmp_path / "node")
    before = node.running_guests()
    job = run_job(node, [TARGET], env_extra=full_disk(tmp_path, "log-end job-end job-abort"))
    assert "No space left on device" in said(job, "log-end")
    recorded(node, before)  # records it could not drop are kept: never lost
    assert node.running_guests() == before, job.log
    assert cli(node, "recover").returncode == 0  # once there is room, the records go
    assert_settled(node, before)


# --- 5. damaged state files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def leftover_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node after an interrupted job: 104 and 110 off, one record line each (built once)."""
    root = tmp_path_factory.mktemp("leftover")
    node = gpu_pair_node(root)
    before = node.running_guests()
    assert run_job(node, [TARGET], crash_after=("backup-start", TARGET)).crashed
    assert recorded(node, before) == BOTH_STOPPED
    assert node.running_guests() == set()
    return root


def damaged(leftover_root: Path, tmp_path: Path, kind: str) -> tuple[FakeNode, bytes]:
    """A copy of the leftover node whose state file is damaged or foreign in the way ``kind``
    says; returns the node and the file's bytes."""
    root = tmp_path / "node"
    shutil.copytree(leftover_root, root, symlinks=True)
    node = FakeNode(root)
    text = state_path(node).read_text()
    lines = text.splitlines(keepends=True)
    assert len(lines) == 3 and f'"vmid":{PLEX}' in lines[2]  # header, 104, 110
    saved = read_state(state_path(node))
    if kind == "garbage":
        data = b"\x00\xff{{ not json at all"
    elif kind == "empty":  # e.g. a file system that lost the data of a fresh file in a crash
        data = b""
    elif kind == "truncated":  # cut in the middle of 110's line, as a torn write would
        data = "".join(lines[:2]).encode() + lines[2][:40].encode()
    elif kind == "older-format":  # no "format" key, fewer fields per record
        dropped = ("status", "job", "note", "drivers")
        old = [{k: v for k, v in r.items() if k not in dropped} for r in saved]
        data = json.dumps({"records": old}).encode()
    elif kind == "newer-format":
        data = ('{"format": 3}\n' + "".join(lines[1:])).encode()
    else:  # newer-format-reshaped: a later release may well change everything after the header
        data = json.dumps({"format": 3, "guests": saved}).encode()
    state_path(node).write_bytes(data)
    return node, data


CORRUPT = ("garbage", "empty", "truncated")
# the guests the hook still knows about once it read the file: it starts exactly these
INTACT = {"garbage": set(), "empty": set(), "truncated": {WIN11}, "older-format": {WIN11, PLEX}}


def kept_aside(node: FakeNode) -> list[Path]:
    return sorted((node.root / STATE_DIR).glob("state.json.corrupt-*"))


@pytest.mark.parametrize("kind", [*CORRUPT, "older-format"])
def test_damaged_state_file_in_a_job(leftover_root: Path, tmp_path: Path, kind: str) -> None:
    node, data = damaged(leftover_root, tmp_path, kind)
    status = cli(node, "status")
    assert status.returncode == 1
    if kind in CORRUPT:
        assert str(state_path(node)) in status.stdout
        # said once, on stderr
        assert "corrupt" in status.stderr and len(status.stderr.splitlines()) == 1
    job = run_job(node, [NEXT])
    assert job.ok, job.log
    # intact records are started again; a guest named only by a damaged line cannot be: it stays off
    assert node.running_guests() == INTACT[kind]
    assert records(node) == []
    if kind not in CORRUPT:
        assert kept_aside(node) == []
        return
    [aside] = kept_aside(node)
    assert aside.read_bytes() == data  # never discarded, never rewritten
    after = cli(node, "status")
    assert after.returncode == 1 and aside.name in after.stdout
    # every later job names it in its notification until the admin deals with it
    later = run_job(node, [NEXT])
    for phase in ("job-start", "backup-start", "job-end"):
        assert aside.name in said(later, phase)


def surface(node: FakeNode, where: str) -> tuple[int | None, str]:
    """Exit code and output of one hook phase, ``recover``, or a whole job (its hook lines)."""
    if where == "recover":
        result = cli(node, "recover")
        return result.returncode, result.stdout + result.stderr
    if where == "job":
        job = run_job(node, [NEXT])
        return 0 if job.ok else 1, "\n".join(line for c in job.hook_calls for line in c.lines)
    call = call_hook(node, where, "stop", str(NEXT)) if where == "backup-start" else None
    call = call or call_hook(node, where)
    return call.exit_code, "\n".join(call.lines)


SURFACES = ("job-start", "backup-start", "job-end", "recover", "job")


@pytest.mark.parametrize("where", SURFACES)
@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_state_file_is_reported_where_found(
    leftover_root: Path, tmp_path: Path, kind: str, where: str
) -> None:
    node, _ = damaged(leftover_root, tmp_path, kind)
    if where == "backup-start":
        node.start(WIN11)  # so that it has to stop 104 again, and to read the state
    code, out = surface(node, where)
    assert code in (0, 1)
    assert "corrupt" in out and "state.json" in out, out


@pytest.mark.parametrize("where", SURFACES[:4])
@pytest.mark.parametrize("kind", ["newer-format", "newer-format-reshaped"])
def test_newer_state_format_is_refused_untouched(
    leftover_root: Path, tmp_path: Path, kind: str, where: str
) -> None:
    node, data = damaged(leftover_root, tmp_path, kind)
    node.start(WIN11)  # backup-start would have to stop it again
    calls = len(node.calls())
    code, out = surface(node, where)
    # job-start only reports it: backups that need no GPU can still run
    assert code == (0 if where == "job-start" else 1)
    assert f"{state_path(node)} has format 3, newer than" in out and "upgrade" in out
    assert state_path(node).read_bytes() == data and kept_aside(node) == []
    assert len(node.calls()) == calls  # nobody stopped or started
    status = cli(node, "status")
    assert status.returncode == 1 and "has format 3" in status.stdout
