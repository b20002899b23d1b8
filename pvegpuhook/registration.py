"""The registration: our block in ``/etc/vzdump.conf``, its record, and the chained previous hook.

``/etc/vzdump.conf`` is pve-manager's conffile, so we change as little as possible:
:func:`register` appends one marked block at the end (the last ``script:`` wins in PVE's parser)
and never touches a line of the admin's; :func:`unregister` takes exactly that suffix off again,
so the file is byte for byte what it was. What was appended is recorded in
``registration.json``, and a hook that ``register --chain`` kept in ``chain``; both live in the
state directory, and this module is their only reader and writer. The hook runs the chained
script only after :func:`resolve_chain` found it safe.

The hook reads the chain on every phase when one is set: this module imports the text functions
of :mod:`pvegpuhook.vzdumpconf` (and their ``re``) only where the file is edited.
"""

from __future__ import annotations

import os
import stat

from pvegpuhook import files, paths
from pvegpuhook.errors import GpuHookError, NotPermitted, StateError
from pvegpuhook.log import Log, clean

HOOK_PATH = "/usr/share/pve-gpu-hook/vzdump-hook"  # = vzdumpconf.HOOK_PATH, without its import
JOBS_CFG = "etc/pve/jobs.cfg"
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # a path is bytes: whatever vzdump.conf held comes back unchanged

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pvegpuhook.vzdumpconf import Added, Job


class Report:
    """What a change did: ``lines`` for stdout, ``warnings`` for stderr."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.warnings: list[str] = []


# ---- /etc/vzdump.conf ---------------------------------------------------------------------------


class ConfFile:
    """``/etc/vzdump.conf`` as read: its text and what a rewrite must keep (mode, owner)."""

    __slots__ = ("path", "text", "raw", "mode", "uid", "gid")

    def __init__(self, path: str, raw: bytes, info: os.stat_result) -> None:
        self.path = path
        self.raw = raw
        self.text = raw.decode(ENCODING, ERRORS)
        self.mode = info.st_mode & 0o7777
        self.uid = info.st_uid
        self.gid = info.st_gid


def read_conf(*, missing_ok: bool = False, follow: bool = False) -> ConfFile | None:
    """Read vzdump.conf; a symlink is refused unless ``follow`` (reading only, as vzdump does).
    None when absent and ``missing_ok``."""
    path = paths.host(paths.VZDUMP_CONF)
    shown = paths.shown(paths.VZDUMP_CONF)
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise GpuHookError(
            f"{shown} does not exist: not a Proxmox VE host? nothing registered"
        ) from None
    except PermissionError:
        raise NotPermitted(path) from None
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
    except PermissionError:
        raise NotPermitted(path) from None
    except OSError as error:
        raise GpuHookError(f"cannot read {shown}: {error.strerror}") from None
    return ConfFile(path, raw, info)


def _write_conf(conf: ConfFile, text: str) -> None:
    """Replace vzdump.conf atomically with ``text``, keeping its mode and owner.

    Refused when the file changed since it was read (an editor or a package upgrade): we must not
    overwrite someone else's change with our older copy.
    """
    shown = paths.shown(paths.VZDUMP_CONF)
    current = read_conf(missing_ok=True)
    if current is None or current.raw != conf.raw:
        raise GpuHookError(f"{shown} changed while pve-gpu-hook was editing it; run it again")
    try:
        files.write_atomic(
            conf.path, text.encode(ENCODING, ERRORS), mode=conf.mode, owner=(conf.uid, conf.gid)
        )
    except OSError as error:
        raise GpuHookError(f"cannot write {shown}: {error.strerror}") from None


def active_script(conf: ConfFile | None) -> tuple[str, int] | None:
    """The hook script vzdump uses (value, line), or None."""
    if conf is None:
        return None
    from pvegpuhook import vzdumpconf

    active = vzdumpconf.active_script(conf.text)
    return (active.value, active.line) if active is not None else None


def registered() -> bool:
    """Whether vzdump runs our hook now (the active script of vzdump.conf is ours); False when
    the file cannot be read."""
    try:
        active = active_script(read_conf(missing_ok=True, follow=True))  # vzdump follows it
    except GpuHookError:
        return False
    return active is not None and active[0] == HOOK_PATH


# ---- our records --------------------------------------------------------------------------------


def _record_path() -> str:
    return paths.host(paths.REGISTRATION_FILE)


def load_added() -> Added | None:
    """What ``register`` appended, or None (never registered, or the record is unreadable)."""
    import json

    from pvegpuhook.vzdumpconf import Added

    try:
        raw = files.read_private(_record_path())
        return Added.from_dict(json.loads(raw.decode("utf-8"))) if raw is not None else None
    except (StateError, ValueError, UnicodeDecodeError):
        return None


def _save_added(added: Added | None) -> None:
    """Record (or with None forget) what was appended. The caller holds the lock."""
    path = _record_path()
    try:
        if added is None:
            files.remove(path)
            return
        import json

        files.private_dir(os.path.dirname(path))
        data = {"format": 1, "file": paths.shown(paths.VZDUMP_CONF), **added.to_dict()}
        files.write_atomic(path, (json.dumps(data) + "\n").encode("utf-8"))
    except OSError as error:
        raise StateError(f"cannot write {path}: {error.strerror}") from None


def chain() -> str | None:
    """The admin's previous hook that ``register --chain`` kept, or None. StateError when the
    chain file is not ours (someone else's file must never name what we run)."""
    raw = files.read_private(paths.host(paths.CHAIN_FILE))
    value = raw.decode(ENCODING, ERRORS).strip() if raw is not None else ""
    return value or None


def _save_chain(script: str | None) -> None:
    path = paths.host(paths.CHAIN_FILE)
    try:
        if script is None:
            files.remove(path)
            return
        files.private_dir(os.path.dirname(path))
        files.write_atomic(path, (script + "\n").encode(ENCODING, ERRORS))
    except OSError as error:
        raise StateError(f"cannot write {path}: {error.strerror}") from None


# ---- the chained hook's safety ------------------------------------------------------------------


def resolve_chain(script: str) -> tuple[str | None, str]:
    """(why it must not run or None, the resolved file to run).

    ``script`` is the host path as the admin wrote it: absolute, a root-owned executable file
    that neither group nor others can write, in directories only root can write. The file that
    was checked is the one that runs, so a symlink cannot be swapped in between.
    """
    path = os.path.realpath(paths.host(script))
    if script == HOOK_PATH:
        return "is pve-gpu-hook itself", path
    if not os.path.isabs(script):
        return "is not an absolute path", path
    try:
        info = os.stat(path)
    except OSError as error:
        return f"cannot be read: {error.strerror}", path
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file", path
    if info.st_uid != 0:
        return f"is owned by uid {info.st_uid}, not root", path
    if info.st_mode & 0o022:
        return "is writable by group or others", path
    if not info.st_mode & 0o100:
        return "is not executable", path
    # the directories of the file and of the name it was given by (a symlink there could be
    # pointed elsewhere) must be root's alone
    for start in (path, paths.host(script)):
        problem = _open_directory(os.path.dirname(start))
        if problem:
            return problem, path
    return None, path


def chain_problem(script: str) -> str | None:
    """Why ``script`` must not be chained (or run as the chained hook), or None."""
    return resolve_chain(script)[0]


def _open_directory(directory: str) -> str | None:
    top = os.path.realpath(paths.root())
    directory = os.path.abspath(directory)
    while directory.startswith(top) and directory != top:
        info = os.stat(directory)
        if info.st_uid != 0 or info.st_mode & 0o022:
            return f"lies in {directory[len(top) :] or '/'}, which others can write"
        directory = os.path.dirname(directory)
    return None


def executable(host_path: str) -> bool:
    """A regular file with an execute bit, looked up under the root."""
    try:
        info = os.stat(paths.host(host_path))
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and bool(info.st_mode & 0o111)


# ---- jobs that bypass vzdump.conf ---------------------------------------------------------------


def read_jobs() -> tuple[list[Job], str | None]:
    """Backup jobs that set their own script, and a problem reading jobs.cfg (or None)."""
    from pvegpuhook.vzdumpconf import parse_jobs

    path = paths.host(JOBS_CFG)
    try:
        with open(path, "rb") as f:
            text = f.read().decode(ENCODING, ERRORS)
    except FileNotFoundError:
        return [], None
    except PermissionError:
        raise NotPermitted(path) from None
    except OSError as error:
        return [], f"cannot read {paths.shown(JOBS_CFG)}: {error.strerror}"
    return parse_jobs(text), None


def jobs_warning(jobs: list[Job]) -> str | None:
    """One line naming the jobs that bypass the hook, or None."""
    if not jobs:
        return None
    named = ", ".join(
        f"{job.id} (script {job.script}{'' if job.enabled else ', disabled'})" for job in jobs
    )
    conf = paths.shown(paths.VZDUMP_CONF)
    return (
        f"backup job(s) in {paths.shown(JOBS_CFG)} set their own hook script, which replaces the "
        f"one of {conf}: pve-gpu-hook does not run for {named}; remove their script option "
        f"(Datacenter > Backup > Edit > Advanced); a hook they need can be set in {conf} and kept "
        "with 'pve-gpu-hook register --chain'"
    )


def _jobs_warnings(report: Report) -> None:
    jobs, problem = read_jobs()
    report.warnings.extend(w for w in (problem, jobs_warning(jobs)) if w)


# ---- register / unregister ----------------------------------------------------------------------


def _hold(wait: float, purpose: str) -> files.FileLock:
    lock = files.FileLock(paths.host(paths.LOCK_FILE))
    lock.acquire(wait, purpose)
    return lock


def register(*, chain_previous: bool, wait: float) -> Report:
    """Make vzdump call the hook; with ``chain_previous`` keep the active script as the chain.

    Raises GpuHookError, changing nothing, when another hook is active without
    ``chain_previous`` or that hook fails the chain checks.
    """
    from pvegpuhook import vzdumpconf

    shown = paths.shown(paths.VZDUMP_CONF)
    report = Report()
    lock = _hold(wait, "register")
    try:
        conf = read_conf()
        assert conf is not None
        _jobs_warnings(report)
        active = vzdumpconf.active_script(conf.text)
        if active is not None and active.value == HOOK_PATH:
            chained = chain()
            report.lines.append(
                f"already registered: line {active.line} of {shown} sets 'script: {HOOK_PATH}'"
                + (f"; chained hook: {clean(chained)}" if chained else "")
            )
            if chain_previous and not chained:
                report.lines.append(
                    "--chain: nothing to chain (the hook is already active); nothing changed"
                )
            return report
        text = conf.text
        notes: list[str] = []
        if vzdumpconf.has_block(text):
            # our old block is shadowed by a later script line: drop it so there is only one
            text, _ = vzdumpconf.remove_block(text, load_added())
            notes.append("an earlier pve-gpu-hook block that was no longer active was removed")
        kept: str | None = None
        if active is not None:
            if not chain_previous:
                raise GpuHookError(
                    f"{shown} line {active.line} already sets another hook script: "
                    f"'{active.value}'. vzdump runs only one script, so registering would "
                    f"silently turn that one off. Run 'pve-gpu-hook register --chain' to keep it: "
                    "pve-gpu-hook then runs it after its own work with the same arguments and "
                    "environment (it must be an absolute path, owned by root, not writable by "
                    "group or others, executable). Nothing changed"
                )
            problem = chain_problem(active.value)
            if problem is not None:
                raise GpuHookError(
                    f"cannot chain the hook script '{active.value}' ({shown} line {active.line}): "
                    f"it {problem}. Fix it (chown root, chmod go-w,+x) and run register --chain "
                    "again. Nothing changed"
                )
            kept = active.value
        elif chain_previous:
            notes.append("--chain: no other hook script is active, nothing to chain")
        new, added = vzdumpconf.add_block(text)
        # the records first: a crash before the rename leaves records that unregister ignores
        old_chain, old_added = chain(), load_added()
        _save_chain(kept)
        _save_added(added)
        try:
            _write_conf(conf, new)
        except GpuHookError:
            _save_chain(old_chain)  # the file is unchanged: so are our records
            _save_added(old_added)
            raise
        line = vzdumpconf.active_script(new)
        assert line is not None
        detail = f"registered: {shown} line {line.line} now sets 'script: {HOOK_PATH}'"
        if kept:
            detail += (
                f"; the previous hook '{kept}' (line {active.line if active else '?'}) stays "
                "in the file and is run after pve-gpu-hook's work (chained)"
            )
        Log("register", echo=False).file(detail)
        report.lines.append(detail)
        if not executable(HOOK_PATH):
            # not refused: a source checkout may register before installing; vzdump would not
            report.warnings.append(
                f"{HOOK_PATH} is missing or not executable: vzdump fails every "
                "backup job until it is installed (or run 'pve-gpu-hook unregister')"
            )
        report.lines.extend(notes)
        return report
    finally:
        lock.release()


def unregister(*, wait: float) -> Report:
    """Take our block out of vzdump.conf and forget the chain: the previous hook is vzdump's
    script again. Lines the admin wrote are never removed (GpuHookError when our script line
    stands outside our block: not ours to take out)."""
    from pvegpuhook import vzdumpconf

    shown = paths.shown(paths.VZDUMP_CONF)
    report = Report()
    lock = _hold(wait, "unregister")
    try:
        conf = read_conf(missing_ok=True)
        if conf is None:
            _forget()
            report.lines.append(f"not registered: {shown} does not exist; nothing to do")
            return report
        _jobs_warnings(report)
        added = load_added()
        if not vzdumpconf.has_block(conf.text):
            active = vzdumpconf.active_script(conf.text)
            if active is not None and active.value == HOOK_PATH:
                # someone wrote the line by hand (or an old installer): not ours to remove
                raise GpuHookError(
                    f"{shown} line {active.line} sets 'script: {HOOK_PATH}' outside "
                    "a pve-gpu-hook block (not added by register): left in place; remove it by "
                    "hand, or vzdump will fail when the hook is gone"
                )
            chained = _forget()
            report.lines.append(
                f"not registered: {shown} has no pve-gpu-hook block; nothing to do"
                + (f" (forgot the chained hook {chained})" if chained else "")
            )
            return report
        new, leftovers = vzdumpconf.remove_block(conf.text, added)
        _write_conf(conf, new)
        chained = _forget()
        exact = added is not None and conf.text.endswith(added.suffix)
        detail = f"unregistered: removed the pve-gpu-hook block from {shown}" + (
            "; the file is as it was before register" if exact else ""
        )
        Log("unregister", echo=False).file(detail)
        report.lines.append(detail)
        if leftovers:
            report.warnings.append(
                f"kept {len(leftovers)} line(s) someone added inside the pve-gpu-hook block: "
                + " | ".join(leftovers)
            )
        now = vzdumpconf.active_script(new)
        if now is not None and now.value == HOOK_PATH:
            report.warnings.append(
                f"{shown} line {now.line} still sets 'script: {HOOK_PATH}' "
                "(not added by register): left in place"
            )
        elif now is not None:
            report.lines.append(
                f"vzdump's hook script is '{now.value}' again (line {now.line})"
                + (" (it was chained)" if chained == now.value else "")
            )
        return report
    finally:
        lock.release()


def _forget() -> str | None:
    """Drop the chain and registration records; the chained path, if there was one."""
    chained = chain()
    _save_chain(None)
    _save_added(None)
    return chained
