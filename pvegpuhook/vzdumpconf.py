"""``/etc/vzdump.conf`` (our ``script:`` block) and ``/etc/pve/jobs.cfg`` (jobs that bypass it).

``/etc/vzdump.conf`` is pve-manager's conffile, so we change as little as possible: ``register``
appends one marked block at the end (the last ``script:`` wins in PVE's parser) and never touches
a line of the admin's; ``unregister`` takes exactly that suffix off again, so the file is byte for
byte what it was. What was appended is recorded in our state dir (``registration.json``) so the
suffix can be recognised even after the admin reformatted nothing but added lines elsewhere.

The text functions (:func:`parse`, :func:`active_script`, :func:`add_block`, :func:`remove_block`,
:func:`parse_jobs`) are pure; the file functions below them do the I/O. Files are handled as text
decoded with ``surrogateescape``, so bytes that are not UTF-8 survive a round trip unchanged.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass

from pvegpuhook import paths
from pvegpuhook.errors import GpuHookError, StateError
from pvegpuhook.state import write_atomic

HOOK_PATH = "/usr/share/pve-gpu-hook/vzdump-hook"
BEGIN_MARK = "# pve-gpu-hook: begin (added by 'pve-gpu-hook register'; removed by 'unregister')"
BEGIN_PREFIX = "# pve-gpu-hook: begin"  # recognised even if the admin shortened the comment
END_MARK = "# pve-gpu-hook: end"
SCRIPT_LINE = f"script: {HOOK_PATH}"
JOBS_CFG = "etc/pve/jobs.cfg"
REGISTRATION_NAME = "registration.json"
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # undecodable bytes round-trip unchanged

# Perl's \s on a byte string: ASCII whitespace only (PVE reads the file as bytes).
_WS = " \t\n\r\f\v"
# PVE::JSONSchema::parse_config: after trimming, skip '#' lines, then `key: value`.
_SETTING = re.compile(r"(\S+?):\s*(.*)", re.ASCII | re.DOTALL)
_SECTION = re.compile(r"(\S+):\s*(\S+)", re.ASCII)
_PROPERTY = re.compile(r"(\S+)(?:\s+(.*))?", re.ASCII | re.DOTALL)


def display(relative: str) -> str:
    """The host path as the admin knows it (``/etc/vzdump.conf``), whatever the test root."""
    return "/" + relative.lstrip("/")


# ---- pure text functions -------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One ``key: value`` line as PVE reads it; ``line`` is 1-based."""

    line: int
    key: str
    value: str


def lines_of(text: str) -> list[str]:
    """The lines with their line ends kept. Only ``\\n`` ends a line, as in Perl's ``/m``."""
    if not text:
        return []
    parts = text.split("\n")
    result = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        result.append(parts[-1])  # no final newline
    return result


def parse(text: str) -> list[Setting]:
    """Every setting in file order, read like PVE's parser (comments and junk lines skipped)."""
    settings: list[Setting] = []
    for number, raw in enumerate(lines_of(text), start=1):
        line = raw.strip(_WS)
        if not line or line.startswith("#"):
            continue
        match = _SETTING.fullmatch(line)
        if match:
            settings.append(Setting(number, match.group(1), match.group(2)))
    return settings


def active_script(text: str) -> Setting | None:
    """The ``script`` setting vzdump uses: the last one; None when unset or set empty."""
    last = None
    for setting in parse(text):
        if setting.key == "script":
            last = setting
    return last if last is not None and last.value else None


def eol_of(text: str) -> str:
    """The file's line-end style: CRLF when most of its lines end so."""
    crlf = text.count("\r\n")
    return "\r\n" if crlf and crlf * 2 >= text.count("\n") else "\n"


def block_text(eol: str = "\n") -> str:
    return eol.join((BEGIN_MARK, SCRIPT_LINE, END_MARK)) + eol


@dataclass(frozen=True)
class Added:
    """What ``register`` appended: the exact suffix, and whether it starts with a newline that
    the file lacked (a file without a final newline)."""

    suffix: str
    newline_added: bool

    def to_dict(self) -> dict[str, object]:
        return {"suffix": self.suffix, "newline_added": self.newline_added}

    @classmethod
    def from_dict(cls, data: object) -> Added | None:
        if not isinstance(data, dict):
            return None
        suffix, added = data.get("suffix"), data.get("newline_added")
        if not isinstance(suffix, str) or not isinstance(added, bool) or BEGIN_PREFIX not in suffix:
            return None
        return cls(suffix, added)


def add_block(text: str) -> tuple[str, Added]:
    """``text`` with our block appended, in the file's line-end style."""
    eol = eol_of(text)
    newline_added = bool(text) and not text.endswith("\n")
    suffix = (eol if newline_added else "") + block_text(eol)
    new = text + suffix
    # a safety net for odd input: the block must be what vzdump ends up using
    active = active_script(new)
    if active is None or active.value != HOOK_PATH:
        raise GpuHookError("internal error: the appended script line would not be the active one")
    return new, Added(suffix, newline_added)


def _is_our_script(line: str) -> bool:
    match = _SETTING.fullmatch(line.strip(_WS))
    return bool(match) and match.group(1) == "script" and match.group(2) == HOOK_PATH


def has_block(text: str) -> bool:
    return any(line.strip(_WS).startswith(BEGIN_PREFIX) for line in lines_of(text))


def remove_block(text: str, added: Added | None) -> tuple[str, list[str]]:
    """``text`` without our block(s), and the admin's non-blank lines found inside a block (kept).

    When the file still ends with exactly what was appended, that suffix is cut off: the result is
    the original byte for byte. Otherwise only the lines we wrote (markers, our ``script:`` line)
    are dropped, wherever the block is; the newline we had added goes too when nothing follows.
    """
    if added is not None and text.endswith(added.suffix):
        return text[: len(text) - len(added.suffix)], []
    kept: list[str] = []
    leftovers: list[str] = []
    inside = False
    last_begin: int | None = None  # index in `kept` where the last block started
    for line in lines_of(text):
        stripped = line.strip(_WS)
        if not inside and stripped.startswith(BEGIN_PREFIX):
            inside = True
            last_begin = len(kept)
            continue
        if inside:
            if stripped == END_MARK:
                inside = False
                continue
            if _is_our_script(line):
                continue
            if stripped:
                leftovers.append(stripped)
        kept.append(line)
    result = "".join(kept)
    if added is not None and added.newline_added and last_begin == len(kept):
        # nothing follows the block: the newline we put before it goes as well
        eol = "\r\n" if added.suffix.startswith("\r\n") else "\n"
        if result.endswith(eol):
            result = result[: len(result) - len(eol)]
    return result, leftovers


@dataclass(frozen=True)
class Job:
    """A backup job of ``/etc/pve/jobs.cfg`` that sets its own hook script."""

    id: str
    script: str
    enabled: bool


def parse_jobs(text: str) -> list[Job]:
    """Backup jobs (``vzdump: <id>`` sections) whose ``script`` replaces ours (not our own path).

    PVE's SectionConfig format: an unindented ``type: id`` header, then indented ``key value``.
    """
    jobs: list[Job] = []
    section: tuple[str, str] | None = None
    props: dict[str, str] = {}

    def finish() -> None:
        if section is not None and section[0] == "vzdump":
            script = props.get("script", "")
            if script and script != HOOK_PATH:
                enabled = props.get("enabled", "1").strip() not in ("0", "false", "no", "off")
                jobs.append(Job(section[1], script, enabled))

    for raw in text.split("\n"):
        line = raw.rstrip(_WS)
        if not line.strip(_WS) or line.lstrip(_WS).startswith("#"):
            continue
        if line[0] not in _WS:
            finish()
            match = _SECTION.fullmatch(line)
            section = (match.group(1), match.group(2)) if match else None
            props = {}
        elif section is not None:
            match = _PROPERTY.fullmatch(line.strip(_WS))
            if match:
                props[match.group(1)] = (match.group(2) or "").strip(_WS)
    finish()
    return jobs


# ---- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfFile:
    """``/etc/vzdump.conf`` as read: its text and what a rewrite must keep (mode, owner)."""

    path: str
    text: str
    raw: bytes
    mode: int
    uid: int
    gid: int


def conf_path() -> str:
    return paths.host(paths.VZDUMP_CONF)


def read_conf(*, missing_ok: bool = False, follow: bool = False) -> ConfFile | None:
    """Read vzdump.conf; a symlink is refused unless ``follow`` (reading only, as vzdump does).
    None when absent and ``missing_ok``."""
    path = conf_path()
    shown = display(paths.VZDUMP_CONF)
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise GpuHookError(
            f"{shown} does not exist: not a Proxmox VE host? nothing registered"
        ) from None
    except OSError as error:
        raise GpuHookError(f"cannot read {shown}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        # the target may be anything (another package's file, a file on pmxcfs): not ours to edit
        raise GpuHookError(
            f"{shown} is a symlink (to {os.readlink(path)}): refusing to edit through it; "
            f"add 'script: {HOOK_PATH}' to the real file by hand"
        )
    if not stat.S_ISREG(info.st_mode):
        raise GpuHookError(f"{shown} is not a regular file: refusing to edit it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise GpuHookError(f"cannot read {shown}: {error.strerror}") from None
    return ConfFile(
        path, raw.decode(ENCODING, ERRORS), raw, info.st_mode & 0o7777, info.st_uid, info.st_gid
    )


def write_conf(conf: ConfFile, text: str) -> None:
    """Replace vzdump.conf atomically with ``text``, keeping its mode and owner.

    Refused when the file changed since it was read (an editor or a package upgrade): we must not
    overwrite someone else's change with our older copy.
    """
    shown = display(paths.VZDUMP_CONF)
    current = read_conf(missing_ok=True)
    if current is None or current.raw != conf.raw:
        raise GpuHookError(f"{shown} changed while pve-gpu-hook was editing it; run it again")
    try:
        write_atomic(
            conf.path, text.encode(ENCODING, ERRORS), mode=conf.mode, owner=(conf.uid, conf.gid)
        )
    except OSError as error:
        raise GpuHookError(f"cannot write {shown}: {error.strerror}") from None


def registration_path() -> str:
    return paths.host(paths.STATE_DIR, REGISTRATION_NAME)


def load_registration() -> Added | None:
    """What ``register`` appended, or None (never registered, or the record is unreadable)."""
    try:
        fd = os.open(registration_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return Added.from_dict(data)


def save_registration(added: Added | None) -> None:
    """Record (or with None forget) what was appended. The caller holds the StateStore lock."""
    from pvegpuhook.state import check_private_dir

    path = registration_path()
    if added is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    check_private_dir(os.path.dirname(path))
    data = {"format": 1, "file": display(paths.VZDUMP_CONF), **added.to_dict()}
    try:
        write_atomic(path, (json.dumps(data) + "\n").encode("utf-8"))
    except OSError as error:
        raise StateError(f"cannot write {path}: {error.strerror}") from None


def read_jobs() -> tuple[list[Job], str | None]:
    """Backup jobs that set their own script, and a problem reading jobs.cfg (or None)."""
    path = paths.host(JOBS_CFG)
    try:
        with open(path, "rb") as f:
            text = f.read().decode(ENCODING, ERRORS)
    except FileNotFoundError:
        return [], None
    except OSError as error:
        return [], f"cannot read {display(JOBS_CFG)}: {error.strerror}"
    return parse_jobs(text), None


def jobs_warning(jobs: list[Job]) -> str | None:
    """One line naming the jobs that bypass the hook, or None."""
    if not jobs:
        return None
    named = ", ".join(
        f"{job.id} (script {job.script}{'' if job.enabled else ', disabled'})" for job in jobs
    )
    return (
        f"backup job(s) in {display(JOBS_CFG)} set their own hook script, which replaces the one "
        f"of {display(paths.VZDUMP_CONF)}: pve-gpu-hook does not run for {named}; remove their "
        "script option (Datacenter > Backup > Edit > Advanced); a hook they need can be set in "
        f"{display(paths.VZDUMP_CONF)} and kept with 'pve-gpu-hook register --chain'"
    )


def executable(host_path: str) -> bool:
    """A regular file with an execute bit, looked up under the root."""
    try:
        info = os.stat(paths.host(host_path))
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


def chain_problem(script: str) -> str | None:
    """Why ``script`` must not be chained, or None (see handlers.chain_problem)."""
    from pvegpuhook.handlers import chain_problem as problem_of

    if script == HOOK_PATH:
        return "is pve-gpu-hook itself"
    return problem_of(script)
