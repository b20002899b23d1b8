"""What the state files hold — records of guests to start again, the last job's tally — and
their formats. Pure: text in, objects out; :mod:`pvegpuhook.state` reads and writes the files.

State format 2 is JSON lines: a header line ``{"format": 2}``, then one line per record,
``{"crc": "<crc32 of the record>", "record": {...}}``. A damaged line (cut short, garbled, its
checksum wrong) loses that record only. Format 1 (one JSON object with a record list) is still
read.
"""

from __future__ import annotations

from enum import StrEnum

from pvegpuhook.model import GuestKind, guest_label
from pvegpuhook.vmid import is_vmid

FORMAT = 2


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
        "upid",
        "ha_state",
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
        upid: str | None = None,
        ha_state: str | None = None,
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
        # the GPU functions a CT or an mdev VM used through their host driver → that driver: a
        # VM's backup binds them to vfio-pci and PVE never binds them back, so the CT would start
        # without its GPU and the VM's mdev could not be created
        self.drivers = drivers or {}
        self.upid = upid  # the vzdump task that stopped it (docs/pve-facts.md §3)
        # its HA state before the hook took it out of HA's hands (None: not HA-managed); set
        # back when it is started again
        self.ha_state = ha_state

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
            upid=_text(data.get("upid")),
            ha_state=_text(data.get("ha_state")),
        )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _drivers(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


class Cycle:
    """One shutdown/boot cycle of a holder in a job: when it went down, for whom, and when (or
    whether) it came back."""

    __slots__ = ("vmid", "label", "for_vmid", "at", "back", "failed")

    def __init__(
        self,
        vmid: int,
        label: str,
        for_vmid: int | None,
        at: float,
        back: float | None = None,
        failed: bool = False,
    ) -> None:
        self.vmid, self.label, self.for_vmid = vmid, label, for_vmid
        self.at, self.back, self.failed = at, back, failed

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


class JobTally:
    """What one backup job did to holders: the night in numbers."""

    __slots__ = ("job", "upid", "started", "ended", "end_phase", "stops", "said")

    def __init__(self, job: str, upid: str | None, started: float) -> None:
        self.job = job  # the job's identity: its UPID when known, else the vzdump pid
        self.upid = upid
        self.started = started
        self.ended: float | None = None
        self.end_phase: str | None = None
        self.stops: list[Cycle] = []
        self.said: list[str] = []  # what the task log was told once for the whole job

    @property
    def holders_stopped(self) -> int:
        return len({s.vmid for s in self.stops})

    @property
    def cycles(self) -> int:
        """Shutdown/boot cycles: every shutdown, whether or not the boot after it worked."""
        return len(self.stops)

    @property
    def failed_restarts(self) -> int:
        return sum(1 for s in self.stops if s.failed)

    def downtime(self, now: float) -> float:
        """Seconds holders were down in this job (a holder still down counts until ``now``)."""
        return sum((s.back if s.back is not None else now) - s.at for s in self.stops)

    def to_dict(self) -> dict[str, object]:
        data = {name: getattr(self, name) for name in self.__slots__}
        data["stops"] = [s.to_dict() for s in self.stops]
        return {"format": 1, **data}

    @classmethod
    def from_dict(cls, data: object) -> JobTally:
        if not isinstance(data, dict) or data.get("format") != 1:
            raise ValueError("not a job tally of format 1")
        tally = cls(str(data["job"]), _text(data.get("upid")), float(data["started"]))
        ended = data.get("ended")
        tally.ended = float(ended) if isinstance(ended, (int, float)) else None
        tally.end_phase = _text(data.get("end_phase"))
        said = data.get("said")
        tally.said = [str(s) for s in said] if isinstance(said, list) else []
        for item in data.get("stops") or []:
            vmid = int(item["vmid"])
            tally.stops.append(
                Cycle(
                    vmid,
                    str(item.get("label") or f"guest {vmid}"),
                    item.get("for_vmid") if isinstance(item.get("for_vmid"), int) else None,
                    float(item["at"]),
                    float(item["back"]) if isinstance(item.get("back"), (int, float)) else None,
                    bool(item.get("failed")),
                )
            )
        return tally

    def summary(self, now: float) -> str:
        """The night in one line, for the job-end part of the task log and the notification."""
        if not self.stops:
            return "this job stopped no guest"
        by_guest: dict[int, list[Cycle]] = {}
        for cycle in self.stops:
            by_guest.setdefault(cycle.vmid, []).append(cycle)
        parts = []
        for cycles in by_guest.values():
            down = sum((c.back if c.back is not None else now) - c.at for c in cycles)
            needers = ", ".join(str(c.for_vmid) for c in cycles if c.for_vmid is not None)
            times = "once" if len(cycles) == 1 else f"{len(cycles)} times"
            state = " (not started again)" if cycles[-1].back is None else ""
            parts.append(
                f"{cycles[0].label} shut down {times} for {needers}, down {duration(down)}{state}"
            )
        return (
            f"this job: {self.holders_stopped} guest(s) shut down to free a GPU, "
            f"{self.cycles} shutdown/boot cycle(s), {duration(self.downtime(now))} down in all, "
            f"{self.failed_restarts} failed restart(s): " + "; ".join(parts)
        )


def duration(seconds: float) -> str:
    """A measured duration as people read it: 3.2 s, 45 s, 14 min, 2.5 h."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---- the file format ----------------------------------------------------------------------------


def _checksum(payload: str) -> str:
    import zlib

    return f"{zlib.crc32(payload.encode('utf-8', 'surrogatepass')):08x}"


def record_line(record: Record) -> str:
    import json

    payload = json.dumps(record.to_dict(), sort_keys=True, separators=(",", ":"))
    return f'{{"crc": "{_checksum(payload)}", "record": {payload}}}'


class ParsedState:
    """What a state file holds: its intact records, its format, and what was damaged."""

    __slots__ = ("records", "version", "damage")

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.version: int | None = None
        self.damage: list[str] = []  # one entry per damaged part: "line 3: checksum mismatch"


PARSE_ERRORS = (ValueError, KeyError, TypeError, OverflowError, RecursionError)


def parse_state(raw: bytes) -> ParsedState:
    """Parse a state file of format 1 or 2; a damaged part loses only what it holds."""
    import json

    parsed = ParsedState()
    text = raw.decode("utf-8", "replace")
    try:
        whole = json.loads(text)
    except PARSE_ERRORS:
        whole = None
    if isinstance(whole, dict) and "records" in whole:  # format 1, intact
        version = whole.get("format", 1)
        parsed.version = version if isinstance(version, int) else 1
        if parsed.version > FORMAT or not isinstance(whole["records"], list):
            if not isinstance(whole["records"], list):
                parsed.damage.append("no record list")
            return parsed
        for index, item in enumerate(whole["records"], start=1):
            try:
                parsed.records.append(Record.from_dict(item))
            except PARSE_ERRORS as error:
                parsed.damage.append(f"record {index}: {error}")
        return parsed
    lines = text.split("\n")
    header = _json_line(lines[0])
    if isinstance(header, dict) and isinstance(header.get("format"), int):
        parsed.version = header["format"]
        if parsed.version > FORMAT:
            return parsed
    elif lines[0].startswith('{"format": 1, "records": ['):
        parsed.version = 1  # a format-1 file cut short: its records are one per line
    else:
        parsed.damage.append(f"line 1: no format header ({_excerpt(lines[0])})")
    for number, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if not line or line in ("]}", "]"):
            continue
        if parsed.version == 1:
            problem = _format1_line(line.rstrip(","), parsed.records)
        else:
            problem = _format2_line(line, parsed.records)
        if problem:
            parsed.damage.append(f"line {number}: {problem}")
    if not text.endswith("\n"):
        parsed.damage.append("the file ends in the middle of a line")
    if parsed.version == 1 and not text.rstrip().endswith("]}"):
        parsed.damage.append("the record list is cut short")
    return parsed


def _json_line(line: str) -> object:
    import json

    try:
        return json.loads(line)
    except PARSE_ERRORS:
        return None


def _excerpt(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _format1_line(line: str, records: list[Record]) -> str | None:
    data = _json_line(line)
    if data is None:
        return f"not a record ({_excerpt(line)})"
    try:
        records.append(Record.from_dict(data))
    except PARSE_ERRORS as error:
        return str(error) or type(error).__name__
    return None


def _format2_line(line: str, records: list[Record]) -> str | None:
    import json

    data = _json_line(line)
    if not isinstance(data, dict) or not isinstance(data.get("record"), dict):
        return f"not a record ({_excerpt(line)})"
    try:
        payload = json.dumps(data["record"], sort_keys=True, separators=(",", ":"))
    except PARSE_ERRORS as error:
        return str(error)
    if data.get("crc") != _checksum(payload):
        return "checksum mismatch"
    try:
        records.append(Record.from_dict(data["record"]))
    except PARSE_ERRORS as error:
        return str(error) or type(error).__name__
    return None
