"""``pve-gpu-hook recover``: start the guests the hook stopped that are still off.

Every recorded guest that is still off and whose devices are free is started, confirmed running,
and its record dropped; a guest that runs again has its record dropped. A guest whose device
another running guest holds is reported, never forced; when that guest would take another device
of its PCI mapping if started after it (an ``onboot`` guest of a mapping after a power loss), the
report says so, and ``recover VMID --swap`` does it: it shuts that guest down gracefully, starts
the recorded one, and starts the other again — each step confirmed. ``recover VMID`` of a guest
without a record says it is not waiting (exit 0).

A damaged state file is said once on stderr, with the log lines (``/var/log/pve-gpu-hook.log``)
of the guests the hook shut down and did not start again that no intact record names: the
damaged part may have named them. recover keeps the damaged file aside (``state.json.corrupt-*``)
and starts the guests of the intact records; the exit status stays 1 while a damaged file is
kept: start the guests those log lines name that should run (``qm start``, ``pct start``), then
delete the file.

Exit status: 0 when no recorded guest is left off; 1 when one is kept (its reason is given), or
while damaged state exists; 2 for a usage or configuration error.

JSON shape (``--output-format json``)::

    {"format": 1, "dry_run": false,
     "guests": [{"vmid": 104, "type": "qemu", "name": "win11",
                 "result": "kept",
                 "reason": "0000:01:00.0 is held by VM 105 (render)",   # or null
                 "way_out": {"blocker": 105, "address": "0000:01:00.0",
                             "moves_to": ["0000:41:00.0"],
                             "command": "pve-gpu-hook recover 104 --swap"},
                                        # or null: the swap that lets it start
                 "no_way_out": null}],  # or why no swap would do it
     "damage": {"state_file": "the state file was corrupt (...): kept aside as ...",
                "kept_aside": ["/var/lib/pve-gpu-hook/state.json.corrupt-20240501T210500"],
                "not_started_again": [{"vmid": 110, "type": "lxc", "running": false,
                                       "line": "2024-05-01T21:03:12+02:00 backup-start 106 ..."}],
                "log_error": null}}     # damage: null when the state is whole

``result`` is one of ``started``, ``would-start`` (``--dry-run``), ``running`` (it runs again:
record dropped), ``moved`` (it lives on another node now: record dropped), ``kept`` (``reason``
says why), ``watching`` (its shutdown timed out; it may still power off: a detached watcher
starts it if it does), ``not-waiting`` (no record), ``forgotten``, ``would-forget``
(``--forget``) and ``restarted`` (a guest ``--swap`` shut down and started again).
"""

from __future__ import annotations

import argparse
import sys

from pvegpuhook import completion, metrics, paths, runtime
from pvegpuhook.commands import seconds_arg, vmid_arg
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, GpuHookError, NotPermitted
from pvegpuhook.log import Log, clean, not_started_again, read_tail
from pvegpuhook.model import GuestKind
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.records import Record
from pvegpuhook.restart import RestartReport, restart, watch, watch_detached
from pvegpuhook.settings import Settings, load_settings
from pvegpuhook.state import StateStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recover",
        help="start guests the hook stopped that are still off",
        description=(
            "Start every recorded guest that is still stopped and whose devices are free, "
            "confirm it runs and drop its record. Guests whose GPU is held by another running "
            "guest are reported, never forced; when that guest would take another device of "
            "its PCI mapping if started after the recorded one, the report says so and --swap "
            "does it. A damaged state file is reported with the log lines of the guests the hook "
            "stopped and did not start again. Safe to run again."
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
        "--swap",
        action="store_true",
        help="for the given VMIDs whose device another running guest holds: shut that guest "
        "down gracefully, start the recorded one, then start the other again (it takes another "
        "device of its PCI mapping); only where the report offers it",
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
        "that powers off (started by the hook at job end, and by a plain recover after a killed "
        "job, while such a guest still runs)",
    )
    parser.add_argument(
        "--wait",
        type=seconds_arg,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the lock, 0-3600",
    )
    add_output_options(parser)
    parser.set_defaults(run=run)


class Row:
    """One guest of the answer."""

    def __init__(self, record: Record | None, vmid: int, result: str, reason: str = "") -> None:
        self.vmid = vmid
        self.kind = record.kind if record is not None else None
        self.name = record.name if record is not None else None
        self.label = record.label if record is not None else _label(vmid)
        self.result = result
        self.reason = reason
        self.way_out: dict[str, object] | None = None
        self.no_way_out: str | None = None
        self.way_out_text: str | None = None

    def data(self) -> dict[str, object]:
        return {
            "vmid": self.vmid,
            "type": str(self.kind) if self.kind is not None else None,
            "name": self.name,
            "result": self.result,
            "reason": self.reason or None,
            "way_out": self.way_out,
            "no_way_out": self.no_way_out,
        }


def _label(vmid: int) -> str:
    from pvegpuhook.inventory import load_guest

    guest = load_guest(vmid)
    return guest.label if guest is not None else f"guest {vmid}"


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    damage: list[str] = []
    store = StateStore(report=damage.append)
    wanted = set(args.vmids)
    if args.forget and not wanted:
        raise GpuHookError("--forget needs the VMIDs whose records to drop", EXIT_USAGE)
    if args.swap and not wanted:
        raise GpuHookError("--swap needs the VMIDs of the guests to make room for", EXIT_USAGE)
    if args.swap and args.forget:
        raise GpuHookError("--swap and --forget exclude each other", EXIT_USAGE)
    if args.watch is not None:
        report = watch(store, settings, Log("recover", echo=False), args.watch)
        return EXIT_ATTENTION if report.kept or report.watching else EXIT_OK
    if args.dry_run:
        rows = _recover(store, settings, args, wanted, dry_run=True)
    else:
        with store.hold(args.wait, "recover"):
            rows = _recover(store, settings, args, wanted, dry_run=False)
            metrics.update(Log("recover", echo=False), store, settings)
    damaged = _damage(store, damage)
    data = {
        "dry_run": bool(args.dry_run),
        "guests": [row.data() for row in rows],
        "damage": damaged,
    }
    emit(args, data, _tables(rows), _notes(rows, damaged))
    if damaged is not None:
        _say_damage(damaged)
    kept = any(row.result in ("kept", "watching") for row in rows)
    return EXIT_ATTENTION if kept or damaged is not None else EXIT_OK


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


def _recover(
    store: StateStore,
    settings: Settings,
    args: argparse.Namespace,
    wanted: set[int],
    *,
    dry_run: bool,
) -> list[Row]:
    records = {r.vmid: r for r in store.records()}
    rows = [
        Row(None, vmid, "not-waiting", "no record: pve-gpu-hook did not stop it, or it was "
            "started again")
        for vmid in sorted(wanted - set(records))
    ]  # fmt: skip
    chosen = [records[v] for v in sorted(records) if not wanted or v in wanted]
    if args.forget:
        for record in chosen:
            if not dry_run:
                store.drop(record.vmid)
                Log("recover", record.vmid, echo=False).file(
                    "record dropped by the admin (--forget)"
                )
            result = "would-forget" if dry_run else "forgotten"
            rows.append(Row(record, record.vmid, result, "nothing was started"))
        return rows
    if args.swap:
        return rows + _swap(store, settings, chosen, dry_run=dry_run)
    return rows + _restart(store, settings, chosen, dry_run=dry_run, force=args.force)


def _restart(
    store: StateStore, settings: Settings, chosen: list[Record], *, dry_run: bool, force: bool
) -> list[Row]:
    log = Log("recover", echo=False)
    vmids = {r.vmid for r in chosen}
    # a guest stopped by the job running now: starting it would take the GPU from the backup
    # that needs it; that job's log-end or job-end starts it
    busy: list[tuple[Record, str]] = []
    for record in chosen:
        why = _job_runs(record)
        if why:
            busy.append((record, why))
    skip = set() if force else {r.vmid for r, _ in busy}
    report = restart(
        store, settings, log, lambda r: r.vmid in vmids and r.vmid not in skip, dry_run=dry_run
    )
    if not force:
        for record, why in busy:
            report.kept.append((record, f"{why}; --force starts it"))
    if report.watching and not dry_run:
        # the job that would have watched them is gone (killed, or the host rebooted)
        report.watching = _watched(report.watching, settings)
    rows = _rows(report, dry_run=dry_run)
    _ways_out(rows, {r.vmid: r for r, _ in report.kept}, settings)
    return rows


def _watched(watching: list[tuple[Record, str]], settings: Settings) -> list[tuple[Record, str]]:
    """Leave the guests that may still power off to a detached watcher; say until when."""
    import time

    until, problem = watch_detached([r for r, _ in watching], settings)
    if problem is not None:
        return [(r, f"{why}; cannot be watched: {problem}") for r, why in watching]
    at = time.strftime("%H:%M", time.localtime(until))
    then = f"watched until {at}: started again if it powers off"
    return [(r, f"{why}; {then}") for r, why in watching]


def _rows(report: RestartReport, *, dry_run: bool) -> list[Row]:
    rows = [Row(r, r.vmid, "would-start" if dry_run else "started") for r in report.started]
    dropped = "record would be dropped" if dry_run else "record dropped"
    for record in report.dropped:
        if runtime.running(record.kind, record.vmid):
            rows.append(Row(record, record.vmid, "running", dropped))
        else:  # HA or a migration placed it on another node
            rows.append(Row(record, record.vmid, "moved", f"on another node now: {dropped}"))
    rows += [Row(r, r.vmid, "kept", why) for r, why in report.kept]
    rows += [Row(r, r.vmid, "watching", why) for r, why in report.watching]
    return sorted(rows, key=lambda row: row.vmid)


def _ways_out(rows: list[Row], kept: dict[int, Record], settings: Settings) -> None:
    """For each kept guest whose device a running guest holds: the swap that would let it start,
    or why there is none."""
    blocked = [row for row in rows if row.result == "kept" and " is held by " in row.reason]
    if not blocked:
        return
    from pvegpuhook.inventory import Inventory
    from pvegpuhook.swap import describe, way_out

    inventory = Inventory()
    for row in blocked:
        swap, why = way_out(kept[row.vmid], inventory, settings)
        if swap is None:
            row.no_way_out = why or None
            continue
        row.way_out = {
            "blocker": swap.blocker.vmid,
            "address": swap.address,
            "moves_to": swap.moves_to,
            "command": f"pve-gpu-hook recover {row.vmid} --swap",
        }
        row.way_out_text = describe(swap)


def _swap(
    store: StateStore, settings: Settings, chosen: list[Record], *, dry_run: bool
) -> list[Row]:
    from pvegpuhook.inventory import Inventory
    from pvegpuhook.swap import describe, make_room, way_out

    rows: list[Row] = []
    for record in chosen:
        swap, why = way_out(record, Inventory(), settings)
        if swap is None:
            reason = (
                why or "nothing keeps it from starting: run 'pve-gpu-hook recover' without --swap"
            )
            row = Row(record, record.vmid, "kept", f"no swap: {reason}")
            rows.append(row)
            continue
        if dry_run:
            row = Row(record, record.vmid, "would-start", describe(swap))
            rows.append(row)
            continue
        steps = make_room(store, settings, Log("recover", record.vmid, echo=False), swap)
        done = "; ".join(steps.lines)
        result = "started" if steps.target_started else "kept"
        rows.append(Row(record, record.vmid, result, done))
        blocker = swap.blocker.guest
        back = Row(None, blocker.vmid, "restarted" if steps.blocker_back else "kept")
        back.kind, back.name, back.label = blocker.kind, blocker.name, blocker.label
        if steps.blocker_back:
            on = ", ".join(steps.blocker_on)
            back.reason = f"shut down to make room for {record.label}, running again" + (
                f" on {on}" if on else ""
            )
        else:
            back.reason = f"shut down to make room for {record.label}, and did not start again"
        rows.append(back)
    return rows


# ---- a damaged state ---------------------------------------------------------------------------


def _damage(store: StateStore, said: list[str]) -> dict[str, object] | None:
    """What is damaged, and the log lines of the guests the damaged part may have named."""
    kept = store.corrupt_files()
    if not said and not kept:
        return None
    try:
        recorded = {r.vmid for r in store.records()}
    except NotPermitted:
        raise
    except GpuHookError:
        recorded = set()
    found: list[dict[str, object]] = []
    problem = None
    try:
        lines = read_tail()
    except NotPermitted:
        raise
    except GpuHookError as error:
        lines, problem = [], str(error)
    for word, vmid, line in not_started_again(lines):
        if vmid in recorded:
            continue
        kind = GuestKind.QEMU if word == "VM" else GuestKind.LXC
        found.append(
            {
                "vmid": vmid,
                "type": str(kind),
                "running": runtime.running(kind, vmid),
                "line": f"{line.time} {line.phase} {line.vmid or '-'} {line.message}",
            }
        )
    return {
        "state_file": said[0] if said else None,
        "kept_aside": kept,
        "not_started_again": found,
        "log_error": problem,
    }


def _say_damage(damage: dict[str, object]) -> None:
    """The damage, once, on stderr."""
    out = []
    if damage["state_file"]:
        out.append(f"warning: {damage['state_file']}")
    kept = damage["kept_aside"]
    assert isinstance(kept, list)
    earlier = [k for k in kept if k not in str(damage["state_file"])]  # not just kept aside
    if earlier:
        out.append(f"warning: damaged state file(s) kept aside: {', '.join(map(str, earlier))}")
    log_file = paths.shown(paths.LOG_FILE)
    if damage["log_error"]:
        out.append(f"{damage['log_error']}: the guests the damaged records named are not known")
    found = damage["not_started_again"]
    assert isinstance(found, list)
    if found:
        out.append(
            f"{log_file} shows {len(found)} guest(s) the hook shut down and did not start again "
            "that no intact record names:"
        )
        for item in found:
            state = "running now" if item["running"] else "still off"
            out.append(f"  {item['line']}  [{state}]")
        then = "start those that should run (qm start VMID, pct start VMID)"
    elif not damage["log_error"]:
        out.append(f"{log_file} shows no other guest the hook shut down and did not start again")
        then = "check"
    else:
        then = "check which guests should run"
    if kept:
        out.append(f"{then}, then delete the damaged file(s): rm {' '.join(map(str, kept))}")
    else:  # a dry run: the damaged file is still state.json
        out.append(f"{then}; 'pve-gpu-hook recover' keeps the damaged file aside")
    sys.stdout.flush()
    for line in out:
        print(f"pve-gpu-hook: {clean(line)}", file=sys.stderr)


# ---- text ----------------------------------------------------------------------------------------


def _tables(rows: list[Row]) -> list[Table]:
    if not rows:
        return []
    shown = []
    for row in rows:
        result = row.result.replace("-", " ")
        shown.append(
            {"guest": row.label, "result": f"{result}: {row.reason}" if row.reason else result}
        )
    return [Table([("guest", "GUEST"), ("result", "RESULT")], shown)]


def _notes(rows: list[Row], damage: dict[str, object] | None) -> list[str]:
    notes = []
    for row in rows:
        if row.way_out_text:
            notes.append(f"way out for {row.label}: {row.way_out_text}")
        elif row.no_way_out:
            notes.append(f"no way out for {row.label} found: {row.no_way_out}")
    if not rows:
        if damage is None:
            notes.append("nothing to recover: no guest stopped by pve-gpu-hook is waiting")
        else:
            notes.append("no intact record to recover; the state is damaged: see below")
    return notes
