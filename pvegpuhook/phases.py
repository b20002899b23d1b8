"""The hook's phases that act: read → decide (:mod:`pvegpuhook.plan`) → act → record.

Imported by :mod:`pvegpuhook.hook` only when a phase has work to do.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import act, metrics, paths, runtime, timing, vzdumpjob
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import ConfigError, StateError
from pvegpuhook.inventory import Inventory, load_guest, local_vmids
from pvegpuhook.log import Log
from pvegpuhook.model import (
    MDEV_UNAVAILABLE,
    ClaimKind,
    Guest,
    GuestKind,
    Holder,
    JobOrder,
    Need,
)
from pvegpuhook.plan import (
    BackupDecision,
    Verdict,
    decide_backup,
    keep_down_through,
    keep_down_until,
    same_function,
)
from pvegpuhook.pveconf import parse_guest_config
from pvegpuhook.records import Record, RecordStatus, duration
from pvegpuhook.restart import record_holder, restart, watch_detached
from pvegpuhook.settings import Settings, load_settings
from pvegpuhook.state import StateStore
from pvegpuhook.vzdumpjob import Unknown

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def settings_or_error(log: Log) -> tuple[Settings, ConfigError | None]:
    """The override file's values; when invalid, the defaults plus the error (stop nobody)."""
    try:
        return load_settings(), None
    except ConfigError as error:
        log.file(f"override file invalid: {error}")
        return Settings(), error


def lock_timeout(settings: Settings) -> float:
    # a recover in progress may be waiting for a guest to start
    return float(timing.lock_wait(settings))


def report_leftovers(log: Log) -> int:
    """job-start: name the guests an interrupted job left off (job-end starts them)."""
    _, error = settings_or_error(log)
    if error is not None:
        log.say(f"{error}; this job will stop no guest to free a GPU")
    store = StateStore(report=log.say)
    if store.exists():
        try:
            records = store.records()
        except StateError as error:  # GPU backups will fail on it; the others can run
            log.say(str(error))
            return 0
        for record in records:
            if runtime.running(record.kind, record.vmid):
                continue
            for_what = f" for the backup of VM {record.for_vmid}" if record.for_vmid else ""
            log.say(
                f"{record.label} is still off since {_when(record.since)}: "
                f"stopped{for_what} "
                "by an interrupted job; it will be started at job end "
                "(or now with 'pve-gpu-hook recover')"
            )
    return 0


def _when(epoch: float | None) -> str:
    return (
        "an unknown time"
        if epoch is None
        else time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))
    )


def free_for_backup(log: Log, vmid: int, mode: str, text: str) -> int:
    """backup-start: free every unit the VM ``vmid`` will claim when vzdump starts it (paused,
    for a stopped VM; again right after its shutdown, for a running VM in stop mode)."""
    guest = Guest(vmid, GuestKind.QEMU, parse_guest_config(text, paths.qemu_conf(vmid)))
    running = runtime.vm_running(vmid)
    if running and mode != "stop":
        return 0  # snapshot/suspend: its QEMU keeps running and keeps its devices
    inventory = Inventory()
    needs, warnings = inventory.needs(guest, for_start=True)
    store = StateStore(report=log.say)
    if _give_back_mdev_parents(log, guest, needs, store):
        inventory = Inventory()  # sysfs changed: the mdev can be created now
        needs, warnings = inventory.needs(guest, for_start=True)
    for warning in [*warnings, *inventory.mapping_warnings]:
        log.say(f"warning: {warning}")
    settings, config_error = settings_or_error(log)

    def decide(protect: frozenset[int]) -> BackupDecision:
        # holders are read only when the decision can depend on them
        busy = needs and not guest.template
        return decide_backup(
            guest,
            job_mode=mode,
            running=running,
            needs=needs,
            holders=inventory.holders() if busy else [],
            protect=protect,
            waiting={r.vmid: r.addresses for r in store.records()} if running else {},
        )

    if needs and not guest.template:
        _let_cts_start(log, needs, inventory)
    decision = decide(settings.protect)
    if decision.verdict == Verdict.NOTHING:
        _say_moves(log, decision)
        if needs:
            log.file(decision.reason)
        return 0
    with store.hold(lock_timeout(settings), f"backup-start of VM {vmid}"):
        decision = _settle_starting(log, decision, lambda: decide(settings.protect))
        if decision.verdict == Verdict.RESTART_FIRST:
            # they must reserve their devices again before vzdump restarts this VM, or PVE
            # gives it theirs (the first free device of the mapping)
            restart(store, settings, log, lambda r: r.vmid in decision.restart_first)
            metrics.update(log, store, settings)
            decision = decide(settings.protect)
            if decision.verdict == Verdict.RESTART_FIRST:
                names = ", ".join(f"VM {v}" for v in decision.restart_first)
                log.error(
                    f"VM {vmid}: {names} must get their devices back before vzdump restarts "
                    "it, and did not start: refusing its stop-mode backup"
                )
                return 1
        if decision.verdict == Verdict.NOTHING:
            _say_moves(log, decision)
            log.file(decision.reason)
            return 0
        refusal = decision.refusal
        if config_error is not None and decision.verdict == Verdict.FREE:
            first = decision.stops[0].address
            log.error(f"cannot free {first} for VM {vmid}: {config_error}; stopping nobody")
            return 1
        if refusal is not None:
            label = refusal.holder.guest.label
            log.error(f"cannot free {refusal.address} for VM {vmid}: {label} {refusal.reason}")
            return 1
        if decision.verdict == Verdict.REFUSE:
            log.error(f"VM {vmid}: {decision.reason}")
            return 1
        code = _stop_holders(log, store, settings, decision, inventory)
        if code == 0:
            # confirm: nothing (an HA manager, an admin) took the devices while we waited
            again = decide(frozenset())
            if again.stops:
                late = again.stops[0]
                log.error(
                    f"cannot free {late.address} for VM {vmid}: "
                    f"{late.holder.guest.label} holds it now"
                )
                return 1
        return code


def _say_moves(log: Log, decision: BackupDecision) -> None:
    for move in decision.moves:
        log.say(f"note: {decision.guest.label} will take {move} at vzdump's restart")


def _give_back_mdev_parents(log: Log, guest: Guest, needs: list[Need], store: StateStore) -> bool:
    """An mdev PVE cannot create because its parent GPU sits on vfio-pci (an earlier backup of
    the job passed it through whole; PVE never binds it back): when the record of a guest the hook
    stopped knows the GPU's host driver, the GPU goes back to it now, not only at that guest's
    restart, and the backup goes on (docs/pve-facts.md §5). Whether something was given back."""
    wanted = [
        claim.address
        for need in needs
        if need.failure is not None and need.failure.startswith(MDEV_UNAVAILABLE)
        for claim in need.claims()
        if claim.kind == ClaimKind.MDEV
    ]
    if not wanted:
        return False
    try:
        known = [(f, d, r) for r in store.records() for f, d in sorted(r.drivers.items())]
    except StateError:
        return False  # said when the store is read for the decision
    given = False
    for function, driver, record in known:
        if not any(same_function(function, address) for address in wanted):
            continue
        problem = act.rebind(function, driver)
        if problem is None:
            log.say(
                f"{function} given back to {driver} (as {record.label} had it), so that the "
                f"mdev of {guest.label} can be created"
            )
            given = True
        else:
            log.say(f"warning: {problem}")
    return given


def _let_cts_start(log: Log, needs: list[Need], inventory: Inventory) -> None:
    """A container whose start is under way on a GPU this VM needs is let finish, and is then a
    holder like any other. Taken for stopped, it would resolve its device nodes while this VM's
    start binds the GPU to vfio-pci: it would run without its GPU, and its next start would fail
    on a device node that is gone (docs/pve-facts.md §6)."""
    units = {unit for need in needs for claim in need.claims() for unit in claim.units}
    starting = []
    for vmid in runtime.starting_cts():
        ct = load_guest(vmid, GuestKind.LXC)
        if ct is not None and any(
            not units.isdisjoint(claim.units) for claim in inventory.claims_of_stopped(ct)
        ):
            starting.append(ct)
    if not starting:
        return
    log.say(
        f"{', '.join(ct.label for ct in starting)} is starting right now; waiting for its start "
        "to finish"
    )
    vmids = {ct.vmid for ct in starting}
    deadline = time.monotonic() + timing.pve_start_limit("lxc", None) + act.GRACE
    act.wait_until(lambda: not vmids & set(runtime.starting_cts()), deadline)


def _settle_starting(
    log: Log, decision: BackupDecision, decide: Callable[[], BackupDecision]
) -> BackupDecision:
    """A holder that is starting right now (its devices reserved, its QEMU not up yet) is let
    finish, then treated like any holder: stopping it half-started is not possible, and PVE's
    own answer would be 'is currently reserved for use by VMID' (docs/pve-facts.md §5)."""
    starting = {s.holder.vmid for s in decision.stops if s.holder.starting}
    if not starting:
        return decision
    until = max(runtime.starting_vms().get(v, ([], 0.0))[1] for v in starting)
    names = ", ".join(f"VM {v}" for v in sorted(starting))
    log.say(f"{names} is starting right now; waiting for its start to finish")
    deadline = time.monotonic() + max(0.0, until - time.time()) + act.GRACE
    act.wait_until(lambda: not starting & set(runtime.starting_vms()), deadline)
    decision = decide()
    still = sorted(s.holder.vmid for s in decision.stops if s.holder.starting)
    if still:
        stop = next(s for s in decision.stops if s.holder.starting)
        decision.verdict = Verdict.REFUSE
        decision.stops = []
        decision.reason = (
            f"cannot free {stop.address}: {stop.holder.guest.label} is still starting (its "
            f"start reserved {stop.address} until "
            f"{time.strftime('%H:%M:%S', time.localtime(until))})"
        )
    return decision


def job_identity(
    task: vzdumpjob.Upid | Unknown, log: Log | None = None
) -> tuple[str, int, str | None]:
    """(key, pid, UPID) of the vzdump job this hook runs in, from ``vzdumpjob.running_job()``:
    the key tells one job's tally from the next; the pid is its worker's. The UPID only when
    vzdump's pid file names a task that runs now (vzdump writes it before job-start; pid and
    start time tell it is this job): then it is also the key. Else the key is vzdump's pid (the
    hook's parent)."""
    if isinstance(task, Unknown):
        if log is not None:
            log.file(f"the backup job's UPID is unknown ({task.reason}); recording its pid only")
        return str(os.getppid()), os.getppid(), None
    return task.text, task.pid, task.text


def job_ahead(
    task: vzdumpjob.Upid | Unknown, vmid: int, inventory: Inventory
) -> tuple[JobOrder, dict[int, float]] | Unknown:
    """The guests of the backup job ``task`` that come after ``vmid`` (in vzdump's order, whether
    they run, what their start will claim) and their previous backup durations: what job-aware
    restarts decide on. Unknown when the job cannot be learnt from PVE's files."""
    if isinstance(task, Unknown):
        return task
    spec = vzdumpjob.read_job(task)
    if isinstance(spec, Unknown):
        return spec
    local = local_vmids()
    pools = vzdumpjob.read_pools() if spec.pool is not None else {}
    if isinstance(pools, Unknown):
        return pools
    order = vzdumpjob.included_guests(spec, set(local), pools)
    if isinstance(order, Unknown):
        return order
    if vmid not in order:
        return Unknown(f"VM {vmid} is not among the guests of the job line ({spec.command})")
    # a guest whose config is gone is left out: vzdump fails it at once
    guests = [g for v in order[order.index(vmid) + 1 :] if (g := load_guest(v, local[v]))]
    later, _ = inventory.job_order(guests, stop_mode=spec.mode == "stop")
    return later, vzdumpjob.previous_durations(later)


def _until_whom(
    log: Log,
    store: StateStore,
    settings: Settings,
    decision: BackupDecision,
    inventory: Inventory,
    task: vzdumpjob.Upid | Unknown,
) -> Callable[[Record], str]:
    """How the shutdown line ends: when the holder will be started again."""
    if settings.restart == "after-job":
        return lambda record: "it will be started again at the end of the job"
    after_this = "it will be started again after this backup"
    if settings.restart == "after-guest":
        return lambda record: after_this
    ahead = job_ahead(task, decision.guest.vmid, inventory)
    if isinstance(ahead, Unknown):
        text = (
            f"restart: job-aware cannot learn this job's guests ({ahead.reason}): holders are "
            "started again after each backup that needed them, as with after-guest"
        )

        def unknown(record: Record) -> str:
            # said after the shutdown (the record comes first), once per job
            job_key, _, upid = job_identity(task)
            try:
                if store.say_once(job_key, upid, text, time.time()):
                    log.say(text)
            except StateError as error:
                log.file(f"{text} (cannot note it: {error})")
            return after_this

        return unknown
    later, durations = ahead
    stopping = {s.holder.vmid for s in decision.stops}
    others = [h for h in inventory.holders() if h.vmid not in stopping]

    def until(record: Record) -> str:
        last = keep_down_through(
            record_holder(record, inventory), later, durations, settings.keep_down_max, others
        )
        if last is None:
            return after_this
        return (
            f"it stays down for the job's later backups that need it, and is started again "
            f"after the backup of VM {last}"
        )

    return until


def _host_drivers(holder: Holder, inventory: Inventory) -> dict[str, str]:
    """The host driver of each GPU the holder uses through it: a CT's (device nodes) and an mdev
    VM's (the mdev's parent). The needer's start binds them to vfio-pci and PVE never binds them
    back, so they are given back before the holder starts again (docs/pve-facts.md §5)."""
    drivers = {}
    for claim in holder.claims:
        if claim.kind == ClaimKind.EXCLUSIVE:
            continue
        driver = inventory.sysfs.driver(claim.address)
        if driver and driver != "vfio-pci":
            drivers[claim.address] = driver
    return drivers


def _stop_holders(
    log: Log, store: StateStore, settings: Settings, decision: BackupDecision, inventory: Inventory
) -> int:
    vmid = decision.guest.vmid
    task = vzdumpjob.running_job()  # read once: the record, the tally and the restart plan
    job_key, job, upid = job_identity(task, log)
    until_whom = _until_whom(log, store, settings, decision, inventory, task)
    for stop in decision.stops:
        guest = stop.holder.guest
        drivers = _host_drivers(stop.holder, inventory)
        ha_state = inventory.ha_states().get(guest.vmid)
        take = ha_state not in (None, "ignored")
        if ha_state == "ignored":
            # HA leaves it alone: qm/pct act on it directly. When the hook set that, for an
            # earlier shutdown that timed out, the state to give back is the one recorded then.
            earlier = next((r for r in store.records() if r.vmid == guest.vmid), None)
            ha_state = earlier.ha_state if earlier is not None else None
        record = Record(
            guest.vmid,
            guest.kind,
            guest.name,
            vmid,
            sorted({c.address for c in stop.holder.claims}),
            since=time.time(),
            job=job,
            drivers=drivers,
            upid=upid,
            ha_state=ha_state,
        )
        crash_point("before-record")
        store.add(record)  # before the guest is touched: a crash leaves the record
        metrics.update(log, store, settings)  # and a metrics file that says it waits
        crash_point("after-record")
        if take and not _take_from_ha(log, store, record, stop.address):
            return 1
        timeout = timing.shutdown_timeout(guest.config, settings.shutdown_timeout)
        if timeout != settings.shutdown_timeout:
            log.file(
                f"{guest.label} has startup: down={timeout}: shutting it down with that timeout"
            )
        began = time.monotonic()
        outcome = act.shutdown(guest.kind, guest.vmid, timeout)
        how = "shut down"
        if not outcome.ok and settings.force_stop:
            log.file(f"{guest.label} did not shut down ({outcome.detail}); force_stop: stopping it")
            outcome = act.hard_stop(guest.kind, guest.vmid)
            how = "stopped hard (force_stop) after a shutdown timeout,"
        crash_point("after-shutdown")
        status = RecordStatus.STOPPED if outcome.ok else RecordStatus.STOP_FAILED
        store.mark(guest.vmid, status, outcome.detail)
        if outcome.ok:
            store.note_stop(job_key, upid, record, record.since or time.time())
        if not outcome.ok:
            if how != "shut down":
                why = f"{guest.label} could not be stopped: {outcome.detail}"
            elif outcome.seconds < timeout:  # refused at once, e.g. "VM is paused"
                why = f"{guest.label} could not be shut down: {outcome.detail}"
            else:
                # the request stays delivered: it may still power off (docs/pve-facts.md §8)
                why = (
                    f"{guest.label} did not shut down within {timeout} s (it may still power "
                    "off; it is watched, and started again if it does)"
                )
            log.file(f"{why}: {outcome.detail}")
            log.error(f"cannot free {stop.address} for VM {vmid}: {why}")
            return 1
        via = (
            f"; HA resource {act.ha_sid(guest.kind, guest.vmid)} set to ignored for it"
            if take
            else ""
        )
        took = duration(time.monotonic() - began)  # the whole of it, a hard stop included
        log.say(
            f"{guest.label} {how} in {took}{via}: it held {stop.address}, "
            f"needed by VM {vmid}; {until_whom(record)}"
        )
    return 0


def _take_from_ha(log: Log, store: StateStore, record: Record, address: str) -> bool:
    """Take an HA resource out of HA's hands before its shutdown (its state is in the record).

    For an HA resource ``qm shutdown`` becomes a CRM stop request, and HA then kills a VM that
    ignores it although ``force_stop`` is false, or leaves a CT in its ``error`` state
    (docs/pve-facts.md §9). In state ``ignored`` HA leaves the guest alone, and the hook shuts
    it down like any guest; the recorded state is set back when it starts again.
    """
    sid = act.ha_sid(record.kind, record.vmid)
    taken = act.ha_set(record.kind, record.vmid, "ignored")
    if taken.ok:
        log.file(f"{record.label}: HA resource {sid} (state {record.ha_state}) set to ignored")
        return True
    given = act.ha_set(record.kind, record.vmid, str(record.ha_state))  # whatever happened
    if given.ok:
        store.drop(record.vmid)  # untouched, and HA's again: nothing to start later
    log.error(
        f"cannot free {address} for VM {record.for_vmid}: {record.label} is HA resource {sid}, "
        f"and it could not be taken out of HA's hands: {taken.detail}"
    )
    return False


def restart_after_backup(log: Log, vmid: int) -> int:
    """log-end: start the guests stopped for this backup (``after-guest``), or those this job
    no longer needs down soon (``job-aware``): a later guest of the job that needs a holder's
    unit, expected within ``keep_down_max``, keeps that holder down until its own log-end."""
    settings, _ = settings_or_error(log)  # an invalid override file never keeps guests off
    if settings.restart == "after-job":
        return 0
    store = StateStore(report=log.say)
    task = vzdumpjob.running_job()
    _, _, upid = job_identity(task)
    aware = settings.restart == "job-aware"

    def ours(record: Record) -> bool:
        # job-aware: also the holders this job keeps down (those whose shutdown timed out
        # still run: they are watched, and left to job-end)
        kept = record.status == RecordStatus.STOPPED and upid is not None and record.upid == upid
        # a holder that powered off after its shutdown timed out starts with them, in the same
        # order (fixed devices first): else a mapped guest started now may take its device
        late = record.status == RecordStatus.STOP_FAILED and not runtime.running(
            record.kind, record.vmid
        )
        return record.for_vmid == vmid or late or (aware and kept)

    candidates = [r for r in store.records() if ours(r)]
    if not candidates:
        return 0
    keep = _kept_down(log, task, vmid, candidates, settings) if aware else set()
    now = {r.vmid for r in candidates if r.vmid not in keep}
    if any(r.for_vmid == vmid for r in candidates if r.vmid in now):
        # the paused QEMU vzdump started for this backup must be gone before the guests stopped
        # for it can start (a guest backed up running, in snapshot mode, keeps running: then
        # nobody was stopped for it)
        deadline = time.monotonic() + settings.shutdown_timeout
        if not act.wait_until(lambda: not runtime.vm_running(vmid), deadline):
            log.say(f"VM {vmid} still runs; guests stopped for it will be started at job end")
            now -= {r.vmid for r in candidates if r.for_vmid == vmid}
    if not now:
        return 0
    with store.hold(lock_timeout(settings), f"log-end of VM {vmid}"):
        restart(store, settings, log, lambda r: r.vmid in now)
        metrics.update(log, store, settings)
    return 0  # a failed start keeps its record; job-end retries it and fails the job


def _kept_down(
    log: Log,
    task: vzdumpjob.Upid | Unknown,
    vmid: int,
    records: list[Record],
    settings: Settings,
) -> set[int]:
    """The recorded holders job-aware restarts keep down after ``vmid``'s backup."""
    stopped = [r for r in records if r.status == RecordStatus.STOPPED]
    if not stopped:
        return set()
    inventory = Inventory()
    ahead = job_ahead(task, vmid, inventory)
    if isinstance(ahead, Unknown):
        log.file(f"the job's guests are unknown ({ahead.reason}): starting as after-guest")
        return set()  # those stopped for ``vmid`` start now; job-end starts any other
    later, durations = ahead
    others = inventory.holders()
    keep = set()
    for record in stopped:
        holder = record_holder(record, inventory)
        until = keep_down_until(holder, later, durations, settings.keep_down_max, others)
        if until is not None and not runtime.running(record.kind, record.vmid):
            keep.add(record.vmid)
            why = (
                f"{record.label} stays down: the backup of VM {until} needs "
                f"{', '.join(record.addresses)} next in this job"
            )
            # in the task log after the backup it was stopped for; then in the log file only
            if record.for_vmid == vmid:
                log.say(why)
            else:
                log.file(why)
    return keep


def _watch(log: Log, records: list[Record], settings: Settings) -> None:
    """Guests whose shutdown timed out still run at the job's end, and may still power off."""
    until, problem = watch_detached(records, settings)
    names = ", ".join(r.label for r in records)
    if problem is None:
        log.say(
            f"{names} did not shut down in time and still run; watched until "
            f"{time.strftime('%H:%M', time.localtime(until))}: started again if they power off"
        )
    else:
        log.error(f"{names} may still power off, and cannot be watched: {problem}")


def restart_leftovers(log: Log) -> int:
    """job-end, job-abort: start every guest still recorded; fail when one stays off."""
    settings, _ = settings_or_error(log)
    store = StateStore(report=log.say)
    job_key = job_identity(vzdumpjob.running_job())[0]
    with store.hold(lock_timeout(settings), f"{log.phase}"):
        done = store.job()
        if log.phase == "job-abort" and done and done.job == job_key and done.ended:
            # vzdump runs job-abort after a failed job-end: that said everything already
            log.file("job-end of this job already ran; nothing more to do")
            return 0
        report = restart(store, settings, log, lambda r: True)
        ended = time.time()
        tally = store.end_job(job_key, log.phase, ended)
        metrics.update(log, store, settings, metrics.LastJob.at_end(ended, report.ok, tally))
    if tally is not None:
        log.say(tally.summary(ended))  # the notification's copy of the night
    if report.watching:
        _watch(log, [r for r, _ in report.watching], settings)
    if report.ok:
        return 0
    kept = "; ".join(f"{r.label}: {why}" for r, why in report.kept)
    log.error(
        f"{len(report.kept)} guest(s) stopped to free a GPU still need attention ({kept}); "
        "see 'pve-gpu-hook status', then run 'pve-gpu-hook recover'"
    )
    return 1
