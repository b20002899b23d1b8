"""``pve-gpu-hook dry-run``: predict what a vzdump job will do, with the hook's own planner.

Runs no command and writes nothing; prints text tables, or JSON with ``--output-format json``
(its shape is below). A guest's forecast is ``fail`` whenever the hook or vzdump
will fail its backup: a holder that must not or cannot be stopped, vzdump's refusal (stop mode of
an HA guest), or PVE refusing to start the VM with its devices (a device sysfs lacks, a PCI mapping
it cannot use, ``host=`` and ``mapping=`` together, no IOMMU: ``reason`` says which, and the hook
then stops nobody for it). A template is ``ok``: it is backed up without its devices.

For a PCI mapping with several devices (a pool), ``DEVICES`` shows the one the guest gets: the
one PVE takes once the hook has freed what it frees (the planner's choice), or the one a running
guest holds; the notes name the other alternatives. Warnings also name a device in ``D3cold`` or
without a reset method that tonight's job starts or whose holder it shuts down.

Text: one row per guest (``VMID NAME MODE DEVICES STOPS BACK OUTCOME``: STOPS lists the VMIDs the
hook shuts down for it, BACK when they are started again: ``after-guest``, ``after-VMID`` (after
a later guest's backup) or ``after-job``), then the reasons, warnings and a summary. Piped, each
cell is one awk field::

    pve-gpu-hook dry-run --all --noheader | awk '$7 == "fail" {print $1}'

JSON shape (``--output-format json``)::

    {"format": 1, "mode": "stop", "restart": "job-aware", "ok": true,
     "guests": [{"vmid": 102, "type": "qemu", "name": "gpu2", "mode": "stop",
                 "devices": ["0000:01:00.0"],          # every address its config names
                 "needs": [{"source": "hostpci0", "mapping": "gpu" | null,
                            "alternatives": [["0000:01:00.0"], ["0000:41:00.0"]],
                            "picked": 1 | null,        # index of the alternative it gets
                            "failure": str | null}],   # PVE's error: its start dies here
                 "stops": [{"vmid": 104, "address": "0000:01:00.0"}],
                 "restarted_after": [], "outcome": "ok" | "fail",
                 "reason": ""}, ...],                  # why it fails; for a template: that it
                                                       # is backed up without its devices
     "restarted_at_job_end": [], "down_for_backups": {"104": 3},
     "holders": {"104": {"cycles": 1, "down_seconds": 840, "during": [102, 103, 105]}},
     "warnings": []}

``restarted_after``: holders started again after this guest's backup; ``down_seconds``: the
expected time down, from the guests' previous backup durations (10 minutes for a guest
without one).

``outcome`` was ``skip`` for a template before: a template's backup succeeds, so it is ``ok``.

Exit status: 0 when every backup is forecast to succeed, 1 when one fails, 2 for a usage error.
"""

from __future__ import annotations

import argparse

from pvegpuhook import completion, pci, vzdumpjob
from pvegpuhook.commands import vmid_arg
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, ConfigError, GpuHookError
from pvegpuhook.findings import health_problem, join_and
from pvegpuhook.inventory import Inventory, all_guests
from pvegpuhook.model import Holder, start_failure
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.plan import (
    Forecast,
    GuestForecast,
    JobForecast,
    forecast_job,
    held_alternative,
)
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
    order, problems = inventory.job_order(
        [guests[v] for v in wanted], stop_mode=args.mode == "stop"
    )
    warnings: list[str] = []
    for guest, _, needs in order:
        # PVE refusing its start is this guest's reason (with the file and line), not a warning
        failed = start_failure(needs)
        said = f"{failed.blame}: {failed.source}: PVE will not start " if failed else None
        warnings.extend(
            w
            for w in problems[guest.vmid]
            if w not in warnings and not (said and w.startswith(said))
        )
    warnings.extend(w for w in inventory.mapping_warnings if w not in warnings)
    forecast = forecast_job(
        order,
        inventory.holders(),
        mode=args.mode,
        protect=settings.protect,
        restart=settings.restart,
        ha={vmid for vmid, state in inventory.ha_states().items() if state == "started"},
        durations=vzdumpjob.previous_durations(order),
        keep_down_max=settings.keep_down_max,
    )
    picks = _picks(forecast, inventory.holders())
    warnings.extend(w for w in _health(forecast, picks, inventory.sysfs) if w not in warnings)
    notes.extend(f"warning: {w}" for w in warnings)
    data = _as_data(forecast, args.mode, settings.restart, notes, picks)
    text_notes = _reasons(forecast, picks) + notes + _summary(forecast)
    emit(args, data, _tables(forecast, picks), text_notes)
    return EXIT_OK if forecast.ok else EXIT_ATTENTION


Picks = dict[int, dict[str, int]]  # vmid → need source → index of the alternative it gets


def _picks(forecast: JobForecast, holders: list[Holder]) -> Picks:
    """The alternative of each need every guest gets: the planner's choice for a VM the job
    starts; for a running one, the one its QEMU holds."""
    by_vmid = {h.vmid: h for h in holders}
    picks: Picks = {}
    for step in forecast.guests:
        chosen = picks.setdefault(step.guest.vmid, {})
        for need, index in zip(step.needs, step.decision.picks, strict=False):
            if index is not None:
                chosen[need.source] = index
        holder = by_vmid.get(step.guest.vmid)
        if holder is not None and not chosen:
            for need in step.needs:
                index = held_alternative(need, holder.claims)
                if index is not None:
                    chosen[need.source] = index
    return picks


def _gets(step: GuestForecast, picks: Picks) -> list[str]:
    """The addresses a guest gets: its picked alternatives, all of a need without one."""
    if step.decision.template:
        return []
    chosen = picks.get(step.guest.vmid, {})
    found: list[str] = []
    for need in step.needs:
        index = chosen.get(need.source)
        alternatives = need.alternatives if index is None else [need.alternatives[index]]
        found += [c.address for alternative in alternatives for c in alternative]
    return found


def _health(forecast: JobForecast, picks: Picks, sysfs: pci.Sysfs) -> list[str]:
    """GPUs the job starts a VM with, or whose holder it shuts down, that may not come back."""
    stopped: dict[str, list[str]] = {}  # device → the holders the job shuts down to free it
    started: dict[str, list[str]] = {}  # device → the VMs whose backup starts with it
    for step in forecast.guests:
        if step.outcome != Forecast.OK:
            continue
        for stop in step.stops:
            for claim in stop.holder.claims:
                stopped.setdefault(pci.device_of(claim.address), []).append(stop.holder.guest.label)
        if step.mode == "stop" and not step.decision.template:
            for address in _gets(step, picks):
                started.setdefault(pci.device_of(address), []).append(f"VM {step.guest.vmid}")
    found = []
    for device in sorted(set(stopped) | set(started)):
        functions = sysfs.functions(device)
        problem = health_problem(sysfs, device, functions[0]) if functions else None
        if problem is None:
            continue
        tonight = []
        if device in stopped:
            holders = list(dict.fromkeys(stopped[device]))
            verb = "is" if len(holders) == 1 else "are"
            tonight.append(f"{join_and(holders)} {verb} shut down to free it")
        if device in started:
            vmids = list(dict.fromkeys(started[device]))
            what = "the backup of" if len(vmids) == 1 else "the backups of"
            tonight.append(
                f"{what} {join_and(vmids)} {'starts' if len(vmids) == 1 else 'start'} it"
            )
        found.append(f"{problem} (tonight: {'; '.join(tonight)})")
    return found


def _as_data(
    forecast: JobForecast, mode: str, restart: str, notes: list[str], picks: Picks
) -> dict[str, object]:
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
                "needs": [
                    {
                        "source": need.source,
                        "mapping": need.mapping,
                        "alternatives": [[c.address for c in alt] for alt in need.alternatives],
                        "picked": picks.get(g.guest.vmid, {}).get(need.source),
                        "failure": need.failure,
                    }
                    for need in g.needs
                ],
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


def _back(forecast: JobForecast, step: GuestForecast) -> str | None:
    """When the holders stopped for ``step`` run again, one word each: ``after-guest`` (this
    backup), ``after-VMID`` (a later guest's backup) or ``after-job``."""
    whens = []
    later = forecast.guests[forecast.guests.index(step) :]
    for stop in step.stops:
        back = next((g for g in later if stop.holder.vmid in g.restarted), None)
        if back is None:
            whens.append("after-job")
        elif back is step:
            whens.append("after-guest")
        else:
            whens.append(f"after-{back.guest.vmid}")
    return ",".join(dict.fromkeys(whens)) or None


def _tables(forecast: JobForecast, picks: Picks) -> list[Table]:
    rows = []
    for g in forecast.guests:
        back = _back(forecast, g)
        rows.append(
            {
                "vmid": g.guest.vmid,
                "name": g.guest.name,
                "mode": g.mode,
                "devices": _gets(g, picks) or None,
                "stops": [s.holder.vmid for s in g.stops] or None,
                "back": back,
                "outcome": g.outcome,
            }
        )
    columns = [
        ("vmid", "VMID"),
        ("name", "NAME"),
        ("mode", "MODE"),
        ("devices", "DEVICES"),
        ("stops", "STOPS"),
        ("back", "BACK"),
        ("outcome", "OUTCOME"),
    ]
    return [
        Table(
            columns,
            rows,
            title="Backup job forecast",
            fields=True,
            wrap=("devices", "stops"),
            empty="no guest to back up",
        )
    ]


def _reasons(forecast: JobForecast, picks: Picks) -> list[str]:
    """Why a backup fails, what a template's backup leaves out, which device of a pool a guest
    gets: one line each, after the table."""
    lines = []
    for g in forecast.guests:
        failed = start_failure(g.needs) if g.decision.failure else None
        if failed is not None:  # where the admin fixes it
            lines.append(f"{g.guest.label}: {g.outcome}: {g.reason} ({failed.blame})")
        elif g.reason:
            lines.append(f"{g.guest.label}: {g.outcome}: {g.reason}")
        if g.decision.restart_first and g.outcome == Forecast.OK:
            first = g.decision.restart_first
            verb = "is" if len(first) == 1 else "are"
            lines.append(
                f"{g.guest.label}: {join_and([f'VM {v}' for v in first])} {verb} started again "
                "before vzdump restarts it, to take its device back first"
            )
        if g.decision.moves:  # as the hook says it at backup-start
            lines += [
                f"{g.guest.label} will take {m} at vzdump's restart" for m in g.decision.moves
            ]
            continue
        chosen = picks.get(g.guest.vmid, {})
        for need in g.needs:
            index = chosen.get(need.source)
            if len(need.alternatives) < 2 or index is None or g.decision.template:
                continue
            gets = ", ".join(c.address for c in need.alternatives[index])
            others = [
                ", ".join(c.address for c in alt)
                for n, alt in enumerate(need.alternatives)
                if n != index
            ]
            how = "gets" if g.decision.picks else "holds"
            lines.append(
                f"{g.guest.label} {how} {gets} of mapping {need.mapping} ({need.source}; "
                f"alternative {index + 1} of {len(need.alternatives)}; the others: "
                f"{'; '.join(others)})"
            )
    return lines


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
