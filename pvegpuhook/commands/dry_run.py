"""``pve-gpu-hook dry-run``: predict what a vzdump job will do, with the hook's own planner.

Runs no command and writes nothing. JSON shape (``--output-format json``)::

    {"format": 1, "mode": "stop", "restart": "job-aware", "ok": true,
     "guests": [{"vmid": 102, "type": "qemu", "name": "gpu2", "mode": "stop",
                 "devices": ["0000:01:00.0"], "stops": [{"vmid": 104, "address": "0000:01:00.0"}],
                 "restarted_after": [], "outcome": "ok", "reason": ""}, ...],
     "restarted_at_job_end": [], "down_for_backups": {"104": 3},
     "holders": {"104": {"cycles": 1, "down_seconds": 840, "during": [102, 103, 105]}},
     "warnings": []}

``restarted_after``: holders started again after this guest's backup; ``down_seconds``: the
expected time down, from the guests' previous backup durations (10 minutes for a guest
without one).
"""

from __future__ import annotations

import argparse

from pvegpuhook import completion, runtime, vzdumpjob
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, ConfigError, GpuHookError
from pvegpuhook.inventory import Inventory, all_guests
from pvegpuhook.model import Guest, Need
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.plan import GuestForecast, JobForecast, forecast_job
from pvegpuhook.settings import load_settings
from pvegpuhook.vmid import parse_vmid


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dry-run",
        help="predict what a backup job would do",
        description=(
            "Walk a vzdump job over the given guests (or --all) in vzdump's order and show, "
            "per guest: the effective mode, the devices it needs, which guests the hook would "
            "shut down for it, when they would come back, and the expected outcome. Uses the "
            "same planner as the hook; runs no command and writes nothing."
        ),
    )
    vmids = parser.add_argument(
        "vmids", metavar="VMID", nargs="*", type=vmid_arg, help="guests to back up"
    )
    vmids.completer = completion.local_vmids  # type: ignore[attr-defined]
    parser.add_argument("--all", action="store_true", help="every guest of this node")
    exclude = parser.add_argument(
        "--exclude", metavar="VMID,...", default="", help="guests to leave out (with --all)"
    )
    exclude.completer = completion.local_vmid_list  # type: ignore[attr-defined]
    parser.add_argument(
        "--mode",
        choices=("stop", "snapshot", "suspend"),
        default="snapshot",
        help="backup mode of the job (default: snapshot, as vzdump)",
    )
    add_output_options(parser)
    parser.set_defaults(run=run)


def _excluded(text: str) -> set[int]:
    result = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        vmid = parse_vmid(part)
        if vmid is None:
            raise GpuHookError(f"--exclude: invalid VMID {part!r}", EXIT_USAGE)
        result.add(vmid)
    return result


def run(args: argparse.Namespace) -> int:
    if not args.vmids and not args.all:
        raise GpuHookError("name the guests to back up, or --all", EXIT_USAGE)
    if args.vmids and (args.all or args.exclude):
        # as vzdump: "option conflicts with option 'vmid'" (PVE/VZDump.pm verify_vzdump_parameters)
        option = "--all" if args.all else "--exclude"
        raise GpuHookError(
            f"{option} conflicts with the VMIDs given ({', '.join(map(str, args.vmids))}), as in "
            "vzdump: give the guests, or --all [--exclude ...]",
            EXIT_USAGE,
        )
    notes: list[str] = []
    try:
        settings = load_settings()
    except ConfigError as error:
        raise GpuHookError(f"{error} (the hook would stop nobody)", EXIT_USAGE) from None
    guests = {g.vmid: g for g in all_guests()}
    wanted = sorted(guests) if args.all else sorted(set(args.vmids))
    unknown = [v for v in wanted if v not in guests]
    if unknown:
        raise GpuHookError(f"no guest {', '.join(map(str, unknown))} on this node", EXIT_USAGE)
    wanted = [v for v in wanted if v not in _excluded(args.exclude)]
    inventory = Inventory()
    order = []
    warnings: list[str] = []
    for vmid in wanted:
        guest = guests[vmid]
        is_running = runtime.running(guest.kind, vmid)
        # a stop-mode backup restarts a running VM: that start applies its pending changes
        needs, problems = inventory.needs(guest, for_start=not is_running or args.mode == "stop")
        warnings.extend(w for w in problems if w not in warnings)
        order.append((guest, is_running, needs))
    warnings.extend(w for w in inventory.mapping_warnings if w not in warnings)
    forecast = forecast_job(
        order,
        inventory.holders(),
        mode=args.mode,
        protect=settings.protect,
        restart=settings.restart,
        ha={vmid for vmid, state in inventory.ha_states().items() if state == "started"},
        durations=_durations(order),
        keep_down_max=settings.keep_down_max,
    )
    notes.extend(f"warning: {w}" for w in warnings)
    data = _as_data(forecast, args.mode, settings.restart, notes)
    emit(args, data, _tables(forecast), notes + _summary(forecast))
    return EXIT_OK if forecast.ok else EXIT_ATTENTION


def _durations(order: list[tuple[Guest, bool, list[Need]]]) -> dict[int, float]:
    """Each guest's previous backup, from vzdump's per-guest logs (as the hook reads them)."""
    found = {}
    for guest, _, _ in order:
        seconds = vzdumpjob.last_backup_seconds(guest.kind, guest.vmid)
        if not isinstance(seconds, vzdumpjob.Unknown):
            found[guest.vmid] = float(seconds)
    return found


def _as_data(forecast: JobForecast, mode: str, restart: str, notes: list[str]) -> dict[str, object]:
    return {
        "mode": mode,
        "restart": restart,
        "ok": forecast.ok,
        "guests": [
            {
                "vmid": g.guest.vmid,
                "type": g.guest.kind,
                "name": g.guest.name,
                "mode": g.mode,
                "devices": g.addresses,
                "stops": [{"vmid": s.holder.vmid, "address": s.address} for s in g.stops],
                "restarted_after": g.restarted,
                "outcome": g.outcome,
                "reason": g.reason,
            }
            for g in forecast.guests
        ],
        "restarted_at_job_end": forecast.restarted_at_end,
        "down_for_backups": {str(k): v for k, v in sorted(forecast.down_for.items())},
        "holders": {
            str(vmid): {
                "cycles": cost.cycles,
                "down_seconds": round(cost.down_seconds),
                "during": cost.during,
            }
            for vmid, cost in sorted(forecast.holders.items())
        },
        "warnings": notes,
    }


def _back(forecast: JobForecast, step: GuestForecast) -> str:
    """When the holders stopped for ``step`` run again."""
    whens = []
    for stop in step.stops:
        vmid = stop.holder.vmid
        later = forecast.guests[forecast.guests.index(step) :]
        back = next((g for g in later if vmid in g.restarted), None)
        if back is None:
            whens.append("at job end")
        elif back is step:
            whens.append("after this backup")
        else:
            whens.append(f"after {back.guest.label}")
    return ", ".join(dict.fromkeys(whens))


def _tables(forecast: JobForecast) -> list[Table]:
    rows = []
    for g in forecast.guests:
        stops = ", ".join(s.holder.guest.label for s in g.stops)
        back = _back(forecast, g)
        outcome = g.outcome if not g.reason else f"{g.outcome}: {g.reason}"
        rows.append(
            {
                "guest": g.guest.label,
                "mode": g.mode,
                "devices": ", ".join(g.addresses) or "-",
                "stops": stops or "-",
                "back": back or "-",
                "outcome": outcome,
            }
        )
    columns = [
        ("guest", "GUEST"),
        ("mode", "MODE"),
        ("devices", "DEVICES"),
        ("stops", "SHUTS DOWN"),
        ("back", "BACK"),
        ("outcome", "OUTCOME"),
    ]
    return [Table(columns, rows, title="Backup job forecast")]


def _summary(forecast: JobForecast) -> list[str]:
    """Per holder what the night costs it, in words: cycles, time down, whose backups."""
    lines = []
    labels = {s.holder.vmid: s.holder.guest.label for g in forecast.guests for s in g.stops}
    for vmid, cost in sorted(forecast.holders.items()):
        times = {1: "once", 2: "twice"}.get(cost.cycles, f"{cost.cycles} times")
        during = ", ".join(str(v) for v in cost.during)
        lines.append(
            f"{labels.get(vmid, cost.label)}: shut down {times}, down about "
            f"{_about(cost.down_seconds)}, during the backups of {during}"
        )
    if forecast.restarted_at_end:
        names = ", ".join(labels.get(v, str(v)) for v in forecast.restarted_at_end)
        lines.append(f"started again at job end: {names}")
    return lines


def _about(seconds: float) -> str:
    """An expected duration, rounded as an estimate deserves."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "a minute"
    if minutes < 120:
        return f"{minutes} min"
    return f"{seconds / 3600:.1f} h"
