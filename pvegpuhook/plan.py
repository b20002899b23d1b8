"""Pure decisions: what a guest's backup needs freed, who stops for it, how guests come back.

No I/O here: model types in (:mod:`pvegpuhook.model`), decisions out. The hook and ``dry-run``
call the same :func:`decide_backup` for each guest of a job, and the hook and ``recover`` the
same :func:`plan_restart`, so what ``dry-run`` predicts is what the hook decides.
"""

from __future__ import annotations

from enum import StrEnum

from pvegpuhook.model import (
    MDEV_UNAVAILABLE,
    RESERVED,
    Claim,
    ClaimKind,
    Guest,
    GuestKind,
    Holder,
    JobOrder,
    Need,
    binds_before_failing,
    start_failure,
)

UNORDERED = 1 << 62  # PVE starts guests without a startup order after those with one
# the expected length of a backup without a previous one to go by (docs/pve-facts.md §3)
UNKNOWN_DURATION = 600.0


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
    __slots__ = ("target", "stops", "refusal", "picks")

    def __init__(self, target: Guest) -> None:
        self.target = target
        self.stops: list[Stop] = []
        self.refusal: Refusal | None = None
        # per need, the index of the alternative PVE will take (None: none can be made free)
        self.picks: list[int | None] = []


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


def held_alternative(need: Need, held: list[Claim]) -> int | None:
    """The index of the alternative of ``need`` whose functions a running guest holds (``held``:
    its holder's claims, read from its QEMU), or None."""
    for index, alternative in enumerate(need.alternatives):
        if all(any(same_function(c.address, h.address) for h in held) for c in alternative):
            return index
    return None


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


def _taken(alternative: tuple[Claim, ...], used: list[str]) -> bool:
    return any(same_function(claim.address, u) for claim in alternative for u in used)


def _reserves(holder: Holder) -> bool:
    return any(held.source == RESERVED for held in holder.claims)


def plan_free(
    target: Guest, needs: list[Need], holders: list[Holder], protect: frozenset[int]
) -> FreePlan:
    """Who must shut down so that every need of ``target`` has a free alternative.

    PVE chooses the devices at the start, after every stop, so a choice depends on which
    reserving VMs are gone by then: plan until the VMs a plan assumes gone are the ones it
    stops (at once, unless stopping one frees an earlier alternative of another need).
    """
    holders = [h for h in holders if h.vmid != target.vmid]
    gone: frozenset[int] = frozenset()
    plan = _plan_free(target, needs, holders, protect, gone)
    for _ in holders:
        stopped = frozenset(s.holder.vmid for s in plan.stops if _reserves(s.holder))
        if stopped == gone:
            break
        gone = stopped
        plan = _plan_free(target, needs, holders, protect, gone)
    return plan


def _plan_free(
    target: Guest,
    needs: list[Need],
    holders: list[Holder],
    protect: frozenset[int],
    gone: frozenset[int],
) -> FreePlan:
    """One plan, assuming the VMs ``gone`` have released their reservations.

    PVE chooses each ``hostpciN``'s device in index order (qemu-server PVE/QemuServer/PCI.pm
    choose_hostpci_devices; docs/pve-facts.md §5): one alternative is taken as it is; of
    several, it skips those with a function an earlier ``hostpciN`` of the same VM took, and
    takes the first none of whose functions a running VM has reserved, whatever else uses its
    IOMMU group: that one must then be made usable. When every alternative left is reserved we
    free the one that costs the fewest further stops (and no protected or locked guest), the
    first on a tie — PVE then takes that one. A classic mdev reserves nothing and marks nothing
    taken: PVE creates it on the first alternative where that works.
    """
    plan = FreePlan(target)
    chosen: dict[int, Stop] = {}
    used: list[str] = []  # functions that earlier needs took, PVE's $used
    for need in needs:
        alternatives = need.alternatives
        mdev = any(c.kind == ClaimKind.MDEV for c in need.claims())
        if len(alternatives) > 1 and not mdev:
            alternatives = [a for a in alternatives if not _taken(a, used)]
            leaving = gone | set(chosen)
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
        if not mdev and len(alternatives) == 1:
            used.extend(c.address for c in alternatives[0])  # taken, free or not
        elif not mdev and best is not None:
            used.extend(c.address for c in alternatives[best[1]])
        if best is None:
            if first_refusal is not None and plan.refusal is None:
                plan.refusal = first_refusal
            plan.picks.append(None)
            continue
        chosen.update(best[2])
        plan.picks.append(need.alternatives.index(alternatives[best[1]]))
    plan.stops = sorted(chosen.values(), key=lambda s: s.holder.vmid)
    return plan


# ---- one guest of a backup job ------------------------------------------------------------------


class Verdict(StrEnum):
    # nothing to free: the backup goes on as it would without the hook (also when it fails
    # whatever the hook does: see BackupDecision.failure)
    NOTHING = "nothing"
    FREE = "free"  # shut these holders down first
    RESTART_FIRST = "restart-first"  # start these waiting guests first: they reserve their device
    REFUSE = "refuse"  # the backup fails: a holder must not stop, or vzdump refuses the guest


class BackupDecision:
    """What happens at one guest's backup: its effective mode, the verdict and why.

    ``failure``: vzdump will fail this backup whatever the hook does (PVE refuses to start the
    VM with its devices): the verdict is then NOTHING, so that nobody is stopped for it.
    ``picks``: per need, the index of the alternative the guest gets (see :class:`FreePlan`);
    for a running VM restarted in stop mode, only when a need moves to another alternative.
    """

    __slots__ = (
        "guest",
        "mode",
        "verdict",
        "reason",
        "stops",
        "refusal",
        "template",
        "restart_first",
        "moves",
        "failure",
        "picks",
    )

    def __init__(self, guest: Guest, mode: str, verdict: Verdict, reason: str = "") -> None:
        self.guest = guest
        self.mode = mode
        self.verdict = verdict
        self.reason = reason
        self.stops: list[Stop] = []
        self.refusal: Refusal | None = None
        self.template = False  # backed up without its devices
        self.restart_first: list[int] = []  # waiting guests to start before vzdump's restart
        self.moves: list[str] = []  # devices a running mapped guest moves to at vzdump's restart
        self.failure: str | None = None
        self.picks: list[int | None] = []


def decide_backup(
    guest: Guest,
    *,
    job_mode: str,
    running: bool,
    needs: list[Need],
    holders: list[Holder],
    protect: frozenset[int],
    ha_started: bool = False,
    waiting: dict[int, list[str]] | None = None,
) -> BackupDecision:
    """The decision for ``guest`` in a job of mode ``job_mode``, on the node as given.

    ``needs``: its passthrough needs as its next start sees them (pending changes applied);
    ``holders``: the running guests with what they hold (the guest itself too, when it runs);
    ``ha_started``: an HA resource in state ``started``; ``waiting``: guests the hook stopped
    and has not started again, with the addresses they held.
    """
    mode = job_mode if running else "stop"  # vzdump backs up a guest that is off in stop mode
    if job_mode == "stop" and ha_started:
        return BackupDecision(
            guest, mode, Verdict.REFUSE, "vzdump refuses stop mode for an HA-managed guest"
        )
    if guest.kind != GuestKind.QEMU:
        return BackupDecision(guest, mode, Verdict.NOTHING, "vzdump never starts a stopped CT")
    if guest.template and needs:
        decision = BackupDecision(
            guest, mode, Verdict.NOTHING, "template: backed up without its devices"
        )
        decision.template = True
        return decision
    failed = start_failure(needs)
    if failed is not None and (not running or mode == "stop"):
        # a stopped VM is started for its backup, a running one too in stop mode
        why = f"{failed.source}: {failed.failure}"
        decision = BackupDecision(guest, mode, Verdict.NOTHING, f"vzdump will fail: {why}")
        decision.failure = why
        if running:
            # vzdump shuts it down first: refused, it keeps running
            decision.verdict = Verdict.REFUSE
            decision.reason += (
                "; its backup is refused, as vzdump would shut it down and could not start it again"
            )
        elif binds_before_failing(needs):
            # that start would take its other GPUs from whoever uses them (binding them to
            # vfio-pci), then fail all the same
            decision.verdict = Verdict.REFUSE
            decision.reason += (
                "; its backup is refused before vzdump starts it, as that start would bind its "
                "other devices to vfio-pci first"
            )
        return decision
    if running:
        if mode != "stop" or not needs:
            return BackupDecision(
                guest, mode, Verdict.NOTHING, "running: it keeps its devices during its backup"
            )
        return _decide_restart_in_stop_mode(guest, needs, holders, protect, waiting or {})
    if not needs:
        return BackupDecision(guest, mode, Verdict.NOTHING, "no passthrough device")
    plan = plan_free(guest, needs, holders, protect)
    if plan.refusal is not None:
        refusal = plan.refusal
        decision = BackupDecision(
            guest,
            mode,
            Verdict.REFUSE,
            f"cannot free {refusal.address}: {refusal.holder.guest.label} {refusal.reason}",
        )
        decision.refusal = refusal
        return decision
    doomed = next((s for s in plan.stops if s.holder.restart_failure is not None), None)
    if doomed is not None:
        # stopped, it would stay off: a holder PVE will not start again is never shut down
        why = f"could not be started again: PVE will not start it ({doomed.holder.restart_failure})"
        decision = BackupDecision(
            guest,
            mode,
            Verdict.REFUSE,
            f"cannot free {doomed.address}: {doomed.holder.guest.label} {why}",
        )
        decision.refusal = Refusal(doomed.address, doomed.holder, why)
        return decision
    if not plan.stops:
        decision = BackupDecision(guest, mode, Verdict.NOTHING, "every device it needs is free")
    else:
        decision = BackupDecision(guest, mode, Verdict.FREE)
        decision.stops = plan.stops
    decision.picks = plan.picks
    return decision


def _decide_restart_in_stop_mode(
    guest: Guest,
    needs: list[Need],
    holders: list[Holder],
    protect: frozenset[int],
    waiting: dict[int, list[str]],
) -> BackupDecision:
    """A running VM backed up in stop mode: vzdump shuts it down and starts it again paused
    right away, and that start applies its pending changes and picks mapping alternatives anew
    (docs/pve-facts.md §2, §5). It must come back with what it held, taking nobody's device:
    the hook acts here (backup-start) or never — by pre-restart it already runs again."""
    own = next((h for h in holders if h.vmid == guest.vmid), None)
    others = [h for h in holders if h.vmid != guest.vmid]
    plan = plan_free(guest, needs, others, frozenset())  # its own reservations go at its shutdown
    held = [c.address for c in own.claims] if own is not None else []
    decision = BackupDecision(guest, "stop", Verdict.NOTHING, "running: vzdump restarts it")
    had: list[str] = []  # what earlier needs had: two lines on one pool had two alternatives
    gets: list[int | None] = []  # the alternative each need has after the restart
    for need, pick in zip(needs, plan.picks, strict=True):
        mine = next(
            (
                i
                for i, alternative in enumerate(need.alternatives)
                if not _taken(alternative, had)
                and any(same_function(c.address, a) for c in alternative for a in held)
            ),
            None,
        )
        if mine is not None:
            had.extend(c.address for c in need.alternatives[mine])
        gets.append(mine)
        if pick is None or len(need.alternatives) < 2:
            continue
        if mine is None or pick == mine:
            continue
        taken = [c.address for c in need.alternatives[pick]]
        owners = sorted(
            vmid
            for vmid, addresses in waiting.items()
            if any(same_function(t, a) for t in taken for a in addresses)
        )
        if owners:
            decision.restart_first.extend(v for v in owners if v not in decision.restart_first)
        else:
            decision.moves.append(
                f"{', '.join(taken)} (mapping {need.mapping}: PVE takes the first free device; "
                f"it held {', '.join(c.address for c in need.alternatives[mine])})"
            )
            gets[-1] = pick
    if decision.moves:
        decision.picks = gets
    blocker = (
        plan.refusal.holder if plan.refusal else (plan.stops[0].holder if plan.stops else None)
    )
    if blocker is not None:
        address = plan.refusal.address if plan.refusal else plan.stops[0].address
        why = (
            "its hostpci change waiting in [PENDING] applies at vzdump's restart"
            if guest.config.has_pending("hostpci")
            else "vzdump's restart would take it"
        )
        decision.verdict = Verdict.REFUSE
        decision.reason = (
            f"{why}, but {address} is held by {blocker.guest.label}: refusing the stop-mode "
            "backup, which would leave one of them off (use snapshot mode, or apply the change "
            "while the other guest is off)"
        )
    elif decision.restart_first:
        decision.verdict = Verdict.RESTART_FIRST
        decision.reason = "guests stopped earlier must get their device back before its restart"
    return decision


# ---- handing a GPU over to a guest the admin starts --------------------------------------------


class HandoverVerdict(StrEnum):
    RUNNING = "running"  # it runs already, with its devices: nothing to do
    START = "start"  # shut these holders down (maybe none), then start it
    REFUSE = "refuse"  # stop nobody: a holder must not stop, or PVE would not start the guest


class HandoverDecision:
    """Who gives a guest's devices up before the admin's start of it; decided in full before
    anybody is stopped, so that a refusal leaves every guest as it was."""

    __slots__ = ("guest", "verdict", "reason", "stops", "refusal")

    def __init__(self, guest: Guest, verdict: HandoverVerdict, reason: str = "") -> None:
        self.guest = guest
        self.verdict = verdict
        self.reason = reason
        self.stops: list[Stop] = []
        self.refusal: Refusal | None = None


def decide_handover(
    guest: Guest,
    *,
    running: bool,
    needs: list[Need],
    holders: list[Holder],
    protect: frozenset[int],
    starting: bool = False,
) -> HandoverDecision:
    """The hand-over of every unit ``guest`` claims at its next start (its ``needs``: a VM's
    passthrough lines with pending changes applied, mapping pools picked as PVE picks them; a
    CT's device nodes) from the running ``holders``. Holders are not started again: the admin
    chose this guest. ``protect``ed, locked and starting holders are never stopped.
    ``starting``: PVE is starting it now (its guest hookscript's ``pre-start``), its own checks
    passed."""

    def refuse(reason: str) -> HandoverDecision:
        return HandoverDecision(guest, HandoverVerdict.REFUSE, reason)

    if running:
        return HandoverDecision(guest, HandoverVerdict.RUNNING, f"{guest.label} runs already")
    if guest.template and not starting:
        return refuse(f"{guest.label} is a template: PVE starts no template")
    # a hibernated VM (lock: suspended) is resumed by its start (qemu-server vm_start)
    if guest.lock and guest.lock != "suspended" and not starting:
        return refuse(f"{guest.label} is locked ({guest.lock}): PVE would not start it")
    if not needs:
        return HandoverDecision(guest, HandoverVerdict.START, "no passthrough device")
    failed = start_failure(needs)
    if failed is not None:  # stopping holders would not help it
        where = f"{failed.blame}: " if failed.blame else ""
        return refuse(f"PVE will not start it: {where}{failed.source}: {failed.failure}")
    plan = plan_free(guest, needs, holders, protect)
    if plan.refusal is not None:
        refusal = plan.refusal
        decision = refuse(
            f"cannot free {refusal.address}: {refusal.holder.guest.label} {refusal.reason}"
        )
        decision.refusal = refusal
        return decision
    for need, pick in zip(needs, plan.picks, strict=True):
        if pick is None:
            return refuse(f"{need.source}: none of its devices is available on this node")
    for stop in plan.stops:  # its start reserved the device: it cannot be stopped half-started
        if stop.holder.starting:
            return refuse(
                f"cannot free {stop.address}: {stop.holder.guest.label} is starting right now "
                "(try again once it runs)"
            )
    decision = HandoverDecision(guest, HandoverVerdict.START)
    decision.stops = plan.stops
    if not plan.stops:
        decision.reason = "every device it needs is free"
    return decision


# ---- starting recorded guests again -------------------------------------------------------------


class RestartAction(StrEnum):
    START = "start"  # stopped, its units are free: start it
    DROP = "drop"  # already running again: forget the record
    BLOCKED = "blocked"  # another running guest holds its units now
    AFTER = "after"  # its start would take the units of a recorded guest still down: later
    MISSING = "missing"  # its config is gone: keep the record for the admin
    MOVED = "moved"  # it lives on another node now (HA placed it there): nothing to do here
    WAIT = "wait"  # running, but its shutdown may still take effect: watch it, decide later


class RestartStep:
    __slots__ = ("vmid", "action", "reason")

    def __init__(self, vmid: int, action: RestartAction, reason: str = "") -> None:
        self.vmid = vmid
        self.action = action
        self.reason = reason


def restart_order(
    vmid: int, orders: dict[int, int | None], ranks: dict[int, int]
) -> tuple[int, int, int]:
    order = orders.get(vmid)
    return (ranks.get(vmid, 0), UNORDERED if order is None else order, vmid)


def plan_restart(
    vmids: list[int],
    *,
    running: set[int],
    orders: dict[int, int | None],
    missing: set[int],
    blocked: dict[int, str],
    settling: dict[int, str] | set[int] | frozenset[int] = frozenset(),
    ranks: dict[int, int] | None = None,
    moved: dict[int, str] | None = None,
    after: dict[int, str] | None = None,
) -> list[RestartStep]:
    """Start the guests the hook stopped, in ``startup`` order and then VMID order (as PVE
    boots them).

    ``ranks`` go first: guests with a PCI mapping take the first free alternative when they
    start, so they start after the guests with fixed devices, in the order of the alternative
    each had — then every guest gets the device it had before. ``settling``: running guests
    whose shutdown was interrupted or timed out recently; they may still go down, so their
    record must stay until that is known. ``moved``: guests now on another node (vmid → node).
    ``after``: guests that wait for another recorded guest to start first (:func:`hold_back`).
    """
    ranks = ranks or {}
    moved = moved or {}
    after = after or {}
    steps = []
    for vmid in sorted(vmids, key=lambda v: restart_order(v, orders, ranks)):
        if vmid in moved:
            why = f"now lives on node {moved[vmid]} (HA or a migration placed it there)"
            steps.append(RestartStep(vmid, RestartAction.MOVED, why))
        elif vmid in running and vmid in settling:
            why = (
                settling[vmid]
                if isinstance(settling, dict)
                else "its interrupted shutdown may still be under way"
            )
            steps.append(RestartStep(vmid, RestartAction.WAIT, why))
        elif vmid in running:
            steps.append(RestartStep(vmid, RestartAction.DROP, "already running"))
        elif vmid in missing:
            steps.append(RestartStep(vmid, RestartAction.MISSING, "its config no longer exists"))
        elif vmid in blocked:
            steps.append(RestartStep(vmid, RestartAction.BLOCKED, blocked[vmid]))
        elif vmid in after:
            steps.append(RestartStep(vmid, RestartAction.AFTER, after[vmid]))
        else:
            steps.append(RestartStep(vmid, RestartAction.START))
    return steps


def hold_back(
    starting: list[Holder], running: list[Holder], waiting: list[Holder]
) -> dict[int, str]:
    """Of the guests about to start (in their order, each as the holder it was, with the
    ``restart_needs`` of its start), those whose start would take what a guest still down
    (``waiting``) needs: vmid → why. They wait for it, and start after it.

    A mapping's device is chosen again at each start: the first one no running VM has reserved
    (docs/pve-facts.md §5). PVE knows nothing of a guest kept down, so a mapped guest started
    before it may take its device, and that guest could not start again. A guest held back
    waits too, so others may in turn take its device.
    """
    held: dict[int, str] = {}
    while True:
        down = waiting + [h for h in starting if h.vmid in held]
        before = list(running)
        found = None
        for holder in starting:
            if holder.vmid in held:
                continue
            found = _takes_from(holder.guest, holder.restart_needs, before, down)
            if found is not None:
                taken, address = found
                name = taken.guest.label
                held[holder.vmid] = (
                    f"its start now would take {address}, which {name}, still down, needs: it "
                    f"starts after {name}"
                )
                break
            before.append(holder)
        if found is None:
            return held


def _picked(needs: list[Need], plan: FreePlan) -> list[tuple[Need, Claim]]:
    """What a start by ``plan`` takes, each claim with the need it serves, reserved as PVE
    reserves a VM's devices at its start."""
    return [
        (need, Claim(c.address, c.units, c.kind, RESERVED))
        for need, pick in zip(needs, plan.picks, strict=True)
        if pick is not None
        for c in need.alternatives[pick]
    ]


def _takes_from(
    guest: Guest, needs: list[Need], running: list[Holder], down: list[Holder]
) -> tuple[Holder, str] | None:
    """The guest of ``down`` whose units the start of ``guest`` now would take, and what: a guest
    with a mapping of its own (its ``restart_needs``) is only robbed when no alternative is left
    free for it once ``guest`` runs."""
    taken = _picked(needs, plan_free(guest, needs, running, frozenset()))
    started = Holder(guest, [c for _, c in taken])  # as it will run
    for holder in down:
        hit = next(
            ((n, c) for n, c in taken if any(c.conflicts_with(h) for h in holder.claims)), None
        )
        if hit is None:
            continue
        if holder.restart_needs:
            # the others still down count as holding theirs: they start again too
            others = [h for h in down if h is not holder]
            later = plan_free(
                holder.guest, holder.restart_needs, [*running, *others, started], frozenset()
            )
            if not later.stops and later.refusal is None:
                continue  # another alternative stays free for it
        need, claim = hit
        of = f" (mapping {need.mapping})" if need.mapping else ""
        return holder, f"{claim.address}{of}"
    return None


# ---- when the job no longer needs a holder's GPU ------------------------------------------------


def next_needer(holder: Holder, later: JobOrder, others: list[Holder]) -> int | None:
    """Index in ``later`` (the job's guests still to come, whether they run, their needs) of the
    first one whose backup would shut ``holder`` down again if it ran: a stopped VM started
    paused for its backup, with ``others`` (the guests running now) holding what they hold."""
    for index, (guest, running, needs) in enumerate(later):
        if guest.kind != GuestKind.QEMU or running or guest.template or not needs:
            continue
        if start_failure(needs) is not None:
            continue  # PVE will not start it: nobody is stopped for its backup
        plan = plan_free(guest, needs, [*others, holder], frozenset())
        if any(stop.holder.vmid == holder.vmid for stop in plan.stops):
            return index
    return None


def keep_down_until(
    holder: Holder,
    later: JobOrder,
    durations: dict[int, float],
    keep_down_max: float,
    others: list[Holder],
) -> int | None:
    """Job-aware restarts: the VMID of the next guest of the job that needs the (stopped)
    holder's unit when its backup is expected to begin within ``keep_down_max`` seconds (keep
    the holder down until that guest's ``log-end``); None: start it now.

    The wait is the previous backup durations of the guests in between (``durations``; a guest
    without one counts UNKNOWN_DURATION). The holder's own backup may come in between: it is
    then backed up as the stopped guest it is (consistent, as after a shutdown).
    """
    index = next_needer(holder, later, others)
    if index is None:
        return None
    wait = sum(durations.get(g.vmid, UNKNOWN_DURATION) for g, _, _ in later[:index])
    return later[index][0].vmid if wait <= keep_down_max else None


def keep_down_through(
    holder: Holder,
    later: JobOrder,
    durations: dict[int, float],
    keep_down_max: float,
    others: list[Holder],
) -> int | None:
    """The guest of ``later`` whose ``log-end`` is expected to start the holder again (None:
    the current guest's): :func:`keep_down_until` followed from needer to needer."""
    last = None
    while True:
        until = keep_down_until(holder, later, durations, keep_down_max, others)
        if until is None:
            return last
        last = until
        later = later[next(i for i, (g, _, _) in enumerate(later) if g.vmid == until) + 1 :]


# ---- a whole job ---------------------------------------------------------------------------------


class Forecast(StrEnum):
    OK = "ok"
    FAIL = "fail"


class GuestForecast:
    """What the hook (and vzdump) will do for one guest of a job."""

    __slots__ = ("decision", "addresses", "restarted", "outcome", "needs")

    def __init__(
        self, decision: BackupDecision, addresses: list[str], needs: list[Need] | None = None
    ) -> None:
        self.decision = decision
        self.addresses = addresses
        self.needs = needs or []
        self.restarted: list[int] = []  # holders started again at this guest's log-end
        failed = decision.verdict == Verdict.REFUSE or decision.failure is not None
        self.outcome = Forecast.FAIL if failed else Forecast.OK

    @property
    def guest(self) -> Guest:
        return self.decision.guest

    @property
    def mode(self) -> str:
        return self.decision.mode

    @property
    def stops(self) -> list[Stop]:
        return self.decision.stops

    @property
    def reason(self) -> str:
        """Why it fails, or what an admin might not expect of a good one (a template)."""
        if self.outcome == Forecast.FAIL or self.decision.template:
            return self.decision.reason
        return ""


class HolderCost:
    """What a job costs one holder: shutdown/boot cycles, time down, and whose backups it was
    down for."""

    __slots__ = ("label", "cycles", "down_seconds", "during")

    def __init__(self, label: str) -> None:
        self.label = label
        self.cycles = 0
        self.down_seconds = 0.0
        self.during: list[int] = []  # guests backed up while it was down


class JobForecast:
    def __init__(self) -> None:
        self.guests: list[GuestForecast] = []
        self.restarted_at_end: list[int] = []
        self.holders: dict[int, HolderCost] = {}

    @property
    def down_for(self) -> dict[int, int]:
        """Holder VMID → the number of guest backups during which it is down."""
        return {vmid: len(cost.during) for vmid, cost in self.holders.items()}

    @property
    def ok(self) -> bool:
        return all(g.outcome != Forecast.FAIL for g in self.guests)


def forecast_job(
    order: JobOrder,
    holders: list[Holder],
    *,
    mode: str,
    protect: frozenset[int],
    restart: str,
    ha: set[int],
    durations: dict[int, float] | None = None,
    keep_down_max: float = 1800.0,
) -> JobForecast:
    """Walk a vzdump job guest by guest, as the hook will: who stops for whom, when they return.

    ``order``: every guest of the job in vzdump's order, whether it runs now, and its needs as
    its next start sees them. ``holders``: the guests running now with what they hold.
    ``durations``: each guest's previous backup in seconds, for the timeline (job-aware restarts
    and the cost per holder); a guest without one counts UNKNOWN_DURATION.
    """
    durations = durations or {}
    forecast = JobForecast()
    running = {h.vmid for h in holders}
    running.update(g.vmid for g, is_running, _ in order if is_running)
    held = {h.vmid: h.claims for h in holders}
    by_vmid = {h.vmid: h for h in holders}
    labels = {h.vmid: h.guest.label for h in holders}
    stopped_for: dict[int, int] = {}  # holder → the guest it was stopped for
    down_since: dict[int, float] = {}  # holder → when it went down, on the job's timeline
    clock = 0.0

    # the units a start of this job binds to vfio-pci, and whose: PVE never binds them back
    bound: dict[str, int] = {}

    def bring_back(vmid: int, at: float, step: GuestForecast | None) -> None:
        del stopped_for[vmid]
        running.add(vmid)
        forecast.holders[vmid].down_seconds += at - down_since.pop(vmid)
        if step is not None:
            step.restarted.append(vmid)
        for unit in _host_driver_units(held.get(vmid, [])):  # the hook gives these back
            bound.pop(unit, None)

    def known() -> set[str]:
        """Units whose host driver the record of a holder that is down knows: the hook gives
        them back when an mdev on them is needed (before that holder's restart)."""
        return {unit for vmid in stopped_for for unit in _host_driver_units(held.get(vmid, []))}

    for index, (guest, _, needs) in enumerate(order):
        for claim in (c for n in needs for c in n.claims() if c.kind == ClaimKind.MDEV):
            for unit in claim.units & known():
                bound.pop(unit, None)
        needs = _after_binds(needs, bound)
        decision = decide_backup(
            guest,
            job_mode=mode,
            running=guest.vmid in running,
            needs=needs,
            holders=[h for h in holders if h.vmid in running],
            protect=protect,
            ha_started=guest.vmid in ha,
            waiting={v: [c.address for c in held.get(v, [])] for v in stopped_for},
        )
        step = GuestForecast(decision, [c.address for n in needs for c in n.claims()], needs)
        forecast.guests.append(step)
        if step.outcome == Forecast.OK and guest.vmid not in running and not guest.template:
            for need, pick in zip(needs, decision.picks, strict=False):
                for claim in need.alternatives[pick] if pick is not None else ():
                    if claim.kind == ClaimKind.EXCLUSIVE:
                        bound.update(dict.fromkeys(claim.units, guest.vmid))
        for vmid in decision.restart_first:  # started again before this guest's restart
            bring_back(vmid, clock, step)
        for stop in decision.stops:
            vmid = stop.holder.vmid
            running.discard(vmid)
            stopped_for[vmid] = guest.vmid
            down_since[vmid] = clock
            cost = forecast.holders.setdefault(vmid, HolderCost(labels.get(vmid, str(vmid))))
            cost.cycles += 1
        for vmid in stopped_for:
            forecast.holders[vmid].during.append(guest.vmid)
        clock += durations.get(guest.vmid, UNKNOWN_DURATION)
        lasting = {unit: vmid for unit, vmid in bound.items() if unit not in known()}
        later = [(g, g.vmid in running, _after_binds(n, lasting)) for g, _, n in order[index + 1 :]]
        others = [h for h in holders if h.vmid in running]
        back = []
        for vmid in sorted(stopped_for):
            if restart == "after-guest":
                if stopped_for[vmid] == guest.vmid:
                    back.append(vmid)
            elif restart == "job-aware":
                until = keep_down_until(by_vmid[vmid], later, durations, keep_down_max, others)
                if until is None:
                    back.append(vmid)
        # fixed devices first, as the hook starts them
        back.sort(key=lambda v: (any(len(n.alternatives) > 1 for n in by_vmid[v].restart_needs), v))
        waiting = [by_vmid[v] for v in stopped_for if v not in back]
        later_still = hold_back([by_vmid[v] for v in back], others, waiting)
        for vmid in back:
            if vmid not in later_still:
                bring_back(vmid, clock, step)
    forecast.restarted_at_end = sorted(stopped_for)
    for vmid in forecast.restarted_at_end:
        forecast.holders[vmid].down_seconds += clock - down_since[vmid]
    return forecast


def _host_driver_units(claims: list[Claim]) -> set[str]:
    """The units a guest uses through their host driver (a CT's nodes, an mdev's parent): those
    its record knows the driver of."""
    return {u for c in claims if c.kind != ClaimKind.EXCLUSIVE for u in c.units}


def _after_binds(needs: list[Need], bound: dict[str, int]) -> list[Need]:
    """``needs`` as a start later in the job meets them: an mdev whose parent an earlier start of
    the job bound to vfio-pci (``bound``) cannot be created, unless the hook gave it back to its
    host driver in between (docs/pve-facts.md §5)."""
    result = []
    for need in needs:
        blocked = next(
            (
                (claim, bound[unit])
                for claim in need.claims()
                if claim.kind == ClaimKind.MDEV
                for unit in claim.units
                if unit in bound
            ),
            None,
        )
        if need.failure is None and blocked is not None:
            claim, vmid = blocked
            failure = (
                f"{MDEV_UNAVAILABLE}: pci device '{claim.address}' does not support mediated "
                f"devices (bound to vfio-pci by the backup of VM {vmid} before it)"
            )
            need = Need(
                need.source, need.alternatives, need.mapping, failure=failure, blame=need.blame
            )
        result.append(need)
    return result


# ---- making room for a recorded guest -----------------------------------------------------------


class Swap:
    """The way out for a recorded guest whose device a running guest took (an ``onboot`` guest
    of a PCI mapping after a power loss): shut ``blocker`` down, start ``target``, then start
    ``blocker`` again, which then takes ``moves_to`` (PVE's pick among its alternatives)."""

    __slots__ = ("target", "blocker", "address", "moves_to")

    def __init__(self, target: Guest, blocker: Holder, address: str, moves_to: list[str]) -> None:
        self.target = target
        self.blocker = blocker
        self.address = address  # what the blocker holds that the target needs
        self.moves_to = moves_to


def plan_swap(
    target: Guest,
    needs: list[Need],
    holders: list[Holder],
    blocker_needs: list[Need],
    protect: frozenset[int],
) -> tuple[Swap | None, str]:
    """Whether one running VM keeps ``target`` (a stopped VM with these needs) from starting and
    would find another device of its own if started after it: (the swap, "") or (None, why not).

    ``blocker_needs``: the needs of that one holder as its next start sees them (the caller
    asks :func:`plan_free` who it is first). The target's start reserves what it picks, and the
    blocker's start then picks as PVE does, around those reservations.
    """
    plan = plan_free(target, needs, holders, frozenset())
    if plan.refusal is not None:
        return None, f"{plan.refusal.holder.guest.label} {plan.refusal.reason}"
    if len(plan.stops) != 1:
        return None, "it would take more than one guest to shut down"
    stop = plan.stops[0]
    blocker = stop.holder
    label = blocker.guest.label
    why = _unstoppable(blocker, protect)
    if why is not None:
        return None, f"{label} {why}"
    if blocker.guest.kind != GuestKind.QEMU or blocker.starting:
        return None, f"{label} has no other device to take"
    others = [h for h in holders if h.vmid not in (blocker.vmid, target.vmid)]
    others.append(Holder(target, [c for _, c in _picked(needs, plan)]))
    back = plan_free(blocker.guest, blocker_needs, others, frozenset())
    if back.stops or back.refusal is not None or None in back.picks:
        return None, f"{label} would find no other free device if started after {target.label}"
    moves_to = [
        claim.address
        for need, pick in zip(blocker_needs, back.picks, strict=True)
        if pick is not None
        for claim in need.alternatives[pick]
    ]
    return Swap(target, blocker, stop.address, moves_to), ""
