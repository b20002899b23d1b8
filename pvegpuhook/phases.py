"""The hook's phases that act: read → decide (:mod:`pvegpuhook.plan`) → act → record.

Imported by :mod:`pvegpuhook.hook` only when a phase has work to do.
"""

from __future__ import annotations

import os
import time

from pvegpuhook import act, paths, runtime, timing
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import ConfigError, StateError
from pvegpuhook.inventory import Inventory
from pvegpuhook.log import Log
from pvegpuhook.model import Guest, GuestKind
from pvegpuhook.plan import BackupDecision, Verdict, decide_backup
from pvegpuhook.pveconf import parse_guest_config
from pvegpuhook.records import Record, RecordStatus
from pvegpuhook.restart import restart
from pvegpuhook.settings import Settings, load_settings
from pvegpuhook.state import StateStore


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
    """backup-start: free every unit the VM ``vmid`` will claim when vzdump starts it paused."""
    guest = Guest(vmid, GuestKind.QEMU, parse_guest_config(text, paths.qemu_conf(vmid)))
    inventory = Inventory()
    running = runtime.vm_running(vmid)
    needs, warnings = ([], []) if running else inventory.needs(guest, for_start=True)
    for warning in [*warnings, *inventory.mapping_warnings]:
        log.say(f"warning: {warning}")
    settings, config_error = settings_or_error(log)

    def decide(protect: frozenset[int]) -> BackupDecision:
        # holders are read only when the decision can depend on them
        busy = needs and not guest.template
        holders = inventory.holders(exclude={vmid}) if busy else []
        return decide_backup(
            guest, job_mode=mode, running=running, needs=needs, holders=holders, protect=protect
        )

    decision = decide(settings.protect)
    if decision.verdict == Verdict.NOTHING:
        if needs:
            log.file(decision.reason)
        return 0
    store = StateStore(report=log.say)
    with store.hold(lock_timeout(settings), f"backup-start of VM {vmid}"):
        decision = decide(settings.protect)  # again under the lock: another run may have acted
        if decision.verdict == Verdict.NOTHING:
            log.file(decision.reason)
            return 0
        first = decision.refusal.address if decision.refusal else decision.stops[0].address
        if config_error is not None:
            log.error(f"cannot free {first} for VM {vmid}: {config_error}; stopping nobody")
            return 1
        refusal = decision.refusal
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


def job_identity(log: Log | None = None) -> tuple[str, int, str | None]:
    """(key, pid, UPID) of the vzdump job this hook runs in: the key tells one job's tally from
    the next; the pid is its worker's. The UPID only when vzdump's pid file names a task that runs
    now (vzdump writes it before job-start; pid and start time tell it is this job): then it is
    also the key. Else the key is vzdump's pid (the hook's parent)."""
    from pvegpuhook import vzdumpjob

    task = vzdumpjob.running_job()
    if isinstance(task, vzdumpjob.Unknown):
        if log is not None:
            log.file(f"the backup job's UPID is unknown ({task.reason}); recording its pid only")
        return str(os.getppid()), os.getppid(), None
    return task.text, task.pid, task.text


def _stop_holders(
    log: Log, store: StateStore, settings: Settings, decision: BackupDecision, inventory: Inventory
) -> int:
    vmid = decision.guest.vmid
    job_key, job, upid = job_identity(log)
    for stop in decision.stops:
        guest = stop.holder.guest
        drivers = {}
        if guest.kind != GuestKind.QEMU:
            for claim in stop.holder.claims:
                driver = inventory.sysfs.driver(claim.address)
                if driver and driver != "vfio-pci":
                    drivers[claim.address] = driver
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
        )
        crash_point("before-record")
        store.add(record)  # before the guest is touched: a crash leaves the record
        crash_point("after-record")
        timeout = timing.shutdown_timeout(guest.config, settings.shutdown_timeout)
        if timeout != settings.shutdown_timeout:
            log.file(
                f"{guest.label} has startup: down={timeout}: shutting it down with that timeout"
            )
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
            store.note_stop(job_key, upid, guest.vmid, vmid, record.since or time.time())
        if not outcome.ok:
            if how != "shut down":
                why = f"{guest.label} could not be stopped: {outcome.detail}"
            elif outcome.seconds < timeout:  # refused at once, e.g. "VM is paused"
                why = f"{guest.label} could not be shut down: {outcome.detail}"
            else:
                why = f"{guest.label} did not shut down within {timeout} s"
            log.file(f"{why}: {outcome.detail}")
            log.error(f"cannot free {stop.address} for VM {vmid}: {why}")
            return 1
        log.say(
            f"{guest.label} {how} in {outcome.seconds:.0f} s: it held {stop.address}, "
            f"needed by VM {vmid}; it will be started again after "
            f"{'this backup' if settings.restart == 'after-guest' else 'the job'}"
        )
    return 0


def restart_after_backup(log: Log, vmid: int) -> int:
    """log-end: with ``restart: after-guest``, start the guests stopped for this backup."""
    settings, _ = settings_or_error(log)  # an invalid override file never keeps guests off
    if settings.restart != "after-guest":
        return 0
    store = StateStore(report=log.say)
    if not any(r.for_vmid == vmid for r in store.records()):
        return 0
    # the paused QEMU vzdump started for the backup must be gone before the holders can start
    deadline = time.monotonic() + settings.shutdown_timeout
    if not act.wait_until(lambda: not runtime.vm_running(vmid), deadline):
        log.say(f"VM {vmid} still runs; guests stopped for it will be started at job end")
        return 0
    with store.hold(lock_timeout(settings), f"log-end of VM {vmid}"):
        restart(store, settings, log, lambda r: r.for_vmid == vmid)
    return 0  # a failed start keeps its record; job-end retries it and fails the job


def restart_leftovers(log: Log) -> int:
    """job-end, job-abort: start every guest still recorded; fail when one stays off."""
    settings, _ = settings_or_error(log)
    store = StateStore(report=log.say)
    with store.hold(lock_timeout(settings), f"{log.phase}"):
        report = restart(store, settings, log, lambda r: True)
        store.end_job(job_identity()[0], log.phase, time.time())
    if report.ok:
        return 0
    kept = "; ".join(f"{r.label}: {why}" for r, why in report.kept)
    log.error(
        f"{len(report.kept)} guest(s) stopped to free a GPU still need attention ({kept}); "
        "see 'pve-gpu-hook status', then run 'pve-gpu-hook recover'"
    )
    return 1
