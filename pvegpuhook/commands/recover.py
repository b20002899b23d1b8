"""``pve-gpu-hook recover``: start the guests the hook stopped that are still off."""

from __future__ import annotations

import argparse

from pvegpuhook import completion, metrics, runtime
from pvegpuhook.commands import seconds_arg, vmid_arg
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, GpuHookError
from pvegpuhook.log import Log, clean
from pvegpuhook.records import Record
from pvegpuhook.restart import restart, watch
from pvegpuhook.settings import Settings, load_settings
from pvegpuhook.state import StateStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recover",
        help="start guests the hook stopped that are still off",
        description=(
            "Start every recorded guest that is still stopped and whose devices are free, "
            "confirm it runs and drop its record. Guests whose GPU is held by another running "
            "guest are reported, never forced. Safe to run again."
        ),
    )
    vmids = parser.add_argument(
        "vmids", metavar="VMID", nargs="*", type=vmid_arg, help="only these guests"
    )
    vmids.completer = completion.recorded_vmids  # type: ignore[attr-defined]
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")
    parser.add_argument(
        "--forget",
        action="store_true",
        help="drop the records of the given VMIDs without starting anything",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="also start guests stopped by the backup job running now (it would start them "
        "itself when its backup ends)",
    )
    parser.add_argument(
        "--watch",
        type=seconds_arg,
        metavar="SECONDS",
        help="keep watching guests whose shutdown timed out for up to SECONDS: start each one "
        "that powers off (the hook starts this at job end when one still runs)",
    )
    parser.add_argument(
        "--wait",
        type=seconds_arg,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the lock, 0-3600",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    store = StateStore(report=lambda message: print(f"warning: {clean(message)}"))
    wanted = set(args.vmids)
    if args.forget and not wanted:
        raise GpuHookError("--forget needs the VMIDs whose records to drop", EXIT_USAGE)
    if args.watch is not None:
        report = watch(store, settings, Log("recover", echo=False), args.watch)
        return EXIT_ATTENTION if report.kept or report.watching else EXIT_OK
    if args.dry_run:
        return _report(store, settings, wanted, dry_run=True, force=args.force)
    with store.hold(args.wait, "recover"):
        known = {r.vmid for r in store.records()}
        unknown = sorted(wanted - known)
        if unknown:
            raise GpuHookError(
                f"no record for {', '.join(map(str, unknown))}: pve-gpu-hook did not stop it",
                EXIT_USAGE,
            )
        if args.forget:
            store.drop(*wanted)
            for vmid in sorted(wanted):
                Log("recover", vmid, echo=False).file("record dropped by the admin (--forget)")
                print(f"record of {vmid} dropped; nothing was started")
            code = EXIT_OK
        else:
            code = _report(store, settings, wanted, dry_run=False, force=args.force)
        metrics.update(Log("recover", echo=False), store, settings)
        return code


def _job_runs(record: Record) -> str | None:
    """Why the guest is left to the backup job that stopped it, when that job still runs.

    By the job's UPID, as PVE tells whether a task runs (its worker's pid and start time): after
    a reboot or when another process got the pid, the job is over. Records of older releases
    have the worker's pid only: a live process with that pid counts as the job.
    """
    if record.upid is not None:
        from pvegpuhook import vzdumpjob

        upid = vzdumpjob.decode_upid(record.upid)
        if not isinstance(upid, vzdumpjob.Unknown):
            running = vzdumpjob.task_running(upid)
            if isinstance(running, vzdumpjob.Unknown):
                return f"cannot tell whether the job that stopped it still runs: {running.reason}"
            return f"stopped by the backup job running now ({upid.text})" if running else None
    if record.job and runtime.process_alive(record.job):
        return f"stopped by the backup job running now (pid {record.job})"
    return None


def _report(
    store: StateStore, settings: Settings, wanted: set[int], *, dry_run: bool, force: bool = False
) -> int:
    log = Log("recover", echo=False)
    # a guest stopped by the job running now: starting it would take the GPU from the backup
    # that needs it; that job's log-end or job-end starts it
    busy: list[tuple[Record, str]] = []
    for record in store.records():
        if wanted and record.vmid not in wanted:
            continue
        why = _job_runs(record)
        if why:
            busy.append((record, why))
    skip = set() if force else {r.vmid for r, _ in busy}
    report = restart(
        store,
        settings,
        log,
        lambda r: (not wanted or r.vmid in wanted) and r.vmid not in skip,
        dry_run=dry_run,
    )
    if not force:
        for record, why in busy:
            report.kept.append((record, f"{why}; --force starts it"))
    rows = []
    verb = "would start" if dry_run else "started"
    rows += [(r.vmid, r.label, verb) for r in report.started]
    rows += [(r.vmid, r.label, "already running, record dropped") for r in report.dropped]
    rows += [(r.vmid, r.label, f"kept: {why}") for r, why in report.kept]
    rows += [(r.vmid, r.label, f"kept: {why}") for r, why in report.watching]
    if not rows:
        print("nothing to recover: no guest stopped by pve-gpu-hook is waiting")
        return EXIT_OK
    rows = [(vmid, clean(label), clean(result)) for vmid, label, result in rows]
    width = max(len(label) for _, label, _ in rows)
    print(f"{'GUEST'.ljust(width)}  RESULT")
    for _, label, result in sorted(rows):
        print(f"{label.ljust(width)}  {result}")
    return EXIT_ATTENTION if report.kept or report.watching else EXIT_OK
