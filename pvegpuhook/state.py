"""The state store: records of guests the hook stopped and must start again. The only writer.

``/var/lib/pve-gpu-hook/state.json`` survives a reboot. A record is written *before* its guest is
touched and dropped only once the guest is confirmed running again (or the admin says so).
Changes are named operations (:meth:`StateStore.add`, :meth:`~StateStore.mark`,
:meth:`~StateStore.drop`) made while the store is held (:meth:`StateStore.hold`): the file is read
once when the lock is taken, and every change is written at once, atomically (see
:mod:`pvegpuhook.files`).

The file holds one record per line (:mod:`pvegpuhook.records`): a damaged line loses that
record only, every intact line is still read, and a damaged file is kept aside, never discarded.
A format-1 file of an older release is read; the next change writes format 2.

``job.json`` beside it is the tally of the last job that acted (:class:`JobTally`): who was
stopped and started when, for the job-end summary, ``status`` and the metrics. It holds numbers,
not guests to start: a damaged tally is replaced, never salvaged.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import files, paths
from pvegpuhook.errors import StateError
from pvegpuhook.records import (
    FORMAT,
    PARSE_ERRORS,
    Cycle,
    JobTally,
    ParsedState,
    Record,
    RecordStatus,
    parse_state,
    record_line,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class StateStore:
    """The state file. Read it anywhere with :meth:`records`; change it only while held."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.dir = paths.host(paths.STATE_DIR)
        self.path = paths.host(paths.STATE_FILE)
        self._lock = files.FileLock(paths.host(paths.LOCK_FILE))
        self._records: list[Record] | None = None  # read once per lock hold
        self.salvaged: str | None = None  # set when the file was found damaged
        self._report = report  # told once, where a damaged file is found
        self._reported: set[str] = set()  # a file read again says the same: said once

    # ---- holding ------------------------------------------------------------------------------

    def acquire(self, timeout: float, purpose: str) -> None:
        """Take the lock; the file is read now, once, for every change made until release."""
        problem = files.untrusted_dir(self.dir)  # first: another user must not make root's lock
        if problem:
            raise StateError(problem)
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

    def job(self) -> JobTally | None:
        """The tally of the last job that stopped or started a guest; None when there is none
        (or it cannot be read: it holds numbers only, and is replaced at the next change)."""
        import json

        try:
            raw = files.read_private(paths.host(paths.JOB_FILE))
            return JobTally.from_dict(json.loads(raw)) if raw is not None else None
        except (StateError, *PARSE_ERRORS):
            return None

    def _read(self) -> list[Record]:
        problem = files.untrusted_dir(self.dir)
        if problem:
            raise StateError(problem)
        raw = files.read_private(self.path)
        if raw is None:
            return []
        parsed = parse_state(raw)
        if parsed.version is not None and parsed.version > FORMAT:
            # whatever its layout, a newer release's file is not ours to judge or rewrite
            raise StateError(
                f"{self.path} has format {parsed.version}, newer than this pve-gpu-hook "
                f"understands ({FORMAT}); upgrade pve-gpu-hook"
            )
        if parsed.damage:
            self._salvage(parsed)
        return parsed.records

    def _salvage(self, parsed: ParsedState) -> None:
        """Keep a damaged file aside (under the lock) and its intact records in a clean one."""
        reason = "; ".join(parsed.damage[:3]) + (" ..." if len(parsed.damage) > 3 else "")
        count = len(parsed.records)
        if self._lock.held:
            stamp = f"{self.path}{paths.CORRUPT_MARK}{time.strftime('%Y%m%dT%H%M%S')}"
            aside, number = stamp, 1
            while os.path.lexists(aside):  # never overwrite an earlier kept copy
                number += 1
                aside = f"{stamp}.{number}"
            try:
                os.rename(self.path, aside)
            except OSError as error:
                raise StateError(
                    f"the state file {self.path} is corrupt ({reason}), and it cannot be kept "
                    f"aside: {error.strerror}"
                ) from None
            self.salvaged = f"{aside} ({reason}); {count} intact record(s) kept"
            self._write(parsed.records)
            message = (
                f"the state file was corrupt ({reason}): kept aside as {aside}; "
                f"{count} intact record(s) kept; guests it named may still be off, "
                "see 'pve-gpu-hook status'"
            )
        else:
            self.salvaged = f"{self.path} is corrupt ({reason})"
            message = (
                f"the state file {self.path} is corrupt ({reason}); {count} intact record(s) read"
            )
        if self._report is not None and message not in self._reported:
            self._reported.add(message)
            self._report(message)

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

    def note_stop(self, job: str, upid: str | None, record: Record, at: float) -> None:
        """A holder was shut down in job ``job`` (a new job starts a new tally)."""
        tally = self.job()
        if tally is None or tally.job != job:
            tally = JobTally(job, upid, at)
        tally.stops.append(Cycle(record.vmid, record.label, record.for_vmid, at))
        self._write_job(tally)

    def say_once(self, job: str, upid: str | None, text: str, at: float) -> bool:
        """Whether ``text`` is new to job ``job``'s task log (then it is noted as said)."""
        tally = self.job()
        if tally is None or tally.job != job:
            tally = JobTally(job, upid, at)
        if text in tally.said:
            return False
        tally.said.append(text)
        self._write_job(tally)
        return True

    def note_start(self, vmid: int, at: float, *, ok: bool) -> None:
        """A recorded guest was started again (``ok``) or its start failed."""
        tally = self.job()
        open_stops = [s for s in tally.stops if s.vmid == vmid and s.back is None] if tally else []
        if tally is None or not open_stops:
            return  # stopped by an earlier job: that night's numbers are closed
        stop = open_stops[-1]
        if ok:
            stop.back, stop.failed = at, False
        else:
            stop.failed = True
        self._write_job(tally)

    def end_job(self, job: str, phase: str, at: float) -> JobTally | None:
        """The job ``job`` ended: its tally (None when it stopped nobody)."""
        tally = self.job()
        if tally is None or tally.job != job:
            return None
        tally.ended, tally.end_phase = at, phase
        self._write_job(tally)
        return tally

    def _write_job(self, tally: JobTally) -> None:
        if self._records is None:
            raise StateError("internal error: state changed without the lock")
        import json

        path = paths.host(paths.JOB_FILE)
        try:
            files.private_dir(self.dir)
            files.write_atomic(path, (json.dumps(tally.to_dict()) + "\n").encode("utf-8"))
        except OSError as error:
            raise StateError(f"cannot write {path}: {error.strerror}") from None

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
            lines = [f'{{"format": {FORMAT}}}', *(record_line(r) for r in records)]
            files.write_atomic(self.path, ("\n".join(lines) + "\n").encode("utf-8"))
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
