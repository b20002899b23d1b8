"""A vzdump driver: runs a backup job over a FakeNode the way PVE::VZDump does, calling the hook.

The phase order, environment, failure handling and task log follow PVE::VZDump (exec_backup,
exec_backup_task, run_hook_script) and its QemuServer/LXC plugins; docs/pve-facts.md §1-3 sums
them up. The job has an identity as in PVE: a worker process (a fake ``/proc/<pid>``) titled
``task <UPID>``, the UPID in ``/var/run/vzdump.pid``, a task log under ``/var/log/pve/tasks`` and
each guest's ``/var/log/vzdump/<type>-<vmid>.log``.
Guest power actions run in-process (as vzdump's own code would), so they do not show in calls.log.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import selectors
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.sim.node import FakeNode
from tests.sim.pve import REPO, TASK_STOP, Out, Pve, PveError, remove, write_atomic

DUMPDIR = "/var/lib/vz/dump"
STOREID = "local"
PIPE_GRACE = 5.0  # how long we wait for EOF after the hook exited
DEFAULT_HOOK = (sys.executable, "-m", "pvegpuhook.hook")
# hook_cmd=INPROCESS: call pvegpuhook.hook.main() in this process instead of starting one per
# phase (~40 ms each), for the soak; the fake qm/pct the hook runs stay real processes
INPROCESS = ("<in-process pvegpuhook.hook>",)


@dataclass
class HookCall:
    argv: list[str]
    exit_code: int | None
    stdout: list[str]
    stderr: list[str]
    lines: list[str]  # stdout and stderr in arrival order, as the task log shows them
    env: dict[str, str]
    args: list[str] = field(default_factory=list)  # what vzdump appends: phase [mode vmid]
    error: str | None = None  # pipes left open, timeout

    @property
    def phase(self) -> str:
        return self.args[0]

    @property
    def mode(self) -> str | None:
        return self.args[1] if len(self.args) > 1 else None

    @property
    def vmid(self) -> int | None:
        return int(self.args[2]) if len(self.args) > 2 else None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None


@dataclass
class GuestOutcome:
    vmid: int
    kind: str
    mode: str
    ok: bool
    error: str | None


@dataclass
class JobOutcome:
    ok: bool
    guests: dict[int, GuestOutcome]
    log: list[str]
    hook_calls: list[HookCall]
    errors: list[str] = field(default_factory=list)  # driver-level problems (hook hung, pipes)
    aborted: bool = False
    crashed: bool = False
    upid: str = ""  # the task's UPID
    worker: int = 0  # the fake pid of its worker (alive after a hang_after)

    def phases(self, vmid: int | None = None) -> list[str]:
        """Hook phases in call order; with ``vmid`` only that guest's phases."""
        return [c.phase for c in self.hook_calls if vmid is None or c.vmid == vmid]

    def sequence(self) -> list[tuple[str, int | None]]:
        return [(c.phase, c.vmid) for c in self.hook_calls]


class _Fail(Exception):
    """A die inside exec_backup_task: ``message`` for the task log, ``detail`` for the outcome."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or message


class _Crash(Exception):
    """vzdump is killed (or the host dies): nothing more runs."""


class _JobAbort(Exception):
    """A fatal job-level error: job-abort runs, then the job ends."""


class TaskLog(list[str]):
    """The task log: its lines in memory (for the tests) and, as vzdump writes them, in its file.

    While a guest's backup log is open (``logfd`` in exec_backup_task), each line also goes there,
    with a time stamp (PVE::VZDump debugmsg).
    """

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.guest_log: Path | None = None

    def append(self, line: str) -> None:
        super().append(line)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")
        if self.guest_log is not None:
            with open(self.guest_log, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def extend(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.append(line)

    def task_only(self, line: str) -> None:
        """A line vzdump writes without its logfd (debugmsg without it): not in the guest's log."""
        guest_log, self.guest_log = self.guest_log, None
        self.append(line)
        self.guest_log = guest_log


def format_time(seconds: float) -> str:
    """PVE::VZDump format_time: HH:MM:SS (hours may have more digits)."""
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class _Job:
    def __init__(
        self,
        node: FakeNode,
        mode: str,
        hook_cmd: Sequence[str],
        abort_during: int | None,
        crash_after: tuple[str, int | None] | None,
        hook_timeout: float,
        env_extra: Mapping[str, str] | None = None,
        env_at: tuple[str, int | None] | None = None,
        hang_after: tuple[str, int | None] | None = None,
    ) -> None:
        self.node = node
        self.pve = Pve(node.root)
        self.mode = mode
        self.hook_cmd = list(hook_cmd)
        self.abort_during = abort_during
        self.crash_after = crash_after
        self.hang_after = hang_after
        self.hook_timeout = hook_timeout
        self.env_extra = dict(env_extra or {})
        self.env_at = env_at
        self.log = TaskLog()
        self.calls: list[HookCall] = []
        # the GUI stopped the task (pve.stop_caller_task): when its SIGKILL comes
        self.kill_at: float | None = None
        self.interrupted = False
        self.upid = ""
        self.worker = 0
        self.pid_file = True  # False: a fault, the hook cannot learn the job from PVE's files
        self.errors: list[str] = []
        self.guests: dict[int, GuestOutcome] = {}  # kept when vzdump "crashes" mid-job
        self.stamp = time.strftime("%Y_%m_%d-%H_%M_%S")

    # ---- hook calls -------------------------------------------------------------------------

    def info(self, msg: str) -> None:
        self.log.append(f"INFO: {msg}")

    def hook(self, args: list[str], task_env: dict[str, str] | None = None) -> HookCall | None:
        """run_hook_script: emptied environment, output to the task log, both pipes to EOF."""
        if not self.hook_cmd:
            return None
        env = {"STOREID": STOREID, "DUMPDIR": DUMPDIR}
        env.update(task_env or {})
        env.update(
            {
                "LC_ALL": "C",
                "LVM_SUPPRESS_FD_WARNINGS": "1",
                # The test seam, not set by vzdump: where "/" is and where the package lives.
                "PVE_GPU_HOOK_ROOT": str(self.node.root),
                "PYTHONPATH": str(REPO),
            }
        )
        if self.env_at is None or _matches(self.env_at, args):
            env.update(self.env_extra)  # a test's extra environment (e.g. a crash point)
        timeout = self.hook_timeout
        if self.kill_at is not None:
            # the task was stopped: its SIGKILL ends whatever of it still runs then
            timeout = self.kill_at - time.time()
            if timeout <= 0:
                raise _Crash("vzdump killed (SIGKILL 5 s after the task's stop)")
        if self.hook_cmd == list(INPROCESS):
            call = run_hook_inprocess(args, env)
        else:
            call = run_hook_process([*self.hook_cmd, *args], env, timeout)
        call.args = list(args)
        self.calls.append(call)
        self.pve.apply_sysfs_writes()  # the kernel acts on what the hook wrote, at once
        self.log.extend(f"INFO: {line}" for line in call.lines)
        if self.kill_at is not None and time.time() >= self.kill_at:
            raise _Crash("vzdump killed (SIGKILL 5 s after the task's stop)")
        if call.error:
            self.errors.append(f"{' '.join(args)}: {call.error}")
            self.log.append(f"ERROR: {call.error}")
        self.notice_stop()
        if self.crash_after is not None and _matches(self.crash_after, args):
            raise _Crash(f"vzdump killed after {' '.join(args)}")
        if self.hang_after is not None and _matches(self.hang_after, args):
            raise _Crash(f"vzdump hangs after {' '.join(args)}; its worker still runs")
        return call

    def notice_stop(self) -> None:
        """The GUI's stop reached the worker too (it is in the task's process group): the step
        under way dies with "interrupted by signal" (api2 VZDump.pm's signal handlers)."""
        if self.kill_at is not None:
            return
        try:
            data = json.loads((self.pve.sim / TASK_STOP).read_text())
        except (FileNotFoundError, ValueError):
            return
        self.kill_at = float(data["kill_at"])
        self.interrupted = True

    def hook_or_fail(self, args: list[str], task_env: dict[str, str] | None = None) -> None:
        call = self.hook(args, task_env)
        if self.interrupted:
            raise _Fail("interrupted by signal")
        if call is None or call.ok:
            return
        shown = " ".join(call.argv)
        if call.error:
            message = f"command '{shown}' failed: {call.error}"
        else:
            message = f"command '{shown}' failed: exit code {call.exit_code}"
        last = next((line for line in reversed(call.lines) if line.strip()), None)
        raise _Fail(message, last or message)

    # ---- the job ----------------------------------------------------------------------------

    def begin_task(self, single: int | None) -> None:
        """fork_worker (pve-common PVE/RESTEnvironment.pm): the worker process, titled
        ``task <UPID>``, and its task log, before anything of the job runs."""
        pve = self.pve
        self.worker = pve.spawn_proc(["task"], "task")
        pstart = pve.proc_starttime(self.worker) or 0
        started = int(time.time())
        vmid = "" if single is None else str(single)  # API2/VZDump.pm: the VMID of a 1-guest job
        self.upid = (
            f"UPID:{pve.node}:{self.worker:08X}:{pstart:08X}:{started:08X}:vzdump:{vmid}:root@pam:"
        )
        write_atomic(pve.p(f"proc/{self.worker}/cmdline"), f"task {self.upid}\0")
        # PVE/UPID.pm decode: tasks/<last hex digit of the start time>/<UPID>
        self.log.path = pve.p(f"var/log/pve/tasks/{self.upid.split(':')[4][7]}/{self.upid}")
        self.log.path.parent.mkdir(parents=True, exist_ok=True)
        self.log.path.touch()

    def end_task(self, status: str | None) -> None:
        """The worker ends: the last line of the task log (None: it was killed)."""
        if status is not None:
            self.log.append(status)
        self.pve.end_proc(self.worker)

    @contextlib.contextmanager
    def node_lock(self) -> Iterator[None]:
        """getlock: flock on /var/run/vzdump.lock, saying so when it has to wait."""
        path = self.node.root / "run/vzdump.lock"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.info("trying to get global lock - waiting...")
                fcntl.flock(fd, fcntl.LOCK_EX)
                self.info("got global lock")
            yield
        finally:
            os.close(fd)

    def run(self, vmids: list[int], line: str, skipped: list[int]) -> tuple[bool, bool, str]:
        """Returns (ok, aborted, error): vzdump's worker sub (API2/VZDump.pm vzdump)."""
        init = self.hook(["job-init"])  # PVE::VZDump::new
        if init is not None and not init.ok:
            err = f"command '{' '.join(init.argv)}' failed: exit code {init.exit_code}"
            self.log.append(f"ERROR: Backup job failed - {err}")
            return False, False, err
        # getlock: the node lock, then the UPID into the pid file, then exec_backup
        with self.node_lock():
            if self.pid_file:
                write_atomic(self.pve.p("run/vzdump.pid"), self.upid)  # no newline
            self.info(f"starting new backup job: {line}")  # exec_backup
            if skipped:
                self.info(f"skip external VMs: {', '.join(map(str, sorted(skipped)))}")
            return self._locked(vmids)

    def _locked(self, vmids: list[int]) -> tuple[bool, bool, str]:
        guests = self.guests
        err: str | None = None
        aborted = False
        try:
            start = self.hook(["job-start"])
            if start is not None and not start.ok:
                raise _JobAbort(
                    f"command '{' '.join(start.argv)}' failed: exit code {start.exit_code}"
                )
            for vmid in vmids:
                outcome = self.guest(vmid)
                guests[vmid] = outcome
                if self.abort_during == vmid or self.interrupted:
                    aborted = True
                    raise _JobAbort("interrupted by signal")
            end = self.hook(["job-end"])
            if end is not None and not end.ok:
                raise _JobAbort(f"command '{' '.join(end.argv)}' failed: exit code {end.exit_code}")
        except _JobAbort as e:
            err = str(e)
        if err is not None:
            self.hook(["job-abort"])
            self.log.append(f"ERROR: Backup job failed - {err}")
            return False, aborted, err
        failed = any(not g.ok for g in guests.values())
        self.info(
            "Backup job finished with errors" if failed else "Backup job finished successfully"
        )
        if failed:
            return False, aborted, "job errors"
        remove(self.pve.p("run/vzdump.pid"))  # only after a fully successful job
        return True, aborted, ""

    # ---- one guest (exec_backup_task) -------------------------------------------------------

    def guest(self, vmid: int) -> GuestOutcome:
        pve = self.pve
        kind = pve.guest_type(vmid)
        label = {"qemu": "qemu", "lxc": "lxc"}.get(kind or "", "unknown")
        args_mode = self.mode
        env: dict[str, str] = {}
        cleanup = {"unlock": False, "restart": False, "resume": False}
        eff_mode = self.mode
        t0 = time.time()
        err: _Fail | None = None
        try:
            if kind is None:
                raise _Fail(f"unable to find VM '{vmid}'")
            # vzdump checks the job's mode, against HA resources in state 'started'.
            if self.mode == "stop" and pve.ha_state(vmid) == "started":
                raise _Fail(
                    "Cannot execute a backup with stop mode on a HA managed and enabled "
                    "Service. Use snapshot mode or disable the Service."
                )
            ext = ".vma.zst" if kind == "qemu" else ".tar.zst"
            base = f"{DUMPDIR}/vzdump-{kind}-{vmid}-{self.stamp}"
            env["TARGET"] = base + ext
            env["LOGFILE"] = base + ".log"
            env["VMTYPE"] = kind
            # logfd = open(">" tmplog): the guest's previous backup log is truncated only now
            guest_log = pve.p(f"var/log/vzdump/{kind}-{vmid}.log")
            guest_log.parent.mkdir(parents=True, exist_ok=True)
            guest_log.write_text("")
            self.log.guest_log = guest_log
            self.info(f"Starting Backup of VM {vmid} ({kind})")
            self.log.task_only(f"INFO: Backup started at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            running = pve.is_running(vmid)
            self.info(f"status = {'running' if running else 'stopped'}")
            try:
                pve.set_lock(kind, vmid, "backup")
            except PveError as e:
                raise _Fail(e.message) from None
            cleanup["unlock"] = True
            eff_mode = self.mode if running else "stop"
            args_mode = eff_mode
            cfg = pve.read_config(kind, vmid)
            name = cfg.get("name") if kind == "qemu" else (cfg.get("hostname") or f"CT{vmid}")
            if name:
                env["HOSTNAME"] = name  # set by the plugin's prepare; unnamed VMs have none
            was_paused = (
                kind == "qemu"
                and running
                and (pve.qmp_status(vmid) or "") in ("paused", "prelaunch", "suspended")
            )
            self.info(f"backup mode: {eff_mode}")
            self.info("ionice priority: 7")
            g = [str(vmid)]
            if eff_mode == "stop":
                self.hook_or_fail(["backup-start", eff_mode, *g], env)
                if running:
                    self.info("stopping virtual guest")
                    self.hook_or_fail(["pre-stop", eff_mode, *g], env)
                    self.stop_guest(kind, vmid)
                    cleanup["restart"] = True
            elif eff_mode == "suspend":
                self.hook_or_fail(["backup-start", eff_mode, *g], env)
                self.info("suspending guest")
                self.hook_or_fail(["pre-stop", eff_mode, *g], env)
                self.suspend(kind, vmid, was_paused)
                cleanup["resume"] = True
                if kind == "lxc":
                    self.info("resuming guest")
                    cleanup["resume"] = False
                    self.hook_or_fail(["pre-restart", eff_mode, *g], env)
                    self.resume(kind, vmid, was_paused)
                    self.hook_or_fail(["post-restart", eff_mode, *g], env)
            elif eff_mode == "snapshot":
                self.hook_or_fail(["backup-start", eff_mode, *g], env)
                self.hook_or_fail(["pre-stop", eff_mode, *g], env)
                self.hook_or_fail(["pre-restart", eff_mode, *g], env)
                self.hook_or_fail(["post-restart", eff_mode, *g], env)
            else:
                raise _Fail(f"internal error - unknown mode '{eff_mode}'")
            self.info(f"creating vzdump archive '{env['TARGET']}'")
            self.archive(kind, vmid, running, was_paused, eff_mode)
            self.info("archive file size: 1.23GB")
            self.hook_or_fail(["backup-end", eff_mode, *g], env)
        except _Fail as e:
            err = e

        # Clean-up: unlock first, then bring back a guest vzdump stopped or suspended.
        if cleanup["unlock"]:
            with contextlib.suppress(PveError):
                pve.remove_lock(kind or "qemu", vmid, "backup")
        if kind and (cleanup["resume"] or cleanup["restart"]):
            try:
                self.hook_or_fail(["pre-restart", args_mode, str(vmid)], env)
                if cleanup["resume"]:
                    self.info("resume vm")
                    self.resume(kind, vmid, False)
                elif not pve.is_running(vmid):
                    self.info("restarting vm")
                    self.start_guest(kind, vmid)
                self.hook_or_fail(["post-restart", args_mode, str(vmid)], env)
            except _Fail as e:
                self.log.append(f"WARN: {e.message}")

        if err is not None:
            self.log.append(f"ERROR: Backup of VM {vmid} failed - {err.message}")
            self.log.task_only(f"INFO: Failed at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            abort = self.hook(["backup-abort", args_mode, str(vmid)], env)
            if abort is not None and not abort.ok:
                self.log.append(f"WARN: hook 'backup-abort' failed: exit code {abort.exit_code}")
        else:
            # in simulated seconds: what the guest's backup took on the model's clock
            took = format_time((time.time() - t0) / pve.scale)
            self.info(f"Finished Backup of VM {vmid} ({took})")
            self.log.task_only(f"INFO: Backup finished at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.log.guest_log = None  # close(logfd): log-end has none
        end = self.hook(["log-end", args_mode, str(vmid)], env)
        if end is not None and not end.ok:
            self.log.append(f"WARN: hook 'log-end' failed: exit code {end.exit_code}")
        return GuestOutcome(vmid, label, args_mode, err is None, err.detail if err else None)

    def archive(self, kind: str, vmid: int, was_running: bool, was_paused: bool, mode: str) -> None:
        """The plugin's archive step; for QEMU: start paused if needed, resume, restore power."""
        pve = self.pve
        if kind == "lxc":
            self.signal_point(vmid)
            return
        if not pve.vm_pid(vmid):
            self.info("starting kvm to execute backup task")
            out = Out()
            try:
                pve.vm_start(vmid, skiplock=True, paused=True, for_backup=True, out=out)
            except PveError as e:
                self.log.extend(out.text())
                self.log.extend(e.before)
                raise _Fail(e.message) from None
            self.log.extend(out.text())
        try:
            self.info(f"started backup task '00000000-0000-0000-0000-{vmid:012d}'")
            if was_running and not was_paused and mode in ("stop", "suspend"):
                self.info("resuming VM again")
                pve.set_qmp(vmid, "running")
            self.signal_point(vmid)
            self.info("100% (32.0 GiB of 32.0 GiB) in 1s, read: 32.0 GiB/s, write: 0 B/s")
        except _Fail:
            self.restore_power_state(vmid, was_running)
            raise
        self.restore_power_state(vmid, was_running)  # not on _Crash: a dead vzdump does nothing

    def restore_power_state(self, vmid: int, was_running: bool) -> None:
        """restore_vm_power_state: only a QEMU still in prelaunch is stopped again."""
        if was_running:
            return
        status = self.pve.qmp_status(vmid)
        if status == "prelaunch":
            self.info("stopping kvm after backup task")
            with contextlib.suppress(PveError):
                self.pve.vm_stop(vmid, skiplock=True, use_faults=False)
        elif status is not None:
            self.info(f"kvm status changed after backup ('{status}') - keep VM running")

    def signal_point(self, vmid: int) -> None:
        """The backup is running: a signal or a crash can hit here (paused QEMU still up)."""
        # fault backup_delay: how long (simulated s) the backup itself takes
        self.pve.sleep(float(self.pve.faults(vmid).get("backup_delay", 0)))
        if self.crash_after is not None and self.crash_after in (
            ("archive", None),
            ("archive", vmid),
        ):
            raise _Crash(f"vzdump killed while archiving {vmid}")
        if self.abort_during == vmid:
            raise _Fail("interrupted by signal")

    def stop_guest(self, kind: str, vmid: int) -> None:
        """`qm shutdown --skiplock --keepActive` / `pct shutdown` as the plugin runs it."""
        try:
            if kind == "qemu":
                self.pve.vm_stop(vmid, skiplock=True, shutdown=True, timeout=600, use_faults=False)
            else:
                self.pve.ct_stop(vmid, skiplock=True, use_faults=False)
        except PveError as e:
            raise _Fail(e.message) from None

    def start_guest(self, kind: str, vmid: int) -> None:
        out = Out()
        try:
            if kind == "qemu":
                self.pve.vm_start(vmid, skiplock=True, out=out)
            else:
                self.pve.ct_start(vmid, skiplock=True, out=out)
        except PveError as e:
            self.log.extend(out.text())
            self.log.extend(e.before)
            raise _Fail(e.message) from None
        self.log.extend(out.text())

    def suspend(self, kind: str, vmid: int, was_paused: bool) -> None:
        if kind == "qemu":
            if not was_paused:
                self.pve.set_qmp(vmid, "paused")
        else:
            self.pve.ct_freeze(vmid, True)

    def resume(self, kind: str, vmid: int, was_paused: bool) -> None:
        if kind == "qemu":
            if not was_paused and self.pve.vm_pid(vmid):
                self.pve.set_qmp(vmid, "running")
        else:
            self.pve.ct_freeze(vmid, False)


def _matches(target: tuple[str, int | None], args: Sequence[str]) -> bool:
    """Whether hook ``args`` (phase [mode vmid]) are the call ``target`` = (phase, vmid or None)."""
    phase, vmid = target
    return phase == args[0] and (vmid is None or (len(args) > 2 and args[2] == str(vmid)))


class _LineSink(io.TextIOBase):
    """A stand-in for sys.stdout/sys.stderr that appends whole lines to a shared list."""

    def __init__(self, stream: str, lines: list[tuple[str, str]]) -> None:
        super().__init__()
        self.stream = stream
        self.lines = lines
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self.lines.append((self.stream, line))
        return len(text)

    def finish(self) -> None:
        if self.pending:
            self.lines.append((self.stream, self.pending))
            self.pending = ""


@contextlib.contextmanager
def process_environment(env: Mapping[str, str]) -> Iterator[list[tuple[str, str]]]:
    """Run code in this process as if it were a process started with ``env``.

    ``os.environ`` is replaced by ``env`` and sys.stdout/sys.stderr are captured as (stream, line)
    in arrival order; both are restored afterwards. Output written to file descriptors 1/2
    directly (a child process inheriting them) is not captured.
    """
    saved_env = dict(os.environ)
    saved_streams = sys.stdout, sys.stderr
    lines: list[tuple[str, str]] = []
    sinks = _LineSink("stdout", lines), _LineSink("stderr", lines)
    os.environ.clear()
    os.environ.update(env)
    sys.stdout, sys.stderr = sinks
    try:
        yield lines
    finally:
        for sink in sinks:
            sink.finish()
        sys.stdout, sys.stderr = saved_streams
        os.environ.clear()
        os.environ.update(saved_env)


def run_hook_inprocess(args: Sequence[str], env: Mapping[str, str]) -> HookCall:
    """``pvegpuhook.hook.main(args)`` under vzdump's environment ``env``, as a HookCall.

    No timeout and no pipe check (there are no pipes); an uncaught exception becomes a traceback
    on stderr and exit code 1, as in a hook process. The simulator imports the library only here.
    """
    if "PVE_GPU_HOOK_CRASH_AT" in env:
        raise ValueError("a crash point SIGKILLs its own process: use a hook process for it")
    from pvegpuhook import hook

    with process_environment(env) as lines:
        try:
            code = hook.main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except Exception:  # noqa: BLE001 - reported like a hook process would report it
            traceback.print_exc()
            code = 1
    stdout = [line for stream, line in lines if stream == "stdout"]
    stderr = [line for stream, line in lines if stream == "stderr"]
    return HookCall(
        [*DEFAULT_HOOK, *args], code, stdout, stderr, [line for _, line in lines], dict(env)
    )


def run_hook_process(argv: list[str], env: dict[str, str], timeout: float) -> HookCall:
    """Run one hook, reading stdout and stderr in arrival order until both reach EOF.

    Like vzdump we wait for EOF, not only for the exit; unlike vzdump we give up after
    PIPE_GRACE seconds so that a hook leaving a background child on the pipes fails the test
    instead of hanging it.
    """
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        process_group=0,  # lets us kill a leftover child together with the hook
    )
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    buffers = {"stdout": b"", "stderr": b""}
    got: dict[str, list[str]] = {"stdout": [], "stderr": []}
    lines: list[str] = []

    def emit(stream: str, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        got[stream].append(line)
        lines.append(line)

    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    eof_deadline: float | None = None
    error: str | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if eof_deadline is None and proc.poll() is not None:
                eof_deadline = now + PIPE_GRACE
            if eof_deadline is not None and now > eof_deadline:
                error = "hook left its output pipes open"
                break
            if now > deadline:
                error = f"hook timed out after {timeout:g} s"
                break
            for key, _ in sel.select(timeout=0.05):
                fd = int(key.fd)
                stream = streams[fd]
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    if buffers[stream]:
                        emit(stream, buffers[stream])
                        buffers[stream] = b""
                    continue
                buffers[stream] += data
                while b"\n" in buffers[stream]:
                    raw, buffers[stream] = buffers[stream].split(b"\n", 1)
                    emit(stream, raw)
    finally:
        sel.close()
        if error is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for stream, rest in buffers.items():
            if rest:
                emit(stream, rest)
        proc.stdout.close()
        proc.stderr.close()
        code = proc.wait()
    return HookCall(list(argv), code, got["stdout"], got["stderr"], lines, dict(env), error=error)


def job_command_line(
    vmids: Sequence[int] | None,
    options: Mapping[str, str],
    rng: random.Random,
) -> str:
    """The job line's command (pve-guest-common PVE/VZDump/Common.pm command_line): the VMIDs in
    the order given, then ``--key value`` for each other parameter in Perl's hash order (random
    per process), values shell-quoted."""
    words = ["vzdump", *(str(v) for v in vmids or ())]
    keys = list(options)
    rng.shuffle(keys)
    for key in keys:
        if options[key] != "":
            words += [f"--{key}", shlex.quote(options[key])]
    return " ".join(words)


def run_job(
    node: FakeNode,
    vmids: Iterable[int] | None = None,
    mode: str = "stop",
    *,
    exclude: Iterable[int] = (),
    pool: str | None = None,
    hook_cmd: Sequence[str] | None = None,
    abort_during: int | None = None,
    crash_after: tuple[str, int | None] | None = None,
    hang_after: tuple[str, int | None] | None = None,
    hook_timeout: float = 120,
    env_extra: Mapping[str, str] | None = None,
    env_at: tuple[str, int | None] | None = None,
    job_options: Mapping[str, str] | None = None,
    rng: random.Random | None = None,
    pid_file: bool = True,
) -> JobOutcome:
    """Run one vzdump job on ``node``.

    ``vmids`` None = every guest of this node (``--all 1``, minus ``exclude``), or with ``pool``
    the pool's members (``--pool``); guests on other nodes are skipped. ``hook_cmd`` None = the
    project's hook (``python -m pvegpuhook.hook``); an empty sequence = no hook script;
    INPROCESS = the project's hook called in this process (fast, see run_hook_inprocess).
    ``abort_during`` = a signal arrives while that guest is archived;
    ``crash_after`` = (phase, vmid or None): vzdump dies right after that hook call, or with phase
    "archive" while that guest is being archived (its paused QEMU stays up); ``hang_after``: the
    same, but vzdump hangs there (say, on a dead storage): its worker still runs, and the pid
    file names it. ``env_extra`` is added to the hook's environment (after vzdump's own), for
    every call or, with ``env_at`` = (phase, vmid or None), only for that call; e.g.
    ``{"PVE_GPU_HOOK_CRASH_AT": "after-record"}``. ``job_options`` are further parameters of the
    job line (``{"quiet": "1"}``); ``rng`` orders its options (Perl's hash order).
    ``pid_file`` False: a fault, no UPID in /var/run/vzdump.pid (the hook cannot learn its job).
    """
    if mode not in ("stop", "suspend", "snapshot"):
        raise ValueError(f"bad mode {mode!r}")
    cmd = list(DEFAULT_HOOK if hook_cmd is None else hook_cmd)
    job = _Job(
        node, mode, cmd, abort_during, crash_after, hook_timeout, env_extra, env_at, hang_after
    )
    job.pid_file = pid_file
    pve = job.pve
    excluded = set(exclude)
    skipped: list[int] = []
    options = {"mode": mode, "storage": STOREID, **(job_options or {})}
    if pool is not None:
        # get_included_guests: the pool's members, no --exclude; then this node's only
        options["pool"] = pool
        given = None
        ids = []
        for v in pve.pool_members(pool):
            entry = pve.vmlist().get("ids", {}).get(str(v))
            if entry and entry.get("node") != pve.node:
                skipped.append(v)
            else:
                ids.append(v)
    elif vmids is None:
        ids = pve.local_guests()
        options["all"] = "1"
        if excluded:
            options["exclude"] = ",".join(map(str, sorted(excluded)))
        given = None
    else:
        given = [int(v) for v in vmids]
        ids = []
        for v in given:
            entry = pve.vmlist().get("ids", {}).get(str(v))
            if entry and entry.get("node") != pve.node:
                skipped.append(v)  # "skip external VMs"
            else:
                ids.append(v)
    ids = sorted(v for v in set(ids) if v not in excluded)
    line = job_command_line(given, options, rng or random.Random())
    job.begin_task(ids[0] if len(ids) == 1 else None)
    crashed = hung = False
    ok = False
    aborted = False
    status: str | None = None
    try:
        ok, aborted, err = job.run(ids, line, skipped)
        status = "TASK OK" if ok else f"TASK ERROR: {err}"
    except _Crash as e:
        crashed = True
        hung = job.hang_after is not None and str(e).startswith("vzdump hangs")
        job.log.path = job.log.guest_log = None  # a dead (or hung) vzdump writes nothing more
        job.log.append(f"ERROR: {e}")
    finally:
        remove(pve.sim / TASK_STOP)  # the worker is gone: no SIGKILL to its group any more
    if not hung:
        job.end_task(status)
    if job.errors:
        ok = False
    return JobOutcome(
        ok=ok and not crashed,
        guests=job.guests,
        log=job.log,
        hook_calls=job.calls,
        errors=job.errors,
        aborted=aborted,
        crashed=crashed,
        upid=job.upid,
        worker=job.worker,
    )
