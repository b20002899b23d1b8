"""``pve-gpu-hook status``: is the hook in place, and does anything need the admin?

Reads only — no lock, no write — so it is safe from monitoring while a backup runs. Exit status 0
when all is fine, 1 when something needs the admin (each reason is one entry of ``attention``):
not registered on a Proxmox VE host, another hook active without chaining, our hook file missing,
a backup job that bypasses the hook, an invalid override file, guests waiting to be started
again, corrupt state, a chained hook failing its checks, or ERROR lines in the last job.

JSON/YAML shape (``--output-format json``; keys are stable)::

    {"registered": true,                 # vzdump.conf's active script is our hook
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
                             "start_timeout": 120, "protect": [], "restore": "after-guest"}},
                                         # values: the ones in force; null when invalid
     "waiting": [{"vmid": 104, "kind": "qemu", "name": "gpu-desktop", "status": "stopped",
                  "since": "2024-05-01T21:03:10+02:00", "for_vmid": 102, "note": null}],
     "corrupt_state": ["/var/lib/pve-gpu-hook/state.json.corrupt-20240501T210500"],
     "last_job": {"start": "2024-05-01T21:00:00+02:00", "end": "2024-05-01T21:20:03+02:00",
                  "end_phase": "job-end",   # or "job-abort"; null while unfinished
                  "result": "ok",           # ok | error (ERROR lines) | aborted | unfinished
                  "errors": 0,
                  "actions": [{"time": "...", "phase": "backup-start", "vmid": 102,
                               "message": "VM 104 (gpu-desktop) shut down in 12 s: ..."}]},
                                            # last_job: null when the log has no job
     "attention": ["..."]}                  # why the exit status is 1; empty when 0
"""

from __future__ import annotations

import argparse
import os

from pvegpuhook import paths, vzdumpconf
from pvegpuhook.errors import EXIT_ATTENTION, EXIT_OK, ConfigError, GpuHookError
from pvegpuhook.log import timestamp
from pvegpuhook.output import Table, add_output_options, emit
from pvegpuhook.settings import load_settings
from pvegpuhook.state import StateStore

LOG_TAIL = 4 * 1024 * 1024  # the last job is near the end; a rotated-late log may be big
JOB_END_PHASES = ("job-end", "job-abort")
ERROR_PREFIX = "ERROR: "


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
    add_output_options(parser)
    parser.set_defaults(run=run)


# ---- the log ---------------------------------------------------------------------------------


def read_log_tail(path: str, limit: int = LOG_TAIL) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        raw = f.read()
    lines = raw.decode("utf-8", "replace").split("\n")
    if size > limit:
        lines = lines[1:]  # a partial first line
    return [line for line in lines if line]


def last_job(lines: list[str]) -> dict[str, object] | None:
    """The last job of the log: from its ``job-start`` to its ``job-end``/``job-abort`` lines.

    Log lines are ``TIMESTAMP PHASE VMID|- MESSAGE``. Lines of other phases after the job ended
    (the next job's job-init, a ``recover``) are not part of it. Actions are the non-``called:``
    lines.
    """
    job: dict[str, object] | None = None
    actions: list[dict[str, object]] = []
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        stamp, phase, vmid_text = parts[0], parts[1], parts[2]
        message = parts[3] if len(parts) > 3 else ""
        if phase == "job-start" and (
            job is None or job["end"] is not None or message.startswith("called:")
        ):
            actions = []
            job = {"start": stamp, "end": None, "end_phase": None, "actions": actions}
        if job is None:
            continue
        if job["end"] is not None and phase not in JOB_END_PHASES:
            continue
        if phase in JOB_END_PHASES:
            job["end"], job["end_phase"] = stamp, phase
        if message.startswith("called:"):
            continue
        vmid = int(vmid_text) if vmid_text.isdigit() else None
        actions.append({"time": stamp, "phase": phase, "vmid": vmid, "message": message})
    if job is None:
        return None
    errors = sum(1 for a in actions if str(a["message"]).startswith(ERROR_PREFIX))
    if errors:
        result = "error"
    elif job["end"] is None:
        result = "unfinished"
    elif job["end_phase"] == "job-abort":
        result = "aborted"
    else:
        result = "ok"
    job["result"] = result
    job["errors"] = errors
    return job


# ---- gathering -------------------------------------------------------------------------------


def gather() -> dict[str, object]:
    """Everything status reports, as the JSON shape documented above."""
    attention: list[str] = []
    shown = vzdumpconf.display(paths.VZDUMP_CONF)
    registered = False
    script = script_line = None
    conf_exists = False
    try:
        conf = vzdumpconf.read_conf(missing_ok=True, follow=True)  # vzdump follows it
    except GpuHookError as error:
        conf = None
        conf_exists = True
        attention.append(str(error))
    if conf is not None:
        conf_exists = True
        active = vzdumpconf.active_script(conf.text)
        if active is not None:
            script, script_line = active.value, active.line
            registered = active.value == vzdumpconf.HOOK_PATH
    on_pve = conf_exists or os.path.isdir(paths.host("etc/pve"))
    store = StateStore()
    chain_path = store.chain()
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
    hook_executable = vzdumpconf.executable(vzdumpconf.HOOK_PATH)
    if registered and not hook_executable:
        attention.append(
            f"{vzdumpconf.HOOK_PATH} is missing or not executable: vzdump will fail every job; "
            "reinstall pve-gpu-hook or run 'pve-gpu-hook unregister'"
        )

    chain: dict[str, object] | None = None
    if chain_path is not None:
        problem = vzdumpconf.chain_problem(chain_path)
        chain = {"path": chain_path, "ok": problem is None, "problem": problem}
        if problem is not None and registered:
            attention.append(
                f"the chained hook {chain_path} {problem}: the hook does not run it and "
                "fails the phase; fix it or run 'pve-gpu-hook unregister'"
            )

    jobs, jobs_problem = vzdumpconf.read_jobs()
    if jobs_problem:
        attention.append(jobs_problem)
    jobs_message = vzdumpconf.jobs_warning(jobs)
    if jobs_message:
        attention.append(jobs_message)

    override_path = paths.host(paths.OVERRIDE_FILE)
    override: dict[str, object] = {
        "path": vzdumpconf.display(paths.OVERRIDE_FILE),
        "exists": os.path.exists(override_path),
        "valid": True,
        "error": None,
        "values": None,
    }
    try:
        override["values"] = load_settings().as_dict()
    except ConfigError as error:
        override["valid"] = False
        override["error"] = str(error)
        attention.append(
            f"override file invalid: {error}; the hook stops no guest until it is fixed"
        )

    waiting: list[dict[str, object]] = []
    corrupt = list(store.corrupt_files())
    try:
        records = store.load()  # without the lock: load() then only reads
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
                "kind": record.kind,
                "name": record.name,
                "status": record.status,
                "since": timestamp(record.since) if record.since is not None else None,
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

    job = last_job(read_log_tail(paths.host(paths.LOG_FILE)))
    if job is not None and job["errors"]:
        attention.append(
            f"the last backup job (started {job['start']}) logged {job['errors']} error(s); "
            f"see {vzdumpconf.display(paths.LOG_FILE)}"
        )

    return {
        "registered": registered,
        "script": script,
        "script_line": script_line,
        "vzdump_conf": shown,
        "vzdump_conf_exists": conf_exists,
        "hook_path": vzdumpconf.HOOK_PATH,
        "hook_executable": hook_executable,
        "chain": chain,
        "bypassing_jobs": [job_.id for job_ in jobs],
        "override": override,
        "waiting": waiting,
        "corrupt_state": corrupt,
        "last_job": job,
        "attention": attention,
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
            ("kind", "TYPE"),
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
    notes = [f"warning: {item}" for item in attention] or ["all fine: nothing needs attention"]
    emit(args, data, tables(data), notes)
    return EXIT_ATTENTION if attention else EXIT_OK
