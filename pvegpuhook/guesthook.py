"""The guest hookscript: ``guest-hook VMID PHASE``, called by PVE at each start and stop of a
guest whose ``hookscript`` option names it (``pve-gpu-hook handover enable``).

Only ``pre-start`` acts: it runs inside PVE's start of the guest, with the guest's config lock
held, before PVE chooses and reserves its PCI devices (qemu-server vm_start; pve-container
vm_start). It shuts down the running guests that hold those devices (:mod:`pvegpuhook.handover`),
so that PVE's start finds them free. A non-zero exit makes PVE abort the start with
``hookscript error for <vmid> on pre-start: ...``: that is how a refusal (a protected holder) or
a holder that did not go down reaches the admin. Our lines go to the start task's log.

vzdump's paused start of a stopped VM for its backup runs the same ``pre-start``, with
``lock: backup`` in the config: then nothing is done here, the vzdump hook frees the GPU (and
starts the holders again after the backup). Nothing here takes the guest's own config lock
(``qm set`` of it would wait for PVE's start and fail): the holders are other guests.
Phases with nothing to do import almost nothing.
"""

from __future__ import annotations

import sys

from pvegpuhook.log import PREFIX, Log, clean
from pvegpuhook.vmid import parse_vmid

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pvegpuhook.model import Guest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(f"{PREFIX}usage: guest-hook VMID PHASE (called by PVE)", file=sys.stderr)
        return 2
    vmid, phase = parse_vmid(argv[0]), argv[1]
    if phase != "pre-start":
        return 0  # post-start, pre-stop, post-stop: PVE only warns on a failure there anyway
    if vmid is None:
        print(f"{PREFIX}invalid VMID {clean(argv[0])!r}", file=sys.stderr)
        return 2
    return pre_start(vmid)


def pre_start(vmid: int) -> int:
    from pvegpuhook.handover import PHASE
    from pvegpuhook.inventory import load_guest

    log = Log(PHASE, vmid, echo=False)
    guest = load_guest(vmid)
    if guest is None:
        return 0  # PVE starts nothing without a config: nothing to free
    if guest.lock == "backup":
        log.file(
            f"pre-start of {guest.label} with lock: backup (vzdump's start for its backup): "
            "nothing to do, the vzdump hook frees its devices"
        )
        return 0
    text = "\n".join(f"{k}: {v}" for k, v in guest.config.values(with_pending=True).items())
    if "hostpci" not in text and "dev" not in text and "lxc." not in text and "vfio" not in text:
        return 0  # no passthrough at all: nothing to hand over
    return _hand_over(guest, log)


def _hand_over(guest: Guest, log: Log) -> int:
    import time

    from pvegpuhook import handover, timing
    from pvegpuhook.errors import GpuHookError

    vmid = guest.vmid
    budget = timing.handover_budget(guest.kind, guest.config)
    deadline = time.monotonic() + budget

    def say(line: str) -> None:
        print(PREFIX + clean(line), flush=True)

    try:
        done = handover.hand_over(vmid, start=False, say=say, deadline=deadline)
    except GpuHookError as error:
        print(PREFIX + clean(str(error)), file=sys.stderr, flush=True)
        log.file(f"ERROR: {error}")
        return 1
    except Exception as error:  # noqa: BLE001 - PVE must get an answer; the start is refused
        import traceback

        log.file(f"ERROR: the hand-over failed: {traceback.format_exc()}")
        print(f"{PREFIX}the hand-over failed ({clean(repr(error))})", file=sys.stderr, flush=True)
        return 1
    for warning in done.warnings:
        say(f"warning: {warning}")
    if not done.ok:
        print(
            f"{PREFIX}not starting {clean(guest.label)}: {clean(done.reason)}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
