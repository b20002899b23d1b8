"""The only writer of state: records of guests the hook stopped and must start again.

``/var/lib/pve-gpu-hook/state.json`` survives a reboot. It is replaced atomically (temp file,
fsync, rename, fsync of the directory) while the caller holds an exclusive ``flock`` on
``/run/lock/pve-gpu-hook.lock``. A record is written *before* its guest is touched and dropped only
once the guest is confirmed running again (or the admin says so). One record per line, so that a
damaged file still yields every intact record; a corrupt file is kept aside, never discarded.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import paths
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import LockTimeout, StateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FORMAT = 1
CORRUPT_MARK = ".corrupt-"

STOPPING = "stopping"  # written before the shutdown; the guest may be up or down
STOPPED = "stopped"  # confirmed off, waiting to be started again
STOP_FAILED = "stop-failed"  # the shutdown was tried and did not happen; the guest still runs
START_FAILED = "start-failed"  # a start was tried and not confirmed


class Record:
    __slots__ = (
        "vmid",
        "kind",
        "name",
        "for_vmid",
        "since",
        "addresses",
        "status",
        "job",
        "note",
        "drivers",
    )

    def __init__(
        self,
        vmid: int,
        kind: str,
        name: str | None,
        for_vmid: int | None,
        addresses: list[str],
        *,
        since: float | None = None,  # None: unknown (a damaged record)
        status: str = STOPPING,
        job: int | None = None,
        note: str | None = None,
        drivers: dict[str, str] | None = None,
    ) -> None:
        self.vmid = vmid
        self.kind = kind
        self.name = name
        self.for_vmid = for_vmid
        self.addresses = addresses
        self.since = since
        self.status = status
        self.job = job
        self.note = note
        # a CT's GPU functions → their host driver when it was stopped: a VM's backup binds them
        # to vfio-pci and PVE never binds them back, so the CT would start without its GPU
        self.drivers = drivers or {}

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, data: object) -> Record:
        if not isinstance(data, dict):
            raise ValueError("record is not an object")
        vmid, kind = data.get("vmid"), data.get("kind")
        if not isinstance(vmid, int) or isinstance(vmid, bool) or not 100 <= vmid <= 999999999:
            raise ValueError(f"bad vmid {vmid!r}")
        if kind not in ("qemu", "lxc"):
            raise ValueError(f"bad kind {kind!r}")
        for_vmid = data.get("for_vmid")
        since = data.get("since")
        try:
            since = float(since) if isinstance(since, (int, float)) else None
        except OverflowError:
            since = None
        addresses = data.get("addresses") or []
        return cls(
            vmid,
            str(kind),
            str(data["name"]) if data.get("name") is not None else None,
            for_vmid if isinstance(for_vmid, int) else None,
            [str(a) for a in addresses] if isinstance(addresses, list) else [],
            since=since,
            status=str(data.get("status") or STOPPED),
            job=data.get("job") if isinstance(data.get("job"), int) else None,
            note=str(data["note"]) if data.get("note") is not None else None,
            drivers=_drivers(data.get("drivers")),
        )


def _drivers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def check_private_dir(path: str) -> None:
    """Create the directory 0700; refuse a symlink or a directory owned by someone else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
        info = os.lstat(path)
    import stat

    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StateError(f"{path} is not a directory (a symlink?): refusing to use it")
    if info.st_uid != os.geteuid():
        raise StateError(f"{path} is owned by uid {info.st_uid}, not by us: refusing to use it")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def write_atomic(
    path: str, data: bytes, *, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory.

    A full disk or any other failure leaves the old file as it was and no temp file behind.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
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
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateStore:
    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.dir = paths.host(paths.STATE_DIR)
        self.path = paths.host(paths.STATE_FILE)
        self.lock_path = paths.host(paths.LOCK_FILE)
        self._lock_fd: int | None = None
        self.salvaged: str | None = None  # set when load() found the file corrupt
        self._report = report  # told once, where a corrupt file is found

    # Locking

    def acquire(self, timeout: float, purpose: str) -> None:
        import fcntl

        directory = os.path.dirname(self.lock_path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except OSError as error:
            raise StateError(f"cannot open lock {self.lock_path}: {error.strerror}") from None
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            raise StateError(f"lock {self.lock_path} is owned by someone else: refusing it")
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
                        f"{self.lock_path} after {timeout:g} s; {purpose} not done"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {purpose}\n".encode(), 0)
        self._lock_fd = fd
        self._remove_stale_temp_files()

    def _untrusted_dir(self) -> str | None:
        """Why the state directory must not be used (a symlink, someone else's), or None."""
        import stat

        try:
            info = os.lstat(self.dir)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            return f"{self.dir} is not a directory (a symlink?): refusing to use it"
        if info.st_uid != os.geteuid():
            return f"{self.dir} is owned by uid {info.st_uid}, not by us: refusing to use it"
        return None

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writers killed before their rename; under the lock none is in use."""
        if self._untrusted_dir():
            return
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and ".tmp-" in name:
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # Reading

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> list[Record]:
        """Every record. A corrupt file is renamed aside (under the lock only) and its intact
        records are returned, so that no guest that must be restarted is forgotten."""
        problem = self._untrusted_dir()
        if problem:
            raise StateError(problem)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        except OSError as error:
            raise StateError(f"cannot read {self.path}: {error.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            owner = os.fstat(f.fileno()).st_uid
            if owner != os.geteuid():  # records planted by someone else must not start guests
                raise StateError(f"{self.path} is owned by uid {owner}, not by us: refusing it")
            raw = f.read()
        import json

        try:
            data = json.loads(raw.decode("utf-8"))
            version = data.get("format", 1) if isinstance(data, dict) else 1
            if isinstance(version, int) and version > FORMAT:
                # whatever its layout, a newer release's file is not ours to judge or rewrite
                raise StateError(
                    f"{self.path} has format {version}, newer than this pve-gpu-hook "
                    f"understands ({FORMAT}); upgrade pve-gpu-hook"
                )
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise ValueError("no record list")
            return [Record.from_dict(item) for item in data["records"]]
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
            return self._salvage(raw, str(error) or type(error).__name__)

    def _salvage(self, raw: bytes, reason: str) -> list[Record]:
        import json

        records: list[Record] = []
        for line in raw.decode("utf-8", "replace").splitlines():
            line = line.strip().rstrip(",")
            if not line.startswith('{"vmid"'):
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
                continue
        if self._lock_fd is not None:
            stamp = f"{self.path}{CORRUPT_MARK}{time.strftime('%Y%m%dT%H%M%S')}"
            aside, number = stamp, 1
            while os.path.lexists(aside):  # never overwrite an earlier kept copy
                number += 1
                aside = f"{stamp}.{number}"
            os.rename(self.path, aside)
            self.salvaged = f"{aside} ({reason}); {len(records)} intact record(s) kept"
            self.save(records)
            message = (
                f"the state file was corrupt ({reason}): kept aside as {aside}; "
                f"{len(records)} intact record(s) kept; guests it named may still be off, "
                "see 'pve-gpu-hook status'"
            )
        else:
            self.salvaged = f"{self.path} is corrupt ({reason})"
            message = (
                f"the state file {self.path} is corrupt ({reason}); "
                f"{len(records)} intact record(s) read"
            )
        if self._report is not None:
            self._report(message)
        return records

    def corrupt_files(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return sorted(os.path.join(self.dir, n) for n in names if CORRUPT_MARK in n)

    # Writing

    def save(self, records: list[Record]) -> None:
        """Replace the state atomically; an empty state removes the file."""
        if self._lock_fd is None:
            raise StateError("internal error: state written without the lock")
        check_private_dir(self.dir)
        if not records:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                return
            self._sync_dir()
            return
        import json

        lines = ",\n".join(json.dumps(r.to_dict(), sort_keys=False) for r in records)
        text = f'{{"format": {FORMAT}, "records": [\n{lines}\n]}}\n'
        self._write_atomic(self.path, text.encode("utf-8"))

    def _write_atomic(self, path: str, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as error:
            raise StateError(f"cannot write {path}: {error.strerror}") from None

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # The chained previous hook (set by `pve-gpu-hook register --chain`)

    def chain(self) -> str | None:
        try:
            # a path is bytes: whatever vzdump.conf held comes back unchanged
            with open(
                paths.host(paths.CHAIN_FILE), encoding="utf-8", errors="surrogateescape"
            ) as f:
                value = f.read().strip()
        except OSError:
            return None
        return value or None

    def set_chain(self, script: str | None) -> None:
        if self._lock_fd is None:
            raise StateError("internal error: state written without the lock")
        check_private_dir(self.dir)
        path = paths.host(paths.CHAIN_FILE)
        if script is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        self._write_atomic(path, (script + "\n").encode("utf-8", "surrogateescape"))
