"""Pure decisions: which holders must stop so a VM can start, and how to put guests back.

No I/O here: inputs in, decisions out. The hook, ``recover`` and ``dry-run`` share these
functions, so what ``dry-run`` predicts is what the hook does.
"""

from __future__ import annotations

from pvegpuhook.claims import Claim, Need
from pvegpuhook.inventory import RESERVED, Guest, Holder
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
            for held in holder.claims:
                if claim.conflicts_with(held):
                    found[holder.vmid] = Stop(holder, held.address)
                    break
    return found


def same_function(a: str, b: str) -> bool:
    """Whether two addresses (a function or a whole device) name a common PCI function."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _reserved(alternative: tuple[Claim, ...], holders: list[Holder], leaving: set[int]) -> bool:
    """Whether a running VM (not one about to stop) has reserved one of these very functions:
    PVE's own check, which knows nothing of IOMMU groups, CTs, mdevs or raw ``args`` devices."""
    return any(
        held.source == RESERVED and same_function(claim.address, held.address)
        for holder in holders
        if holder.vmid not in leaving
        for held in holder.claims
        for claim in alternative
    )


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

    For a mapping, PVE takes the first alternative none of whose functions a running VM has
    reserved, whatever else uses its IOMMU group: that one must then be made usable. When every
    alternative is reserved we free the one that costs the fewest further stops (and no
    protected or locked guest), the first on a tie — PVE then takes that one.
    """
    plan = FreePlan(target)
    chosen: dict[int, Stop] = {}
    holders = [h for h in holders if h.vmid != target.vmid]
    for need in needs:
        alternatives = need.alternatives
        if len(alternatives) > 1:
            leaving = set(chosen)
            picked = next((a for a in alternatives if not _reserved(a, holders, leaving)), None)
            if picked is not None:
                alternatives = [picked]
        best: tuple[int, int, dict[int, Stop]] | None = None
        first_refusal: Refusal | None = None
        for index, alternative in enumerate(alternatives):
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


def restore_order(
    record: Record, orders: dict[int, int | None], ranks: dict[int, int]
) -> tuple[int, int, int]:
    order = orders.get(record.vmid)
    return (ranks.get(record.vmid, 0), UNORDERED if order is None else order, record.vmid)


def plan_restore(
    records: list[Record],
    *,
    running: set[int],
    orders: dict[int, int | None],
    missing: set[int],
    blocked: dict[int, str],
    settling: set[int] | frozenset[int] = frozenset(),
    ranks: dict[int, int] | None = None,
) -> list[RestoreStep]:
    """Put recorded guests back, in ``startup`` order and then VMID order (as PVE boots them).

    ``ranks`` go first: guests with a PCI mapping take the first free alternative when they
    start, so they start after the guests with fixed devices, in the order of the alternative
    each had — then every guest gets the device it had before. ``settling``: running guests
    whose recorded shutdown was interrupted recently; they may still go down, so their record
    must stay until that is known.
    """
    ranks = ranks or {}
    steps = []
    for record in sorted(records, key=lambda r: restore_order(r, orders, ranks)):
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


class GuestForecast:
    """What the hook (and vzdump) will do for one guest of a job."""

    __slots__ = ("guest", "mode", "addresses", "stops", "restored", "outcome", "reason")

    def __init__(self, guest: Guest, mode: str) -> None:
        self.guest = guest
        self.mode = mode
        self.addresses: list[str] = []
        self.stops: list[Stop] = []
        self.restored: list[int] = []  # holders started again at this guest's log-end
        self.outcome = "ok"  # ok | fail | skip
        self.reason = ""


class JobForecast:
    def __init__(self) -> None:
        self.guests: list[GuestForecast] = []
        self.restored_at_end: list[int] = []
        self.down_for: dict[int, int] = {}  # holder vmid → number of guest backups it is down

    @property
    def ok(self) -> bool:
        return all(g.outcome != "fail" for g in self.guests)


def forecast_job(
    order: list[tuple[Guest, bool, list[Need]]],
    holders: list[Holder],
    *,
    mode: str,
    protect: frozenset[int],
    restore: str,
    ha: set[int],
) -> JobForecast:
    """Walk a vzdump job guest by guest, as the hook will: who stops for whom, when they return.

    ``order``: every guest of the job in vzdump's order, whether it runs now, and its needs as
    its next start sees them. ``holders``: the guests running now with what they hold.
    """
    forecast = JobForecast()
    running = {h.vmid for h in holders}
    running.update(g.vmid for g, is_running, _ in order if is_running)
    stopped_for: dict[int, int] = {}  # holder → the guest it was stopped for
    for guest, _, needs in order:
        is_running = guest.vmid in running
        step = GuestForecast(guest, mode if is_running else "stop")
        step.addresses = [c.address for need in needs for c in need.claims()]
        forecast.guests.append(step)
        if step.mode == "stop" and guest.vmid in ha:
            step.outcome, step.reason = "fail", "vzdump refuses stop mode for an HA-managed guest"
        elif guest.kind != "qemu" or is_running or not needs:
            step.outcome = "ok"
        elif guest.template:
            step.outcome, step.reason = "skip", "template: backed up without its devices"
        else:
            current = [h for h in holders if h.vmid in running]
            plan = plan_free(guest, needs, current, protect)
            if plan.refusal is not None:
                r = plan.refusal
                step.outcome = "fail"
                step.reason = f"cannot free {r.address}: {r.holder.guest.label} {r.reason}"
            for stop in plan.stops if plan.refusal is None else []:
                step.stops.append(stop)
                running.discard(stop.holder.vmid)
                stopped_for[stop.holder.vmid] = guest.vmid
        for vmid in stopped_for:
            forecast.down_for[vmid] = forecast.down_for.get(vmid, 0) + 1
        if restore == "after-guest":
            back = sorted(v for v, w in stopped_for.items() if w == guest.vmid)
            step.restored = back
            for vmid in back:
                del stopped_for[vmid]
                running.add(vmid)
    forecast.restored_at_end = sorted(stopped_for)
    return forecast
