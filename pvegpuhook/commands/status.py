"""``pve-gpu-hook status``: is the hook in place, and does anything need the admin?

Reads only — no lock, no write — so it is safe from monitoring while a backup runs; ``--quiet``
prints nothing, for checks that look at the exit status alone. Exit status 0 when all is fine, 1
when something needs the admin (each reason is one entry of ``attention``): ``/etc/vzdump.conf``
missing or not naming the hook, another hook active without chaining, our hook file missing, a
backup job that bypasses the hook, an invalid override file or one that protects a guest this node
does not have, guests waiting to be started again, a damaged state file (or one kept aside), a state
file or log that cannot be read, a chained hook failing its checks, or ERROR lines in the last job.
A damaged state file is also said once on stderr. Run as another user than root it cannot see the
state and the guests: it says so in one line and exits 2, and answers nothing.

Text: sections of ``Key: value`` lines as ``pvecm status`` prints them (times as PVE prints
them, local ``YYYY-MM-DD HH:MM:SS``), the waiting guests as a table, then the reasons for exit
status 1 as ``warning:`` lines. The last job is summed up (when it ran, how it ended, how many
guests it shut down, for how long); ``--verbose`` adds its every action.

JSON/YAML shape (``--output-format json``; keys are stable)::

    {"format": 1,                        # this shape's version (every command's JSON has it)
     "registered": true,                 # vzdump.conf's active script is our hook
     "script": "/usr/share/pve-gpu-hook/vzdump-hook",   # the active script: value, or null
     "script_line": 23,                  # its line in /etc/vzdump.conf, or null
     "vzdump_conf": "/etc/vzdump.conf", "vzdump_conf_exists": true,
     "hook_path": "/usr/share/pve-gpu-hook/vzdump-hook",
     "hook_executable": true,            # the file exists (under the root) and is executable
     "chain": {"path": "/usr/local/bin/old-hook", "ok": true, "problem": null},   # or null
     "bypassing_jobs": ["backup-1a2b3c4d-0001"],   # jobs.cfg jobs with their own script
     "override": {"path": "/etc/pve-gpu-hook/config.yaml", "exists": true, "valid": true,
                  "error": null,         # "file:line: message" when invalid
                  "values": {"shutdown_timeout": 180, "force_stop": false,
                             "start_timeout": 0, "protect": [], "restart": "after-guest",
                             "metrics_file": "/var/lib/.../pve-gpu-hook.prom"},
                                         # values: the ones in force; null when invalid;
                                         # metrics_file: false when turned off
                  "unknown_protect": []},  # protected VMIDs that are no guest of this node
     "waiting": [{"vmid": 104, "type": "qemu", "name": "gpu-desktop", "status": "stopped",
                  "since": "2024-05-01T21:03:10+02:00", "for_vmid": 102, "note": null}],
                                         # null when the state file cannot be read
     "state_error": null,                # why the state file cannot be read, or null
     "corrupt_state": ["/var/lib/pve-gpu-hook/state.json.corrupt-20240501T210500"],
                                         # damaged state files: kept aside, or the live one
     "not_started_again": [{"vmid": 110, "type": "lxc", "line": "2024-05-01T21:03:12+02:00 ..."}],
                                         # with damaged state: the guests the log shows shut
                                         # down by the hook and not back since; else []
     "last_job": {"start": "2024-05-01T21:00:00+02:00", "end": "2024-05-01T21:20:03+02:00",
                  "end_phase": "job-end",   # or "job-abort"; null while unfinished
                  "result": "ok",           # ok | error (ERROR lines) | aborted | unfinished
                  "errors": 0,
                  "actions": [{"time": "...", "phase": "backup-start", "vmid": 102,
                               "message": "VM 104 (gpu-desktop) shut down in 12 s: ..."}]},
                                            # last_job: null when the log has no job
     "night": {"started": "2024-05-01T21:03:10+02:00",   # the last job that shut guests down
               "ended": "2024-05-01T21:20:03+02:00",     # null while it runs (or was killed)
               "holders_stopped": 1, "cycles": 1,        # guests shut down; shutdown/boot
               "downtime_seconds": 1013.2,               # cycles; time they were down
               "failed_restarts": 0, "still_down": []},  # VMIDs not back yet
                                            # night: null when no job ever shut a guest down
     "attention": ["..."],                  # why the exit status is 1; empty when 0
     "notes": ["..."]}                      # e.g. an old key name in the override file
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pvegpuhook import log, paths, registration
from pvegpuhook.errors import (
    EXIT_ATTENTION,
    EXIT_OK,
    ConfigError,
    GpuHookError,
    NotPermitted,
)
from pvegpuhook.model import GuestKind, guest_label
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.records import JobTally, duration
from pvegpuhook.settings import load_settings
from pvegpuhook.state import StateStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show whether the hook is in place and what needs attention",
        description=(
            "Show whether vzdump calls the hook (/etc/vzdump.conf), a chained previous hook, "
            "backup jobs that bypass it with their own script, the override file and the values "
            "in force, guests the hook stopped that are not back yet, damaged state files and "
            "a summary of the last job. Reads only. Exit status 1 when something needs the "
            "admin, 2 when it cannot look (run it as root)."
        ),
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also list every action of the last job"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing: the exit status alone says whether something needs attention "
        "(for Nagios, Zabbix or CheckMK style checks)",
    )
    add_output_options(parser)
    parser.set_defaults(run=run)


# ---- gathering -------------------------------------------------------------------------------


def gather() -> dict[str, object]:
    """Everything status reports, as the JSON shape documented above, plus ``damage``: the
    lines to say once on stderr (not part of the shape)."""
    attention: list[str] = []
    shown = paths.shown(paths.VZDUMP_CONF)
    registered = False
    script = script_line = None
    conf_exists = False
    try:
        conf = registration.read_conf(missing_ok=True, follow=True)  # vzdump follows it
    except NotPermitted:
        raise
    except GpuHookError as error:
        conf = None
        conf_exists = True
        attention.append(str(error))
    if conf is not None:
        conf_exists = True
        active = registration.active_script(conf)
        if active is not None:
            script, script_line = active
            registered = script == registration.HOOK_PATH
    store = StateStore()
    try:
        chain_path = registration.chain()
    except NotPermitted:
        raise
    except GpuHookError as error:
        chain_path = None
        attention.append(str(error))
    if not registered:
        if not conf_exists:
            attention.append(
                f"not registered: {shown} does not exist (is this a Proxmox VE host? the file "
                "belongs to pve-manager): restore it, then run 'pve-gpu-hook register'"
            )
        elif script is not None:
            attention.append(
                f"another hook script is active ({shown} line {script_line}: '{script}'): "
                "pve-gpu-hook does not run; run 'pve-gpu-hook register --chain'"
            )
        elif conf is not None:
            attention.append(
                f"not registered: {shown} sets no hook script; run 'pve-gpu-hook register'"
            )
    hook_executable = registration.executable(registration.HOOK_PATH)
    if registered and not hook_executable:
        attention.append(
            f"{registration.HOOK_PATH} is missing or not executable: vzdump will fail every job; "
            "reinstall pve-gpu-hook or run 'pve-gpu-hook unregister'"
        )

    chain: dict[str, object] | None = None
    if chain_path is not None:
        problem = registration.chain_problem(chain_path)
        chain = {"path": chain_path, "ok": problem is None, "problem": problem}
        if problem is not None and registered:
            attention.append(
                f"the chained hook {chain_path} {problem}: the hook does not run it and "
                "fails the phase; fix it or run 'pve-gpu-hook unregister'"
            )

    jobs, jobs_problem = registration.read_jobs()
    if jobs_problem:
        attention.append(jobs_problem)
    jobs_message = registration.jobs_warning(jobs)
    if jobs_message:
        attention.append(jobs_message)

    override, notes = _override(attention)

    waiting: list[dict[str, object]] | None = []
    state_error: str | None = None
    damage: list[str] = []
    corrupt = list(store.corrupt_files())
    try:
        records = store.records()  # not held: only reads
    except NotPermitted:
        raise
    except GpuHookError as error:
        records = None
        state_error = str(error)
        attention.append(
            f"cannot read the state file: {error}; guests the hook stopped may still be off"
        )
    if store.salvaged:
        corrupt.insert(0, store.path)
        line = (
            f"the state file {store.salvaged}: guests it named may still be off; "
            "'pve-gpu-hook recover' keeps it aside, starts the guests of its intact records "
            "and shows the log lines of the others"
        )
        attention.append(line)
        damage.append(line)
    kept = [c for c in corrupt if c != store.path]
    if kept:
        line = (
            f"damaged state file(s) kept aside: {', '.join(kept)}; guests they named may still "
            "be off: 'pve-gpu-hook recover --dry-run' shows the log lines of the guests the hook "
            "shut down and did not start again; start those that should run, then delete the "
            "file(s)"
        )
        attention.append(line)
        damage.append(line)
    if records is None:
        waiting = None
    else:
        for record in sorted(records, key=lambda r: r.vmid):
            waiting.append(
                {
                    "vmid": record.vmid,
                    "type": str(record.kind),
                    "name": record.name,
                    "status": str(record.status),
                    "since": log.timestamp(record.since) if record.since is not None else None,
                    "for_vmid": record.for_vmid,
                    "note": record.note,
                }
            )
        if waiting:
            attention.append(
                f"{len(waiting)} guest(s) stopped by pve-gpu-hook are not back yet: "
                + ", ".join(str(w["vmid"]) for w in waiting)
                + "; 'pve-gpu-hook recover' starts them"
            )

    try:
        lines = log.read_tail()
    except NotPermitted:
        raise
    except GpuHookError as error:
        lines = []
        attention.append(f"{error}: the last job is not known")
    job = log.last_job(lines)
    if job is not None and job["errors"]:
        attention.append(
            f"the last backup job (started {pve_time(str(job['start']))}) logged "
            f"{job['errors']} error(s); see {paths.shown(paths.LOG_FILE)}"
        )
    recorded = {r.vmid for r in records or []}
    not_back = []
    if corrupt:
        for word, vmid, line_ in log.not_started_again(lines):
            if vmid not in recorded:
                kind = GuestKind.QEMU if word == "VM" else GuestKind.LXC
                not_back.append({"vmid": vmid, "type": str(kind), "line": _log_text(line_)})

    return {
        "registered": registered,
        "script": script,
        "script_line": script_line,
        "vzdump_conf": shown,
        "vzdump_conf_exists": conf_exists,
        "hook_path": registration.HOOK_PATH,
        "hook_executable": hook_executable,
        "chain": chain,
        "bypassing_jobs": [job_.id for job_ in jobs],
        "override": override,
        "waiting": waiting,
        "state_error": state_error,
        "corrupt_state": corrupt,
        "not_started_again": not_back,
        "last_job": job,
        "night": _night(store.job()),
        "attention": attention,
        "notes": notes,
        "damage": damage,
    }


def _override(attention: list[str]) -> tuple[dict[str, object], list[str]]:
    """The override file's part of the shape, and its notes (an old key name)."""
    override: dict[str, object] = {
        "path": paths.shown(paths.OVERRIDE_FILE),
        "exists": os.path.exists(paths.host(paths.OVERRIDE_FILE)),
        "valid": True,
        "error": None,
        "values": None,
        "unknown_protect": [],
    }
    notes: list[str] = []
    try:
        settings = load_settings()
    except ConfigError as error:
        override["valid"] = False
        override["error"] = str(error)
        attention.append(
            f"override file invalid: {error}; the hook stops no guest until it is fixed"
        )
        return override, notes
    override["values"] = settings.as_dict()
    notes.extend(settings.notes)
    if settings.protect:
        from pvegpuhook.inventory import local_vmids

        unknown = sorted(settings.protect - set(local_vmids()))
        override["unknown_protect"] = unknown
        if unknown:
            attention.append(
                f"{paths.shown(paths.OVERRIDE_FILE)}: protect: "
                f"{', '.join(map(str, unknown))} {'is' if len(unknown) == 1 else 'are'} no "
                "guest of this node (a typo? the guest meant is not protected)"
            )
    return override, notes


def _night(tally: JobTally | None) -> dict[str, object] | None:
    """The job tally in the JSON shape: the last job that shut guests down, in numbers."""
    if tally is None:
        return None
    now = time.time()
    return {
        "started": log.timestamp(tally.started),
        "ended": log.timestamp(tally.ended) if tally.ended is not None else None,
        "holders_stopped": tally.holders_stopped,
        "cycles": tally.cycles,
        "downtime_seconds": round(tally.downtime(now), 1),
        "failed_restarts": tally.failed_restarts,
        "still_down": sorted({s.vmid for s in tally.stops if s.back is None}),
    }


def _log_text(line: log.LogLine) -> str:
    vmid = str(line.vmid) if line.vmid is not None else "-"
    return f"{line.time} {line.phase} {vmid} {line.message}"


# ---- text ------------------------------------------------------------------------------------


def pve_time(stamp: str | float | None) -> str:
    """A time as PVE prints it: local ``YYYY-MM-DD HH:MM:SS`` (from an epoch or ISO 8601)."""
    if stamp is None:
        return "-"
    if isinstance(stamp, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


def _epoch(stamp: object) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return None


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def sections(data: dict[str, object], tally: JobTally | None) -> list[tuple[str, list]]:
    """The text form's sections: (title, [(key, value), ...])."""
    conf = data["vzdump_conf"]
    if not data["vzdump_conf_exists"]:
        registered = f"no: {conf} does not exist"
    elif data["registered"]:
        registered = f"yes ({conf} line {data['script_line']})"
    elif data["script"] is not None:
        registered = f"no: {conf} line {data['script_line']} sets another hook: {data['script']}"
    else:
        registered = f"no: {conf} sets no hook script"
    state = "executable" if data["hook_executable"] else "MISSING or not executable"
    hook: list[tuple[str, str]] = [
        ("Registered", registered),
        ("Hook script", f"{data['hook_path']} ({state})"),
    ]
    chain = data["chain"]
    if isinstance(chain, dict):
        verdict = "passes the checks" if chain["ok"] else f"FAILS the checks: {chain['problem']}"
        hook.append(("Chained hook", f"{chain['path']} ({verdict})"))
    else:
        hook.append(("Chained hook", "none"))
    jobs = data["bypassing_jobs"]
    assert isinstance(jobs, list)
    hook.append(("Bypassing jobs", ", ".join(map(str, jobs)) or "none"))
    override = data["override"]
    assert isinstance(override, dict)
    if not override["valid"]:
        hook.append(("Settings", f"INVALID: {override['error']}"))
    else:
        where = f"from {override['path']}" if override["exists"] else "defaults"
        if not override["exists"]:
            where += f" (no {override['path']})"
        hook.append(("Settings", where))
        values = override["values"]
        assert isinstance(values, dict)
        import textwrap

        pairs = " ".join(f"{k}={_plain(v)}" for k, v in values.items())
        hook += [("", part) for part in textwrap.wrap(pairs, 60, break_on_hyphens=False)]

    guests: list[tuple[str, str]] = []
    waiting = data["waiting"]
    if waiting is None:
        guests.append(("Waiting guests", f"UNKNOWN: {data['state_error']}"))
    elif waiting:
        assert isinstance(waiting, list)
        labels = [guest_label(str(w["type"]), int(w["vmid"]), w["name"]) for w in waiting]
        guests.append(("Waiting guests", f"{len(waiting)}: {', '.join(labels)}"))
    else:
        guests.append(("Waiting guests", "none"))
    corrupt = data["corrupt_state"]
    assert isinstance(corrupt, list)
    if corrupt:
        guests.append(("Damaged state", f"YES: {', '.join(map(str, corrupt))}"))
        not_back = data["not_started_again"]
        assert isinstance(not_back, list)
        named = [guest_label(str(n["type"]), int(n["vmid"])) for n in not_back]
        guests.append(
            (
                "Not started again",
                ", ".join(named) + ": the log shows the hook shut it down; no record names it"
                if named
                else "none: every guest the log shows shut down by the hook has a record or "
                "was started again",
            )
        )
    else:
        guests.append(("Damaged state", "none"))

    job_lines = _job_lines(data, tally)
    return [("Hook", hook), ("Guests", guests), ("Last job", job_lines)]


def _job_lines(data: dict[str, object], tally: JobTally | None) -> list[tuple[str, str]]:
    job = data["last_job"]
    waiting = data["waiting"] or []
    assert isinstance(waiting, list)
    lines: list[tuple[str, str]] = []
    start = _epoch(job["start"]) if isinstance(job, dict) else None
    # the tally is the last job's when it began after the job's start (else an older job's)
    same = tally is not None and (start is None or tally.started >= start - 1)
    if isinstance(job, dict):
        lines.append(("Started", pve_time(str(job["start"]))))
        result = str(job["result"])
        logged = f"{job['errors']} error(s) logged, see {paths.shown(paths.LOG_FILE)}"
        if job["end"] is not None:
            lines.append(("Ended", f"{pve_time(str(job['end']))} ({job['end_phase']})"))
            outcome = {"ok": "ok", "aborted": "aborted (job-abort)", "error": logged}
            lines.append(("Result", outcome.get(result, result)))
        else:
            lines.append(("Ended", "no job-end logged (the job still runs, or vzdump was killed)"))
            mine = [
                int(w["vmid"])
                for w in waiting
                if start is not None and (_epoch(w["since"]) or 0) >= start - 1
            ]
            off = sorted({*mine, *(_still_off(tally) if same else [])})
            if job["errors"]:
                outcome_ = logged
            elif off:
                outcome_ = f"unfinished: guests it shut down are still off: {_vmids(off)}"
            else:
                outcome_ = "every guest it shut down runs again"
            lines.append(("Result", outcome_))
    else:
        lines.append(("Job", "none in the log"))
    if tally is None:
        lines.append(("Guests shut down", "none" if job else "no job ever shut a guest down"))
    elif same:
        lines.append(("Guests shut down", _tally_text(tally)))
    else:
        lines.append(("Guests shut down", "none"))
        lines.append(("Last job that did", f"{pve_time(tally.started)}: {_tally_text(tally)}"))
    return lines


def _vmids(vmids: list[int]) -> str:
    return ", ".join(map(str, vmids))


def _still_off(tally: JobTally | None) -> list[int]:
    """Guests the job shut down that it did not start again and that are off now (an admin may
    have started one by hand)."""
    if tally is None:
        return []
    from pvegpuhook import runtime

    off = []
    for stop in tally.stops:
        if stop.back is None and stop.vmid not in off:
            kind = GuestKind.LXC if stop.label.startswith("CT ") else GuestKind.QEMU
            if not runtime.running(kind, stop.vmid):
                off.append(stop.vmid)
    return sorted(off)


def _tally_text(tally: JobTally) -> str:
    now = time.time()
    names = ", ".join(dict.fromkeys(s.label for s in tally.stops))
    cycles = f"{tally.cycles} shutdown/boot cycle{'s' if tally.cycles != 1 else ''}"
    failed = tally.failed_restarts
    text = (
        f"{tally.holders_stopped} ({names}), {cycles}, {duration(tally.downtime(now))} down, "
        f"{failed or 'no'} failed restart{'s' if failed != 1 else ''}"
    )
    off = _still_off(tally)
    if off:
        text += f"; still off: {', '.join(map(str, off))}"
    return text


def render_sections(blocks: list[tuple[str, list]], *, noheader: bool) -> str:
    width = max(len(key) for _, rows in blocks for key, _ in rows) + 2
    out: list[str] = []
    for title, rows in blocks:
        if out:
            out.append("")
        if not noheader:
            out += [title, "-" * len(title)]
        for key, value in rows:
            head = f"{key}:" if key else ""
            out.append(log.clean(f"{head.ljust(width)}{value}").rstrip())
    return "\n".join(out) + "\n"


def tables(data: dict[str, object], *, verbose: bool) -> list[Table]:
    result = []
    waiting = data["waiting"]
    if isinstance(waiting, list) and waiting:
        rows = [
            {
                **w,
                "type": GuestKind(str(w["type"])).word,
                "since": pve_time(str(w["since"])) if w["since"] else None,
            }
            for w in waiting
        ]
        columns = [
            ("vmid", "VMID"),
            ("type", "TYPE"),
            ("name", "NAME"),
            ("status", "STATUS"),
            ("since", "SINCE"),
            ("for_vmid", "FOR BACKUP OF"),
            ("note", "NOTE"),
        ]
        result.append(Table(columns, rows, "Guests stopped by the hook, not back yet"))
    job = data["last_job"]
    if verbose and isinstance(job, dict) and job["actions"]:
        columns = [("time", "TIME"), ("phase", "PHASE"), ("vmid", "VMID"), ("message", "MESSAGE")]
        actions = job["actions"]
        assert isinstance(actions, list)
        rows = [{**a, "time": pve_time(str(a["time"]))} for a in actions]
        result.append(Table(columns, rows, "Last job: every action"))
    return result


def run(args: argparse.Namespace) -> int:
    data = gather()
    damage = data.pop("damage")
    attention = data["attention"]
    assert isinstance(attention, list) and isinstance(damage, list)
    code = EXIT_ATTENTION if attention else EXIT_OK
    if args.quiet:  # the exit status alone, also for a damaged state
        return code
    for line in damage:  # said once, where an admin's terminal and a cron mail see it
        print(f"pve-gpu-hook: warning: {log.clean(line)}", file=sys.stderr)
    given = data["notes"]
    assert isinstance(given, list)
    if getattr(args, "output_format", "text") != "text":
        emit(args, data, [], [])
        return code
    tally = StateStore().job()
    noheader = bool(getattr(args, "noheader", False))
    sys.stdout.write(render_sections(sections(data, tally), noheader=noheader))
    sys.stdout.write("\n")
    sys.stdout.flush()
    notes = [f"warning: {item}" for item in attention if item not in damage]
    if not attention:
        notes = ["all fine: nothing needs attention"]
    emit(args, data, tables(data, verbose=args.verbose), [*given, *notes])
    return code
