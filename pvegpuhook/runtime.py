"""Which guests run, and which PCI functions their QEMU holds, read without spawning Perl.

A VM runs while ``/run/qemu-server/<vmid>.pid`` names a live kvm/qemu process that mentions that
pid file; a ``prelaunch`` or ``paused`` QEMU counts as running because it holds its devices. A CT
runs while its LXC command socket is listed in ``/proc/net/unix``, as PVE decides it. Liveness is
judged by ``/proc/<pid>/cmdline`` under the root, never by signalling a pid.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import paths
from pvegpuhook.pveconf import is_number, read_text


def qemu_cmdline(vmid: int) -> list[str] | None:
    """The argv of a VM's live QEMU process, or None when the VM is not running."""
    pid_text = read_text(paths.host("run/qemu-server", f"{vmid}.pid"))
    if pid_text is None or not is_number(pid_text.strip()):
        return None
    raw = read_text(paths.host("proc", pid_text.strip(), "cmdline"))
    if not raw:
        return None
    argv = raw.rstrip("\0").split("\0")
    binary = os.path.basename(argv[0])
    if not ("kvm" in binary or "qemu" in binary):
        return None
    if f"qemu-server/{vmid}.pid" not in raw:
        return None  # the pid was reused by another QEMU
    return argv


def process_alive(pid: int) -> bool:
    """A live (not zombie) process, judged by its /proc entry under the root."""
    return bool(read_text(paths.host("proc", str(pid), "cmdline")))


def vm_running(vmid: int) -> bool:
    return qemu_cmdline(vmid) is not None


def _ct_sockets() -> set[int] | None:
    """VMIDs whose LXC command socket ``@/var/lib/lxc/<vmid>/command`` the kernel lists in
    ``/proc/net/unix``: PVE's own test of a running CT (pve-container src/PVE/LXC.pm
    list_active_containers, check_running; docs/pve-facts.md §7). A line is ``Num: RefCount
    Protocol Flags Type St Inode Path``; PVE takes a line whose inode is a number and whose path
    is its last word. None when the file cannot be read."""
    text = read_text(paths.host(paths.UNIX_SOCKETS))
    if text is None:
        return None
    found: set[int] = set()
    for line in text.splitlines():
        words = line.split()
        if len(words) != 8 or not _hex_colon(words[0]) or not is_number(words[6]):
            continue
        path = words[7]
        if path.startswith("@/var/lib/lxc/") and path.endswith("/command"):
            vmid = path[len("@/var/lib/lxc/") : -len("/command")]
            if is_number(vmid):
                found.add(int(vmid))
    return found


def _hex_colon(word: str) -> bool:
    return len(word) > 1 and word[-1] == ":" and all(c in "0123456789abcdef" for c in word[:-1])


def _ct_cgroups() -> list[int]:
    """CTs with a cgroup ``/sys/fs/cgroup/lxc/<vmid>`` (cgroup v2 hosts only): read only where
    ``/proc/net/unix`` is missing, which on a host never happens. It keeps a root that stands
    for ``/`` and models running CTs by their cgroup alone (the test seam) working."""
    names = paths.listdir(paths.host(paths.CT_CGROUPS))
    return [
        int(n) for n in names if is_number(n) and os.path.isdir(paths.host(paths.CT_CGROUPS, n))
    ]


def ct_running(vmid: int) -> bool:
    sockets = _ct_sockets()
    return vmid in (sockets if sockets is not None else _ct_cgroups())


def running(kind: str, vmid: int) -> bool:
    return vm_running(vmid) if kind == "qemu" else ct_running(vmid)


def vm_candidates() -> list[int]:
    """VMIDs with a pid file (not yet checked for a live process)."""
    names = paths.listdir(paths.host("run/qemu-server"))
    return sorted(int(n[:-4]) for n in names if n.endswith(".pid") and is_number(n[:-4]))


def running_cts() -> list[int]:
    sockets = _ct_sockets()
    return sorted(sockets if sockets is not None else _ct_cgroups())


def reservations() -> dict[int, list[str]]:
    """Live entries of PVE's PCI reservation file: vmid → reserved functions.

    ``<pci-id> <vmid> pid:<pid>`` is live while that pid lives; ``time:<epoch>`` until that time
    (a start in progress: docs/pve-facts.md §5).
    """
    result: dict[int, list[str]] = {}
    for address, vmid, _ in _live_reservations():
        result.setdefault(vmid, []).append(address)
    return result


def starting_vms() -> dict[int, tuple[list[str], float]]:
    """VMs that are starting right now: a live ``time:`` reservation and no QEMU yet.

    PVE's reserve_pci_usage writes ``time:`` entries before QEMU runs (vm_start, from HA, onboot
    or an admin); another start of those devices then fails ``is currently reserved``.
    vmid → (reserved functions, when the reservation expires).
    """
    found: dict[int, tuple[list[str], float]] = {}
    for address, vmid, until in _live_reservations():
        if until is None or vm_running(vmid):
            continue
        functions, expiry = found.get(vmid, ([], 0.0))
        found[vmid] = ([*functions, address], max(expiry, until))
    return found


CT_LOCK_DIR = "run/lock/lxc"  # pve-container PVE/LXC/Config.pm: pve-config-<vmid>.lock


def starting_cts() -> list[int]:
    """CTs whose start is under way: their config lock is held, and they do not run yet.

    ``pct start`` runs the whole start (pre-start, where the CT's device nodes are resolved, and
    lxc's monitor) under the CT's config flock (pve-container PVE/API2/LXC/Status.pm vm_start).
    The lock is also held for a moment by config changes: then the wait for it is short.
    """
    directory = paths.host(CT_LOCK_DIR)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        vmid = name.removeprefix("pve-config-").removesuffix(".lock")
        if vmid == name or not is_number(vmid):
            continue
        if _flock_held(os.path.join(directory, name)) and not ct_running(int(vmid)):
            found.append(int(vmid))
    return sorted(found)


def _flock_held(path: str) -> bool:
    """Whether another process holds a flock on ``path`` (a shared lock for an instant: PVE's
    own lock_file waits up to 10 s for it)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def _live_reservations() -> list[tuple[str, int, float | None]]:
    """(function, vmid, expiry of a ``time:`` entry or None for ``pid:``) of live entries."""
    text = read_text(paths.host(paths.RESERVATIONS))
    if not text:
        return []
    now = time.time()
    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not is_number(parts[1]):
            continue
        address, vmid, holder = parts[0].lower(), int(parts[1]), parts[2]
        kind, _, value = holder.partition(":")
        if kind == "pid":
            if is_number(value) and os.path.exists(paths.host("proc", value, "cmdline")):
                entries.append((address, vmid, None))
        elif kind == "time":
            try:
                until = float(value)
            except ValueError:
                continue
            if until >= now:
                entries.append((address, vmid, until))
    return entries
