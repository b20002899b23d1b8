"""Make room for a recorded guest whose device another running guest took, for ``recover``.

After a power loss an ``onboot`` VM of a PCI mapping starts first and takes the first free device
of its mapping, which may be the one a guest the hook stopped had (and needs: a fixed device, or
the same pick). Starting that blocker after the recorded guest would give it another device.
:func:`way_out` asks the planner whether that is so (:func:`pvegpuhook.plan.plan_swap`), and
:func:`make_room`, only when the admin asks (``recover VMID --swap``), takes it step by step:
record the blocker (before touching it, as the hook does), shut it down gracefully, start the
recorded guest, start the blocker again — each step confirmed; the blocker is never left off.
"""

from __future__ import annotations

import time

from pvegpuhook import act
from pvegpuhook.inventory import Inventory, load_guest
from pvegpuhook.log import Log
from pvegpuhook.model import GuestKind
from pvegpuhook.plan import Swap, plan_free, plan_swap
from pvegpuhook.records import Record, RecordStatus, duration
from pvegpuhook.restart import restart, watch_detached
from pvegpuhook.settings import Settings
from pvegpuhook.state import StateStore


def way_out(record: Record, inventory: Inventory, settings: Settings) -> tuple[Swap | None, str]:
    """The swap that lets ``record``'s guest start, or (None, why there is none; "" when the
    question does not arise: not a VM, or nothing blocks it)."""
    guest = load_guest(record.vmid, record.kind)
    if guest is None or guest.kind != GuestKind.QEMU:
        return None, ""
    needs, _ = inventory.needs(guest, for_start=True)
    holders = inventory.holders()
    first = plan_free(guest, needs, holders, frozenset())
    if not first.stops:
        return None, ""
    blocker = first.stops[0].holder
    blocker_needs, _ = inventory.needs(blocker.guest, for_start=True)
    swap, why = plan_swap(guest, needs, holders, blocker_needs, settings.protect)
    if swap is None:
        return None, why
    ha = inventory.ha_states().get(blocker.vmid)
    if ha not in (None, "ignored"):
        # HA would start it elsewhere or kill it on a shutdown timeout (docs/pve-facts.md §9)
        return None, f"{blocker.guest.label} is managed by HA (state {ha})"
    return swap, ""


def describe(swap: Swap) -> str:
    """The way out in one sentence, with the command that takes it."""
    moves = ", ".join(swap.moves_to)
    target, blocker = swap.target, swap.blocker.guest
    return (
        f"{blocker.label} would take {moves} if started after {target.label}: "
        f"'pve-gpu-hook recover {target.vmid} --swap' shuts {blocker.label} down gracefully, "
        f"starts {target.label}, then starts {blocker.label} again"
    )


class Steps:
    """What :func:`make_room` did, one line per step, and whether both guests run."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.target_started = False
        self.blocker_back = False
        self.blocker_on: list[str] = []  # what the blocker holds once it runs again


def make_room(store: StateStore, settings: Settings, log: Log, swap: Swap) -> Steps:
    """Take the way out. The caller holds the store; every step is confirmed before the next."""
    steps = Steps()
    blocker = swap.blocker.guest
    target = swap.target

    def say(line: str) -> None:
        steps.lines.append(line)
        log.file(line)

    record = Record(
        blocker.vmid,
        blocker.kind,
        blocker.name,
        target.vmid,
        sorted({c.address for c in swap.blocker.claims}),
        since=time.time(),
    )
    store.add(record)  # before it is touched: whatever happens next, it is started again
    outcome = act.shutdown(blocker.kind, blocker.vmid, settings.shutdown_timeout)
    if not outcome.ok:
        store.mark(blocker.vmid, RecordStatus.STOP_FAILED, outcome.detail)
        say(
            f"{blocker.label} did not shut down within {settings.shutdown_timeout} s "
            f"({outcome.detail}); nothing else was done. It may still power off: it is watched "
            "and started again if it does"
        )
        _watch(log, record, settings)
        steps.blocker_back = True  # it still runs
        return steps
    store.mark(blocker.vmid, RecordStatus.STOPPED)
    say(f"{blocker.label} shut down in {duration(outcome.seconds)} to make room for {target.label}")
    # one at a time: the recorded guest reserves its devices before the blocker picks its own
    report = restart(store, settings, log, lambda r: r.vmid == target.vmid)
    steps.target_started = any(r.vmid == target.vmid for r in report.started)
    if not steps.target_started:
        why = "; ".join(why for _, why in report.kept) or "it did not start"
        steps.lines.append(f"{target.label} did not start: {why}")
    report = restart(store, settings, log, lambda r: r.vmid == blocker.vmid)
    steps.blocker_back = any(r.vmid == blocker.vmid for r in report.started)
    if steps.blocker_back:
        holder = next((h for h in Inventory().holders() if h.vmid == blocker.vmid), None)
        steps.blocker_on = sorted({c.address for c in holder.claims}) if holder else []
        log.file(f"{blocker.label} runs on {', '.join(steps.blocker_on) or 'no PCI device'}")
    else:
        why = "; ".join(why for _, why in report.kept) or "it did not start"
        steps.lines.append(f"{blocker.label} did not start again: {why}; its record is kept")
    return steps


def _watch(log: Log, record: Record, settings: Settings) -> None:
    """A blocker whose shutdown timed out may power off later: watch it, as the hook does."""
    _, problem = watch_detached([record], settings)
    if problem is not None:
        log.error(f"{record.label} may still power off, and cannot be watched: {problem}")
