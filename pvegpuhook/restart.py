"""Start the recorded guests again: read → plan (pure) → act → record, for the hook and ``recover``.

The caller holds the state store. Each start is confirmed before its record is dropped; a guest
that does not come back keeps its record, marked ``start-failed``, and is reported. A guest whose
shutdown request timed out may still power off later (docs/pve-facts.md §8): while that can
happen its record stays and it is watched, never forgotten.
"""

from __future__ import annotations

import time

from pvegpuhook import act, metrics, runtime, timing
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import StateError
from pvegpuhook.inventory import Inventory, config_path, load_guest
from pvegpuhook.log import Log
from pvegpuhook.model import RESERVED, Claim, ClaimKind, Guest, GuestKind, Holder, Need
from pvegpuhook.plan import (
    RestartAction,
    RestartStep,
    Stop,
    hold_back,
    plan_free,
    plan_restart,
    restart_order,
    same_function,
)
from pvegpuhook.pveconf import guest_node, node_name, parse_guest_config
from pvegpuhook.records import Record, RecordStatus, duration
from pvegpuhook.settings import Settings
from pvegpuhook.state import StateStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def watch_window(settings: Settings) -> float:
    """Seconds after a record's ``since`` during which its guest, whose shutdown timed out, may
    still go down by itself and is watched (``shutdown_watch``; docs/pve-facts.md §8)."""
    return float(settings.shutdown_watch)


def first_conflict(
    guest: Guest,
    needs: list[Need],
    inventory: Inventory,
    holders: list[Holder],
    recorded: list[str],
) -> Stop | None:
    """A running guest that would keep ``guest`` (with these needs, if a VM) from starting now.

    For a CT, also the addresses its record names: once a VM's start bound its GPU to vfio-pci,
    the CT's device nodes no longer lead to that GPU, but the CT still needs it.
    """
    if guest.kind == GuestKind.QEMU:
        # the same rule as for a backup, mappings included
        plan = plan_free(guest, needs, holders, frozenset())
        if plan.refusal is not None:
            return Stop(plan.refusal.holder, plan.refusal.address)
        return plan.stops[0] if plan.stops else None
    claims = inventory.claims_of_stopped(guest) + [
        Claim(a, inventory.sysfs.units(a), ClaimKind.SHARED, "record") for a in recorded
    ]
    for holder in holders:
        for claim in claims:
            for held in holder.claims:
                if claim.conflicts_with(held):
                    return Stop(holder, held.address)
    return None


def record_holder(record: Record, inventory: Inventory) -> Holder:
    """A stopped holder as it will be when started again: holding the units it held (a VM
    reserving them, as PVE does at its start)."""
    guest = load_guest(record.vmid, record.kind) or Guest(
        record.vmid, record.kind, parse_guest_config("", config_path(record.kind, record.vmid))
    )
    if record.kind == GuestKind.QEMU:
        kind, source = ClaimKind.EXCLUSIVE, RESERVED
    else:
        kind, source = ClaimKind.SHARED, "record"
    claims = [Claim(a, inventory.sysfs.units(a), kind, source) for a in record.addresses]
    holder = Holder(guest, claims)
    if record.kind == GuestKind.QEMU:
        # a mapping chooses again at the start: what it needs, not only what it had
        holder.restart_needs = inventory.needs(guest, for_start=True)[0]
    return holder


def survey(
    records: list[Record],
    inventory: Inventory,
    settings: Settings,
    waiting: list[Record] | None = None,
) -> list[RestartStep]:
    """Read what the restart decision needs, then plan it. ``waiting``: other recorded guests,
    not started now: a guest whose start would take what one of them needs waits for it."""
    running = {r.vmid for r in records if runtime.running(r.kind, r.vmid)}
    orders: dict[int, int | None] = {}
    missing: set[int] = set()
    moved: dict[int, str] = {}
    blocked: dict[int, str] = {}
    now = time.time()
    settling: dict[int, str] = {}
    for r in records:
        if r.vmid not in running or r.since is None:
            continue
        if r.status == RecordStatus.STOP_FAILED and now - r.since < watch_window(settings):
            until = time.strftime("%H:%M", time.localtime(r.since + watch_window(settings)))
            settling[r.vmid] = (
                "its shutdown timed out, but the request may still take effect; "
                f"watched until {until}"
            )
    ranks: dict[int, int] = {}
    holders = None
    startable: dict[int, Record] = {}
    after: dict[int, str] = {}
    here = None
    for record in records:
        guest = load_guest(record.vmid, record.kind)
        if _may_still_be_shutting_down(record, guest, running, settings):
            settling[record.vmid] = "its interrupted shutdown may still be under way"
        if guest is None:
            node = guest_node(record.vmid)
            here = here or node_name()
            if node is not None and node != here:
                moved[record.vmid] = node
            else:
                missing.add(record.vmid)
            continue
        orders[record.vmid] = guest.startup_order
        needs, _ = inventory.needs(guest, for_start=True)
        ranks[record.vmid] = mapping_rank(record, needs)
        if record.vmid in running:
            continue
        if holders is None:
            holders = inventory.holders()
        conflict = first_conflict(guest, needs, inventory, holders, record.addresses)
        if conflict is not None:
            starting = " (starting)" if conflict.holder.starting else ""
            blocked[record.vmid] = (
                f"{conflict.address} is held by {conflict.holder.guest.label}{starting}"
            )
        else:
            startable[record.vmid] = record
    down = [r for r in waiting or [] if not runtime.running(r.kind, r.vmid)]
    if startable and down:
        order = sorted(startable, key=lambda v: restart_order(v, orders, ranks))
        starting = [record_holder(startable[v], inventory) for v in order]
        others = [record_holder(r, inventory) for r in down]
        after = hold_back(starting, holders or [], others)
    return plan_restart(
        [r.vmid for r in records],
        running=running,
        orders=orders,
        missing=missing,
        moved=moved,
        blocked=blocked,
        settling=settling,
        ranks=ranks,
        after=after,
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
        # running, but its shutdown may still take effect: record, why it is watched
        self.watching: list[tuple[Record, str]] = []

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
    records = store.records()
    chosen = [r for r in records if select(r)]
    if not chosen:
        return report
    by_vmid = {r.vmid: r for r in chosen}
    # guests still to be started later; one whose start failed waits for the admin, not for us
    waiting = [
        r for r in records if r.vmid not in by_vmid and r.status != RecordStatus.START_FAILED
    ]
    for step in survey(chosen, Inventory(), settings, waiting):
        record = by_vmid[step.vmid]
        if step.action == RestartAction.DROP:
            report.dropped.append(record)
            if not dry_run:
                log.file(f"{record.label} is running; record dropped")
                _give_back_to_ha(record, log)
                _forget(store, record, log)
        elif step.action == RestartAction.MOVED:
            report.dropped.append(record)
            if not dry_run:
                log.say(f"{record.label} {step.reason}; record dropped")
                _forget(store, record, log)
        elif step.action == RestartAction.WAIT and record.status == RecordStatus.STOP_FAILED:
            report.watching.append((record, step.reason))
            if not dry_run:
                log.file(f"{record.label} not started again: {step.reason}; record kept")
        elif step.action == RestartAction.AFTER:
            report.kept.append((record, step.reason))
            if not dry_run:
                log.say(f"{record.label} stays down: {step.reason}")
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
    if record.ha_state is not None:
        outcome = act.start_through_ha(record.kind, record.vmid, record.ha_state, wait)
        how = f" (HA resource {act.ha_sid(record.kind, record.vmid)}: {record.ha_state} again)"
    else:
        outcome = act.start(record.kind, record.vmid, wait)
        how = ""
    if outcome.ok:
        crash_point("after-start")
        _note_start(store, record, log, ok=True)
        away = f"{duration(time.time() - record.since)} off" if record.since else "a while off"
        where = f"; {outcome.detail}" if outcome.detail else ""
        took = duration(outcome.seconds)
        log.say(f"{label} started again{how} after {away} (took {took}){where}")
        report.started.append(record)
        _forget(store, record, log)
        return
    if outcome.left_running:
        # never killed: PVE's worker may still bring the guest up; the record stays until then
        log.file(outcome.detail)
        why = f"still starting after {duration(outcome.seconds)}, longer than PVE allows for it"
        log.error(
            f"{label} {why}; it may still come up; record kept until it runs "
            "(the next phase or 'pve-gpu-hook recover' drops it then)"
        )
    elif record.status == RecordStatus.START_FAILED and record.note == outcome.detail[:500]:
        why = f"did not start ({outcome.detail}, after {duration(outcome.seconds)})"
        log.file(f"{label} {why}; as before")  # said once already; the job's summary has it
    else:
        if outcome.seconds >= wait:
            why = f"was not running {duration(outcome.seconds)} after its start: {outcome.detail}"
        else:
            why = f"did not start ({outcome.detail}, after {duration(outcome.seconds)})"
        log.error(f"{label} {why}; record kept, run 'pve-gpu-hook recover'")
    report.kept.append((record, why))
    _note_start(store, record, log, ok=False)
    try:
        store.mark(record.vmid, RecordStatus.START_FAILED, outcome.detail)
    except StateError as error:  # the record itself is still there, marked or not
        log.file(f"cannot mark the record of {label}: {error}")


def _give_back_to_ha(record: Record, log: Log) -> None:
    """A guest taken out of HA's hands for its shutdown runs again (or never went down): HA
    manages it again, in the state it had."""
    if record.ha_state is None:
        return
    outcome = act.ha_set(record.kind, record.vmid, record.ha_state)
    if outcome.ok:
        log.say(f"{record.label} is managed by HA again (state {record.ha_state})")
    else:
        log.error(
            f"{record.label}: cannot set its HA state back to {record.ha_state}: "
            f"{outcome.detail}; run 'ha-manager set {act.ha_sid(record.kind, record.vmid)} "
            f"--state {record.ha_state}'"
        )


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


WATCH_POLL = 2.0


def watch_detached(records: list[Record], settings: Settings) -> tuple[float, str | None]:
    """Watch guests whose shutdown timed out after the caller is gone: a detached
    ``pve-gpu-hook recover --watch`` that lasts until the last of their windows ends, and
    starts each one that powers off (nobody else would before the next job).

    When the watch ends (seconds since the epoch), and None or why it could not start."""
    import sys

    now = time.time()
    until = max((r.since or now) + watch_window(settings) for r in records)
    seconds = max(1, int(until - now))
    problem = act.spawn_detached(
        [sys.executable, "-m", "pvegpuhook", "recover", "--watch", str(seconds)]
    )
    return until, problem


def watch(store: StateStore, settings: Settings, log: Log, seconds: float) -> RestartReport:
    """Watch the guests whose shutdown timed out for ``seconds``: start each one that powers
    off, and drop the record of each one still running when its window ends. The lock is held
    only while acting, so jobs and ``recover`` are not kept waiting."""
    deadline = time.monotonic() + seconds
    final = RestartReport()

    def watched(record: Record) -> bool:
        return record.status == RecordStatus.STOP_FAILED

    while True:
        pending = [r for r in store.records() if watched(r)]
        if not pending:
            return final
        down = [r for r in pending if not runtime.running(r.kind, r.vmid)]
        expired = [
            r for r in pending if r.since is None or time.time() - r.since >= watch_window(settings)
        ]
        # the watch ends when its time is up, but never inside a record's window: started
        # before it ends (the job-end rounds its seconds down), it would keep that record
        waiting = [r for r in pending if r not in expired]
        ending = time.monotonic() >= deadline and not waiting
        if down or expired or ending:
            acting = {r.vmid for r in (down + expired)}

            def select(record: Record, acting: set[int] = acting, ending: bool = ending) -> bool:
                return watched(record) and (ending or record.vmid in acting)

            with store.hold(timing.lock_wait(settings), "recover --watch"):
                report = restart(store, settings, log, select)
                metrics.update(log, store, settings)
            final.started += report.started
            final.dropped += report.dropped
            final.kept += report.kept
            if ending:
                final.watching = report.watching
                return final
        time.sleep(WATCH_POLL)
