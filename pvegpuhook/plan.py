"""Pure decisions: which holders must stop so a VM can start, and how to put guests back.

No I/O here: inputs in, decisions out. The hook, ``recover`` and ``dry-run`` share these
functions, so what ``dry-run`` predicts is what the hook does.
"""

from __future__ import annotations

from pvegpuhook.claims import Claim, Need
from pvegpuhook.inventory import Guest, Holder
from pvegpuhook.state import Record

UNORDERED = 1 << 62  # PVE starts guests without a startup order after those with one


class Stop:
    """Shut ``holder`` down because it holds ``address`` that the target needs."""

    __slots__ = ("holder", "address")

    def __init__(self, holder: Holder, address: str) -> None:
        self.holder = holder
        self.address = address


class Refusal:
    """The target cannot get ``address`` because ``holder`` must not or cannot be stopped."""

    __slots__ = ("address", "holder", "reason")

    def __init__(self, address: str, holder: Holder, reason: str) -> None:
        self.address = address
        self.holder = holder
        self.reason = reason


class FreePlan:
    __slots__ = ("target", "stops", "refusal")

    def __init__(self, target: Guest) -> None:
        self.target = target
        self.stops: list[Stop] = []
        self.refusal: Refusal | None = None


def _blockers(alternative: tuple[Claim, ...], holders: list[Holder]) -> dict[int, Stop]:
    found: dict[int, Stop] = {}
    for claim in alternative:
        for holder in holders:
            if holder.vmid in found:
                continue
            if any(claim.conflicts_with(held) for held in holder.claims):
                found[holder.vmid] = Stop(holder, claim.address)
    return found


def _unstoppable(holder: Holder, protect: frozenset[int]) -> str | None:
    if holder.vmid in protect:
        return "is protected (protect: in the override file)"
    lock = holder.guest.lock
    if lock:
        return f"is locked ({lock})"
    return None


def plan_free(
    target: Guest, needs: list[Need], holders: list[Holder], protect: frozenset[int]
) -> FreePlan:
    """Who must shut down so that every need of ``target`` has a free alternative.

    For a mapping, PVE takes the first free alternative: when none is free we free the one that
    costs the fewest further stops (and no protected or locked guest), the first on a tie.
    """
    plan = FreePlan(target)
    chosen: dict[int, Stop] = {}
    holders = [h for h in holders if h.vmid != target.vmid]
    for need in needs:
        best: tuple[int, int, dict[int, Stop]] | None = None
        first_refusal: Refusal | None = None
        for index, alternative in enumerate(need.alternatives):
            blockers = _blockers(alternative, holders)
            new = {v: s for v, s in blockers.items() if v not in chosen}
            if not blockers:
                best = (0, index, {})
                break
            refused = [(s, _unstoppable(s.holder, protect)) for s in new.values()]
            refused = [(s, why) for s, why in refused if why]
            if refused:
                stop, why = refused[0]
                first_refusal = first_refusal or Refusal(stop.address, stop.holder, str(why))
                continue
            if best is None or len(new) < best[0]:
                best = (len(new), index, new)
        if best is None:
            if first_refusal is not None and plan.refusal is None:
                plan.refusal = first_refusal
            continue
        chosen.update(best[2])
    plan.stops = sorted(chosen.values(), key=lambda s: s.holder.vmid)
    return plan


START = "start"  # stopped, its units are free: start it
DROP = "drop"  # already running again: forget the record
BLOCKED = "blocked"  # another running guest holds its units now
MISSING = "missing"  # its config is gone: keep the record for the admin
WAIT = "wait"  # an interrupted shutdown may still be under way: decide later


class RestoreStep:
    __slots__ = ("record", "action", "reason")

    def __init__(self, record: Record, action: str, reason: str = "") -> None:
        self.record = record
        self.action = action
        self.reason = reason


def restore_order(record: Record, orders: dict[int, int | None]) -> tuple[int, int]:
    order = orders.get(record.vmid)
    return (UNORDERED if order is None else order, record.vmid)


def plan_restore(
    records: list[Record],
    *,
    running: set[int],
    orders: dict[int, int | None],
    missing: set[int],
    blocked: dict[int, str],
    settling: set[int] | frozenset[int] = frozenset(),
) -> list[RestoreStep]:
    """Put recorded guests back, in ``startup`` order and then VMID order (as PVE boots them).

    ``settling``: running guests whose recorded shutdown was interrupted recently; they may still
    go down, so their record must stay until that is known.
    """
    steps = []
    for record in sorted(records, key=lambda r: restore_order(r, orders)):
        if record.vmid in running and record.vmid in settling:
            steps.append(
                RestoreStep(record, WAIT, "its interrupted shutdown may still be under way")
            )
        elif record.vmid in running:
            steps.append(RestoreStep(record, DROP, "already running"))
        elif record.vmid in missing:
            steps.append(RestoreStep(record, MISSING, "its config no longer exists"))
        elif record.vmid in blocked:
            steps.append(RestoreStep(record, BLOCKED, blocked[record.vmid]))
        else:
            steps.append(RestoreStep(record, START))
    return steps
