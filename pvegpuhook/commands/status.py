"""``pve-gpu-hook status``: is the hook in place, and does anything need the admin?

Reads only — no lock, no write — so it is safe from monitoring while a backup runs; ``--quiet``
prints nothing, for checks that look at the exit status alone. Exit status 0 when all is fine, 1
when something needs the admin (each reason is one entry of ``attention``): not registered on a
Proxmox VE host, another hook active without chaining, our hook file missing,
a backup job that bypasses the hook, an invalid override file, guests waiting to be started
again, corrupt state, a chained hook failing its checks, or ERROR lines in the last job.

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
                             "metrics_file": "/var/lib/.../pve-gpu-hook.prom"}},
                                         # values: the ones in force; null when invalid;
                                         # metrics_file: false when turned off
     "waiting": [{"vmid": 104, "type": "qemu", "name": "gpu-desktop", "status": "stopped",
                  "since": "2024-05-01T21:03:10+02:00", "for_vmid": 102, "note": null}],
     "corrupt_state": ["/var/lib/pve-gpu-hook/state.json.corrupt-20240501T210500"],
     "last_job": {"start": "2024-05-01T21:00:00+02:00", "end": "2024-05-01T21:20:03+02:00",
                  "end_phase": "job-end",   # or "job-abort"; null while unfinished
                  "result": "ok",           # ok | error (ERROR lines) | aborted | unfinished
                  "errors": 0,
                  "actions": [{"time": "...", "phase": "backup-start", "vmid": 102,
                               "message": "VM 104 (gpu-desktop) shut down in 12 s: ..."}]},
                                            # last_job: null when the log has no job
     "attention": ["..."],                  # why the exit status is 1; empty when 0
     "notes": ["..."]}                      # e.g. an old key name in the override file
"""

from __future__ import annotations

import argparse
import os

from pvegpuhook import log, paths, registration
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, ConfigError, GpuHookError
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.settings import load_settings
from pvegpuhook.state import StateStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show whether the hook is in place and what needs attention",
        description=(
            "Show whether vzdump calls the hook (/etc/vzdump.conf), a chained previous hook, "
            "backup jobs that bypass it with their own script, the override file and the values "
            "in force, guests the hook stopped that are not back yet, corrupt state files and "
            "the last job's summary. Reads only. Exit status 1 when something needs the admin."
        ),
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
    """Everything status reports, as the JSON shape documented above."""
    attention: list[str] = []
    shown = paths.shown(paths.VZDUMP_CONF)
    registered = False
    script = script_line = None
    conf_exists = False
    try:
        conf = registration.read_conf(missing_ok=True, follow=True)  # vzdump follows it
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
    on_pve = conf_exists or os.path.isdir(paths.host("etc/pve"))
    store = StateStore()
    try:
        chain_path = registration.chain()
    except GpuHookError as error:
        chain_path = None
        attention.append(str(error))
    if not registered and on_pve:
        if script is not None:
            attention.append(
                f"another hook script is active ({shown} line {script_line}: '{script}'): "
                "pve-gpu-hook does not run; run 'pve-gpu-hook register --chain'"
            )
        elif conf is not None:
            attention.append(
                f"not registered: {shown} sets no hook script; run 'pve-gpu-hook register'"
            )
        elif not conf_exists:
            attention.append(
                f"not registered: {shown} does not exist on this Proxmox VE host; restore it "
                "(it belongs to pve-manager) and run 'pve-gpu-hook register'"
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

    override_path = paths.host(paths.OVERRIDE_FILE)
    override: dict[str, object] = {
        "path": paths.shown(paths.OVERRIDE_FILE),
        "exists": os.path.exists(override_path),
        "valid": True,
        "error": None,
        "values": None,
    }
    notes: list[str] = []
    try:
        settings = load_settings()
        override["values"] = settings.as_dict()
        notes.extend(settings.notes)
    except ConfigError as error:
        override["valid"] = False
        override["error"] = str(error)
        attention.append(
            f"override file invalid: {error}; the hook stops no guest until it is fixed"
        )

    waiting: list[dict[str, object]] = []
    corrupt = list(store.corrupt_files())
    try:
        records = store.records()  # not held: only reads
    except GpuHookError as error:
        records = []
        attention.append(str(error))
    if store.salvaged:
        corrupt.insert(0, store.path)
        attention.append(
            f"state file {store.salvaged}: the next hook run or 'pve-gpu-hook recover' keeps it "
            "aside and its intact records"
        )
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
    if corrupt and not store.salvaged:
        attention.append(
            f"{len(corrupt)} corrupt state file(s) kept aside: {', '.join(corrupt)}; "
            "check them for guests to start, then delete them"
        )

    job = log.last_job(log.read_tail())
    if job is not None and job["errors"]:
        attention.append(
            f"the last backup job (started {job['start']}) logged {job['errors']} error(s); "
            f"see {paths.shown(paths.LOG_FILE)}"
        )

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
        "corrupt_state": corrupt,
        "last_job": job,
        "attention": attention,
        "notes": notes,
    }


# ---- text ------------------------------------------------------------------------------------


def _summary_rows(data: dict[str, object]) -> list[dict[str, object]]:
    rows: list[tuple[str, object]] = []
    conf = data["vzdump_conf"]
    if not data["vzdump_conf_exists"]:
        registered = f"no: {conf} does not exist"
    elif data["registered"]:
        registered = f"yes: {conf} line {data['script_line']}"
    elif data["script"] is not None:
        registered = f"no: {conf} line {data['script_line']} sets another hook: {data['script']}"
    else:
        registered = f"no: {conf} sets no hook script"
    rows.append(("registered", registered))
    state = "executable" if data["hook_executable"] else "missing or not executable"
    rows.append(("hook", f"{data['hook_path']} ({state})"))
    chain = data["chain"]
    if isinstance(chain, dict):
        verdict = "passes the checks" if chain["ok"] else f"FAILS the checks: {chain['problem']}"
        rows.append(("chained hook", f"{chain['path']} ({verdict})"))
    else:
        rows.append(("chained hook", None))
    rows.append(("bypassing jobs", data["bypassing_jobs"] or "none"))
    override = data["override"]
    assert isinstance(override, dict)
    if not override["valid"]:
        rows.append(("override file", f"INVALID: {override['error']}"))
    else:
        where = override["path"] if override["exists"] else "absent, defaults in force"
        rows.append(("override file", f"valid ({where})"))
        values = override["values"]
        assert isinstance(values, dict)
        rows.append(("settings", " ".join(f"{k}={_plain(v)}" for k, v in sorted(values.items()))))
    waiting = data["waiting"]
    assert isinstance(waiting, list)
    rows.append(("waiting guests", len(waiting) or "none"))
    rows.append(("corrupt state", data["corrupt_state"] or "none"))
    job = data["last_job"]
    if isinstance(job, dict):
        end = job["end"] or "not ended"
        count = len(job["actions"]) if isinstance(job["actions"], list) else 0
        rows.append(
            ("last job", f"{job['start']} to {end}: {job['result']}, {count} action line(s)")
        )
    else:
        rows.append(("last job", "none in the log"))
    return [{"key": f"{key}:", "value": value} for key, value in rows]


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def tables(data: dict[str, object]) -> list[Table]:
    result = [Table([("key", "ITEM"), ("value", "STATE")], _summary_rows(data), "pve-gpu-hook")]
    waiting = data["waiting"]
    if isinstance(waiting, list) and waiting:
        columns = [
            ("vmid", "VMID"),
            ("type", "TYPE"),
            ("name", "NAME"),
            ("status", "STATUS"),
            ("since", "SINCE"),
            ("for_vmid", "FOR BACKUP OF"),
            ("note", "NOTE"),
        ]
        result.append(Table(columns, waiting, "Guests stopped by the hook, not back yet"))
    job = data["last_job"]
    if isinstance(job, dict) and job["actions"]:
        columns = [("time", "TIME"), ("phase", "PHASE"), ("vmid", "VMID"), ("message", "MESSAGE")]
        actions = job["actions"]
        assert isinstance(actions, list)
        result.append(Table(columns, actions, "Last job"))
    return result


def run(args: argparse.Namespace) -> int:
    data = gather()
    attention = data["attention"]
    assert isinstance(attention, list)
    if args.quiet:
        return EXIT_ATTENTION if attention else EXIT_OK
    notes = [f"warning: {item}" for item in attention] or ["all fine: nothing needs attention"]
    given = data["notes"]
    assert isinstance(given, list)
    emit(args, data, tables(data), [*given, *notes])
    return EXIT_ATTENTION if attention else EXIT_OK
