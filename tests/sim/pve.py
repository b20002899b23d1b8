"""A fake Proxmox VE node: guest configs, PCI reservations, QEMU/LXC state, qm/pct/ha-manager.

This is an independent model of PVE (qemu-server, pve-container, pve-ha-manager, read from their
source) over a directory tree that stands for ``/``. It never imports the library under test, so a
misreading of PVE in the library shows up as a disagreement with this model.

The fake commands in ``<root>/usr/sbin`` call :func:`main`; the vzdump driver and the builder call
the :class:`Pve` methods directly (vzdump runs them in-process in real PVE too).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_HOSTPCI = 16
FIRST_PID = 10000
LOCK_TIMEOUT = 10.0  # PVE's config lock wait before "got timeout"
DEFAULT_HA_DELAY = 0.3
QEMU_SHUTDOWN_TIMEOUT = 60  # _do_vm_stop: without --timeout and startup down=
LXC_SHUTDOWN_TIMEOUT = 60  # pct shutdown's default --timeout
AGENT_PING_TIMEOUT = 3  # qga_check_running: guest-ping with a 3 s timeout
CLOCK_TICKS = 100  # USER_HZ: /proc/<pid>/stat's start time is in 1/100 s since boot
PAUSED_STATES = ("paused", "prelaunch", "suspended")

# qemu-server's $PCIRE (src/PVE/QemuServer/PCI.pm): domain optional and of 4 or more digits,
# function optional.
PCIRE = r"(?:[a-f0-9]{4,}:)?[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?"
PCI_ID_RE = re.compile(rf"^{PCIRE}$")
RESERVATION_RE = re.compile(rf"^({PCIRE})\s(\d+)\s(time|pid):(\d+)$")
KEY_RE = re.compile(r"^([a-z][a-z_\-]*\d*):\s*(.*?)\s*$")
# pve-container accepts raw lxc keys with ':' or '='.
LXC_KEY_RE = re.compile(r"^(lxc\.[a-z0-9_\-.]+)(?::|\s*=)\s*(.*?)\s*$")
SECTION_RE = re.compile(r"^\[([^\]]+)\]\s*$")
NVIDIA_MAJOR = 195
DRM_MAJOR = 226
# /proc/net/unix as the kernel writes it (net/unix/af_unix.c unix_seq_show): a header, then per
# socket "%pK: %08X %08X %08X %04X %02X %5lu" (address, refcount, protocol 0, flags
# (__SO_ACCEPTCON 0x10000 when listening), type (1 = stream), state (1 = unconnected), inode),
# then " <path>" when the socket has one; an abstract name is shown as '@' + name.
UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"
HOST_SOCKETS = (
    "0000000000000000: 00000002 00000000 00010000 0001 01 18342 /run/systemd/private\n"
    "0000000000000000: 00000003 00000000 00000000 0002 01 17620 /run/systemd/notify\n"
    "0000000000000000: 00000003 00000000 00000000 0001 03 21873\n"
    "0000000000000000: 00000002 00000000 00010000 0001 01 23011 /var/run/qemu-server/1.qmp\n"
)
NO_CT_CGROUP = "var/lib/fake-pve/no-ct-cgroup"  # this host has no /sys/fs/cgroup/lxc/<vmid>


class PveError(Exception):
    """A Perl ``die`` in PVE: ``before`` lines, then the message, on stderr; exit ``code``."""

    def __init__(self, message: str, code: int = 255, before: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.before = list(before)


class Out:
    """Collects what a PVE command prints; echoes it when it runs as a fake command."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self._add("stdout", msg)

    def warn(self, msg: str) -> None:
        self._add("stderr", msg)

    def _add(self, stream: str, msg: str) -> None:
        for line in msg.splitlines() or [""]:
            self.lines.append((stream, line))
            if self.echo:
                print(line, file=sys.stdout if stream == "stdout" else sys.stderr, flush=True)

    def text(self) -> list[str]:
        return [line for _, line in self.lines]


# --------------------------------------------------------------------------------------------
# Small file helpers


def write_atomic(path: Path, text: str) -> None:
    """Readers must never see a half-written file (the library reads while we write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def symlink(path: Path, target: str) -> None:
    """Create or atomically replace a (relative) symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.lnk")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file, symlink or tree if it exists."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def flocked(path: Path, timeout: float | None = None, shown: str | None = None) -> Iterator[None]:
    """flock on a separate open file: excludes other processes and other threads alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise PveError(f"can't lock file '{shown or path}' - got timeout") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


HOSTPCI_FORMAT = {  # qemu-server PCI.pm $hostpci_fmt: key -> pattern ("bool" for booleans)
    "host": r"(?:[a-f0-9]{4,}:)?[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?"
    r"(?:;(?:[a-f0-9]{4,}:)?[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?)*",
    "mapping": r"[a-zA-Z][a-zA-Z0-9_\-]+",
    "rombar": "bool",
    "romfile": r"[^,;]+",
    "pcie": "bool",
    "x-vga": "bool",
    "legacy-igd": "bool",
    "mdev": r"[^/\.:]+",
    "vendor-id": r"0x[0-9a-fA-F]{4}",
    "device-id": r"0x[0-9a-fA-F]{4}",
    "sub-vendor-id": r"0x[0-9a-fA-F]{4}",
    "sub-device-id": r"0x[0-9a-fA-F]{4}",
    "driver": r"vfio|keep",
}
MAP_FORMAT = {  # pve-guest-common Mapping/PCI.pm $map_fmt (node, id and path are required)
    "node": r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?",
    "id": r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}",
    "subsystem-id": r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}",
    "path": r"(?:[a-f0-9]{4,}:[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?;)*"
    r"[a-f0-9]{4,}:[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?",
    "iommugroup": r"[+-]?\d+",
    "description": r".*",
}


def property_string(value: str, schema: dict[str, str], default_key: str | None) -> dict | None:
    """pve-common JSONSchema.pm parse_property_string + check_object: None when PVE dies."""
    res: dict[str, str] = {}
    bare = False
    for part in value.split(","):
        if re.fullmatch(r"\s*", part):
            continue
        kv = re.fullmatch(r"([^=]+)=(.+)", part, re.DOTALL)
        if kv:
            if kv.group(1) in res or kv.group(1) not in schema:
                return None
            res[kv.group(1)] = kv.group(2)
        elif "=" in part or default_key is None or bare or default_key in res:
            return None
        else:
            bare = True
            res[default_key] = part
    for key, pattern in schema.items():
        if key not in res:
            continue
        if pattern == "bool":
            if res[key].lower() not in ("1", "0", "on", "off", "yes", "no", "true", "false"):
                return None
        elif not re.fullmatch(pattern, res[key]):
            return None
    return res


def hostpci_format(value: str) -> dict[str, str] | None:
    return property_string(value, HOSTPCI_FORMAT, "host")


def parse_map_value(value: str) -> dict[str, str] | None:
    res = property_string(value, MAP_FORMAT, None)
    if res is None or not all(k in res for k in ("node", "id", "path")):
        return None
    return res


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "yes", "on", "true")


def norm_pci_id(pci_id: str) -> str:
    """Full lower-case form: a missing domain is 0000 (as PVE and QEMU do)."""
    i = pci_id.strip().lower()
    if re.match(r"^[0-9a-f]{2}:[0-9a-f]{2}(\.[0-7])?$", i):
        i = "0000:" + i
    return i


# --------------------------------------------------------------------------------------------
# Guest config files (PVE format)


@dataclass
class Config:
    """A guest config: the main section as ordered (key, value) pairs, then raw sections."""

    items: list[tuple[str, str]] = field(default_factory=list)  # key "#" = comment, "" = raw
    sections: list[tuple[str, list[str]]] = field(default_factory=list)

    def get(self, key: str) -> str | None:
        found = None
        for k, v in self.items:
            if k == key:
                found = v
        return found

    def getall(self, key: str) -> list[str]:
        return [v for k, v in self.items if k == key]

    def keys(self) -> list[str]:
        return [k for k, _ in self.items if k not in ("#", "")]

    def set(self, key: str, value: str) -> None:
        for n, (k, _) in enumerate(self.items):
            if k == key:
                self.items[n] = (key, value)
                self.items[n + 1 :] = [it for it in self.items[n + 1 :] if it[0] != key]
                return
        self.items.append((key, value))

    def delete(self, key: str) -> None:
        self.items = [it for it in self.items if it[0] != key]

    def section(self, name: str) -> list[str] | None:
        for n, body in self.sections:
            if n == name:
                return body
        return None

    def drop_section(self, name: str) -> None:
        self.sections = [s for s in self.sections if s[0] != name]


def parse_pairs(lines: Iterable[str]) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("#"):
            items.append(("#", line))
            continue
        m = LXC_KEY_RE.match(line) or KEY_RE.match(line)
        items.append((m.group(1), m.group(2)) if m else ("", line))
    return items


def parse_config(text: str) -> Config:
    cfg = Config()
    current: list[str] | None = None
    main: list[str] = []
    for line in text.splitlines():
        m = SECTION_RE.match(line)
        if m:
            current = []
            cfg.sections.append((m.group(1), current))
        elif current is None:
            main.append(line)
        else:
            current.append(line)
    cfg.items = parse_pairs(main)
    return cfg


def render_config(cfg: Config) -> str:
    out = []
    for k, v in cfg.items:
        out.append(v if k in ("#", "") else f"{k}: {v}")
    text = "\n".join(out) + ("\n" if out else "")
    for name, body in cfg.sections:
        while body and not body[-1].strip():
            body = body[:-1]
        text += f"\n[{name}]\n" + "".join(line + "\n" for line in body)
    return text


# --------------------------------------------------------------------------------------------
# The node


@dataclass
class Hostpci:
    """One parsed hostpciN entry (qemu-server's parse_hostpci)."""

    index: int
    alternatives: list[list[str]]
    mdev: str | None
    opts: dict[str, str]
    ids: list[str] = field(default_factory=list)  # chosen alternative


class Pve:
    """The runtime model of one PVE node rooted at ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._scale: float | None = None

    # ---- simulated time ----------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """Real seconds per simulated second (``run/fake-pve/clock.json``, default 1).

        Every duration of this model (PVE's timeouts and waits, the faults' delays) is in
        simulated seconds; a test that runs the hook with a clock of the same scale can play a
        200 s start in 2 s."""
        if self._scale is None:
            try:
                self._scale = float(json.loads((self.sim / "clock.json").read_text())["scale"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                self._scale = 1.0
        return self._scale

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds * self.scale)

    # ---- paths and basic state -------------------------------------------------------------

    def p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def node(self) -> str:
        try:
            return self.p("etc/hostname").read_text().strip() or "pve1"
        except FileNotFoundError:
            return "pve1"

    @property
    def sim(self) -> Path:
        return self.p("run/fake-pve")

    def conf_rel(self, kind: str, vmid: int, node: str | None = None) -> str:
        sub = "qemu-server" if kind == "qemu" else "lxc"
        return f"nodes/{node or self.node}/{sub}/{vmid}.conf"

    def conf_path(self, kind: str, vmid: int, node: str | None = None) -> Path:
        return self.p("etc/pve/" + self.conf_rel(kind, vmid, node))

    def missing_conf(self, kind: str, vmid: int) -> PveError:
        return PveError(f"Configuration file '{self.conf_rel(kind, vmid)}' does not exist", code=2)

    def vmlist(self) -> dict:
        try:
            return json.loads(self.p("etc/pve/.vmlist").read_text())
        except (FileNotFoundError, ValueError):
            return {"version": 1, "ids": {}}

    def guest_type(self, vmid: int) -> str | None:
        """Type of a guest local to this node (None if unknown here)."""
        entry = self.vmlist().get("ids", {}).get(str(vmid))
        if entry and entry.get("node") == self.node:
            return entry.get("type")
        for kind in ("qemu", "lxc"):
            if self.conf_path(kind, vmid).exists():
                return kind
        return None

    def local_guests(self) -> list[int]:
        ids = {
            int(k) for k, v in self.vmlist().get("ids", {}).items() if v.get("node") == self.node
        }
        for kind in ("qemu", "lxc"):
            d = self.conf_path(kind, 0).parent
            if d.is_dir():
                ids.update(int(f.stem) for f in d.glob("*.conf") if f.stem.isdigit())
        return sorted(ids)

    def pool_members(self, pool: str) -> list[int]:
        """A resource pool's guests (pve-manager PVE/API2Tools.pm get_resource_pool_guest_members:
        the pool's VMIDs from user.cfg that .vmlist knows; pve-access-control
        PVE/AccessControl.pm parse_user_config: ``pool:<name>:<comment>:<vmids>:<storages>:``,
        a VMID already in another pool ignored). vzdump dies when the pool does not exist."""
        path = self.p("etc/pve/user.cfg")
        text = path.read_text() if path.exists() else ""
        seen: set[int] = set()
        found: set[int] | None = None
        for line in text.splitlines():
            fields = [f.strip() for f in line.strip().split(":")]
            if len(fields) < 2 or fields[0] != "pool":
                continue
            vmids = {
                int(v) for v in re.split(r"[,;\s]+", fields[3] if len(fields) > 3 else "") if v
            } - seen
            seen |= vmids
            if fields[1] == pool:
                found = vmids
        if found is None:
            raise PveError(f"pool '{pool}' does not exist")
        known = set(self.local_guests()) | {int(k) for k in self.vmlist().get("ids", {})}
        return sorted(found & known)

    def read_config(self, kind: str, vmid: int) -> Config:
        path = self.conf_path(kind, vmid)
        try:
            return parse_config(path.read_text())
        except FileNotFoundError:
            raise self.missing_conf(kind, vmid) from None

    def write_config(self, kind: str, vmid: int, cfg: Config) -> None:
        write_atomic(self.conf_path(kind, vmid), render_config(cfg))

    def guest_lock_file(self, kind: str, vmid: int) -> tuple[Path, str]:
        """The guest's config lock file under the root, and its path as PVE names it
        (qemu-server PVE/QemuConfig.pm config_file_lock; pve-container PVE/LXC/Config.pm)."""
        if kind == "qemu":
            rel = f"run/lock/qemu-server/lock-{vmid}.conf"
            shown = f"/var/lock/qemu-server/lock-{vmid}.conf"
        else:
            rel = f"run/lock/lxc/pve-config-{vmid}.lock"
            shown = f"/run/lock/lxc/pve-config-{vmid}.lock"
        return self.p(rel), shown

    @contextlib.contextmanager
    def guest_lock(self, kind: str, vmid: int) -> Iterator[None]:
        """PVE's per-guest config flock (held during start, stop and config changes)."""
        path, shown = self.guest_lock_file(kind, vmid)
        with flocked(path, LOCK_TIMEOUT * self.scale, shown):
            yield

    def faults(self, vmid: int) -> dict:
        try:
            data = json.loads((self.sim / "faults.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return dict(data.get(str(vmid), {}))

    def take_fault(self, vmid: int, name: str) -> object:
        """A one-shot fault: its value (None when not set), removed as it is used."""
        path = self.sim / "faults.json"
        with flocked(self.sim / "faults.lock"):
            try:
                data = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                return None
            value = data.get(str(vmid), {}).pop(name, None)
            if value is not None:
                write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        return value

    def set_lock(self, kind: str, vmid: int, lock: str) -> None:
        """AbstractConfig::set_lock: refuses when another lock is already set."""
        with self.guest_lock(kind, vmid):
            cfg = self.read_config(kind, vmid)
            current = cfg.get("lock")
            if current:
                raise PveError(f"{'VM' if kind == 'qemu' else 'CT'} is locked ({current})")
            cfg.set("lock", lock)
            self.write_config(kind, vmid, cfg)

    def remove_lock(self, kind: str, vmid: int, lock: str | None = None) -> None:
        with self.guest_lock(kind, vmid):
            cfg = self.read_config(kind, vmid)
            if cfg.get("lock") is not None and (lock is None or cfg.get("lock") == lock):
                cfg.delete("lock")
                self.write_config(kind, vmid, cfg)

    def apply_pending(self, kind: str, vmid: int, cfg: Config) -> Config:
        """Apply [PENDING] / [pve:pending] to the main section (deletes first), write it back."""
        name = "PENDING" if kind == "qemu" else "pve:pending"
        body = cfg.section(name)
        if body is None:
            return cfg
        pending = parse_pairs(body)
        for k, v in pending:
            if k == "delete":
                for key in v.split(","):
                    key = key.strip().lstrip("!")
                    if key:
                        cfg.delete(key)
        for k, v in pending:
            if k not in ("delete", "#", ""):
                cfg.set(k, v)
        cfg.drop_section(name)
        self.write_config(kind, vmid, cfg)
        return cfg

    # ---- processes ----------------------------------------------------------------------------

    def alloc_pid(self) -> int:
        path = self.sim / "next-pid"
        with flocked(self.sim / "next-pid.lock"):
            try:
                pid = int(path.read_text().strip())
            except (FileNotFoundError, ValueError):
                pid = FIRST_PID
            write_atomic(path, f"{pid + 1}\n")
        return pid

    def proc_cmdline(self, pid: int) -> list[str] | None:
        try:
            raw = self.p(f"proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return raw.decode(errors="replace").rstrip("\0").split("\0")

    def boot_time(self) -> float:
        """When the fake host booted (epoch): the origin of the processes' start times."""
        path = self.sim / "boot-time"
        try:
            return float(path.read_text())
        except (FileNotFoundError, ValueError):
            write_atomic(path, f"{time.time() - 1000:.2f}\n")  # up for a while already
            return float(path.read_text())

    def spawn_proc(self, argv: Sequence[str], comm: str, pid: int | None = None) -> int:
        """A fake process: ``/proc/<pid>/{comm,stat,cmdline}``; ``pid`` reuses a given pid."""
        pid = self.alloc_pid() if pid is None else pid
        d = self.p(f"proc/{pid}")
        remove(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / "comm").write_text(comm[:15] + "\n")
        # the kernel's format: field 3 the state, field 22 the start time in clock ticks
        ticks = int((time.time() - self.boot_time()) * CLOCK_TICKS)
        fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 10
        fields += ["1", "0", str(ticks)] + ["0"] * 30
        write_atomic(d / "stat", f"{pid} ({comm[:15]}) {' '.join(fields)}\n")
        # cmdline last: its existence is what makes the process "alive".
        write_atomic(d / "cmdline", "".join(a + "\0" for a in argv))
        return pid

    def proc_starttime(self, pid: int) -> int | None:
        try:
            rest = self.p(f"proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            return None
        return int(rest[19])

    def end_proc(self, pid: int) -> None:
        remove(self.p(f"proc/{pid}"))

    def vm_pid(self, vmid: int) -> int | None:
        """vm_running_locally: the pid file names a live kvm process for this VMID."""
        try:
            pid = int(self.p(f"run/qemu-server/{vmid}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        argv = self.proc_cmdline(pid) or []
        # A reused pid would belong to another process: it must be this VM's kvm.
        return pid if f"\0-id\0{vmid}\0" in "\0" + "\0".join(argv) + "\0" else None

    def qmp_status(self, vmid: int) -> str | None:
        if not self.vm_pid(vmid):
            return None
        try:
            return (self.sim / f"qmp-{vmid}").read_text().strip() or "running"
        except FileNotFoundError:
            return "running"

    def set_qmp(self, vmid: int, status: str) -> None:
        write_atomic(self.sim / f"qmp-{vmid}", status + "\n")

    def ct_running(self, vmid: int) -> bool:
        return vmid in self.running_cts()

    @property
    def ct_cgroup_dirs(self) -> bool:
        """Whether a running CT has ``/sys/fs/cgroup/lxc/<vmid>`` (cgroup v2, LXC >= 4): not on
        every host (cgroup v1 keeps a CT's cgroups per controller)."""
        return not self.p(NO_CT_CGROUP).exists()

    def unix_socket(self, vmid: int, present: bool) -> None:
        """Add or remove the CT's LXC command socket, the abstract ``/var/lib/lxc/<vmid>/command``
        that lxc-start's monitor listens on while the CT runs."""
        path = self.p("proc/net/unix")
        mine = f" @/var/lib/lxc/{vmid}/command\n"
        with flocked(self.sim / "unix.lock"):
            try:
                lines = path.read_text().splitlines(keepends=True)
            except FileNotFoundError:
                lines = [UNIX_HEADER]
            lines = [line for line in lines if not line.endswith(mine)]
            if present:
                lines.append(
                    f"0000000000000000: 00000002 00000000 00010000 0001 01 {40000 + vmid:5d}{mine}"
                )
            write_atomic(path, "".join(lines))

    def is_running(self, vmid: int) -> bool:
        kind = self.guest_type(vmid)
        if kind == "lxc":
            return self.ct_running(vmid)
        return self.vm_pid(vmid) is not None

    def running_vms(self) -> list[int]:
        d = self.p("run/qemu-server")
        ids = [int(f.stem) for f in d.glob("*.pid") if f.stem.isdigit()] if d.is_dir() else []
        return sorted(v for v in ids if self.vm_pid(v))

    def running_cts(self) -> list[int]:
        """PVE's list_active_containers (pve-container src/PVE/LXC.pm; check_running uses it):
        CTs whose command socket ``@/var/lib/lxc/<vmid>/command`` is in ``/proc/net/unix``."""
        try:
            text = self.p("proc/net/unix").read_text()
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            m = re.match(r"^[a-f0-9]+:\s+\S+\s+\S+\s+\S+\s+\S+\s+\S+\s+\d+\s+(\S+)$", line)
            path = re.match(r"^@/var/lib/lxc/(\d+)/command$", m.group(1)) if m else None
            if path:
                found.append(int(path.group(1)))
        return sorted(set(found))

    # ---- sysfs --------------------------------------------------------------------------------

    def pci_dir(self, addr: str) -> Path:
        return self.p(f"sys/bus/pci/devices/{addr}")

    def lspci(self, pci_id: str) -> list[str]:
        """PVE::SysFSTools::lspci with a filter: a short id means every function present."""
        full = norm_pci_id(pci_id)
        base = self.p("sys/bus/pci/devices")
        if not base.is_dir():
            return []
        if re.search(r"\.[0-7]$", full):
            return [full] if (base / full).exists() else []
        return sorted(n.name for n in base.iterdir() if n.name.startswith(full + "."))

    def iommu_group(self, addr: str) -> str | None:
        link = self.pci_dir(addr) / "iommu_group"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def group_members(self, addr: str) -> list[str]:
        """The unit vfio binds together: the IOMMU group, else (no group) the device's functions."""
        group = self.iommu_group(addr)
        if group is not None:
            d = self.p(f"sys/kernel/iommu_groups/{group}/devices")
            members = sorted(n.name for n in d.iterdir()) if d.is_dir() else []
            return members or [addr]
        return self.lspci(addr.rsplit(".", 1)[0]) or [addr]

    def driver(self, addr: str) -> str | None:
        self.apply_sysfs_writes()
        return self.linked_driver(addr)

    def linked_driver(self, addr: str) -> str | None:
        link = self.pci_dir(addr) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def set_driver(self, addr: str, name: str | None) -> None:
        old = self.linked_driver(addr)
        if old == name:
            return
        if old:
            remove(self.p(f"sys/bus/pci/drivers/{old}/{addr}"))
        link = self.pci_dir(addr) / "driver"
        if name is None:
            remove(link)
        else:
            self.driver_dir(name)
            symlink(link, f"../../drivers/{name}")
            symlink(self.p(f"sys/bus/pci/drivers/{name}/{addr}"), f"../../devices/{addr}")
        self.sync_host_nodes(addr)
        self.sync_mdev_types(addr)

    def sync_mdev_types(self, addr: str) -> None:
        """A GPU's ``mdev_supported_types`` exist only while its vendor driver has it: that driver
        registers the device as an mdev parent when it binds and unregisters it (removing its
        mdev instances) when it lets go (Linux drivers/vfio/mdev/mdev_core.c
        mdev_register_parent, mdev_unregister_parent). PVE binds the GPU to vfio-pci for a VM's
        full passthrough and never back, so after that no mdev can be created on it
        (qemu-server PVE/QemuServer/PCI/Mdev.pm pci_create_mdev_device: "does not support
        mediated devices")."""
        types = self.pci_dir(addr) / "mdev_supported_types"
        stash = self.p(f"var/lib/fake-pve/mdev-types/{addr}")
        host_driver = self.linked_driver(addr) not in (None, "vfio-pci")
        if host_driver and stash.is_dir() and not types.exists():
            stash.rename(types)
        elif not host_driver and types.is_dir():
            self.remove_mdevs(None, parent=addr)
            stash.parent.mkdir(parents=True, exist_ok=True)
            types.rename(stash)

    def register_host_nodes(
        self, addr: str, drm: list[str], nvidia_minor: int | None, model: str
    ) -> None:
        """The device nodes a GPU's host driver creates for it (DRM card/renderD, NVIDIA's
        /dev/nvidiaN with its /proc/driver/nvidia entry), kept while that driver has it."""
        path = self.p("var/lib/fake-pve/host-nodes.json")
        data = json.loads(path.read_text()) if path.exists() else {}
        data[addr] = {"drm": drm, "nvidia": nvidia_minor, "model": model}
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        self.sync_host_nodes(addr)

    def sync_host_nodes(self, addr: str) -> None:
        """A GPU bound to vfio-pci (or to no driver) has no DRM or NVIDIA nodes: they are the
        host driver's. PVE binds the whole IOMMU group to vfio-pci at a VM's start and never
        binds it back (pve-common PVE/SysFSTools.pm pci_dev_bind_to_vfio), so a CT's nodes for
        that GPU are gone until someone gives it back to its driver."""
        try:
            entry = json.loads(self.p("var/lib/fake-pve/host-nodes.json").read_text()).get(addr)
        except (FileNotFoundError, ValueError):
            return
        if not entry:
            return
        present = self.linked_driver(addr) not in (None, "vfio-pci")
        info = self.p(f"proc/driver/nvidia/gpus/{addr}/information")
        minor = entry.get("nvidia")
        if minor is not None and present:
            info.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(
                info,
                f"Model: \t\t {entry['model']}\n"
                "IRQ:   \t\t 145\n"
                f"GPU UUID: \t GPU-00000000-0000-0000-0000-{minor:012d}\n"
                "Video BIOS: \t 94.02.42.00.a9\n"
                "Bus Type: \t PCIe\n"
                "DMA Size: \t 47 bits\n"
                "DMA Mask: \t 0x7fffffffffff\n"
                f"Bus Location: \t {addr}\n"
                f"Device Minor: \t {minor}\n"
                "GPU Excluded:\t No\n",
            )
        elif minor is not None:
            remove(info.parent)
        for name in entry.get("drm", []):
            node_dir = self.p(f"sys/class/drm/{name}")
            if present:
                node_dir.mkdir(parents=True, exist_ok=True)
                symlink(node_dir / "device", f"../../../bus/pci/devices/{addr}")
                number = re.sub(r"\D", "", name)
                (node_dir / "dev").write_text(f"226:{number}\n")
            else:
                remove(node_dir)

    def driver_dir(self, name: str) -> Path:
        """``sys/bus/pci/drivers/<name>`` with its write-only ``bind``/``unbind`` attributes."""
        d = self.p(f"sys/bus/pci/drivers/{name}")
        d.mkdir(parents=True, exist_ok=True)
        for attribute in ("bind", "unbind"):
            (d / attribute).touch()
        return d

    def apply_sysfs_writes(self) -> None:
        """The kernel's side of ``echo <addr> > drivers/<name>/(un)bind``.

        The real kernel acts during the write; this fake one acts when PVE next looks, which
        is before any start (and whenever a test asks for a driver).
        """
        drivers = self.p("sys/bus/pci/drivers")
        if not drivers.is_dir():
            return
        for attribute in ("unbind", "bind"):
            for name in sorted(os.listdir(drivers)):
                path = drivers / name / attribute
                try:
                    requests = path.read_text().split()
                except OSError:
                    continue
                if not requests:
                    continue
                path.write_text("")
                for addr in requests:
                    if attribute == "unbind" and name == "vfio-pci":
                        self.check_vfio_unbind(addr)
                    if self.pci_dir(addr).is_dir():
                        self.set_driver(addr, None if attribute == "unbind" else name)

    def check_vfio_unbind(self, addr: str) -> None:
        """Unbinding a device from vfio-pci while a running QEMU uses it: the kernel asks user
        space to release it and the write blocks until QEMU lets go (or the device is pulled
        from the guest) — a fault of the writer. Logged as a call of the "kernel" that tests
        and the soak check for."""
        for vmid in self.running_vms():
            if addr in self.vm_vfio_devices(vmid)[0]:
                self.log_call(
                    ["kernel", "vfio-pci unbind in use", addr, str(vmid)], 1, time.time(), Out()
                )

    def pci_ids(self, addr: str) -> tuple[str, str]:
        d = self.pci_dir(addr)
        vendor = (d / "vendor").read_text().strip().removeprefix("0x")
        device = (d / "device").read_text().strip().removeprefix("0x")
        return vendor, device

    # ---- mdev ---------------------------------------------------------------------------------

    def mdev_parent(self, uuid: str) -> str | None:
        link = self.p(f"sys/bus/mdev/devices/{uuid}")
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).parent.name

    def create_mdev(self, vmid: int, index: int, parent: str, mdev_type: str) -> str:
        """qemu-server PVE/QemuServer/PCI/Mdev.pm pci_create_mdev_device. A parent bound to
        vfio-pci has no ``mdev_supported_types`` (:meth:`sync_mdev_types`)."""
        uuid = f"{index:08d}-0000-0000-0000-{vmid:012d}"
        self.apply_sysfs_writes()
        types = self.pci_dir(parent) / "mdev_supported_types"
        if not types.is_dir():
            raise PveError(f"pci device '{parent}' does not support mediated devices ")
        tdir = types / mdev_type
        if not tdir.is_dir():
            raise PveError(f"pci device '{parent}' has no type '{mdev_type}'")
        inst = self.pci_dir(parent) / uuid
        if inst.is_dir():
            return uuid
        avail_file = tdir / "available_instances"
        try:
            avail = int(avail_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            avail = 1
        if avail <= 0:
            raise PveError(f"pci device '{parent}' has no available instances of '{mdev_type}'")
        write_atomic(avail_file, f"{avail - 1}\n")
        inst.mkdir(parents=True)
        symlink(inst / "mdev_type", f"../mdev_supported_types/{mdev_type}")
        symlink(self.p(f"sys/bus/mdev/devices/{uuid}"), f"../../pci/devices/{parent}/{uuid}")
        return uuid

    def remove_mdevs(self, vmid: int | None, parent: str | None = None) -> None:
        """Destroy a VM's mdev instances (all of them for None; only those of ``parent`` when
        given) and free their type slots."""
        d = self.p("sys/bus/mdev/devices")
        for link in list(d.iterdir()) if d.is_dir() else []:
            if vmid is not None and not link.name.endswith(f"-{vmid:012d}"):
                continue
            of = self.mdev_parent(link.name)
            if parent is not None and of != parent:
                continue
            if of:
                inst = self.pci_dir(of) / link.name
                type_link = inst / "mdev_type"
                if type_link.is_symlink():
                    mdev_type = Path(os.readlink(type_link)).name
                    avail = inst.parent / "mdev_supported_types" / mdev_type / "available_instances"
                    with contextlib.suppress(FileNotFoundError, ValueError):
                        write_atomic(avail, f"{int(avail.read_text()) + 1}\n")
                remove(inst)
            remove(link)

    # ---- who holds what ---------------------------------------------------------------------

    def vm_vfio_devices(self, vmid: int) -> tuple[set[str], set[str]]:
        """(exclusive host= functions, mdev parents) of a running VM, read from its cmdline."""
        pid = self.vm_pid(vmid)
        argv = self.proc_cmdline(pid) if pid else None
        hosts: set[str] = set()
        parents: set[str] = set()
        for n, arg in enumerate(argv or []):
            if arg != "-device" or n + 1 >= len(argv or []):
                continue
            dev = (argv or [])[n + 1]
            if not dev.startswith("vfio-pci"):
                continue
            opts = dict(p.split("=", 1) for p in dev.split(",")[1:] if "=" in p)
            if "host" in opts:
                hosts.add(norm_pci_id(opts["host"]))
            elif "sysfsdev" in opts:
                parent = self.mdev_parent(os.path.basename(opts["sysfsdev"]))
                if parent:
                    parents.add(parent)
        return hosts, parents

    def exclusive_holder(self, members: set[str], vmid: int) -> str | None:
        """A running VM (not ``vmid``) that has any of ``members`` open through vfio."""
        for other in self.running_vms():
            if other != vmid and self.vm_vfio_devices(other)[0] & members:
                return f"VMID '{other}'"
        return None

    def group_user(self, members: set[str], vmid: int) -> str | None:
        """Anyone keeping a vfio group from being claimed: VMs (vfio or mdev) and running CTs."""
        for other in self.running_vms():
            if other == vmid:
                continue
            hosts, parents = self.vm_vfio_devices(other)
            if (hosts | parents) & members:
                return f"VM {other}"
        for ct in self.running_cts():
            with contextlib.suppress(PveError):
                if self.ct_devices(self.read_config("lxc", ct)) & members:
                    return f"CT {ct}"
        return None

    # ---- CT device nodes -> PCI ---------------------------------------------------------------

    def drm_addr(self, name: str) -> str | None:
        link = self.p(f"sys/class/drm/{name}/device")
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def drm_names(self) -> list[str]:
        d = self.p("sys/class/drm")
        return sorted(n.name for n in d.iterdir()) if d.is_dir() else []

    def nvidia_gpus(self) -> dict[int, str]:
        """Device minor -> PCI address, from /proc/driver/nvidia/gpus/*/information."""
        res: dict[int, str] = {}
        d = self.p("proc/driver/nvidia/gpus")
        if not d.is_dir():
            return res
        for gpu in d.iterdir():
            with contextlib.suppress(FileNotFoundError):
                for line in (gpu / "information").read_text().splitlines():
                    m = re.match(r"^Device Minor:\s*(\d+)", line)
                    if m:
                        res[int(m.group(1))] = gpu.name
        return res

    def dev_node_exists(self, path: str) -> bool:
        """Whether a host device node a CT config names exists now (GPU nodes: while the host
        driver has the GPU; other nodes are taken to exist)."""
        path = path.strip()
        m = re.match(r"^/dev/dri/by-path/pci-([0-9a-f:.]+)-(card|render)$", path)
        if m:
            return self.driver(m.group(1)) not in (None, "vfio-pci")
        m = re.match(r"^/dev/dri/((?:card|renderD)\d+)$", path)
        if m:
            return self.p(f"sys/class/drm/{m.group(1)}").is_dir()
        m = re.match(r"^/dev/nvidia(\d+)$", path)
        if m:
            return int(m.group(1)) in self.nvidia_gpus()
        return True

    def dev_path_addrs(self, path: str) -> set[str]:
        path = path.strip()
        m = re.match(r"^/dev/dri/by-path/pci-([0-9a-f:.]+)-(card|render)$", path)
        if m:
            return {m.group(1)}
        if path.rstrip("/") == "/dev/dri":
            return {a for n in self.drm_names() if (a := self.drm_addr(n))}
        m = re.match(r"^/dev/dri/((?:card|renderD)\d+)$", path)
        if m:
            a = self.drm_addr(m.group(1))
            return {a} if a else set()
        m = re.match(r"^/dev/nvidia(\d+)$", path)
        if m:
            a = self.nvidia_gpus().get(int(m.group(1)))
            return {a} if a else set()
        return set()

    def cgroup_rule_addrs(self, rule: str) -> set[str]:
        m = re.match(r"^\s*c\s+(\d+):(\*|\d+)\s", rule + " ")
        if not m:
            return set()
        major, minor = int(m.group(1)), m.group(2)
        if major == NVIDIA_MAJOR:
            gpus = self.nvidia_gpus()
            if minor == "*":
                return set(gpus.values())
            a = gpus.get(int(minor))
            return {a} if a else set()
        if major == DRM_MAJOR:
            if minor == "*":
                return self.dev_path_addrs("/dev/dri")
            n = int(minor)
            return self.dev_path_addrs(f"/dev/dri/card{n}" if n < 128 else f"/dev/dri/renderD{n}")
        return set()

    @staticmethod
    def gpu_node_major(path: str) -> int | None:
        """The major of the GPU nodes a path names: /dev/nvidia<N>, or /dev/dri and its nodes."""
        path = path.strip()
        if re.fullmatch(r"/dev/nvidia\d+", path):
            return NVIDIA_MAJOR
        if path.rstrip("/") == "/dev/dri" or path.startswith("/dev/dri/"):
            return DRM_MAJOR
        return None

    def ct_devices(self, cfg: Config) -> set[str]:
        """PCI functions a running CT holds through the host driver.

        PVE hands raw ``lxc.*`` lines to LXC unchanged and adds one ``devices.allow`` rule per
        ``devN`` for that node (pve-container src/PVE/LXC.pm update_lxc_config); LXC bind-mounts
        ``lxc.mount.entry`` sources. A process can only hold a GPU it has a device node for, so
        the CT holds the GPUs behind the nodes it is given (``devN``, mount sources). A cgroup
        rule only permits: a rule for one minor stands for the node a privileged CT can make
        itself (mknod), and so does a wildcard rule (``c 195:*``, ``c 226:*``) for every GPU of
        that major — but only in a CT given no GPU node of that major, where the rule is not
        there to permit the nodes it was given.
        """
        nodes: list[str] = []
        rules: list[str] = []
        for key, value in cfg.items:
            if re.fullmatch(r"dev\d+", key):
                nodes.append(value.split(",")[0].removeprefix("path="))
            elif key == "lxc.mount.entry":
                nodes.append(value.split()[0] if value.split() else "")
            elif key in ("lxc.cgroup2.devices.allow", "lxc.cgroup.devices.allow"):
                rules.append(value)
        given = {self.gpu_node_major(n) for n in nodes}
        addrs: set[str] = set()
        for node in nodes:
            addrs |= self.dev_path_addrs(node)
        for rule in rules:
            m = re.match(r"^\s*c\s+(\d+):\*\s", rule + " ")
            if m and int(m.group(1)) in given:
                continue  # it permits the nodes the CT was given
            addrs |= self.cgroup_rule_addrs(rule)
        return addrs

    # ---- PCI reservations (qemu-server's PCI.pm) ----------------------------------------------

    @property
    def reservations_path(self) -> Path:
        return self.p("run/qemu-server/pci-id-reservations")

    def read_reservations(self) -> dict[str, dict]:
        res: dict[str, dict] = {}
        try:
            text = self.reservations_path.read_text()
        except FileNotFoundError:
            return res
        for line in text.splitlines():
            m = RESERVATION_RE.match(line)
            if m:
                res[m.group(1)] = {"vmid": int(m.group(2)), m.group(3): int(m.group(4))}
        return res

    def write_reservations(self, res: dict[str, dict]) -> None:
        lines = []
        for pci_id in sorted(res):
            r = res[pci_id]
            kind = "pid" if "pid" in r else "time"
            lines.append(f"{pci_id} {r['vmid']} {kind}:{r[kind]}\n")
        write_atomic(self.reservations_path, "".join(lines))

    @contextlib.contextmanager
    def reservation_lock(self) -> Iterator[None]:
        with flocked(self.p("run/qemu-server/pci-id-reservations.lock"), 5):
            yield

    def reserve(
        self,
        ids: Sequence[str],
        vmid: int,
        out: Out,
        timeout: int = 10,
        pid: int | None = None,
    ) -> None:
        """reserve_pci_usage (qemu-server src/PVE/QemuServer/PCI.pm): all or nothing, the
        first conflict dies with PVE's message; the file is written once, at the end."""
        if not ids:
            return
        with self.reservation_lock():
            res = self.read_reservations()
            now = int(time.time())
            for pci_id in ids:
                r = res.get(pci_id)
                if r and r["vmid"] != vmid:
                    if "time" in r and r["time"] > now:
                        raise PveError(
                            f"PCI device '{pci_id}' is currently reserved for use by VMID "
                            f"'{r['vmid']}'"
                        )
                    if "pid" in r:
                        if self.vm_pid(r["vmid"]) == r["pid"]:
                            raise PveError(
                                f"PCI device '{pci_id}' already in use by VMID '{r['vmid']}'"
                            )
                        out.warn(f"leftover PCI reservation found for {pci_id}, lets take it...")
                elif r and "time" in r and timeout is not None:
                    # the same VM: the longer timeout wins (and stays for the ids after it)
                    timeout = max(timeout, r["time"] - 5 - now)
                elif r and "pid" in r and self.vm_pid(vmid) == r["pid"]:
                    if pid is not None:
                        raise PveError(
                            f"PCI device '{pci_id}' already in use by running VMID '{vmid}'"
                        )
                    if timeout is not None:
                        return  # a running VM's own ids (qm showcmd): nothing is written
                res[pci_id] = {"vmid": vmid}
                if pid is not None:
                    res[pci_id]["pid"] = pid
                else:
                    res[pci_id]["time"] = now + math.ceil((timeout + 5) * self.scale)
            self.write_reservations(res)

    def remove_reservations(self, vmid: int) -> None:
        with self.reservation_lock():
            res = self.read_reservations()
            kept = {k: v for k, v in res.items() if v["vmid"] != vmid}
            if kept != res:
                self.write_reservations(kept)

    # ---- mappings and HA ----------------------------------------------------------------------

    def read_mappings(self) -> dict[str, dict]:
        """/etc/pve/mapping/pci.cfg as PVE reads it (pve-common SectionConfig.pm parse_config with
        pve-guest-common Mapping/PCI.pm): a section is a header line ``<id>`` (a configid) and the
        indented ``key value`` lines after it, up to the first empty line; a non-indented line in
        there is ignored. A ``map`` value failing ``$map_fmt`` is dropped; a section left without
        a ``map`` fails check_config and is dropped whole. Returns {name: {"map": [...], "mdev"}}.
        """
        res: dict[str, dict] = {}
        try:
            text = self.p("etc/pve/mapping/pci.cfg").read_text()
        except FileNotFoundError:
            return res
        lines = [line for line in text.split("\n") if not re.match(r"\s*#", line)]
        while lines:
            line = lines.pop(0)
            if line in ("", "0"):
                continue
            header = re.fullmatch(r"(\S+)\s*", line)
            section: dict | None = None
            if header and re.fullmatch(r"[a-z][a-z0-9_\-]+", header.group(1), re.IGNORECASE):
                section = {"map": [], "mdev": False}
            while lines and lines[0] not in ("", "0"):
                prop = re.fullmatch(r"\s+(\S+)(?:\s+(.*\S))?\s*", lines.pop(0))
                if section is None or prop is None:
                    continue
                key, value = prop.group(1), prop.group(2)
                if key == "map":
                    entry = parse_map_value(value or "")
                    if entry is not None:
                        section["map"].append(entry)
                elif key == "mdev":
                    section["mdev"] = value is None or is_true(value)
            if header:
                if section is not None and section["map"]:
                    res[header.group(1)] = section
                else:
                    res.pop(header.group(1), None)
        return res

    def ha_resources(self) -> dict[str, dict[str, str]]:
        res: dict[str, dict[str, str]] = {}
        try:
            text = self.p("etc/pve/ha/resources.cfg").read_text()
        except FileNotFoundError:
            return res
        current: dict[str, str] | None = None
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                m = re.match(r"^(vm|ct):\s*(\d+)\s*$", line)
                current = res.setdefault(f"{m.group(1)}:{m.group(2)}", {}) if m else None
            elif current is not None:
                key, _, value = line.strip().partition(" ")
                current[key] = value.strip()
        return res

    def write_ha_resources(self, res: dict[str, dict[str, str]]) -> None:
        chunks = []
        for sid, props in res.items():
            kind, vmid = sid.split(":")
            body = "".join(f"\t{k} {v}\n" for k, v in props.items())
            chunks.append(f"{kind}: {vmid}\n{body}")
        write_atomic(self.p("etc/pve/ha/resources.cfg"), "\n".join(chunks))

    def ha_sid(self, vmid: int) -> str | None:
        """The HA resource of a guest, whatever its state (``vm:<id>``/``ct:<id>``)."""
        res = self.ha_resources()
        for sid in (f"vm:{vmid}", f"ct:{vmid}"):
            if sid in res:
                return sid
        return None

    def ha_state(self, vmid: int) -> str | None:
        """The resource's requested state; a missing state or ``enabled`` is ``started``
        (pve-ha-manager HA/Config.pm read_and_check_resources_config)."""
        sid = self.ha_sid(vmid)
        if sid is None:
            return None
        state = self.ha_resources()[sid].get("state", "started")
        return "started" if state == "enabled" else state

    def ha_managed(self, vmid: int) -> bool:
        """Whether qm/pct hand this guest to HA: a resource not in state ``ignored``, and HA not
        disarmed in mode ``ignore`` (pve-ha-manager HA/Config.pm vm_is_ha_managed, without a
        state to match, as qm/pct call it)."""
        state = self.ha_state(vmid)
        disarmed = (self.sim / "ha-disarm").is_file() and (
            self.sim / "ha-disarm"
        ).read_text().strip() == "ignore"
        return state is not None and state != "ignored" and not disarmed

    def ha_service_status(self, vmid: int) -> str | None:
        """The CRM's own state of the service (``error`` after a failed stop), kept apart from
        the requested state in resources.cfg (HA/Manager.pm's manager status)."""
        try:
            data = json.loads((self.sim / "ha-status.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data.get(str(vmid))

    def set_ha_service_status(self, vmid: int, status: str | None) -> None:
        with flocked(self.p("run/lock/fake-pve-ha.lock")):
            path = self.sim / "ha-status.json"
            try:
                data = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                data = {}
            if status is None:
                data.pop(str(vmid), None)
            else:
                data[str(vmid)] = status
            write_atomic(path, json.dumps(data, sort_keys=True) + "\n")

    def ha_set_state(self, sid: str, state: str) -> None:
        with flocked(self.p("run/lock/fake-pve-ha.lock")):
            res = self.ha_resources()
            if sid in res:
                res[sid]["state"] = state
                self.write_ha_resources(res)

    def ha_request(self, action: str, kind: str, vmid: int, timeout: int, out: Out) -> None:
        """HA-managed start/stop: only ask the CRM and return; a detached worker acts later.

        PVE: qemu-server API2/Qemu.pm vm_start/vm_shutdown/vm_stop (`hastart` runs
        ``ha-manager set <sid> --state started``, `hastop` ``ha-manager crm-command stop <sid>
        <T>``); the CRM then writes ``state stopped`` to resources.cfg (HA/Manager.pm).
        """
        what = "VM" if kind == "qemu" else "CT"
        out.info(f"Requesting HA {action} for {what} {vmid}")
        sid = ("vm:" if kind == "qemu" else "ct:") + str(vmid)
        self.ha_set_state(sid, "started" if action == "start" else "stopped")
        self.spawn_ha_worker(action, kind, vmid, timeout)

    def spawn_ha_worker(self, action: str, kind: str, vmid: int, timeout: int) -> None:
        self.spawn_worker("ha-worker", action, kind, vmid, timeout)

    def spawn_worker(self, worker: str, action: str, kind: str, vmid: int, timeout: float) -> None:
        """A detached process acting later on the guest (the HA stack, a guest powering off)."""
        pending = self.sim / "ha-pending"
        pending.mkdir(parents=True, exist_ok=True)
        marker = Path(tempfile.mkstemp(prefix=f"{action}-{vmid}-", dir=pending)[1])
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.sim.pve",
                worker,
                str(self.root),
                action,
                kind,
                str(vmid),
                str(timeout),
                str(marker),
            ],
            cwd=REPO,
            env={"PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # never holds the caller's pipes or process group
            close_fds=True,
        )
        with contextlib.suppress(FileNotFoundError):
            marker.write_text(f"{proc.pid}\n")

    def ha_worker(self, action: str, kind: str, vmid: int, timeout: int) -> None:
        """What the HA stack does after the request: later, and without the caller.

        PVE: pve-ha-manager HA/LRM.pm exec_resource_agent and HA/Manager.pm: a service in
        ``error`` is not touched; a start may be placed on another node with
        ``crs: ha-rebalance-on-start`` (next_state_request_start); a stop calls
        HA/Resources/PVEVM.pm shutdown, which forces the stop once its timeout passed, or
        PVECT.pm shutdown, which does not: a CT that ignores it leaves the service in ``error``.
        """
        faults = self.faults(vmid)
        self.sleep(float(faults.get("ha_delay", DEFAULT_HA_DELAY)))
        out = Out()
        t0 = time.time()
        sid = ("vm:" if kind == "qemu" else "ct:") + str(vmid)
        code = 0
        try:
            if self.ha_service_status(vmid) == "error":
                out.warn(f"service '{sid}' is in error state")
            elif action == "start":
                elsewhere = faults.get("ha_rebalance_to")
                if elsewhere and not self.is_running(vmid):
                    self.move_guest(kind, vmid, str(elsewhere))
                    out.info(f"service '{sid}': rebalanced to node '{elsewhere}' on start")
                elif not self.is_running(vmid):
                    if kind == "qemu":
                        self.vm_start(vmid, out=out)
                    else:
                        self.ct_start(vmid, out=out)
            elif self.is_running(vmid):
                delay = float(faults.get("shutdown_delay", 0))
                ignores = faults.get("ignore_shutdown") or delay > timeout
                self.sleep(timeout if ignores else delay)
                if ignores and kind == "lxc":
                    self.set_ha_service_status(vmid, "error")
                    raise PveError(f"unable to stop service {sid} (still running)")
                with self.guest_lock(kind, vmid):
                    self.kill_guest(kind, vmid)
        except PveError as e:
            out.warn(e.message)
            code = e.code
        self.log_call(["ha-worker", action, sid], code, t0, out)

    def late_poweroff(self, vmid: int, kind: str) -> None:
        """Fault ``late_poweroff: N`` (one shot): the guest goes down N s after its shutdown
        timed out."""
        delay = self.take_fault(vmid, "late_poweroff")
        if delay is not None:
            self.spawn_worker("late-poweroff", "poweroff", kind, vmid, float(str(delay)))

    def move_guest(self, kind: str, vmid: int, node: str) -> None:
        """The guest's config moves to another node of the cluster (a migration/relocation)."""
        source = self.conf_path(kind, vmid)
        target = self.conf_path(kind, vmid, node)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        with flocked(self.p("run/lock/fake-pve-vmlist.lock")):
            vmlist = self.vmlist()
            entry = vmlist["ids"].setdefault(str(vmid), {"type": kind})
            entry["node"] = node
            vmlist["version"] = int(vmlist.get("version", 1)) + 1
            write_atomic(self.p("etc/pve/.vmlist"), json.dumps(vmlist, indent=1) + "\n")

    def late_poweroff_worker(self, kind: str, vmid: int, delay: float) -> None:
        """A guest whose shutdown request timed out powers off later anyway: the ACPI or
        guest-agent request stays delivered (qemu-server API2/Qemu.pm vm_shutdown; lxc-stop
        --nokill, pve-container PVE/LXC.pm vm_stop). qmeventd then runs ``qm cleanup``, which
        frees the PCI reservations but applies no pending change (notes: qm cleanup)."""
        self.sleep(delay)
        t0 = time.time()
        if self.is_running(vmid):
            with self.guest_lock(kind, vmid):
                self.kill_guest(kind, vmid)
            self.log_call(["guest", "powered off late", str(vmid)], 0, t0, Out())

    # ---- QEMU ---------------------------------------------------------------------------------

    def parse_hostpci(self, index: int, value: str) -> Hostpci:
        """qemu-server PCI.pm parse_hostpci, on a value that passed the config's schema check."""
        opts = hostpci_format(value)
        assert opts is not None, "parse_hostpci_devices drops a value failing the format"
        host = opts.pop("host", None)
        mapping = opts.pop("mapping", None)
        mdev = opts.pop("mdev", None)
        if host and mapping:
            raise PveError("Cannot set both 'host' and 'mapping'.")
        alternatives: list[list[str]] = []
        if mapping:
            entry = self.read_mappings().get(mapping)
            maps = [m for m in (entry or {}).get("map", []) if m.get("node") == self.node]
            if not maps:
                raise PveError(f"PCI device mapping not found for '{mapping}'")
            for m in maps:
                self.check_mapping(mapping, m, bool(entry and entry["mdev"]))
                alternatives.append(m.get("path", "").split(";"))
        elif host:
            alternatives.append(host.split(";"))
        else:
            raise PveError("Either 'host' or 'mapping' must be set.")
        resolved: list[list[str]] = []
        for alt in alternatives:
            devs: list[str] = []
            for pci_id in alt:
                found = self.lspci(pci_id)
                if not found:
                    raise PveError(f"no PCI device found for '{pci_id}'")
                devs.extend(found)
            if len(devs) > 1 and mdev:
                raise PveError("cannot use mediated device with multifunction device")
            resolved.append(devs)
        return Hostpci(index, resolved, mdev, opts)

    def check_mapping(self, name: str, m: dict[str, str], mdev: bool) -> None:
        """pve-guest-common Mapping/PCI.pm assert_valid: every path must exist; its vendor:device
        (``id``), ``subsystem-id`` (when sysfs has one) and mdev capability must match the map
        line, and so must the first path's ``iommugroup``; a property one side lacks fails."""
        prefix = "PCI device mapping invalid (hardware probably changed): "
        for n, path in enumerate(m.get("path", "").split(";")):
            if not re.search(r"\.[a-f0-9]", path, re.IGNORECASE):
                path += ".0"
            d = self.pci_dir(path)
            if not d.is_dir():
                raise PveError(f"{prefix}pci device '{path}' not found")
            vendor, device = self.pci_ids(path)
            sub = [d / "subsystem_vendor", d / "subsystem_device"]
            have = {
                "id": f"{vendor}:{device}",
                "iommugroup": self.iommu_group(path),
                "mdev": "1"
                if (d / "mdev_supported_types").is_dir() or (d / "nvidia").is_dir()
                else "0",
                "subsystem-id": ":".join(f.read_text().strip().removeprefix("0x") for f in sub)
                if all(f.exists() for f in sub)
                else None,
            }
            want = {k: m.get(k) for k in ("id", "iommugroup", "subsystem-id")}
            want["mdev"] = "1" if mdev else "0"
            for prop in sorted(have):
                if prop == "iommugroup" and n > 0:
                    continue
                if have[prop] is None and want[prop] is None:
                    continue
                if want[prop] is None:
                    raise PveError(
                        f"{prefix}missing expected property '{prop}' for device '{path}'"
                    )
                if have[prop] is None:
                    raise PveError(
                        f"{prefix}unexpected property '{prop}' configured for device '{path}'"
                    )
                if str(have[prop]).replace("0x", "") != str(want[prop]).replace("0x", ""):
                    got, wanted = have[prop], want[prop]
                    why = f"'{prop}' does not match for '{name}' ({got} != {wanted})"
                    raise PveError(prefix + why)

    def parse_hostpci_devices(self, vmid: int, cfg: Config, out: Out) -> list[Hostpci]:
        devices = []
        for i in range(MAX_HOSTPCI):
            value = cfg.get(f"hostpci{i}")
            if not value:
                continue
            if hostpci_format(value) is None:
                # parse_vm_config drops a value its schema rejects, with a warning.
                out.warn(f"vm {vmid} - unable to parse value of 'hostpci{i}' - format error")
                continue
            devices.append(self.parse_hostpci(i, value))
        return devices

    def choose_hostpci(self, vmid: int, devices: list[Hostpci], out: Out) -> None:
        """choose_hostpci_devices (qemu-server src/PVE/QemuServer/PCI.pm), in hostpci order: a
        classic mdev takes the first function of each alternative and marks nothing used; one
        alternative is taken unchecked and marks its functions used (twice: "assigned more than
        once"); of several, the first that shares no function with an earlier hostpciN of this
        VM ($used) and that reserve_pci_usage accepts for 10 s."""
        used: set[str] = set()

        def add_used(ids: list[str]) -> None:
            for pci_id in ids:
                if pci_id in used:
                    raise PveError(f"device '{pci_id}' assigned more than once")
                used.add(pci_id)

        for d in devices:
            if d.mdev:
                d.ids = [alt[0] for alt in d.alternatives]  # chosen when the mdev is created
                continue
            if len(d.alternatives) == 1:
                d.ids = d.alternatives[0]
                add_used(d.ids)
                continue
            for alt in d.alternatives:
                if any(i in used for i in alt):
                    continue
                try:
                    self.reserve(alt, vmid, out, timeout=10)
                except PveError:
                    continue
                add_used(alt)
                d.ids = alt
                break
            else:
                raise PveError(f"could not find a free device for 'hostpci{d.index}'")

    @staticmethod
    def pci_addr(index: int, pcie: bool) -> str:
        """print_pci_addr / print_pcie_addr for hostpciN."""
        if pcie:
            return f",bus=ich9-pcie-port-{index + 1},addr=0x0"
        if index < 2:
            return f",bus=pci.0,addr=0x{16 + index:x}"
        if index < 4:
            return f",bus=pci.0,addr=0x{27 + index - 2:x}"
        return f",bus=pci.2,addr=0x{13 + index - 4:x}"

    def device_strings(self, vmid: int, d: Hostpci, sysfsdev: str | None) -> list[str]:
        """print_hostpci_devices: one -device per function (one for an mdev)."""
        ids = d.ids[:1] if sysfsdev else d.ids
        multi = len(ids) > 1
        addr = self.pci_addr(d.index, is_true(d.opts.get("pcie")))
        res = []
        for j, pci_id in enumerate(ids):
            s = "vfio-pci," + (f"sysfsdev={sysfsdev}" if sysfsdev else f"host={pci_id}")
            mf = f".{j}" if multi else ""
            s += f",id=hostpci{d.index}{mf}{addr}{mf}"
            if j == 0:
                if d.opts.get("rombar") is not None and not is_true(d.opts.get("rombar")):
                    s += ",rombar=0"
                if is_true(d.opts.get("x-vga")):
                    s += ",x-vga=on"
                if multi:
                    s += ",multifunction=on"
            res.append(s)
        return res

    @staticmethod
    def args_vfio(args: str | None) -> list[tuple[str, str]]:
        """(-device value, host id) for raw ``args: -device vfio-pci,host=...``."""
        try:
            tokens = shlex.split(args or "")
        except ValueError:
            tokens = (args or "").split()
        res = []
        for n, tok in enumerate(tokens[:-1]):
            dev = tokens[n + 1]
            if tok == "-device" and dev.startswith("vfio-pci"):
                opts = dict(p.split("=", 1) for p in dev.split(",")[1:] if "=" in p)
                if "host" in opts:
                    res.append((dev, norm_pci_id(opts["host"])))
        return res

    @staticmethod
    def config_aware_timeout(cfg: Config, resume: bool) -> int:
        """qemu-server PVE/QemuServer/Helpers.pm config_aware_timeout, on the config the start
        uses (templates minimized: no hostpci, no net): 30 s, or memory/1024 above 30 GiB; x4
        with a hostpciN; >= 300 resuming; >= 150 with hugepages; +5 per netN (>= 8.3.1)."""
        memory = 512  # get_current_memory: the "current" key of the memory property string
        for item in (cfg.get("memory") or "").split(","):
            key, eq, value = item.strip().partition("=")
            number = value if eq else key
            if (key == "current" or not eq) and number.isdigit():
                memory = int(number)
                break
        timeout = memory // 1024 if memory > 30720 else 30
        keys = cfg.keys()
        if any(re.fullmatch(r"hostpci[0-9]+", k) for k in keys):
            timeout *= 4
        if resume and timeout < 300:
            timeout = 300
        if (cfg.get("hugepages") or "0") != "0":  # any, 2 or 1024
            timeout = max(timeout, 150)
        return timeout + 5 * sum(1 for k in keys if re.match(r"net\d+", k))

    # ---- storage and guest hookscripts ---------------------------------------------------------

    def storages(self) -> dict[str, dict[str, str]]:
        """/etc/pve/storage.cfg: section config, ``<type>: <id>`` then indented ``key value``
        lines (pve-storage PVE/Storage/Plugin.pm parse_config): id → {"type", "path", ...}."""
        try:
            text = self.p("etc/pve/storage.cfg").read_text()
        except FileNotFoundError:
            return {}
        found: dict[str, dict[str, str]] = {}
        current: dict[str, str] | None = None
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                kind, _, storeid = line.partition(":")
                current = found.setdefault(storeid.strip(), {"type": kind.strip()})
            elif current is not None:
                key, _, value = line.strip().partition(" ")
                current[key] = value.strip()
        return found

    def volume_path(self, volid: str) -> tuple[Path, str]:
        """PVE::Storage::path for a directory storage: (host path under the root, vtype); the
        volume name ``snippets/<file>`` is of type ``snippets`` in ``<path>/snippets``
        (pve-storage PVE/Storage/Plugin.pm parse_volname, get_subdir)."""
        storeid, colon, volname = volid.partition(":")
        if not colon:
            raise PveError(f"unable to parse volume ID '{volid}'")
        storage = self.storages().get(storeid)
        if storage is None:
            raise PveError(f"storage '{storeid}' does not exist")
        if "path" not in storage:
            raise PveError(f"storage '{storeid}' has no directory (type {storage['type']})")
        vtype, slash, name = volname.partition("/")
        if not slash or "/" in name or vtype not in ("snippets", "iso", "vztmpl", "images"):
            raise PveError(f"unable to parse directory volume name '{volname}'")
        return self.p(f"{storage['path'].lstrip('/')}/{vtype}/{name}"), vtype

    def check_hookscript(self, volid: str) -> Path:
        """pve-guest-common PVE/GuestHelpers.pm check_hookscript: in a snippets directory, a
        file, executable (both after symlinks)."""
        path, vtype = self.volume_path(volid)
        if vtype != "snippets":
            raise PveError(f"'{volid}' is not in the snippets directory")
        if not path.is_file():
            raise PveError(f"script '{volid}' does not exist")
        if not os.access(path, os.X_OK):
            raise PveError(f"script '{volid}' is not executable")
        return path

    def exec_hookscript(
        self, cfg: Config, vmid: int, phase: str, out: Out, stop_on_error: bool = False
    ) -> None:
        """pve-guest-common PVE/GuestHelpers.pm exec_hookscript: nothing without ``hookscript``;
        else run ``<path> <vmid> <phase>`` (run_command: the caller's environment plus
        LC_ALL=C, no timeout, its output to the task). A failure dies only with stop_on_error
        (qemu-server and pve-container pass it for pre-start alone), else it is a warning:
        ``hookscript error for <vmid> on <phase>: <error>``."""
        volid = cfg.get("hookscript")
        if not volid:
            return
        try:
            path = self.check_hookscript(volid)
            shown = "/" + str(path.relative_to(self.root))
            result = subprocess.run(
                [str(path), str(vmid), phase],
                env={**os.environ, "LC_ALL": "C"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
            for line in (result.stdout + result.stderr).splitlines():
                if line.strip():
                    out.info(line)
            if result.returncode != 0:
                how = (
                    f"got signal {-result.returncode}"
                    if result.returncode < 0
                    else f"exit code {result.returncode}"
                )
                raise PveError(f"command '{shown} {vmid} {phase}' failed: {how}")
        except PveError as error:
            message = f"hookscript error for {vmid} on {phase}: {error.message}"
            if stop_on_error:
                raise PveError(message) from None
            out.warn(message)

    def set_option(self, kind: str, vmid: int, opts: dict[str, str]) -> None:
        """``qm set``/``pct set`` of the ``hookscript`` option (a fast-plug option, written at once
        also for a running guest: qemu-server PVE/API2/Qemu.pm update_vm_api; pve-container
        PVE/LXC/Config.pm update_pct_config), checked by check_hookscript; under the config lock,
        refused while the guest is locked."""
        with self.guest_lock(kind, vmid):
            cfg = self.read_config(kind, vmid)
            lock = cfg.get("lock")
            if lock and not is_true(opts.get("skiplock")):
                raise PveError(f"{'VM' if kind == 'qemu' else 'CT'} is locked ({lock})")
            for key in (opts.get("delete") or "").split(","):
                if key.strip():
                    cfg.delete(key.strip())
            if "hookscript" in opts:
                self.check_hookscript(opts["hookscript"])
                cfg.set("hookscript", opts["hookscript"])
            self.write_config(kind, vmid, cfg)

    def vm_start(
        self,
        vmid: int,
        *,
        skiplock: bool = False,
        paused: bool = False,
        for_backup: bool = False,
        use_faults: bool = True,
        timeout: int | None = None,
        out: Out | None = None,
    ) -> int:
        """qemu-server's vm_start (+ QEMU's own vfio checks). Returns the new QEMU pid."""
        out = out or Out()
        if not self.conf_path("qemu", vmid).exists():
            raise self.missing_conf("qemu", vmid)
        with self.guest_lock("qemu", vmid):
            cfg = self.read_config("qemu", vmid)
            template = is_true(cfg.get("template"))
            if template and not for_backup:
                raise PveError("you can't start a vm if it's a template")
            lock = cfg.get("lock")
            if lock and not skiplock:
                raise PveError(f"VM is locked ({lock})")
            if self.vm_pid(vmid):
                raise PveError(f"VM {vmid} already running")
            resume = lock == "suspended" or cfg.get("vmstate") is not None
            if not resume:
                cfg = self.apply_pending("qemu", vmid, cfg)
            faults = self.faults(vmid) if use_faults else {}
            # the guest hookscript's pre-start (qemu-server PVE/QemuServer.pm vm_start_nolock:
            # exec_hookscript(..., 'pre-start', 1)): with the config loaded and locked, after
            # pending, before the PCI choice and reservation; also for vzdump's paused start
            # (then with lock: backup). PVE does not bound it (fault hookscript_delay: how long
            # it takes)
            self.exec_hookscript(cfg, vmid, "pre-start", out, stop_on_error=True)
            self.sleep(float(faults.get("hookscript_delay", 0)))
            # Templates are started for backup with their disks only (qemu-server >= 8.2.2).
            devices = [] if template else self.parse_hostpci_devices(vmid, cfg, out)
            raw = [] if template else self.args_vfio(cfg.get("args"))
            # vm_start_nolock: the start timeout is `qm start --timeout`, else
            # config_aware_timeout of the config the start uses; it is both the reservation's
            # lifetime and QEMU's time to come up
            if timeout is None:
                timeout = self.config_aware_timeout(Config() if template else cfg, resume)
            try:
                self.choose_hostpci(vmid, devices, out)
                real_ids = [i for d in devices if not d.mdev for i in d.ids]
                # PCI.pm reserve_pci_usage: time:<now + start timeout + 5> until QEMU runs
                self.reserve(real_ids, vmid, out, timeout=timeout)
                dev_args = self.prepare_pci(vmid, devices, raw)
                if faults.get("start_fails"):
                    raise PveError("start failed: QEMU exited with code 1")
                delay = float(faults.get("start_delay", 0))
                if delay > timeout:
                    # run_command's timeout: QEMU did not daemonize in time, it is killed
                    self.sleep(timeout)
                    raise PveError(
                        f"start failed: command '/usr/bin/kvm -id {vmid} ...' failed: got timeout"
                    )
                self.sleep(delay)
                argv = self.kvm_argv(vmid, cfg, dev_args, paused)
                pid = self.spawn_proc(argv, "kvm")
                status = "prelaunch" if paused or faults.get("start_paused") else "running"
                self.set_qmp(vmid, status)
                write_atomic(self.p(f"run/qemu-server/{vmid}.pid"), f"{pid}\n")
                self.reserve(real_ids, vmid, out, pid=pid)
            except BaseException:
                self.remove_reservations(vmid)
                self.remove_mdevs(vmid)
                raise
            # vm_start_nolock's end: post-start, a failure only warns
            self.exec_hookscript(cfg, vmid, "post-start", out)
            return pid

    def prepare_pci(
        self, vmid: int, devices: list[Hostpci], raw: list[tuple[str, str]]
    ) -> list[str]:
        """prepare_pci_device + QEMU's vfio open: mdevs, group conflicts, bind to vfio-pci."""
        iommu = self.p("sys/class/iommu")
        present = iommu.is_dir() and any(not n.startswith(".") for n in os.listdir(iommu))
        if devices and not present:
            # PCI.pm prepare_pci_device (via SysFSTools.pm check_iommu_support), for every
            # hostpci device, mdevs included; vm_start_nolock dies with it
            raise PveError("cannot prepare PCI pass-through, IOMMU not present")
        # vm_start_nolock prepares the lines in the order of their keys as strings (hostpci10
        # before hostpci2): a full passthrough's group is bound to vfio-pci, an mdev created.
        # A line that dies leaves the groups bound before it bound; QEMU's open of a group
        # someone uses fails after all of them (the "busy" below).
        args_of: dict[int, list[str]] = {}
        busy: list[tuple[str, str]] = []
        for d in sorted(devices, key=lambda d: f"hostpci{d.index}"):
            if d.mdev:
                # each alternative's failure is a warning; none left is fatal
                warnings: list[str] = []
                for parent in d.ids:
                    try:
                        uuid = self.create_mdev(vmid, d.index, parent, d.mdev)
                    except PveError as e:
                        warnings.append(e.message)
                        continue
                    d.ids = [parent]
                    args_of[d.index] = self.device_strings(vmid, d, f"/sys/bus/mdev/devices/{uuid}")
                    break
                else:
                    raise PveError("could not create mediated device", before=warnings)
                continue
            args_of[d.index] = self.device_strings(vmid, d, None)
            for pci_id, devstr in zip(d.ids, args_of[d.index], strict=True):
                members = self.group_members(pci_id)
                user = self.group_user(set(members), vmid)
                if user is not None:
                    if user.startswith("CT "):
                        # pve-common SysFSTools.pm pci_dev_bind_to_vfio writes to the host
                        # driver's unbind whoever uses it: the CT's processes lose the GPU
                        self.log_call(
                            ["kernel", "host driver unbind in use", pci_id, user, f"VM {vmid}"],
                            1,
                            time.time(),
                            Out(),
                        )
                    busy.append((pci_id, devstr))
                    continue
                # PVE binds every device of the group to vfio-pci and never binds it back.
                for member in members:
                    self.set_driver(member, "vfio-pci")
        dev_args = [a for d in devices for a in args_of[d.index]]
        for pci_id, devstr in busy:
            self.check_group(vmid, pci_id, devstr)
        for devstr, pci_id in raw:
            if not present:  # QEMU finds no IOMMU group to open (vfio_get_group)
                raise PveError(
                    "start failed: QEMU exited with code 1",
                    before=[f"kvm: -device {devstr}: vfio {pci_id}: no iommu_group found"],
                )
            if not self.pci_dir(pci_id).exists():
                raise PveError(
                    "start failed: QEMU exited with code 1",
                    before=[
                        f"kvm: -device {devstr}: vfio {pci_id}: no such host device: "
                        "No such file or directory"
                    ],
                )
            self.check_group(vmid, pci_id, devstr)
            dev_args.append(devstr)
        return dev_args

    def check_group(self, vmid: int, pci_id: str, devstr: str) -> None:
        members = set(self.group_members(pci_id))
        if self.group_user(members, vmid) is None:
            return
        group = self.iommu_group(pci_id)
        if group is not None:
            why = (
                f"failed to setup container for group {group}: "
                "Failed to set iommu for container: Device or resource busy"
            )
        else:
            why = "failed to open device: Device or resource busy"
        raise PveError(
            "start failed: QEMU exited with code 1",
            before=[f"kvm: -device {devstr}: vfio {pci_id}: {why}"],
        )

    def kvm_argv(self, vmid: int, cfg: Config, dev_args: list[str], paused: bool) -> list[str]:
        name = cfg.get("name") or f"vm{vmid}"
        argv = [
            "/usr/bin/kvm",
            "-id",
            str(vmid),
            "-name",
            f"{name},debug-threads=on",
            "-no-shutdown",
            "-chardev",
            f"socket,id=qmp,path=/var/run/qemu-server/{vmid}.qmp,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-pidfile",
            f"/var/run/qemu-server/{vmid}.pid",
            "-daemonize",
            "-nodefaults",
            "-m",
            cfg.get("memory") or "2048",
        ]
        for d in dev_args:
            argv += ["-device", d]
        machine = "q35" if (cfg.get("machine") or "").startswith("q35") else "pc"
        argv += ["-machine", f"type={machine}+pve0"]
        with contextlib.suppress(ValueError):
            argv += shlex.split(cfg.get("args") or "")
        if paused:
            argv.append("-S")
        return argv

    def kill_guest(self, kind: str, vmid: int) -> None:
        """The guest's processes are gone; then PVE's cleanup (reservations, mdevs)."""
        if kind == "lxc":
            procs = self.sim / f"ct-{vmid}.procs"
            with contextlib.suppress(FileNotFoundError, ValueError):
                for pid in procs.read_text().split():
                    remove(self.p(f"proc/{int(pid)}"))
            remove(self.p(f"sys/fs/cgroup/lxc/{vmid}"))
            remove(procs)
            self.unix_socket(vmid, False)  # the monitor exits last: then PVE sees it stopped
            return
        pid = self.vm_pid(vmid)
        if pid:
            remove(self.p(f"proc/{pid}"))
        remove(self.p(f"run/qemu-server/{vmid}.pid"))
        remove(self.sim / f"qmp-{vmid}")
        self.sleep(float(self.faults(vmid).get("cleanup_delay", 0)))
        self.remove_reservations(vmid)
        self.remove_mdevs(vmid)

    def vm_stop(
        self,
        vmid: int,
        *,
        skiplock: bool = False,
        shutdown: bool = False,
        timeout: int | None = None,
        force: bool = False,
        use_faults: bool = True,
        out: Out | None = None,
    ) -> None:
        """qemu-server's vm_stop (_do_vm_stop): graceful (shutdown=True) or hard."""
        out = out or Out()
        if not self.conf_path("qemu", vmid).exists():
            raise self.missing_conf("qemu", vmid)
        with self.guest_lock("qemu", vmid):
            cfg = self.read_config("qemu", vmid)
            lock = cfg.get("lock")
            if lock and not skiplock:
                raise PveError(f"VM is locked ({lock})")
            if not self.vm_pid(vmid):
                if shutdown:
                    out.info(f"VM {vmid} not running")
                return
            if shutdown:
                faults = self.faults(vmid) if use_faults else {}
                if timeout is None:  # the guest's own shutdown timeout, else 60
                    down = re.search(r"(?:^|,)down=(\d+)", cfg.get("startup") or "")
                    timeout = int(down.group(1)) if down and int(down.group(1)) else None
                limit = QEMU_SHUTDOWN_TIMEOUT if timeout is None else timeout
                self.shutdown_vm(vmid, cfg, limit, force, faults, out)
            self.kill_guest("qemu", vmid)
            # _do_vm_stop: vm_stop_cleanup(..., apply_pending=1) (qemu-server PVE/QemuServer.pm)
            self.apply_pending("qemu", vmid, self.read_config("qemu", vmid))

    def shutdown_vm(
        self, vmid: int, cfg: Config, limit: int, force: bool, faults: dict, out: Out
    ) -> None:
        """_do_vm_stop's graceful part; returns once the guest powered off (or is to be killed).

        Faults: ``shutdown_delay`` (s from the request to the power-off), ``ignore_shutdown``
        (never), ``agent_reply_delay`` (s until the guest agent answers ``guest-shutdown``; it
        closes the connection at the power-off at the latest), ``agent_down`` (the agent does
        not answer its ping)."""
        delay = float(faults.get("shutdown_delay", 0))
        if faults.get("ignore_shutdown"):
            delay = math.inf
        agent = re.match(r"(?:enabled=)?(1|on|yes|true)\b", cfg.get("agent") or "")
        if agent and faults.get("agent_down"):
            # qga_check_running: guest-ping with a 3 s timeout, then ACPI instead
            self.sleep(AGENT_PING_TIMEOUT)
            out.warn(
                f"QEMU Guest Agent is not running - VM {vmid} qga command 'guest-ping' failed "
                "- got timeout"
            )
            agent = None
        waited = 0.0
        if agent:
            # guest-shutdown with the shutdown timeout as its QMP timeout; may close at power-off
            reply = min(float(faults.get("agent_reply_delay", 0)), delay)
            if reply > limit:
                self.sleep(limit)
                if not force:
                    self.late_poweroff(vmid, "qemu")
                    raise PveError("VM quit/powerdown failed")
                out.warn("VM quit/powerdown failed - terminating now with SIGTERM")
                return
            self.sleep(reply)
            waited = reply
        # then poll check_running once a second, up to the timeout
        if delay - waited > limit:
            self.sleep(limit)
            if not force:
                self.late_poweroff(vmid, "qemu")
                raise PveError("VM quit/powerdown failed - got timeout")
            out.warn("VM still running - terminating now with SIGTERM")
            return
        self.sleep(delay - waited)

    # ---- LXC ----------------------------------------------------------------------------------

    def ct_start(
        self, vmid: int, *, skiplock: bool = False, use_faults: bool = True, out: Out | None = None
    ) -> None:
        out = out or Out()
        if not self.conf_path("lxc", vmid).exists():
            raise self.missing_conf("lxc", vmid)
        with self.guest_lock("lxc", vmid):
            cfg = self.read_config("lxc", vmid)
            if is_true(cfg.get("template")):
                raise PveError("you can't start a CT if it's a template")
            lock = cfg.get("lock")
            if lock and not skiplock:
                raise PveError(f"CT is locked ({lock})")
            if self.ct_running(vmid):
                raise PveError(f"CT {vmid} already running")
            cfg = self.apply_pending("lxc", vmid, cfg)
            # pve-container PVE/LXC.pm vm_start: pre-start (stop_on_error) before systemctl
            # start pve-container@<vmid>, post-start after it
            self.exec_hookscript(cfg, vmid, "pre-start", out, stop_on_error=True)
            faults = self.faults(vmid) if use_faults else {}
            failed = [f'__lxc_start: 2027 Failed to initialize container "{vmid}"']
            self.apply_sysfs_writes()
            for key, value in cfg.items:
                # PVE adds each devN node of the host to the CT and dies when it is missing
                # (pve-container PVE/LXC.pm update_lxc_config); a GPU's node exists only while
                # its host driver has it (see sync_host_nodes)
                if re.fullmatch(r"dev\d+", key):
                    node = value.split(",")[0].removeprefix("path=")
                    if not self.dev_node_exists(node):
                        raise PveError(f"Device {node} does not exist")
            for addr in sorted(self.ct_devices(cfg)):
                # a mounted node of a GPU a VM holds: LXC's start fails on it
                if self.exclusive_holder(set(self.group_members(addr)), vmid):
                    raise PveError(f"startup for container '{vmid}' failed", before=failed)
            if faults.get("start_fails"):
                raise PveError(f"startup for container '{vmid}' failed", before=failed)
            # systemctl start pve-container@<vmid>, then monitor_start waits up to 10 s
            self.sleep(float(faults.get("start_delay", 0)))
            pid = self.spawn_proc(["/sbin/init"], "systemd")
            write_atomic(self.sim / f"ct-{vmid}.procs", f"{pid}\n")
            if self.ct_cgroup_dirs:
                cg = self.p(f"sys/fs/cgroup/lxc/{vmid}")
                tmp = cg.with_name(f".{vmid}.starting")
                remove(tmp)
                tmp.mkdir(parents=True)
                (tmp / "cgroup.procs").write_text(f"{pid}\n")
                (tmp / "cgroup.freeze").write_text("0\n")
                os.replace(tmp, cg)  # the cgroup appears complete or not at all
            self.unix_socket(vmid, True)  # running, for PVE, from here on
            self.exec_hookscript(cfg, vmid, "post-start", out)

    def ct_stop(
        self,
        vmid: int,
        *,
        skiplock: bool = False,
        shutdown: bool = False,
        timeout: int | None = None,
        force: bool = False,
        use_faults: bool = True,
        out: Out | None = None,
    ) -> None:
        out = out or Out()
        if not self.conf_path("lxc", vmid).exists():
            raise self.missing_conf("lxc", vmid)
        if not self.ct_running(vmid):
            raise PveError(f"CT {vmid} not running")
        with self.guest_lock("lxc", vmid):
            cfg = self.read_config("lxc", vmid)
            lock = cfg.get("lock")
            if lock and (shutdown or not skiplock):  # pct shutdown has no --skiplock
                raise PveError(f"CT is locked ({lock})")
            if shutdown:
                faults = self.faults(vmid) if use_faults else {}
                limit = LXC_SHUTDOWN_TIMEOUT if timeout is None else timeout
                delay = float(faults.get("shutdown_delay", 0))
                if faults.get("ignore_shutdown"):
                    delay = math.inf
                # pve-container vm_stop: lxc-stop --nokill --timeout T (run under T+5); if it
                # fails, a poll of up to T+5 s more for the command socket to close
                if delay > limit and force:
                    self.sleep(limit)  # lxc-stop without --nokill kills it after the timeout
                elif delay > limit:
                    self.sleep(limit)
                    out.warn(
                        f"command 'lxc-stop -n {vmid} --nokill --timeout {limit}' failed: "
                        "exit code 1"
                    )
                    if delay > limit + limit + 5:
                        self.sleep(limit + 5)
                        self.late_poweroff(vmid, "lxc")
                        raise PveError("container did not stop")
                    self.sleep(delay - limit)
                else:
                    self.sleep(delay)
            self.kill_guest("lxc", vmid)

    def ct_freeze(self, vmid: int, frozen: bool) -> None:
        f = self.p(f"sys/fs/cgroup/lxc/{vmid}/cgroup.freeze")
        if f.parent.is_dir():
            f.write_text("1\n" if frozen else "0\n")

    # ---- calls log ----------------------------------------------------------------------------

    def log_call(self, argv: Sequence[str], code: int, t0: float, out: Out) -> None:
        entry = {"argv": list(argv), "exit": code, "t": t0, "t_end": time.time(), "out": out.text()}
        path = self.sim / "calls.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with flocked(self.sim / "calls.log.lock"), open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------------------------
# The fake command line tools

OPTIONS: dict[str, dict[str, dict[str, str]]] = {
    "qm": {
        "start": {"skiplock": "bool", "timeout": "int"},
        "shutdown": {
            "skiplock": "bool",
            "timeout": "int",
            "forceStop": "bool",
            "keepActive": "bool",
        },
        "stop": {
            "skiplock": "bool",
            "timeout": "int",
            "keepActive": "bool",
            "overrule-shutdown": "bool",
        },
        "status": {"verbose": "bool"},
        "config": {"current": "bool"},
        "unlock": {},
        "resume": {"skiplock": "bool"},
        "set": {"hookscript": "str", "delete": "str", "skiplock": "bool"},
    },
    "pct": {
        "start": {"skiplock": "bool"},
        "shutdown": {"timeout": "int", "forceStop": "bool"},
        "stop": {"skiplock": "bool", "overrule-shutdown": "bool"},
        "status": {"verbose": "bool"},
        "config": {"current": "bool"},
        "unlock": {},
        "set": {"hookscript": "str", "delete": "str"},
    },
}


def parse_cli(prog: str, cmd: str, argv: Sequence[str]) -> tuple[int, dict[str, str]]:
    """PVE's CLI: ``<vmid> [--opt value]``; booleans take an optional 0/1."""
    spec = OPTIONS[prog][cmd]
    usage = f"{prog} {cmd} <vmid> [OPTIONS]"
    pos: list[str] = []
    opts: dict[str, str] = {}
    args = list(argv)
    while args:
        tok = args.pop(0)
        if not tok.startswith("-") or tok == "-":
            pos.append(tok)
            continue
        name, eq, value = tok.lstrip("-").partition("=")
        kind = spec.get(name)
        if kind is None:
            raise PveError(f"Unknown option: {name}\n400 unable to parse option\n{usage}")
        if not eq:
            if kind == "bool":
                value = args.pop(0) if args and args[0] in ("0", "1") else "1"
            elif args:
                value = args.pop(0)
            else:
                raise PveError(f"Option {name} requires an argument\n400 unable to parse option")
        if kind == "int" and not re.fullmatch(r"\d+", value):
            raise PveError(
                f"400 Parameter verification failed.\n{name}: type check ('integer') "
                f"failed - got '{value}'\n{usage}"
            )
        opts[name] = value
    if len(pos) != 1:
        raise PveError(f"400 {'too many arguments' if pos else 'not enough arguments'}\n{usage}")
    if not re.fullmatch(r"\d+", pos[0]):
        raise PveError(
            f"400 Parameter verification failed.\nvmid: type check ('integer') failed "
            f"- got '{pos[0]}'\n{usage}"
        )
    return int(pos[0]), opts


def kill_caller() -> None:
    """Test fault: the pve-gpu-hook process that called us dies by SIGKILL; we go on."""
    parent = os.getppid()
    with contextlib.suppress(OSError):
        if b"pvegpuhook" in Path(f"/proc/{parent}/cmdline").read_bytes():  # never the test runner
            os.kill(parent, signal.SIGKILL)


TASK_STOP = "task-stop.json"  # in run/fake-pve: the GUI stopped the backup task (see below)


def stop_caller_task(pve: Pve, grace: float) -> None:
    """Test fault: the GUI's "Stop" of the backup task whose hook runs this command.

    PVE (pve-common PVE/RESTEnvironment.pm check_worker, kill_process_group): SIGTERM to the
    task's whole process group, then SIGKILL to it if its worker still runs ``grace`` s later (5 s
    in PVE). The calling hook's process group stands for the task's; the vzdump driver reads
    ``run/fake-pve/task-stop.json`` and plays the worker's part. A CLI in that group gets the
    SIGTERM too and passes it on to its worker (tee_worker), which dies with "received
    interrupt": see :func:`main`.
    """
    parent = os.getppid()
    with contextlib.suppress(OSError):
        if b"pvegpuhook" not in Path(f"/proc/{parent}/cmdline").read_bytes():
            return  # never the test runner (an in-process hook)
        group = os.getpgid(parent)
        kill_at = time.time() + grace * pve.scale
        write_atomic(pve.sim / TASK_STOP, json.dumps({"pgid": group, "kill_at": kill_at}) + "\n")
        subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.sim.pve", "kill-group"),
                *(str(group), str(kill_at), str(pve.sim / TASK_STOP)),
            ],
            cwd=REPO,
            env={"PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.killpg(group, signal.SIGTERM)


def guest_cli(pve: Pve, prog: str, argv: list[str], out: Out) -> int:
    kind = "qemu" if prog == "qm" else "lxc"
    if not argv or argv[0] not in OPTIONS[prog]:
        raise PveError(f"400 unknown command '{prog} {' '.join(argv[:1])}'")
    cmd = argv[0]
    vmid, opts = parse_cli(prog, cmd, argv[1:])
    if not pve.conf_path(kind, vmid).exists():
        raise pve.missing_conf(kind, vmid)
    skiplock = is_true(opts.get("skiplock"))
    force = is_true(opts.get("forceStop"))
    timeout = int(opts["timeout"]) if "timeout" in opts else None
    ha = pve.ha_managed(vmid)
    running = pve.is_running(vmid)

    if cmd == "status":
        cfg = pve.read_config(kind, vmid)
        if not is_true(opts.get("verbose")):
            out.info(f"status: {'running' if running else 'stopped'}")
            return 0
        info = {"status": "running" if running else "stopped", "vmid": str(vmid)}
        if kind == "qemu":
            info["name"] = cfg.get("name") or f"VM {vmid}"
            if running:
                info["qmpstatus"] = pve.qmp_status(vmid) or "running"
                info["pid"] = str(pve.vm_pid(vmid))
        else:
            info["name"] = cfg.get("hostname") or f"CT{vmid}"
        if ha:
            info["ha"] = f"managed: 1, state: {pve.ha_state(vmid)}"
        for k in sorted(info):
            out.info(f"{k}: {info[k]}")
        return 0
    if cmd == "config":
        cfg = pve.read_config(kind, vmid)
        if not is_true(opts.get("current")):
            pending = cfg.section("PENDING" if kind == "qemu" else "pve:pending")
            for k, v in parse_pairs(pending or []):
                if k == "delete":
                    for key in v.split(","):
                        cfg.delete(key.strip().lstrip("!"))
                elif k not in ("#", ""):
                    cfg.set(k, v)
        for k, v in sorted(it for it in cfg.items if it[0] not in ("#", "")):
            out.info(f"{k}: {v}")
        return 0
    if cmd == "unlock":
        pve.remove_lock(kind, vmid)
        return 0
    if cmd == "set":
        pve.set_option(kind, vmid, opts)
        return 0
    if cmd == "resume":
        if not running:
            raise PveError(f"VM {vmid} not running")
        if (pve.qmp_status(vmid) or "") in PAUSED_STATES:
            pve.set_qmp(vmid, "running")
        return 0
    if cmd == "start":
        grace = pve.take_fault(vmid, "task_stop")
        if grace is not None:
            stop_caller_task(pve, float(grace))  # type: ignore[arg-type]
        if ha:
            pve.ha_request("start", kind, vmid, 0, out)
        elif kind == "qemu":
            pve.vm_start(vmid, skiplock=skiplock, timeout=timeout, out=out)
        else:
            pve.ct_start(vmid, skiplock=skiplock, out=out)
        return 0
    # shutdown / stop
    shutdown = cmd == "shutdown"
    if kind == "lxc" and not running:
        raise PveError(f"CT {vmid} not running")
    if kind == "qemu" and shutdown and (pve.qmp_status(vmid) or "") in PAUSED_STATES:
        # A paused guest would only act on the ACPI request when resumed.
        if not force:
            raise PveError("VM is paused - cannot shutdown")
        out.warn("VM is paused - stop instead of shutdown")
        shutdown = False
    if ha:
        limit = (timeout if timeout is not None else 60) if shutdown else 0
        pve.ha_request("stop", kind, vmid, limit, out)
        return 0
    if shutdown and pve.take_fault(vmid, "kill_caller"):
        kill_caller()
    stop = pve.vm_stop if kind == "qemu" else pve.ct_stop
    stop(vmid, skiplock=skiplock, shutdown=shutdown, timeout=timeout, force=force, out=out)
    return 0


def ha_cli(pve: Pve, argv: list[str], out: Out) -> int:
    cmd = argv[0] if argv else ""
    res = pve.ha_resources()
    if cmd == "status":
        out.info("quorum OK")
        out.info(f"master {pve.node} (active, {time.ctime()})")
        out.info(f"lrm {pve.node} (active, {time.ctime()})")
        for sid, props in res.items():
            vmid = int(sid.split(":")[1])
            state = props.get("state", "started")
            if state in ("started", "enabled"):
                state = "started" if pve.is_running(vmid) else "starting"
            elif state == "stopped" and pve.is_running(vmid):
                state = "stopping"
            out.info(f"service {sid} ({pve.node}, {state})")
        return 0
    if cmd == "config":
        for sid, props in res.items():
            out.info(sid)
            for k, v in props.items():
                out.info(f"\t{k} {v}")
            out.info("")
        return 0
    if cmd == "set" and len(argv) >= 4 and argv[2] == "--state":
        # PVE: pve-ha-manager HA/Manager.pm: ``ignored`` removes the service from the manager
        # (nothing is done to the guest); set back to ``started`` it is started if it is off; a
        # service in ``error`` moves on only through ``disabled`` (next_state_error)
        sid, state = argv[1], argv[3]
        if sid not in res:
            raise PveError(f"service '{sid}' is not managed by ha")
        if state not in ("started", "stopped", "disabled", "ignored"):
            raise PveError(f"400 Parameter verification failed.\nstate: value '{state}' ...")
        vmid = int(sid.split(":")[1])
        kind = "qemu" if sid.startswith("vm:") else "lxc"
        error = pve.ha_service_status(vmid) == "error"
        pve.ha_set_state(sid, state)
        if state == "ignored" or (error and state != "disabled"):
            return 0
        pve.set_ha_service_status(vmid, None)
        pve.spawn_ha_worker("start" if state == "started" else "stop", kind, vmid, 60)
        return 0
    raise PveError(f"400 unknown command 'ha-manager {cmd}'")


def main(prog: str, argv: Sequence[str], root: Path | str) -> int:
    """Entry point of the fake ``qm``, ``pct`` and ``ha-manager`` (``root`` stands for ``/``)."""
    pve = Pve(root)
    out = Out(echo=True)
    t0 = time.time()

    def interrupted(signum: int, frame: object) -> None:
        # the CLI passes SIGINT/TERM/QUIT on to its worker, which dies (RESTEnvironment.pm)
        raise PveError("received interrupt")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, interrupted)
    try:
        code = (
            ha_cli(pve, list(argv), out)
            if prog == "ha-manager"
            else guest_cli(pve, prog, list(argv), out)
        )
    except PveError as e:
        for line in e.before:
            out.warn(line)
        out.warn(e.message)
        code = e.code
    except Exception:  # noqa: BLE001 - a simulator bug must be loud, not look like a PVE error
        out.warn("fake-pve internal error:\n" + traceback.format_exc())
        code = 99
    pve.log_call([prog, *argv], code, t0, out)
    return code


def _worker_main(worker: str, argv: list[str]) -> int:
    root, action, kind, vmid, timeout, marker = argv
    try:
        if worker == "late-poweroff":
            Pve(root).late_poweroff_worker(kind, int(vmid), float(timeout))
        else:
            Pve(root).ha_worker(action, kind, int(vmid), int(float(timeout)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
    return 0


def _kill_group_main(argv: list[str]) -> int:
    """The SIGKILL that follows the GUI's stop (:func:`stop_caller_task`), if the worker still
    runs then: the vzdump driver removes the marker when its job ends."""
    group, kill_at, marker = int(argv[0]), float(argv[1]), Path(argv[2])
    time.sleep(max(0.0, kill_at - time.time()))
    if marker.exists():
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("ha-worker", "late-poweroff"):
        sys.exit(_worker_main(sys.argv[1], sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "kill-group":
        sys.exit(_kill_group_main(sys.argv[2:]))
    sys.exit(2)
