"""Concurrency: the hook, ``recover`` and ``status`` as real processes at once on one fake node.

The seed's node (VMs 102-105 share one GPU, 104 holds it); 104 shuts down slowly, so the hook's
``backup-start`` of 102 holds the state lock for a while. Around it run two ``recover``s, a loop
of ``status --output-format json`` and a queued job's ``job-init``/``job-start``; then 102's
``log-end`` races another ``recover``. Checked every time: no double start, no lost record (a
guest the hook stopped is never off without its record), no deadlock (every process ends by a
deadline; a lock wait ends in one clear line naming the lock), ``status`` never waits for the
lock and always shows a consistent state.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fronts import REPO, commands, records, seed_node
from tests.sim.node import FakeNode

DEADLINE = 30.0  # s: a process still running by then is deadlocked
STATUS_LIMIT = 5.0  # s: status reads only; it must answer while the lock is held
ITERATIONS = 10
LOCK = "run/lock/pve-gpu-hook.lock"
RECORD_STATES = ("stopping", "stopped", "stop-failed", "start-failed")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    began: float = field(default_factory=time.monotonic)
    code: int | None = None
    out: str = ""
    err: str = ""
    seconds: float = 0.0


def spawn(node: FakeNode, name: str, *args: str, vmtype: str | None = None) -> Proc:
    """A hook phase (``vmtype`` given or a job phase) with vzdump's emptied environment, or,
    for a CLI sub-command, ``python3 -m pvegpuhook`` with the caller's environment."""
    seam = {"PVE_GPU_HOOK_ROOT": str(node.root), "PYTHONPATH": str(REPO)}
    if name.startswith("hook"):
        env = {"LC_ALL": "C", "STOREID": "local", "DUMPDIR": "/var/lib/vz/dump", **seam}
        if vmtype:
            env.update(VMTYPE=vmtype, HOSTNAME=f"vm{args[2]}")
        argv = [sys.executable, "-m", "pvegpuhook.hook", *args]
    else:
        env = {**os.environ, **seam}
        argv = [sys.executable, "-m", "pvegpuhook", *args]
    popen = subprocess.Popen(
        argv,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Proc(name, popen)


def finish(procs: list[Proc], deadline: float = DEADLINE) -> None:
    """Wait for every process; one still running at the deadline is a deadlock."""
    hung = []
    for proc in procs:
        left = max(0.1, deadline - (time.monotonic() - proc.began))
        try:
            proc.out, proc.err = proc.popen.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.out, proc.err = proc.popen.communicate()
            hung.append(proc.name)
        proc.code = proc.popen.returncode
        proc.seconds = time.monotonic() - proc.began
    assert not hung, f"deadlock: {hung} still running after {deadline:g} s"
    for proc in procs:
        assert "Traceback" not in proc.out + proc.err, f"{proc.name}: {proc.err}"


def read_records(node: FakeNode) -> list[dict]:
    """The state file's records; it may vanish between records()' check and its read."""
    try:
        return records(node)
    except FileNotFoundError:
        return []  # removed meanwhile: an empty state


def lock_holder(node: FakeNode) -> str:
    """Who last took the lock ("pid N purpose"); it stays written after the release."""
    try:
        return (node.root / LOCK).read_text().strip()
    except FileNotFoundError:
        return ""


def log_lines(node: FakeNode) -> list[str]:
    try:
        return (node.root / "var/log/pve-gpu-hook.log").read_text().splitlines()
    except FileNotFoundError:
        return []


class Watch:
    """Background checks while processes race: the record invariant, sampled every 10 ms, and
    ``status`` run over and over (each must answer quickly and show a consistent state)."""

    def __init__(self, node: FakeNode, holder: int, needer: int) -> None:
        self.node = node
        self.holder = holder
        self.needer = needer
        self.problems: list[str] = []
        self.samples = 0
        self.statuses: list[tuple[float, int, dict]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._guarded, args=(t,)) for t in (self._records, self._status)
        ]

    def _guarded(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except Exception as error:  # noqa: BLE001 - a thread cannot fail the test itself
            self.problems.append(f"{loop.__name__}: {type(error).__name__}: {error}")

    def _records(self) -> None:
        while not self._stop.is_set():
            # off before and after the read, and no record in between: the record was lost
            off_before = not self.node.is_running(self.holder)
            recs = [r for r in read_records(self.node) if r["vmid"] == self.holder]
            off_after = not self.node.is_running(self.holder)
            if off_before and off_after and not recs:
                self.problems.append(f"{self.holder} is off without a record")
            if len(recs) > 1:
                self.problems.append(f"{len(recs)} records of {self.holder}")
            self.samples += 1
            time.sleep(0.01)

    def _status(self) -> None:
        while not self._stop.is_set():
            proc = spawn(self.node, "status", "status", "--output-format", "json")
            finish([proc], STATUS_LIMIT)
            try:
                data = json.loads(proc.out)
            except ValueError:
                self.problems.append(f"status printed no JSON: {proc.out!r} {proc.err!r}")
                continue
            self.statuses.append((proc.seconds, proc.code or 0, data))
            for entry in data["waiting"]:
                if (entry["vmid"], entry["for_vmid"]) != (self.holder, self.needer):
                    self.problems.append(f"status shows an unexpected record: {entry}")
                if entry["status"] not in RECORD_STATES:
                    self.problems.append(f"status shows a bad record status: {entry}")
            if data["corrupt_state"]:
                self.problems.append(f"status saw a corrupt state: {data['corrupt_state']}")

    @contextmanager
    def running(self) -> Iterator[Watch]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(DEADLINE)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_lock_message(proc: Proc, wait: float) -> None:
    """A recover that could not get the lock: exit 1, one line naming the lock, in time."""
    lines = proc.err.strip().splitlines()
    assert proc.code == 1, (proc.code, proc.out, proc.err)
    assert len(lines) == 1, proc.err
    assert lines[0].startswith("pve-gpu-hook: ") and LOCK in lines[0], lines[0]
    assert f"after {wait:g} s" in lines[0], lines[0]
    assert proc.seconds < wait + STATUS_LIMIT


def race_once(tmp_path: Path, rng: random.Random, long_recover: bool) -> Watch:
    node = seed_node(tmp_path)
    # below FAST's shutdown_timeout of 3 s, long enough for a short recover to give up
    node.set_fault(104, shutdown_delay=round(rng.uniform(1.5, 2.5), 2))
    watch = Watch(node, holder=104, needer=102)
    with watch.running():
        # phase A: backup-start stops the slow holder; two recovers, a queued job, status
        hook = spawn(node, "hook backup-start", "backup-start", "stop", "102", vmtype="qemu")
        procs = [hook]
        if long_recover:  # may run before the hook's lock (nothing to do) or after it (starts 104)
            time.sleep(rng.uniform(0, 0.4))
            procs.append(spawn(node, "recover (long wait)", "recover", "--wait", "20"))
        wait_for(lambda: f"pid {hook.popen.pid} " in lock_holder(node), 10, "the hook's lock")
        assert node.is_running(104)  # the slow shutdown keeps the lock held for a while
        short_wait = round(rng.uniform(0.1, 0.4), 2)
        shorts = [
            spawn(node, f"recover {n} (short wait)", "recover", "--wait", str(short_wait))
            for n in range(1 if long_recover else 2)  # always two recovers in phase A
        ]
        log_before = log_lines(node)
        init = spawn(node, "hook job-init", "job-init")
        start = spawn(node, "hook job-start", "job-start")
        finish([init, start])
        assert (init.code, init.out, init.err) == (0, "", "")  # a queued job leaves no trace
        assert not any(" job-init " in line for line in log_lines(node)[len(log_before) :])
        assert start.code == 0 and start.seconds < STATUS_LIMIT  # no lock taken
        finish(shorts)
        for short in shorts:
            assert_lock_message(short, short_wait)
        finish(procs)
        assert hook.code == 0, hook.out + hook.err
        if not long_recover:
            assert not node.is_running(104)
            assert [r["vmid"] for r in read_records(node)] == [104]
        # phase B: 102's log-end races another recover (plus the status loop)
        order = [("hook log-end", "log-end", "stop", "102"), ("recover (race)", "recover")]
        rng.shuffle(order)  # either may take the lock first
        racers = []
        for name, *args in order:
            time.sleep(rng.uniform(0, 0.15))
            racers.append(spawn(node, name, *args, vmtype="qemu" if "hook" in name else None))
        finish(racers)
        assert all(p.code == 0 for p in racers), [(p.name, p.out, p.err) for p in racers]
        wait_for(lambda: watch.samples > 3 and len(watch.statuses) > 1, 10, "the watchers")
    assert not watch.problems, watch.problems
    assert len(commands(node, "shutdown")) == 1
    assert [c[:3] for c in commands(node, "start")] == [["qm", "start", "104"]]  # exactly once
    assert node.running_guests() == {104}
    assert read_records(node) == []
    return watch


def test_hook_recover_status_and_queued_job_race(tmp_path: Path) -> None:
    rng = random.Random(5)
    slowest_status = 0.0
    for n in range(ITERATIONS):
        watch = race_once(tmp_path / str(n), rng, long_recover=n % 2 == 1)
        slowest_status = max([slowest_status, *(s for s, _, _ in watch.statuses)])
    assert slowest_status < STATUS_LIMIT


@contextmanager
def lock_held(node: FakeNode) -> Iterator[None]:
    """Hold the state lock as a stuck pve-gpu-hook run would."""
    path = node.root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, b"pid 4242 backup-start of VM 102\n")
        yield
    finally:
        os.close(fd)


def test_lock_wait_has_a_deadline_and_status_does_not_wait(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    hook = spawn(node, "hook backup-start", "backup-start", "stop", "102", vmtype="qemu")
    finish([hook])
    assert hook.code == 0 and [r["vmid"] for r in read_records(node)] == [104]
    with lock_held(node):
        log_before = log_lines(node)
        recover = spawn(node, "recover", "recover", "--wait", "0.5")
        status = spawn(node, "status", "status", "--output-format", "json")
        init = spawn(node, "hook job-init", "job-init")
        finish([recover, status, init])
        assert_lock_message(recover, 0.5)
        assert "pid 4242 backup-start of VM 102" in recover.err  # who holds it
        assert status.seconds < STATUS_LIMIT and status.code == 1  # 104 waits: attention
        assert [w["vmid"] for w in json.loads(status.out)["waiting"]] == [104]
        assert (init.code, init.out, init.err) == (0, "", "")
        assert log_lines(node) == log_before  # none of the three wrote a log line
        assert commands(node, "start") == []
    again = spawn(node, "recover", "recover", "--wait", "0.5")
    finish([again])
    assert again.code == 0, again.err
    assert node.running_guests() == {104} and read_records(node) == []


@pytest.mark.parametrize("phase", ["log-end", "job-end"])
def test_restarting_phase_and_two_recovers_start_it_once(tmp_path: Path, phase: str) -> None:
    """Three restarters at once after a backup-start: the holder is started exactly once."""
    node = seed_node(tmp_path)
    first = spawn(node, "hook backup-start", "backup-start", "stop", "102", vmtype="qemu")
    finish([first])
    assert first.code == 0 and not node.is_running(104)
    node.set_fault(104, start_delay=0.5)  # a slow start: the others queue on the lock meanwhile
    args = ["log-end", "stop", "102"] if phase == "log-end" else ["job-end"]
    procs = [
        spawn(node, f"hook {phase}", *args, vmtype="qemu" if phase == "log-end" else None),
        spawn(node, "recover 1", "recover", "--wait", "20"),
        spawn(node, "recover 2", "recover", "--wait", "20"),
    ]
    finish(procs)
    assert all(p.code == 0 for p in procs), [(p.name, p.out, p.err) for p in procs]
    assert [c[:3] for c in commands(node, "start")] == [["qm", "start", "104"]]
    assert node.running_guests() == {104}
    assert read_records(node) == []
