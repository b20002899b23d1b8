"""The file-system rules of our private files: atomic replacement, root-only directories, the lock.

Every file we own (state, registration, chain, metrics) is replaced atomically — a temp file in
the same directory, fsync, rename, fsync of the directory — so that a crash or a full disk leaves
the old file whole (the metrics file, a view of the others rewritten at every change, skips the
fsyncs: they would cost the hook more than the rest of the write). Private directories are 0700
and must be ours; private files are opened with ``O_NOFOLLOW`` and refused when someone else owns
them (records planted by another user must never start or stop a guest).
"""

from __future__ import annotations

import os
import time

from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import LockTimeout, NotPermitted, StateError


def write_atomic(
    path: str,
    data: bytes,
    *,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    sync: bool = True,
) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory.

    A full disk or any other failure leaves the old file as it was and no temp file behind.
    Without ``sync`` (a file that only shows what a synced one holds: the metrics) the two fsyncs
    are left out: readers still see the old file or the new one, never a part, but a host crash
    within the file system's commit interval (seconds) may bring back the old one.
    Raises OSError.
    """
    directory = os.path.dirname(path) or "."
    tmp = f"{_temp_prefix(path)}{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            if owner is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != owner:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after the chown, which clears setuid bits; not umask-dependent
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("state-rename")
        os.replace(tmp, path)  # replaces a name: never writes through a symlink
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync:
        sync_dir(directory)


def _temp_prefix(path: str) -> str:
    # never ends in the name's own suffix: a reader of "*.prom" or "*.json" never sees a temp file
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-")


def remove_own_temps(path: str) -> None:
    """Temp files a writer of ``path`` killed before its rename left; only those, so this is
    safe in a directory shared with others. Call only under the lock that serialises the writers.
    """
    prefix = _temp_prefix(path)
    directory, start = os.path.split(prefix)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(start):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> bool:
    """Unlink ``path`` and sync its directory; False when there was nothing to remove."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    sync_dir(os.path.dirname(path) or ".")
    return True


def untrusted_dir(path: str) -> str | None:
    """Why a private directory must not be used (a symlink, someone else's), or None.

    A directory that does not exist yet is fine: :func:`private_dir` creates it. Raises
    NotPermitted when it is root's and we are not root: not an attack, a run without the right
    to look (its answer must not be "nothing recorded").
    """
    import stat

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise NotPermitted(path) from None
    except OSError as error:
        return f"cannot use {path}: {error.strerror}"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory (a symlink?): refusing to use it"
    if info.st_uid != os.geteuid():
        if info.st_uid == 0:
            raise NotPermitted(path)
        return f"{path} is owned by uid {info.st_uid}, not by us: refusing to use it"
    return None


def private_dir(path: str) -> None:
    """Create the directory 0700 when missing; refuse a symlink or someone else's directory."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
    problem = untrusted_dir(path)
    if problem:
        raise StateError(problem)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


def read_private(path: str) -> bytes | None:
    """A private file's bytes; None when absent. StateError when it is not ours or unreadable,
    NotPermitted when this user may not read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        directory = os.path.dirname(path)
        raise NotPermitted(path if os.access(directory, os.X_OK) else directory) from None
    except OSError as error:
        raise StateError(f"cannot read {path}: {error.strerror}") from None
    import stat

    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise StateError(f"{path} is owned by uid {info.st_uid}, not by us: refusing it")
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{path} is not a regular file: refusing it")
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    except OSError as error:
        raise StateError(f"cannot read {path}: {error.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def remove_stale_temps(directory: str) -> None:
    """Temp files of writers killed before their rename; call only under the lock."""
    if untrusted_dir(directory):
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and ".tmp-" in name:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


class FileLock:
    """An exclusive ``flock`` with a deadline; the lock file says who holds it and why."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float, purpose: str) -> None:
        import fcntl

        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.geteuid() != 0 and os.stat(directory).st_uid == 0 and not os.path.lexists(self.path):
            raise NotPermitted(self.path)  # root's lock, made by another user, would lock root out
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except PermissionError:
            raise NotPermitted(self.path) from None
        except OSError as error:
            raise StateError(f"cannot open lock {self.path}: {error.strerror}") from None
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            raise StateError(f"lock {self.path} is owned by someone else: refusing it")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    raise LockTimeout(
                        f"another pve-gpu-hook run ({owner or 'unknown'}) still holds "
                        f"{self.path} after {timeout:g} s; {purpose} not done"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {purpose}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
