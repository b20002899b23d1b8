"""What the hook can learn about the backup job it runs in, read from PVE's own files.

- ``/var/run/vzdump.pid``: the job's UPID, written after vzdump took the node lock and before
  ``job-start``; removed only after a fully successful job, so it may name an old, failed job
  (pve-manager PVE/VZDump.pm getlock, exec_backup).
- The UPID names the task: its worker's pid and that process's start time, so whether it still
  runs can be told as PVE tells it (pve-common PVE/UPID.pm decode, PVE/ProcFSTools.pm
  check_process_running); and its task log, whose job line holds the job's command line
  (PVE/VZDump.pm exec_backup, pve-guest-common PVE/VZDump/Common.pm command_line).
- ``/var/log/vzdump/<qemu|lxc>-<vmid>.log``: a guest's last backup, with its duration.

docs/pve-facts.md §3 has the facts. Every reader answers with what it learnt or with
:class:`Unknown` saying why it could not: nothing here guesses. Standard library only, and cheap
to import (nothing but ``os``), for the hook's phases.
"""

from __future__ import annotations

import os

from pvegpuhook import paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pvegpuhook.model import JobOrder

JOB_LINE = "starting new backup job: "
MODES = ("stop", "suspend", "snapshot")
TAIL = 65536  # bytes of a guest's backup log read from its end: the result is on its last lines
PID_FILE = "/var/run/vzdump.pid"  # as PVE names it (paths.VZDUMP_PID: /run, the same directory)


class Unknown:
    """Something that could not be learnt, and why (a sentence without a final full stop)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unknown({self.reason!r})"


class Upid:
    """A decoded UPID: ``UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:``."""

    __slots__ = ("text", "node", "pid", "pstart", "starttime", "type", "id", "user")

    def __init__(
        self,
        text: str,
        node: str,
        pid: int,
        pstart: int,
        starttime: int,
        type_: str,
        id_: str,
        user: str,
    ) -> None:
        self.text = text
        self.node = node
        self.pid = pid
        self.pstart = pstart  # the worker's start, in clock ticks after boot (/proc/<pid>/stat)
        self.starttime = starttime  # the task's start, seconds since the epoch
        self.type = type_
        self.id = id_  # for vzdump: the VMID when the job has exactly one local guest, else ""
        self.user = user

    @property
    def log_path(self) -> str:
        """The task log: ``/var/log/pve/tasks/<last hex digit of the start time>/<UPID>``."""
        return paths.host(paths.TASK_LOGS, self.text.split(":")[4][7], self.text)

    def __repr__(self) -> str:
        return f"Upid({self.text!r})"


def _hex(text: str, lengths: tuple[int, ...]) -> int | None:
    if len(text) not in lengths or not all(c in "0123456789abcdefABCDEF" for c in text):
        return None
    return int(text, 16)


def _node_name(text: str) -> bool:
    return (
        bool(text)
        and text.isascii()
        and all(c.isalnum() or c == "-" for c in text)
        and text[0] != "-"
        and text[-1] != "-"
    )


def _field(text: str, empty_ok: bool = False) -> bool:
    return (bool(text) or empty_ok) and not any(c.isspace() or c == "/" for c in text)


def decode_upid(text: str) -> Upid | Unknown:
    """A UPID as PVE decodes it (pve-common PVE/UPID.pm decode): pid and start time 8 hex
    digits, pstart 8 or 9 (9 after 497 days of uptime), the trailing ``:`` included."""
    parts = text.split(":")
    shown = text if len(text) <= 120 else text[:120] + "..."
    if len(parts) != 9 or parts[0] != "UPID" or parts[8] != "":
        return Unknown(f"{shown!r} is not a UPID")
    node, pid_hex, pstart_hex, start_hex, type_, id_, user = parts[1:8]
    pid = _hex(pid_hex, (8,))
    pstart = _hex(pstart_hex, (8, 9))
    starttime = _hex(start_hex, (8,))
    if (
        not _node_name(node)
        or pid is None
        or pstart is None
        or starttime is None
        or not _field(type_)
        or not _field(id_, empty_ok=True)
        or not _field(user)
    ):
        return Unknown(f"{shown!r} is not a UPID")
    return Upid(text, node, pid, pstart, starttime, type_, id_, user)


def read_pid_file() -> Upid | Unknown:
    """The UPID in ``/var/run/vzdump.pid``: the job running now, or the last job that failed."""
    path = paths.host(paths.VZDUMP_PID)
    shown = PID_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return Unknown(f"no {shown}: no backup job runs (or the last one ended without errors)")
    except OSError as error:
        return Unknown(f"cannot read {shown}: {error.strerror}")
    try:
        text = raw.decode("ascii").rstrip("\n")
    except UnicodeDecodeError:
        return Unknown(f"{shown} does not hold a UPID")
    upid = decode_upid(text)
    if isinstance(upid, Unknown):
        return Unknown(f"{shown}: {upid.reason}")
    return upid


def task_running(upid: Upid) -> bool | Unknown:
    """Whether the task still runs, as PVE tells it (check_process_running): a process with the
    UPID's pid exists, is not a zombie, and started at the UPID's pstart. Another process that got
    the same pid later (pid reuse, a reboot) started at another time."""
    shown = f"/proc/{upid.pid}/stat"
    try:
        with open(paths.host("proc", str(upid.pid), "stat"), "rb") as f:
            raw = f.read(4096)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return False  # no such process
    except OSError as error:
        return Unknown(f"cannot read {shown}: {error.strerror}")
    text = raw.decode("ascii", "replace")
    head, close, rest = text.rpartition(")")  # the command name may hold spaces and ')'
    fields = rest.split()
    if not close or head.split(" (", 1)[0] != str(upid.pid) or len(fields) < 20:
        return Unknown(f"{shown} is not in the kernel's format")
    state, starttime = fields[0], fields[19]  # fields 3 and 22 of the line
    if not starttime.isdigit():
        return Unknown(f"{shown} is not in the kernel's format")
    return state != "Z" and int(starttime) == upid.pstart


def running_job() -> Upid | Unknown:
    """The backup job that runs now, by vzdump's pid file: its UPID only when that task runs."""
    upid = read_pid_file()
    if isinstance(upid, Unknown):
        return upid
    if upid.type != "vzdump":
        return Unknown(f"{PID_FILE} names a {upid.type!r} task")
    running = task_running(upid)
    if isinstance(running, Unknown):
        return running
    if not running:
        return Unknown(f"the task {upid.text} named by {PID_FILE} has ended")
    return upid


# ---- the job's command line ---------------------------------------------------------------------


class JobSpec:
    """A backup job's parameters, as its task log's job line gives them.

    Only what the command line says: ``mode`` None means none was given (then vzdump.conf's
    ``mode:`` or ``snapshot`` applies); ``all`` is as printed (vzdump prints ``--all 1`` for
    ``--exclude`` without ``--pool`` too). Other options (storage, compression, ...) are ignored.
    """

    __slots__ = ("vmids", "all", "exclude", "pool", "mode", "node", "command")

    def __init__(self, command: str) -> None:
        self.command = command  # the command line, ``vzdump ...``
        self.vmids: list[int] = []  # explicit VMIDs in the order given (not vzdump's order)
        self.all = False
        self.exclude: list[int] = []
        self.pool: str | None = None
        self.mode: str | None = None
        self.node: str | None = None

    def __repr__(self) -> str:
        return f"JobSpec({self.command!r})"


def _split_list(text: str) -> list[str]:
    """PVE::Tools::split_list: items separated by ``,``, ``;`` or white space."""
    for separator in ",;":
        text = text.replace(separator, " ")
    return text.split()


def parse_job_line(line: str) -> JobSpec | Unknown:
    """``INFO: starting new backup job: vzdump 102 103 --mode stop --storage local``: VMIDs
    first in the given order, then ``--key value`` pairs in any order, values shell-quoted."""
    import shlex

    at = line.find(JOB_LINE)
    if at < 0:
        return Unknown("not a job line")
    command = line[at + len(JOB_LINE) :].rstrip("\r\n")
    try:
        words = shlex.split(command)
    except ValueError as error:
        return Unknown(f"cannot split the job's command line ({error})")
    if not words or words[0] != "vzdump":
        return Unknown(f"the job's command line does not start with vzdump: {command[:80]!r}")
    spec = JobSpec(command)
    index = 1
    while index < len(words) and not words[index].startswith("--"):
        word = words[index]
        if not (word.isascii() and word.isdigit()) or int(word) == 0:
            return Unknown(f"{word!r} in the job's command line is not a VMID")
        spec.vmids.append(int(word))
        index += 1
    options: dict[str, str] = {}
    while index < len(words):
        key = words[index]
        if not key.startswith("--") or index + 1 >= len(words):
            return Unknown(f"cannot read {key!r} in the job's command line")
        options[key[2:]] = words[index + 1]  # repeated keys (--exclude-path) are not needed
        index += 2
    problem = _apply_options(spec, options)
    if problem:
        return Unknown(problem)
    if spec.vmids and (spec.all or spec.pool):
        return Unknown("the job's command line has both VMIDs and --all or --pool")
    return spec


def _apply_options(spec: JobSpec, options: dict[str, str]) -> str | None:
    value = options.get("all")
    if value is not None:
        if value not in ("0", "1"):
            return f"--all {value!r} in the job's command line is not 0 or 1"
        spec.all = value == "1"
    value = options.get("exclude")
    if value is not None:
        items = _split_list(value)
        if not all(item.isascii() and item.isdigit() for item in items):
            return f"--exclude {value!r} in the job's command line is not a list of VMIDs"
        spec.exclude = [int(item) for item in items]
    value = options.get("mode")
    if value is not None:
        if value not in MODES:
            return f"--mode {value!r} in the job's command line is not a backup mode"
        spec.mode = value
    spec.pool = options.get("pool") or None
    spec.node = options.get("node") or None
    return None


def find_job_line(text: str) -> str | Unknown:
    """The job line of a task log: the first ``INFO: starting new backup job: `` line, which is
    not always the first line (job-init output and the node lock's lines come before it)."""
    for line in text.splitlines():
        if line.startswith("INFO: " + JOB_LINE):
            return line
    return Unknown("the task log has no job line (yet)")


def read_job(upid: Upid) -> JobSpec | Unknown:
    """The job's parameters, from its task log."""
    shown = "/" + os.path.relpath(upid.log_path, paths.root())
    try:
        with open(upid.log_path, "rb") as f:
            raw = f.read(1 << 20)  # the job line is written before any guest's backup
    except FileNotFoundError:
        return Unknown(f"no task log {shown}")
    except OSError as error:
        return Unknown(f"cannot read {shown}: {error.strerror}")
    line = find_job_line(raw.decode("utf-8", "replace"))
    if isinstance(line, Unknown):
        return Unknown(f"{shown}: {line.reason}")
    return parse_job_line(line)


def parse_pools(text: str) -> dict[str, set[int]]:
    """Resource pools of ``user.cfg``: ``pool:<name>:<comment>:<vmids>:<storages>`` lines, the
    VMIDs a list; a VMID already in another pool is ignored, as PVE ignores it
    (pve-access-control PVE/AccessControl.pm parse_user_config)."""
    pools: dict[str, set[int]] = {}
    seen: set[int] = set()
    for line in text.splitlines():
        fields = [field.strip() for field in line.strip().split(":")]
        if len(fields) < 2 or fields[0] != "pool" or not fields[1]:
            continue
        members = pools.setdefault(fields[1], set())
        for item in _split_list(fields[3] if len(fields) > 3 else ""):
            if item.isascii() and item.isdigit() and int(item) not in seen:
                seen.add(int(item))
                members.add(int(item))
    return pools


def read_pools() -> dict[str, set[int]] | Unknown:
    try:
        with open(paths.host(paths.USER_CFG), encoding="utf-8", errors="replace") as f:
            return parse_pools(f.read())
    except FileNotFoundError:
        return {}
    except OSError as error:
        return Unknown(f"cannot read /{paths.USER_CFG}: {error.strerror}")


def included_guests(
    spec: JobSpec, local: set[int], pools: dict[str, set[int]] | None = None
) -> list[int] | Unknown:
    """The job's guests on this node in the order vzdump backs them up: its pool's members, its
    VMIDs, or every guest but the excluded ones; ascending, VMs and CTs mixed (pve-manager
    PVE/VZDump.pm get_included_guests, check_vmids). ``local``: the guests of this node."""
    if spec.pool is not None:
        if pools is None or spec.pool not in pools:
            return Unknown(f"the job's pool {spec.pool!r} is not in /{paths.USER_CFG}")
        wanted = pools[spec.pool]  # vzdump applies no --exclude to a pool
    elif spec.vmids:
        wanted = set(spec.vmids)
    elif spec.all:
        wanted = local - set(spec.exclude)
    else:
        return Unknown("the job's command line names no guests")
    return sorted(wanted & local)


# ---- a guest's last backup ----------------------------------------------------------------------


def guest_log_path(kind: str, vmid: int) -> str:
    """``/var/log/vzdump/<qemu|lxc>-<vmid>.log`` (kind as PVE spells it: qemu, lxc)."""
    return paths.host(paths.VZDUMP_LOGS, f"{kind}-{vmid}.log")


def parse_duration(text: str) -> int | None:
    """vzdump's ``HH:MM:SS`` (hours may have more digits) in seconds, None if it is not one."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    hours, minutes, seconds = (int(p) for p in parts)
    if len(parts[1]) != 2 or len(parts[2]) != 2 or minutes > 59 or seconds > 59:
        return None
    return hours * 3600 + minutes * 60 + seconds


def previous_durations(order: JobOrder) -> dict[int, float]:
    """Each guest's previous backup in seconds, where its backup log tells (the planner counts
    the others as UNKNOWN_DURATION)."""
    found = {}
    for guest, _, _ in order:
        seconds = last_backup_seconds(guest.kind, guest.vmid)
        if not isinstance(seconds, Unknown):
            found[guest.vmid] = float(seconds)
    return found


def last_backup_seconds(kind: str, vmid: int) -> int | Unknown:
    """How long the guest's previous backup took, from its backup log's
    ``INFO: Finished Backup of VM <vmid> (HH:MM:SS)`` line (vzdump rewrites that log at each
    backup of the guest; an early failure, such as the HA refusal, leaves the old one)."""
    path = guest_log_path(kind, vmid)
    shown = "/" + os.path.relpath(path, paths.root())
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            raw = f.read(TAIL)
    except FileNotFoundError:
        return Unknown(f"no {shown}: no earlier backup of it on this node")
    except OSError as error:
        return Unknown(f"cannot read {shown}: {error.strerror}")
    finished = f"INFO: Finished Backup of VM {vmid} ("
    failed = f"ERROR: Backup of VM {vmid} failed"
    for line in reversed(raw.decode("utf-8", "replace").splitlines()):
        at = line.find(finished)
        if at >= 0 and line.endswith(")"):
            seconds = parse_duration(line[at + len(finished) : -1])
            if seconds is None:
                return Unknown(f"{shown}: cannot read the duration in {line[at:]!r}")
            return seconds
        if failed in line:
            return Unknown(f"{shown}: its last backup failed")
    return Unknown(f"{shown} has no 'Finished Backup' line (a backup under way, or cut short)")
