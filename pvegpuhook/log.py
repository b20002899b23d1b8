"""What the hook says: one concise line per action on stdout (the vzdump task log and the backup
notification), and every detail in ``/var/log/pve-gpu-hook.log``, which ``status`` reads back.

Text from guest configs or commands may carry control characters; they are escaped before they
reach the terminal or the log.
"""

from __future__ import annotations

import os
import sys
import time

from pvegpuhook import paths

PREFIX = "pve-gpu-hook: "
# the log file's line format (``TIME PHASE VMID|- MESSAGE``) is written by Log.file and read back
# by LogLine.parse, both below
ERROR_PREFIX = "ERROR: "
CALLED = "called: "  # the line each phase writes first


def clean(text: str) -> str:
    """Escape control characters (and lone surrogates) so a line stays one printable line."""
    out = []
    for char in text:
        code = ord(char)
        if code < 32 or code == 127 or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def timestamp(epoch: float | None = None) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(epoch))
    return stamp[:-2] + ":" + stamp[-2:]


class Log:
    def __init__(self, phase: str, vmid: int | None = None, *, echo: bool = True) -> None:
        self.phase = phase
        self.vmid = vmid
        self.echo = echo
        self.lines: list[str] = []  # what was said, for callers that report it again

    def say(self, message: str) -> None:
        """A line for the task log (stdout) and the log file."""
        line = clean(message)
        self.lines.append(line)
        if self.echo:
            sys.stdout.write(PREFIX + line + "\n")
            sys.stdout.flush()
        self.file(line)

    def error(self, message: str) -> None:
        """A failure line: on stderr so it ends the task log entry of this guest."""
        line = clean(message)
        self.lines.append(line)
        if self.echo:
            sys.stdout.flush()
            sys.stderr.write(PREFIX + line + "\n")
            sys.stderr.flush()
        self.file(ERROR_PREFIX + line)

    def file(self, message: str) -> None:
        """A line for the log file only; logging must never break a backup."""
        vmid = str(self.vmid) if self.vmid is not None else "-"
        phase = clean(self.phase).replace(" ", "_") or "-"  # argv: never a forged log line
        entry = f"{timestamp()} {phase} {vmid} {clean(message)}\n"
        path = paths.host(paths.LOG_FILE)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            try:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                fd = os.open(path, flags, 0o600)
            except OSError:
                return
        except OSError:
            return
        try:
            if os.fstat(fd).st_uid == os.geteuid():  # not into a file someone else planted
                os.write(fd, entry.encode("utf-8", "backslashreplace"))
        except OSError:
            pass
        finally:
            os.close(fd)


# ---- reading the log back (``status``) ---------------------------------------------------------

TAIL = 4 * 1024 * 1024  # the last job is near the end; a rotated-late log may be big
JOB_END_PHASES = ("job-end", "job-abort")
HANDOVER = "handover"  # the phase of the lines of pve-gpu-hook start and the guest hookscript


class LogLine:
    """One line of the log file as :meth:`Log.file` wrote it: ``TIME PHASE VMID|- MESSAGE``."""

    __slots__ = ("time", "phase", "vmid", "message")

    def __init__(self, time_: str, phase: str, vmid: int | None, message: str) -> None:
        self.time, self.phase, self.vmid, self.message = time_, phase, vmid, message

    @classmethod
    def parse(cls, line: str) -> LogLine | None:
        parts = line.split(" ", 3)
        if len(parts) < 3:
            return None
        vmid = int(parts[2]) if parts[2].isascii() and parts[2].isdigit() else None
        return cls(parts[0], parts[1], vmid, parts[3] if len(parts) > 3 else "")


def read_tail(path: str | None = None, limit: int = TAIL) -> list[LogLine]:
    """The parsed lines of the log's last ``limit`` bytes; none when there is no log yet.

    GpuHookError when it cannot be read (a directory, a symlink, an I/O error), NotPermitted
    when this user may not read it: "no job in the log" must mean that.
    """
    import stat

    from pvegpuhook.errors import GpuHookError, NotPermitted

    path = path or paths.host(paths.LOG_FILE)
    shown = paths.unhost(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except PermissionError:
        raise NotPermitted(path) from None
    except OSError as error:
        raise GpuHookError(f"cannot read the log file {shown}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise GpuHookError(f"cannot read the log file {shown}: not a regular file")
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            raw = f.read()
    except OSError as error:
        raise GpuHookError(f"cannot read the log file {shown}: {error.strerror}") from None
    lines = raw.decode("utf-8", "replace").split("\n")
    if size > limit:
        lines = lines[1:]  # a partial first line
    return [parsed for line in lines if line and (parsed := LogLine.parse(line))]


def last_job(lines: list[LogLine]) -> dict[str, object] | None:
    """The last job of the log: from its ``job-start`` to its ``job-end``/``job-abort`` lines.

    Lines of other phases after the job ended (the next job's job-init, a ``recover``) are not
    part of it. Actions are the lines other than each phase's ``called:`` line.
    """
    job: dict[str, object] | None = None
    actions: list[dict[str, object]] = []
    for line in lines:
        phase, message = line.phase, line.message
        if phase == HANDOVER:
            continue  # a hand-over at a guest's start is no part of a backup job
        if phase == "job-start" and (
            job is None or job["end"] is not None or message.startswith(CALLED)
        ):
            actions = []
            job = {"start": line.time, "end": None, "end_phase": None, "actions": actions}
        if job is None:
            continue
        if job["end"] is not None and phase not in JOB_END_PHASES:
            continue
        if phase in JOB_END_PHASES:
            job["end"], job["end_phase"] = line.time, phase
        if message.startswith(CALLED):
            continue
        actions.append({"time": line.time, "phase": phase, "vmid": line.vmid, "message": message})
    if job is None:
        return None
    errors = sum(1 for a in actions if str(a["message"]).startswith(ERROR_PREFIX))
    if errors:
        result = "error"
    elif job["end"] is None:
        result = "unfinished"
    elif job["end_phase"] == "job-abort":
        result = "aborted"
    else:
        result = "ok"
    job["result"] = result
    job["errors"] = errors
    return job


# what the hook says when it takes a guest down to free a GPU, and when that guest is back
# (phases._stop_holders, restart.restart/_start, recover --forget): "<label> <what> ..."
STOPPED_WORDS = ("shut down in ", "stopped hard ")
BACK_WORDS = ("started again", "is running; record dropped", "record dropped")


def not_started_again(lines: list[LogLine]) -> list[tuple[str, int, LogLine]]:
    """The guests the log shows the hook took down to free a GPU and does not show back since:
    (``VM``/``CT``, VMID, the line of that shutdown), in log order.

    For a damaged state file: these lines say which guests the damaged records may have named.
    """
    import re

    label = re.compile(r"(VM|CT) (\d+)(?: \([^)]*\))? (.*)")
    down: dict[int, tuple[str, LogLine]] = {}
    for line in lines:
        if line.phase == "recover" and line.message.startswith("record dropped"):
            down.pop(line.vmid or -1, None)  # recover --forget: the admin took it over
            continue
        match = label.match(line.message)
        if match is None:
            continue
        word, vmid, rest = match.group(1), int(match.group(2)), match.group(3)
        if rest.startswith(STOPPED_WORDS):
            down[vmid] = (word, line)
        elif any(words in rest for words in BACK_WORDS):
            down.pop(vmid, None)
    found = [(word, vmid, line) for vmid, (word, line) in down.items()]
    return sorted(found, key=lambda item: lines.index(item[2]))
