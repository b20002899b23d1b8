"""The state store: records of guests the hook stopped and must start again. The only writer.

``/var/lib/pve-gpu-hook/state.json`` survives a reboot. A record is written *before* its guest is
touched and dropped only once the guest is confirmed running again (or the admin says so).
Changes are named operations (:meth:`StateStore.add`, :meth:`~StateStore.mark`,
:meth:`~StateStore.drop`) made while the store is held (:meth:`StateStore.hold`): the file is read
once when the lock is taken, and every change is written at once, atomically (see
:mod:`pvegpuhook.files`). One record per line, so that a damaged file still yields every intact
record; a damaged file is kept aside, never discarded.
"""

from __future__ import annotations

import os
import time
from enum import StrEnum

from pvegpuhook import files, paths
from pvegpuhook.errors import StateError
from pvegpuhook.model import GuestKind, guest_label
from pvegpuhook.vmid import is_vmid

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FORMAT = 1


class RecordStatus(StrEnum):
    STOPPING = "stopping"  # written before the shutdown; the guest may be up or down
    STOPPED = "stopped"  # confirmed off, waiting to be started again
    STOP_FAILED = "stop-failed"  # the shutdown was tried and did not happen; the guest still runs
    START_FAILED = "start-failed"  # a start was tried and not confirmed


class Record:
    """One guest the hook stopped (or is stopping) and must start again."""

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
        kind: GuestKind,
        name: str | None,
        for_vmid: int | None,
        addresses: list[str],
        *,
        since: float | None = None,  # None: unknown (a damaged record)
        status: RecordStatus = RecordStatus.STOPPING,
        job: int | None = None,
        note: str | None = None,
        drivers: dict[str, str] | None = None,
    ) -> None:
        self.vmid = vmid
        self.kind = GuestKind(kind)
        self.name = name
        self.for_vmid = for_vmid
        self.addresses = addresses
        self.since = since
        self.status = RecordStatus(status)
        self.job = job
        self.note = note
        # a CT's GPU functions → their host driver when it was stopped: a VM's backup binds them
        # to vfio-pci and PVE never binds them back, so the CT would start without its GPU
        self.drivers = drivers or {}

    @property
    def label(self) -> str:
        return guest_label(self.kind, self.vmid, self.name)

    def to_dict(self) -> dict[str, object]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["kind"], data["status"] = str(self.kind), str(self.status)
        return data

    @classmethod
    def from_dict(cls, data: object) -> Record:
        if not isinstance(data, dict):
            raise ValueError("record is not an object")
        vmid, kind = data.get("vmid"), data.get("kind")
        if not is_vmid(vmid):
            raise ValueError(f"bad vmid {vmid!r}")
        assert isinstance(vmid, int)
        if kind not in tuple(GuestKind):
            raise ValueError(f"bad kind {kind!r}")
        for_vmid = data.get("for_vmid")
        since = data.get("since")
        try:
            since = float(since) if isinstance(since, (int, float)) else None
        except OverflowError:
            since = None
        addresses = data.get("addresses") or []
        status = data.get("status") or RecordStatus.STOPPED
        return cls(
            vmid,
            GuestKind(kind),
            str(data["name"]) if data.get("name") is not None else None,
            for_vmid if isinstance(for_vmid, int) else None,
            [str(a) for a in addresses] if isinstance(addresses, list) else [],
            since=since,
            # an unknown status (a newer release's) is treated as the safest one: still off
            status=RecordStatus(status) if status in tuple(RecordStatus) else RecordStatus.STOPPED,
            job=data.get("job") if isinstance(data.get("job"), int) else None,
            note=str(data["note"]) if data.get("note") is not None else None,
            drivers=_drivers(data.get("drivers")),
        )


def _drivers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


class StateStore:
    """The state file. Read it anywhere with :meth:`records`; change it only while held."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.dir = paths.host(paths.STATE_DIR)
        self.path = paths.host(paths.STATE_FILE)
        self._lock = files.FileLock(paths.host(paths.LOCK_FILE))
        self._records: list[Record] | None = None  # read once per lock hold
        self.salvaged: str | None = None  # set when the file was found damaged
        self._report = report  # told once, where a damaged file is found

    # ---- holding ------------------------------------------------------------------------------

    def acquire(self, timeout: float, purpose: str) -> None:
        """Take the lock; the file is read now, once, for every change made until release."""
        self._lock.acquire(timeout, purpose)
        try:
            files.remove_stale_temps(self.dir)
            self._records = self._read()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._records = None
        self._lock.release()

    def hold(self, timeout: float, purpose: str) -> _Held:
        """``with store.hold(timeout, purpose):`` — the lock for a series of changes."""
        return _Held(self, timeout, purpose)

    # ---- reading ------------------------------------------------------------------------------

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def records(self) -> list[Record]:
        """Every record. Held: as read at acquire plus the changes since. Not held: read now,
        and a damaged file is only reported (moving it aside needs the lock)."""
        if self._records is not None:
            return list(self._records)
        return self._read()

    def record(self, vmid: int) -> Record | None:
        return next((r for r in self.records() if r.vmid == vmid), None)

    def corrupt_files(self) -> list[str]:
        return paths.corrupt_state_files()

    def _read(self) -> list[Record]:
        problem = files.untrusted_dir(self.dir)
        if problem:
            raise StateError(problem)
        raw = files.read_private(self.path)
        if raw is None:
            return []
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
        if self._lock.held:
            stamp = f"{self.path}{paths.CORRUPT_MARK}{time.strftime('%Y%m%dT%H%M%S')}"
            aside, number = stamp, 1
            while os.path.lexists(aside):  # never overwrite an earlier kept copy
                number += 1
                aside = f"{stamp}.{number}"
            os.rename(self.path, aside)
            self.salvaged = f"{aside} ({reason}); {len(records)} intact record(s) kept"
            self._write(records)
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

    # ---- changes (held only) ------------------------------------------------------------------

    def add(self, record: Record) -> None:
        """Record a guest before it is touched (replacing an older record of it)."""
        records = [r for r in self._held() if r.vmid != record.vmid]
        self._commit([*records, record])

    def mark(self, vmid: int, status: RecordStatus, note: str | None = None) -> None:
        """Set a record's status (and note: what happened); a missing record is left missing."""
        records = self._held()
        for record in records:
            if record.vmid == vmid:
                record.status = status
                record.note = note[:500] if note else None
        self._commit(records)

    def drop(self, *vmids: int) -> None:
        """Forget guests that run again (or that the admin took over)."""
        self._commit([r for r in self._held() if r.vmid not in vmids])

    def _held(self) -> list[Record]:
        if self._records is None:
            raise StateError("internal error: state changed without the lock")
        return [*self._records]

    def _commit(self, records: list[Record]) -> None:
        self._write(records)
        self._records = records

    def _write(self, records: list[Record]) -> None:
        """Replace the file atomically; no record removes it (phases test its existence)."""
        try:
            files.private_dir(self.dir)
            if not records:
                files.remove(self.path)
                return
            import json

            lines = ",\n".join(json.dumps(r.to_dict(), sort_keys=False) for r in records)
            text = f'{{"format": {FORMAT}, "records": [\n{lines}\n]}}\n'
            files.write_atomic(self.path, text.encode("utf-8"))
        except OSError as error:
            raise StateError(f"cannot write {self.path}: {error.strerror}") from None


class _Held:
    __slots__ = ("store", "timeout", "purpose")

    def __init__(self, store: StateStore, timeout: float, purpose: str) -> None:
        self.store, self.timeout, self.purpose = store, timeout, purpose

    def __enter__(self) -> StateStore:
        self.store.acquire(self.timeout, self.purpose)
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.release()
