"""Every host path the library reads or writes, relative to one root.

``PVE_GPU_HOOK_ROOT`` (default ``/``) stands for ``/`` so that the tests and the demo can run the
real code against a fake node tree. Nothing else in the library builds an absolute host path.
"""

from __future__ import annotations

import os


def root() -> str:
    return os.environ.get("PVE_GPU_HOOK_ROOT") or "/"


def host(*parts: str) -> str:
    """The path of host file ``/parts...`` under the current root."""
    return os.path.join(root(), *(part.lstrip("/") for part in parts))


def qemu_conf(vmid: int) -> str:
    return host("etc/pve/qemu-server", f"{vmid}.conf")


def lxc_conf(vmid: int) -> str:
    return host("etc/pve/lxc", f"{vmid}.conf")


STATE_DIR = "var/lib/pve-gpu-hook"
STATE_FILE = STATE_DIR + "/state.json"  # absent when no guest waits: phases check it cheaply
CHAIN_FILE = STATE_DIR + "/chain"  # the admin's previous hook, set by 'register --chain'
REGISTRATION_FILE = STATE_DIR + "/registration.json"  # what 'register' appended to vzdump.conf
JOB_FILE = STATE_DIR + "/job.json"  # what the last job that acted did: stops, starts, its end
CORRUPT_MARK = ".corrupt-"  # in the name of a damaged state file kept aside
LOCK_FILE = "run/lock/pve-gpu-hook.lock"
LOG_FILE = "var/log/pve-gpu-hook.log"
OVERRIDE_FILE = "etc/pve-gpu-hook/config.yaml"
VZDUMP_CONF = "etc/vzdump.conf"
PCI_MAPPING = "etc/pve/mapping/pci.cfg"
HA_RESOURCES = "etc/pve/ha/resources.cfg"
RESERVATIONS = "run/qemu-server/pci-id-reservations"
UNIX_SOCKETS = "proc/net/unix"  # the kernel's list of unix sockets: a running CT has one
CT_CGROUPS = "sys/fs/cgroup/lxc"
VZDUMP_PID = "run/vzdump.pid"  # /var/run/vzdump.pid: the running (or last failed) job's UPID
TASK_LOGS = "var/log/pve/tasks"  # PVE's task logs, /<last hex digit of the start time>/<UPID>
VZDUMP_LOGS = "var/log/vzdump"  # each guest's last backup log, <qemu|lxc>-<vmid>.log
QM = "usr/sbin/qm"
PCT = "usr/sbin/pct"
HA_MANAGER = "usr/sbin/ha-manager"
VMLIST = "etc/pve/.vmlist"
USER_CFG = "etc/pve/user.cfg"  # users, ACLs and resource pools (pool:<name>:<comment>:<vmids>:...)
STORAGE_CFG = "etc/pve/storage.cfg"
GUEST_HOOK = "usr/share/pve-gpu-hook/guest-hook"  # the guest hookscript the package installs
GUEST_HOOK_SNIPPET = "pve-gpu-hook-guest-hook"  # its name in a storage's snippets directory


def unhost(path: str) -> str:
    """A path under the root as the admin knows it on the host (``/etc/pve/...``)."""
    top = root().rstrip("/")
    if top and (path == top or path.startswith(top + "/")):
        return path[len(top) :] or "/"
    return path


def listdir(path: str) -> list[str]:
    """The names in a directory; none when it does not exist. NotPermitted when it cannot be
    read: an empty answer would look like data."""
    try:
        return os.listdir(path)
    except PermissionError:
        from pvegpuhook.errors import NotPermitted

        raise NotPermitted(path) from None
    except OSError:
        return []


def shown(relative: str) -> str:
    """A host path as the admin knows it (``/etc/vzdump.conf``), whatever the test root."""
    return "/" + relative.lstrip("/")


def corrupt_state_files() -> list[str]:
    """Damaged state files kept aside, oldest first (cheap: every hook phase asks)."""
    directory = host(STATE_DIR)
    names = listdir(directory)
    return sorted(os.path.join(directory, n) for n in names if CORRUPT_MARK in n)
