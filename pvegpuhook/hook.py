"""The vzdump hook: ``vzdump-hook PHASE [MODE VMID]`` (``python3 -m pvegpuhook.hook``).

A phase → handler table. vzdump empties the environment (no PATH) and turns our stdout/stderr
into task-log lines; a non-zero exit fails the job or the guest's backup depending on the phase
(docs/pve-facts.md §1), so phases where failing would do harm never fail. Phases with nothing to
do import almost nothing: this runs for every guest of every backup job. The work itself is in
:mod:`pvegpuhook.phases`, imported only when there is some.
"""

from __future__ import annotations

import os
import sys

from pvegpuhook.log import CALLED, Log
from pvegpuhook.vmid import parse_vmid

JOB_PHASES = ("job-init", "job-start", "job-end", "job-abort")
GUEST_PHASES = (
    "backup-start",
    "pre-stop",
    "pre-restart",
    "post-restart",
    "backup-end",
    "backup-abort",
    "log-end",
)
# failing here would abort the whole job before any lock (job-init) or keep vzdump from starting
# the guest again (pre-restart, post-restart)
NEVER_FAIL = ("job-init", "pre-restart", "post-restart")


class Call:
    """One invocation of the hook, as vzdump made it."""

    __slots__ = ("argv", "phase", "mode", "vmid", "log")

    def __init__(self, argv: list[str], phase: str, mode: str | None, vmid: int | None) -> None:
        self.argv = argv
        self.phase = phase
        self.mode = mode
        self.vmid = vmid
        self.log = Log(phase, vmid)


def nothing(call: Call) -> int:
    return 0


def job_start(call: Call) -> int:
    from pvegpuhook import paths

    if not os.path.exists(paths.host(paths.STATE_FILE)):
        from pvegpuhook.errors import ConfigError
        from pvegpuhook.settings import load_settings

        try:
            load_settings()
        except ConfigError as error:
            call.log.say(f"{error}; this job will stop no guest to free a GPU")
        return 0
    from pvegpuhook import phases

    return phases.report_leftovers(call.log)


def backup_start(call: Call) -> int:
    assert call.vmid is not None and call.mode is not None
    from pvegpuhook import paths
    from pvegpuhook.pveconf import read_text

    # a CT has no qemu-server config: vzdump never starts a stopped CT, so it needs no device
    text = read_text(paths.qemu_conf(call.vmid))
    if text is None or ("hostpci" not in text and "vfio" not in text):
        return 0  # no passthrough at all: the common case, decided without parsing
    from pvegpuhook import phases

    return phases.free_for_backup(call.log, call.vmid, call.mode, text)


def log_end(call: Call) -> int:
    from pvegpuhook import paths

    if not os.path.exists(paths.host(paths.STATE_FILE)):
        return 0
    from pvegpuhook import phases

    assert call.vmid is not None
    return phases.restart_after_backup(call.log, call.vmid)


def job_end(call: Call) -> int:
    from pvegpuhook import paths

    if not os.path.exists(paths.host(paths.STATE_FILE)) and not os.path.exists(
        paths.host(paths.JOB_FILE)
    ):
        from pvegpuhook import metrics

        if not metrics.wanted():
            # no guest waits, no job ever acted, no metrics file to tell that a job ended
            return 0
    from pvegpuhook import phases

    return phases.restart_leftovers(call.log)


HANDLERS = {
    "job-init": nothing,  # runs before vzdump's node lock: nothing stateful here
    "job-start": job_start,
    "backup-start": backup_start,
    "pre-stop": nothing,
    "pre-restart": nothing,
    "post-restart": nothing,
    "backup-end": nothing,
    "backup-abort": nothing,
    "log-end": log_end,
    "job-end": job_end,
    "job-abort": job_end,
}


def parse_argv(argv: list[str]) -> Call | str:
    """A Call, or the reason the arguments are not a vzdump hook call."""
    if not argv:
        return "usage: vzdump-hook PHASE [MODE VMID] (called by vzdump)"
    phase = argv[0]
    if phase in GUEST_PHASES:
        if len(argv) < 3:
            return f"phase {phase} needs MODE and VMID"
        vmid = parse_vmid(argv[2])
        if vmid is None:
            return f"invalid VMID {argv[2]!r}"
        return Call(argv, phase, argv[1], vmid)
    return Call(argv, phase, None, None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    call = parse_argv(argv)
    if isinstance(call, str):
        phase = argv[0] if argv else "?"
        Log(phase).error(call)
        return 0 if phase in NEVER_FAIL else 2
    if call.phase != "job-init":  # before vzdump's node lock: a queued job must leave no trace
        call.log.file(f"{CALLED}{' '.join(argv)}")
        report_corrupt_state(call)
    handler = HANDLERS.get(call.phase, nothing)  # unknown phases: a newer vzdump; tolerate
    try:
        code = handler(call)
    except Exception as error:  # noqa: BLE001 - the hook must answer vzdump, whatever happened
        code = report_crash(call, error)
    chained = run_chain(call)  # always: the admin's hook runs whatever ours decided
    return 0 if call.phase in NEVER_FAIL else code or chained


# phases whose output reaches the admin once per job or per guest: the task log must not repeat
# one warning seven times per guest
LOUD_PHASES = ("job-start", "backup-start", "job-end", "job-abort")


def report_corrupt_state(call: Call) -> None:
    """A corrupt state file kept aside is an emergency until the admin deals with it."""
    from pvegpuhook import paths

    kept = [os.path.basename(p) for p in paths.corrupt_state_files()]
    if kept:
        message = (
            f"a corrupt state file was kept aside ({', '.join(kept)} in "
            f"{paths.shown(paths.STATE_DIR)}): guests it named may still be off; "
            "see 'pve-gpu-hook status'"
        )
        if call.phase in LOUD_PHASES:
            call.log.say(message)
        else:
            call.log.file(message)


def report_crash(call: Call, error: Exception) -> int:
    from pvegpuhook.errors import GpuHookError

    if isinstance(error, GpuHookError):
        call.log.error(str(error))
        return error.exit_code
    import traceback

    call.log.error(f"internal error: {type(error).__name__}: {error} (details in the log file)")
    for line in traceback.format_exc().splitlines():
        call.log.file(line)
    return 1


def run_chain(call: Call) -> int:
    """Run the hook that was active before ours (``register --chain``), same argv and env."""
    from pvegpuhook import paths

    if not os.path.exists(paths.host(paths.CHAIN_FILE)):
        return 0
    from pvegpuhook import registration
    from pvegpuhook.errors import StateError

    try:
        script = registration.chain()
    except StateError as error:
        call.log.error(f"chained hook not run: {error}")
        return 1
    if script is None:
        return 0
    problem, path = registration.resolve_chain(script)
    if problem is not None:
        call.log.error(f"chained hook {script} {problem}: not run")
        return 1
    from pvegpuhook import act

    return act.run_chained(path, call.argv)


if __name__ == "__main__":
    sys.exit(main())
