"""Test seam for the crash tests: die like a SIGKILL at a named step.

``PVE_GPU_HOOK_CRASH_AT=<name>`` makes the process kill itself when it reaches that step, so a
test can prove that every step leaves a state from which the next phase or ``recover`` puts
every guest back. Unset (always, outside tests), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os

POINTS = (
    "before-record",  # a holder was chosen; nothing written yet
    "after-record",  # its record is on disk; the guest is untouched
    "after-shutdown",  # the guest is off; its record still says "stopping"
    "state-rename",  # a new state file is written and synced, not yet renamed into place
    "start-issued",  # `qm start` returned; the start is not confirmed yet
    "after-start",  # the guest runs again; its record is not dropped yet
)


def crash_point(name: str) -> None:
    if os.environ.get("PVE_GPU_HOOK_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
