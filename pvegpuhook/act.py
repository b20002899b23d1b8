"""The only module that runs commands: ``qm``/``pct`` shutdown, stop and start, each confirmed by
polling the runtime state against a deadline.

Exit codes of ``qm``/``pct`` are not the truth (``qm shutdown`` of a stopped VM exits 0; for an
HA-managed guest they return before anything happened), so every action ends with a wait on
``runtime``. Commands are argv lists with absolute paths (the hook runs with an emptied
environment and no PATH); their output goes to a temp file, never to a pipe a stray child could
keep open.

A ``qm``/``pct`` command is never killed. It runs in its own session, so that the GUI's "Stop" of
the backup task (a signal to the task's process group) does not reach it: the CLI would pass the
signal on to its worker and cut a start or a shutdown in half. The hook waits as long as PVE may
take (:mod:`pvegpuhook.timing`); when that is over and the command still runs, it stops waiting,
leaves the command running and says so.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import paths, runtime, timing
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.model import GuestKind

TYPE_CHECKING = False  # typing costs ~7 ms of import on the hook path
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
POLL = 0.1
# a quick PVE command (ha-manager set): the CLI's start-up and a config lock
GRACE = float(timing.OVERHEAD + timing.CONFIG_LOCK)
# after a failed qm/pct call, how long the runtime state may take to show what really happened
SETTLE = 1.0
# commands the hook stopped waiting for: kept referenced, never waited for nor killed
_LEFT_RUNNING: list[subprocess.Popen[bytes]] = []


class Outcome:
    __slots__ = ("ok", "seconds", "detail", "left_running")

    def __init__(
        self, ok: bool, seconds: float, detail: str = "", left_running: bool = False
    ) -> None:
        self.ok = ok
        self.seconds = seconds
        self.detail = detail
        self.left_running = left_running  # the command still ran when the hook stopped waiting


def run(argv: list[str], wait: float) -> tuple[int | None, str]:
    """Run one command in its own session and wait up to ``wait`` s for it: (exit code, its
    output), or (None, its output so far) when it still runs then; it is left running. Never
    raises for the command's failure."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=COMMAND_ENV,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as error:
            return 127, f"cannot run {argv[0]}: {error.strerror}"
        code: int | None
        try:
            code = proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            code = None
            _LEFT_RUNNING.append(proc)
        out.seek(0)
        text = out.read(16384).decode("utf-8", "replace").strip()
    if code is None:
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv))
        text = f"{text} ('{command}' still runs after {wait:g} s; left running)".strip()
    return code, text


def tool(kind: GuestKind) -> str:
    return paths.host(paths.QM if kind == GuestKind.QEMU else paths.PCT)


def _holds_nothing(kind: GuestKind, vmid: int) -> bool:
    if runtime.running(kind, vmid):
        return False
    return kind != GuestKind.QEMU or vmid not in runtime.reservations()


def wait_until(predicate: Callable[[], bool], deadline: float) -> bool:
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def _confirm(
    argv: list[str], wait: float, done: Callable[[], bool], issued: str | None = None
) -> Outcome:
    """Run a power command and confirm its effect by ``done`` within ``wait`` s of its start."""
    began = time.monotonic()
    code, text = run(argv, wait)
    if issued:
        crash_point(issued)
    if code == 0:
        deadline = began + wait
    elif code is None:
        deadline = time.monotonic()  # look once: it may have happened meanwhile
    else:
        deadline = time.monotonic() + SETTLE
    ok = wait_until(done, deadline)
    seconds = time.monotonic() - began
    if ok:
        return Outcome(True, seconds)
    return Outcome(False, seconds, text or f"exit code {code}", left_running=code is None)


def shutdown(kind: GuestKind, vmid: int, timeout: int, wait: float | None = None) -> Outcome:
    """Graceful shutdown (PVE's ``--timeout``), confirmed: the guest is gone and its PCI
    reservations are released. ``wait``: stop waiting sooner than PVE may take (the command is
    left running, never killed)."""
    argv = [tool(kind), "shutdown", str(vmid), "--timeout", str(timeout)]
    limit = timing.shutdown_wait(kind, timeout)
    return _confirm(argv, _sooner(limit, wait), lambda: _holds_nothing(kind, vmid))


def hard_stop(kind: GuestKind, vmid: int, wait: float | None = None) -> Outcome:
    argv = [tool(kind), "stop", str(vmid)]
    limit = _sooner(timing.hard_stop_wait(), wait)
    return _confirm(argv, limit, lambda: _holds_nothing(kind, vmid))


def _sooner(limit: float, wait: float | None) -> float:
    return limit if wait is None else max(0.0, min(limit, wait))


def start(kind: GuestKind, vmid: int, wait: int) -> Outcome:
    """Start and confirm the guest runs within ``wait`` s (:func:`timing.start_wait`); an
    HA-managed guest is confirmed only once HA has started it."""
    argv = [tool(kind), "start", str(vmid)]
    return _confirm(argv, wait, lambda: runtime.running(kind, vmid), issued="start-issued")


def ha_sid(kind: GuestKind, vmid: int) -> str:
    return f"{'vm' if kind == GuestKind.QEMU else 'ct'}:{vmid}"


def ha_set(kind: GuestKind, vmid: int, state: str) -> Outcome:
    """``ha-manager set <sid> --state <state>``, confirmed in resources.cfg.

    ``ignored`` takes a guest out of HA's hands (qm/pct then act on it directly); setting it
    back to ``started`` makes HA start it if it is off, ``stopped`` keeps it off (docs/pve-facts.md
    §9).
    """
    from pvegpuhook.pveconf import ha_resources

    began = time.monotonic()
    code, text = run(
        [paths.host(paths.HA_MANAGER), "set", ha_sid(kind, vmid), "--state", state], GRACE
    )
    ok = wait_until(lambda: ha_resources().get(vmid) == state, time.monotonic() + SETTLE)
    return Outcome(ok, time.monotonic() - began, "" if ok else (text or f"exit code {code}"))


def start_through_ha(kind: GuestKind, vmid: int, state: str, wait: int) -> Outcome:
    """Give a guest back to HA in its recorded state; for ``started``, HA starts it: confirmed
    within ``wait`` s (:func:`timing.start_wait`, HA's hand-over included) when it runs here, or
    when HA placed it on another node (``crs: ha-rebalance-on-start``): then ``detail`` names
    that node."""
    from pvegpuhook.pveconf import guest_node, node_name

    began = time.monotonic()
    given = ha_set(kind, vmid, state)
    if not given.ok or state != "started":
        return given
    here = node_name()

    def placed() -> bool:
        return runtime.running(kind, vmid) or guest_node(vmid) not in (here, None)

    if not wait_until(placed, began + wait):
        return Outcome(False, time.monotonic() - began, f"HA did not start it within {wait} s")
    elsewhere = guest_node(vmid)
    moved = f"HA started it on node {elsewhere}" if elsewhere not in (here, None) else ""
    return Outcome(True, time.monotonic() - began, moved)


def rebind(function: str, driver: str) -> str | None:
    """Give a PCI function back to its host driver after a VM's vfio-pci took it.

    Returns None when it is bound to ``driver`` (or the request was made), else the problem.
    Never for a function a running (or starting) QEMU holds: the kernel would block the write
    until QEMU lets go, or pull the device from the guest (docs/pve-facts.md §5). The planner
    checked that; this is the last look before the write.
    """
    device = paths.host("sys/bus/pci/devices", function)
    try:
        current = os.path.basename(os.readlink(os.path.join(device, "driver")))
    except OSError:
        current = None
    if current == driver:
        return None
    user = _qemu_using(function)
    if user is not None:
        return f"{function} is in use by VM {user}: not taken from vfio-pci"
    try:
        if current is not None:
            _sysfs_write(paths.host("sys/bus/pci/drivers", current, "unbind"), function)
        if os.path.exists(os.path.join(device, "driver_override")):
            _sysfs_write(os.path.join(device, "driver_override"), "")
        _sysfs_write(paths.host("sys/bus/pci/drivers", driver, "bind"), function)
    except OSError as error:
        return f"cannot bind {function} to {driver} again: {error.strerror}"
    return None


def _qemu_using(function: str) -> int | None:
    """A running or starting VM whose QEMU has ``function`` (its reservation or command line)."""
    from pvegpuhook.claims import vfio_hosts
    from pvegpuhook.pci import normalize

    for vmid, reserved in runtime.reservations().items():
        if function in reserved:
            return vmid
    for vmid in runtime.vm_candidates():
        argv = runtime.qemu_cmdline(vmid)
        if argv and function in {normalize(h) for h in vfio_hosts(argv)}:
            return vmid
    return None


def _sysfs_write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)


def run_chained(script: str, argv: list[str]) -> int:
    """Run the admin's previous hook with our argv and environment; its output is the task log's."""
    import subprocess

    try:
        return subprocess.run([script, *argv], stdin=subprocess.DEVNULL, check=False).returncode
    except OSError as error:
        print(f"pve-gpu-hook: cannot run chained hook {script}: {error.strerror}", flush=True)
        return 1


def spawn_detached(argv: list[str]) -> str | None:
    """Start a process that outlives the hook: its own session, stdio on /dev/null, so it holds
    none of vzdump's pipes and no "Stop" of the task reaches it. None, or why it failed."""
    import subprocess

    try:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            env={**COMMAND_ENV, **_seam_env()},
        )
    except OSError as error:
        return f"cannot run {argv[0]}: {error.strerror}"
    return None


def _seam_env() -> dict[str, str]:
    """The test seam and the import path travel with a detached pve-gpu-hook process."""
    return {k: v for k, v in os.environ.items() if k in ("PVE_GPU_HOOK_ROOT", "PYTHONPATH")}


def set_hookscript(kind: GuestKind, vmid: int, volid: str | None) -> Outcome:
    """``qm set``/``pct set <vmid> --hookscript <volid>`` (``--delete hookscript`` for None).

    PVE checks the script on the way (pve-guest-common PVE/GuestHelpers.pm check_hookscript);
    the option applies at once, also to a running guest (docs/pve-facts.md §10)."""
    option = ["--hookscript", volid] if volid else ["--delete", "hookscript"]
    began = time.monotonic()
    code, text = run([tool(kind), "set", str(vmid), *option], GRACE)
    ok = code == 0
    return Outcome(ok, time.monotonic() - began, "" if ok else (text or f"exit code {code}"))


def link_snippet(path: str, target: str) -> str | None:
    """Make ``path`` (a file in a storage's snippets directory) a symlink to ``target``: PVE runs
    whatever the link points to, so an upgrade of the package reaches every guest. None, or why
    it failed. Never replaces a file that is not already such a link."""
    try:
        if os.path.islink(path) and os.readlink(path) == target:
            return None
        if os.path.lexists(path):
            return f"{path} exists and is not a link to {target}: not replaced"
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.symlink(target, path)
    except OSError as error:
        return f"cannot link {path} to {target}: {error.strerror}"
    return None
