"""The only module that runs commands: ``qm``/``pct`` shutdown, stop and start, each confirmed by
polling the runtime state against a deadline.

Exit codes of ``qm``/``pct`` are not the truth (``qm shutdown`` of a stopped VM exits 0; for an
HA-managed guest they return before anything happened), so every action ends with a wait on
``runtime``. Commands are argv lists with absolute paths (the hook runs with an emptied
environment and no PATH); their output goes to a temp file, never to a pipe a stray child could
keep open.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import paths, runtime
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.model import GuestKind

TYPE_CHECKING = False  # typing costs ~7 ms of import on the hook path
if TYPE_CHECKING:
    from collections.abc import Callable

COMMAND_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
POLL = 0.1
# qm/pct may take a while to return even after the guest is gone (Perl start-up, HA requests)
GRACE = 30.0
# after a failed qm/pct call, how long the runtime state may take to show what really happened
SETTLE = 1.0


class Outcome:
    __slots__ = ("ok", "seconds", "detail")

    def __init__(self, ok: bool, seconds: float, detail: str = "") -> None:
        self.ok = ok
        self.seconds = seconds
        self.detail = detail


def run(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run one command; returns (exit code, its output). Never raises for the command's failure."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=COMMAND_ENV,
                timeout=timeout,
                close_fds=True,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
        except OSError as error:
            return 127, f"cannot run {argv[0]}: {error.strerror}"
        out.seek(0)
        text = out.read(16384).decode("utf-8", "replace").strip()
    if code == -1:
        text = (text + f" (no answer after {timeout:g} s)").strip()
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


def shutdown(kind: GuestKind, vmid: int, timeout: int) -> Outcome:
    """Graceful shutdown, confirmed: the guest is gone and its PCI reservations are released."""
    began = time.monotonic()
    argv = [tool(kind), "shutdown", str(vmid), "--timeout", str(timeout)]
    code, text = run(argv, timeout + GRACE)
    deadline = began + timeout + GRACE if code == 0 else time.monotonic() + SETTLE
    ok = wait_until(lambda: _holds_nothing(kind, vmid), deadline)
    detail = "" if ok else (text or f"exit code {code}")
    return Outcome(ok, time.monotonic() - began, detail)


def hard_stop(kind: GuestKind, vmid: int) -> Outcome:
    began = time.monotonic()
    code, text = run([tool(kind), "stop", str(vmid)], GRACE * 2)
    deadline = began + GRACE * 2 if code == 0 else time.monotonic() + SETTLE
    ok = wait_until(lambda: _holds_nothing(kind, vmid), deadline)
    return Outcome(ok, time.monotonic() - began, "" if ok else (text or f"exit code {code}"))


def start(kind: GuestKind, vmid: int, timeout: int) -> Outcome:
    """Start and confirm the guest runs; HA-managed guests confirm only once HA has started them."""
    began = time.monotonic()
    code, text = run([tool(kind), "start", str(vmid)], timeout + GRACE)
    crash_point("start-issued")
    deadline = began + timeout if code == 0 else time.monotonic() + SETTLE
    ok = wait_until(lambda: runtime.running(kind, vmid), deadline)
    if ok:
        return Outcome(True, time.monotonic() - began)
    return Outcome(False, time.monotonic() - began, text or f"exit code {code}")


def rebind(function: str, driver: str) -> str | None:
    """Give a PCI function back to its host driver after a VM's vfio-pci took it.

    Returns None when it is bound to ``driver`` (or the request was made), else the problem.
    Only for functions no running VM holds: the caller checked that.
    """
    device = paths.host("sys/bus/pci/devices", function)
    try:
        current = os.path.basename(os.readlink(os.path.join(device, "driver")))
    except OSError:
        current = None
    if current == driver:
        return None
    try:
        if current is not None:
            _sysfs_write(paths.host("sys/bus/pci/drivers", current, "unbind"), function)
        if os.path.exists(os.path.join(device, "driver_override")):
            _sysfs_write(os.path.join(device, "driver_override"), "")
        _sysfs_write(paths.host("sys/bus/pci/drivers", driver, "bind"), function)
    except OSError as error:
        return f"cannot bind {function} to {driver} again: {error.strerror}"
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
