"""Start the recorded guests again: read → plan (pure) → act → record, for the hook and ``recover``.

The caller holds the state store. Each start is confirmed before its record is dropped; a guest
that does not come back keeps its record, marked ``start-failed``, and is reported.
"""

from __future__ import annotations

import time

from pvegpuhook import act, runtime, timing
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import StateError
from pvegpuhook.inventory import Inventory, load_guest
from pvegpuhook.log import Log
from pvegpuhook.model import Guest, GuestKind, Holder, Need
from pvegpuhook.plan import RestartAction, RestartStep, Stop, plan_free, plan_restart, same_function
from pvegpuhook.records import Record, RecordStatus
from pvegpuhook.settings import Settings
from pvegpuhook.state import StateStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def first_conflict(
    guest: Guest, needs: list[Need], inventory: Inventory, holders: list[Holder]
) -> Stop | None:
    """A running guest that would keep ``guest`` (with these needs, if a VM) from starting now."""
    if guest.kind == GuestKind.QEMU:
        # the same rule as for a backup, mappings included
        plan = plan_free(guest, needs, holders, frozenset())
        if plan.refusal is not None:
            return Stop(plan.refusal.holder, plan.refusal.address)
        return plan.stops[0] if plan.stops else None
    claims = inventory.claims_of_stopped(guest)
    for holder in holders:
        for claim in claims:
            for held in holder.claims:
                if claim.conflicts_with(held):
                    return Stop(holder, held.address)
    return None


def survey(records: list[Record], inventory: Inventory, settings: Settings) -> list[RestartStep]:
    """Read what the restart decision needs, then plan it."""
    running = {r.vmid for r in records if runtime.running(r.kind, r.vmid)}
    orders: dict[int, int | None] = {}
    missing: set[int] = set()
    blocked: dict[int, str] = {}
    settling: set[int] = set()
    ranks: dict[int, int] = {}
    holders = None
    for record in records:
        guest = load_guest(record.vmid, record.kind)
        if _may_still_be_shutting_down(record, guest, running, settings):
            settling.add(record.vmid)
        if guest is None:
            missing.add(record.vmid)
            continue
        orders[record.vmid] = guest.startup_order
        needs, _ = inventory.needs(guest, for_start=True)
        ranks[record.vmid] = mapping_rank(record, needs)
        if record.vmid in running:
            continue
        if holders is None:
            holders = inventory.holders()
        conflict = first_conflict(guest, needs, inventory, holders)
        if conflict is not None:
            blocked[record.vmid] = f"{conflict.address} is held by {conflict.holder.guest.label}"
    return plan_restart(
        [r.vmid for r in records],
        running=running,
        orders=orders,
        missing=missing,
        blocked=blocked,
        settling=settling,
        ranks=ranks,
    )


def _may_still_be_shutting_down(
    record: Record, guest: Guest | None, running: set[int], settings: Settings
) -> bool:
    """A guest recorded before its shutdown that still runs, while that shutdown may still be
    under way (the run that started it was killed): as long as PVE may take for it."""
    if record.vmid not in running or record.status != RecordStatus.STOPPING:
        return False
    if record.since is None:
        return False
    timeout = timing.shutdown_timeout(guest.config if guest else None, settings.shutdown_timeout)
    return time.time() - record.since < timing.shutdown_wait(record.kind, timeout)


def mapping_rank(record: Record, needs: list[Need]) -> int:
    """0 for fixed devices; for a mapping, 1 + the index of the alternative the guest had."""
    rank = 0
    for need in needs:
        if len(need.alternatives) < 2:
            continue
        held = [
            i
            for i, alternative in enumerate(need.alternatives)
            if any(same_function(c.address, a) for c in alternative for a in record.addresses)
        ]
        rank = max(rank, 1 + (held[0] if held else len(need.alternatives)))
    return rank


class RestartReport:
    def __init__(self) -> None:
        self.started: list[Record] = []
        self.dropped: list[Record] = []
        self.kept: list[tuple[Record, str]] = []  # record, why it is still there

    @property
    def ok(self) -> bool:
        return not self.kept


def restart(
    store: StateStore,
    settings: Settings,
    log: Log,
    select: Callable[[Record], bool],
    *,
    dry_run: bool = False,
) -> RestartReport:
    """Start every selected recorded guest that is down and whose devices are free."""
    report = RestartReport()
    chosen = [r for r in store.records() if select(r)]
    if not chosen:
        return report
    by_vmid = {r.vmid: r for r in chosen}
    for step in survey(chosen, Inventory(), settings):
        record = by_vmid[step.vmid]
        if step.action == RestartAction.DROP:
            report.dropped.append(record)
            if not dry_run:
                log.file(f"{record.label} is running; record dropped")
                _forget(store, record, log)
        elif step.action in (RestartAction.BLOCKED, RestartAction.MISSING, RestartAction.WAIT):
            report.kept.append((record, step.reason))
            if not dry_run:
                log.say(f"{record.label} not started again: {step.reason}; record kept")
        elif dry_run:
            report.started.append(record)
        else:
            _start(store, settings, log, record, report)
    return report


def _start(
    store: StateStore, settings: Settings, log: Log, record: Record, report: RestartReport
) -> None:
    label = record.label
    for function, driver in sorted(record.drivers.items()):
        problem = act.rebind(function, driver)
        log.file(problem or f"{function} given back to {driver} for {label}")
        if problem:
            log.say(f"warning: {label}: {problem}; it may start without that device")
    guest = load_guest(record.vmid, record.kind)
    wait = timing.start_wait(record.kind, guest.config if guest else None, settings.start_timeout)
    outcome = act.start(record.kind, record.vmid, wait)
    if outcome.ok:
        crash_point("after-start")
        _note_start(store, record, log, ok=True)
        away = f"{duration(time.time() - record.since)} off" if record.since else "a while off"
        log.say(f"{label} started again after {away} (took {outcome.seconds:.0f} s)")
        report.started.append(record)
        _forget(store, record, log)
        return
    if outcome.left_running:
        # never killed: PVE's worker may still bring the guest up; the record stays until then
        log.file(outcome.detail)
        why = f"still starting after {outcome.seconds:.0f} s, longer than PVE allows for it"
        log.error(
            f"{label} {why}; it may still come up; record kept until it runs "
            "(the next phase or 'pve-gpu-hook recover' drops it then)"
        )
    elif outcome.seconds >= wait:
        why = f"was not running {wait} s after its start: {outcome.detail}"
        log.error(f"{label} {why}; record kept, run 'pve-gpu-hook recover'")
    else:
        why = f"did not start: {outcome.detail}"
        log.error(f"{label} {why}; record kept, run 'pve-gpu-hook recover'")
    report.kept.append((record, why))
    _note_start(store, record, log, ok=False)
    try:
        store.mark(record.vmid, RecordStatus.START_FAILED, outcome.detail)
    except StateError as error:  # the record itself is still there, marked or not
        log.file(f"cannot mark the record of {label}: {error}")


def _note_start(store: StateStore, record: Record, log: Log, *, ok: bool) -> None:
    """The job's tally; numbers only: a failure to write it never stops a restart."""
    try:
        store.note_start(record.vmid, time.time(), ok=ok)
    except StateError as error:
        log.file(f"cannot write the job's tally: {error}")


def _forget(store: StateStore, record: Record, log: Log) -> None:
    """Drop the record of a guest that runs again; if that cannot be written (a full disk),
    keep going: the record of a running guest is dropped by the next restart."""
    try:
        store.drop(record.vmid)
    except StateError as error:
        log.error(f"{record.label} runs, but its record stays: {error}")
