"""The hook's phases that act: read → plan → act → record. Imported only when there is work."""

from __future__ import annotations

import os
import time

from pvegpuhook import act, paths, runtime
from pvegpuhook.crashpoints import crash_point
from pvegpuhook.errors import ConfigError, StateError
from pvegpuhook.inventory import QEMU, Guest, Inventory
from pvegpuhook.log import Log
from pvegpuhook.plan import FreePlan, plan_free
from pvegpuhook.pveconf import parse_guest_config
from pvegpuhook.restore import record_label, restore
from pvegpuhook.settings import Settings, load_settings
from pvegpuhook.state import STOP_FAILED, STOPPED, Record, StateStore


def settings_or_error(log: Log) -> tuple[Settings, ConfigError | None]:
    """The override file's values; when invalid, the defaults plus the error (stop nobody)."""
    try:
        return load_settings(), None
    except ConfigError as error:
        log.file(f"override file invalid: {error}")
        return Settings(), error


def lock_timeout(settings: Settings) -> float:
    # a recover in progress may be waiting for a guest to start
    return float(max(settings.shutdown_timeout, settings.start_timeout) + act.GRACE)


def job_start(log: Log) -> int:
    _, error = settings_or_error(log)
    if error is not None:
        log.say(f"{error}; this job will stop no guest to free a GPU")
    store = StateStore(report=log.say)
    if store.exists():
        try:
            records = store.load()
        except StateError as error:  # GPU backups will fail on it; the others can run
            log.say(str(error))
            return 0
        for record in records:
            if runtime.running(record.kind, record.vmid):
                continue
            for_what = f" for the backup of VM {record.for_vmid}" if record.for_vmid else ""
            log.say(
                f"{record_label(record)} is still off since {_when(record.since)}: "
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


def backup_start(log: Log, vmid: int, text: str) -> int:
    """Free every unit the stopped VM ``vmid`` will claim when vzdump starts it paused."""
    if runtime.vm_running(vmid):
        return 0  # a running VM gives its devices up and takes them back itself
    guest = Guest(vmid, QEMU, parse_guest_config(text, paths.qemu_conf(vmid)))
    if guest.template:
        return 0  # templates are started with their disks only
    inventory = Inventory()
    needs = inventory.needs(guest, for_start=True)
    for warning in inventory.warnings:
        log.say(f"warning: {warning}")
    if not needs:
        return 0
    settings, config_error = settings_or_error(log)
    store = StateStore(report=log.say)
    store.acquire(lock_timeout(settings), f"backup-start of VM {vmid}")
    try:
        plan = plan_free(guest, needs, inventory.holders(exclude={vmid}), settings.protect)
        if not plan.stops and plan.refusal is None:
            log.file("every device it needs is free")
            return 0
        first = plan.refusal.address if plan.refusal else plan.stops[0].address
        if config_error is not None:
            log.error(f"cannot free {first} for VM {vmid}: {config_error}; stopping nobody")
            return 1
        if plan.refusal is not None:
            refusal = plan.refusal
            log.error(
                f"cannot free {refusal.address} for VM {vmid}: "
                f"{refusal.holder.guest.label} {refusal.reason}"
            )
            return 1
        code = _stop_holders(log, store, settings, plan, inventory)
        if code == 0:
            # confirm: nothing (an HA manager, an admin) took the devices while we waited
            again = plan_free(guest, needs, inventory.holders(exclude={vmid}), frozenset())
            if again.stops:
                late = again.stops[0]
                log.error(
                    f"cannot free {late.address} for VM {vmid}: "
                    f"{late.holder.guest.label} holds it now"
                )
                return 1
        return code
    finally:
        store.release()


def _stop_holders(
    log: Log, store: StateStore, settings: Settings, plan: FreePlan, inventory: Inventory
) -> int:
    vmid = plan.target.vmid
    job = os.getppid()
    for stop in plan.stops:
        guest = stop.holder.guest
        drivers = {}
        if guest.kind != QEMU:
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
        )
        crash_point("before-record")
        records = [r for r in store.load() if r.vmid != guest.vmid]
        store.save([*records, record])  # before the guest is touched: a crash leaves the record
        crash_point("after-record")
        timeout = settings.shutdown_timeout
        outcome = act.shutdown(guest.kind, guest.vmid, timeout)
        how = "shut down"
        if not outcome.ok and settings.force_stop:
            log.file(f"{guest.label} did not shut down ({outcome.detail}); force_stop: stopping it")
            outcome = act.hard_stop(guest.kind, guest.vmid)
            how = "stopped hard (force_stop) after a shutdown timeout,"
        crash_point("after-shutdown")
        _set_status(store, guest.vmid, STOPPED if outcome.ok else STOP_FAILED, outcome.detail)
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
            f"{'this backup' if settings.restore == 'after-guest' else 'the job'}"
        )
    return 0


def _set_status(store: StateStore, vmid: int, status: str, note: str) -> None:
    records = store.load()
    for record in records:
        if record.vmid == vmid:
            record.status = status
            record.note = note[:500] or None
    store.save(records)


def log_end(log: Log, vmid: int) -> int:
    settings, _ = settings_or_error(log)  # an invalid override file never keeps guests off
    if settings.restore != "after-guest":
        return 0
    store = StateStore(report=log.say)
    if not any(r.for_vmid == vmid for r in store.load()):
        return 0
    # the paused QEMU vzdump started for the backup must be gone before the holders can start
    deadline = time.monotonic() + settings.shutdown_timeout
    if not act.wait_until(lambda: not runtime.vm_running(vmid), deadline):
        log.say(f"VM {vmid} still runs; guests stopped for it will be started at job end")
        return 0
    store.acquire(lock_timeout(settings), f"log-end of VM {vmid}")
    try:
        restore(store, settings, log, lambda r: r.for_vmid == vmid)
    finally:
        store.release()
    return 0  # a failed start keeps its record; job-end retries it and fails the job


def job_end(log: Log) -> int:
    settings, _ = settings_or_error(log)
    store = StateStore(report=log.say)
    store.acquire(lock_timeout(settings), f"{log.phase}")
    try:
        report = restore(store, settings, log, lambda r: True)
    finally:
        store.release()
    if report.ok:
        return 0
    kept = "; ".join(f"{record_label(r)}: {why}" for r, why in report.kept)
    log.error(
        f"{len(report.kept)} guest(s) stopped to free a GPU still need attention ({kept}); "
        "see 'pve-gpu-hook status', then run 'pve-gpu-hook recover'"
    )
    return 1


def chain_problem(script: str) -> str | None:
    """Why a chained hook must not run, or None (see resolve_chain)."""
    return resolve_chain(script)[0]


def resolve_chain(script: str) -> tuple[str | None, str]:
    """(why it must not run or None, the resolved file to run).

    ``script`` is the host path as the admin wrote it: absolute, a root-owned executable file
    that neither group nor others can write, in directories only root can write. The file that
    was checked is the one that runs, so a symlink cannot be swapped in between.
    """
    import stat

    path = os.path.realpath(paths.host(script))
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


def _open_directory(directory: str) -> str | None:
    top = os.path.realpath(paths.root())
    directory = os.path.abspath(directory)
    while directory.startswith(top) and directory != top:
        info = os.stat(directory)
        if info.st_uid != 0 or info.st_mode & 0o022:
            return f"lies in {directory[len(top) :] or '/'}, which others can write"
        directory = os.path.dirname(directory)
    return None


def run_chain(log: Log, argv: list[str]) -> int:
    script = StateStore().chain()
    if script is None:
        return 0
    problem, path = resolve_chain(script)
    if problem is not None:
        log.error(f"chained hook {script} {problem}: not run")
        return 1
    return act.run_chained(path, argv)
