"""Hand a guest its GPU: shut down the running guests that hold the devices it will claim, then
(for ``pve-gpu-hook start``) start it. Also ``handover enable|disable``: the guest hookscript
that does the same at every start of a guest.

The two fronts: ``pve-gpu-hook start VMID`` (:mod:`pvegpuhook.commands.start`) and the guest
hookscript's ``pre-start`` (:mod:`pvegpuhook.guesthook`), which runs inside PVE's start of the
guest, before PVE reserves its devices (docs/pve-facts.md §10). The decision is
:func:`pvegpuhook.plan.decide_handover`, made in full before anybody is stopped. Holders are not
started again (the admin chose this guest): the state file records nothing, the log file says
what was done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from enum import StrEnum

from pvegpuhook import act, paths, runtime, timing
from pvegpuhook.errors import EXIT_USAGE, ConfigError, GpuHookError
from pvegpuhook.inventory import Inventory, load_guest
from pvegpuhook.log import HANDOVER, Log
from pvegpuhook.model import Guest, GuestKind, Holder, Need, start_failure
from pvegpuhook.plan import HandoverDecision, HandoverVerdict, Stop, decide_handover
from pvegpuhook.records import duration
from pvegpuhook.settings import Settings, load_settings
from pvegpuhook.state import StateStore

PHASE = HANDOVER  # the log file's phase for every hand-over line, whichever front


class Action(StrEnum):
    """What was done to one holder."""

    WOULD_SHUT_DOWN = "would-shut-down"  # --dry-run
    SHUT_DOWN = "shut-down"
    STOPPED_HARD = "stopped-hard"  # force_stop, after its shutdown failed
    FAILED = "failed"  # it still runs (or may power off later): the guest was not started
    REFUSED = "refused"  # it must not be stopped: nobody was
    UNTOUCHED = "untouched"  # an earlier holder failed: this one was left alone


class Result(StrEnum):
    STARTED = "started"
    RUNNING = "running"  # it ran already
    WOULD_START = "would-start"  # --dry-run: nothing refuses
    FREED = "freed"  # the hookscript's part is done: PVE goes on with its start
    REFUSED = "refused"  # nobody was stopped
    FAILED = "failed"


class HolderOutcome:
    __slots__ = ("holder", "address", "action", "detail")

    def __init__(self, holder: Holder, address: str, action: Action, detail: str = "") -> None:
        self.holder = holder
        self.address = address
        self.action = action
        self.detail = detail

    def as_data(self) -> dict[str, object]:
        guest = self.holder.guest
        return {
            "vmid": guest.vmid,
            "type": guest.kind,
            "name": guest.name,
            "address": self.address,
            "action": self.action,
            "detail": self.detail,
        }


class Handover:
    """The outcome of one hand-over, for the fronts to print."""

    def __init__(self, guest: Guest, dry_run: bool) -> None:
        self.guest = guest
        self.dry_run = dry_run
        self.result = Result.REFUSED
        self.reason = ""
        self.holders: list[HolderOutcome] = []
        self.warnings: list[str] = []

    @property
    def ok(self) -> bool:
        return self.result in (Result.STARTED, Result.RUNNING, Result.WOULD_START, Result.FREED)


def start_needs(inventory: Inventory, guest: Guest) -> tuple[list[Need], list[str]]:
    """What ``guest`` claims at its next start: a VM's passthrough lines (pending applied), a
    CT's GPUs through the host driver (one need per claim)."""
    if guest.kind == GuestKind.QEMU:
        needs, problems = inventory.needs(guest, for_start=True)
        if start_failure(needs) is not None:
            problems = problems[:-1]  # the line saying so: the refusal says it
        return needs, problems
    claims = inventory.reader.ct_claims(guest.config, with_pending=True)
    return [Need(c.source, [(c,)]) for c in claims], list(guest.config.warnings)


def hand_over(
    vmid: int,
    *,
    dry_run: bool = False,
    start: bool = True,
    say: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> Handover:
    """Free every device guest ``vmid`` will claim, then start it (``start``).

    ``start=False`` is the guest hookscript's ``pre-start``: PVE starts the guest itself once the
    hookscript returns. ``deadline`` (monotonic): stop waiting for shutdowns then. ``say`` gets
    one line per holder and one for the guest, as they happen. Raises GpuHookError (exit 2) for
    an unknown guest.
    """
    log = Log(PHASE, vmid, echo=False)
    guest = load_guest(vmid)
    if guest is None:
        raise GpuHookError(f"no guest {vmid} on this node", EXIT_USAGE)
    done = Handover(guest, dry_run)

    def tell(line: str) -> None:
        if say is not None:
            say(line)
        log.file(line)

    try:
        settings, config_error = load_settings(), None
    except ConfigError as error:
        settings, config_error = Settings(), error
    inventory = Inventory()
    needs, warnings = start_needs(inventory, guest)

    def decide(protect: frozenset[int]) -> HandoverDecision:
        return decide_handover(
            guest,
            running=False if not start else runtime.running(guest.kind, vmid),
            needs=needs,
            holders=inventory.holders(exclude={vmid}) if needs else [],
            protect=protect,
            starting=not start,
        )

    decision = decide(settings.protect)
    done.warnings = [*warnings, *inventory.mapping_warnings]
    if decision.verdict == HandoverVerdict.START and decision.stops and config_error is not None:
        decision.verdict = HandoverVerdict.REFUSE
        decision.reason = f"{config_error}: stopping nobody"
    if decision.verdict == HandoverVerdict.RUNNING:
        done.result, done.reason = Result.RUNNING, decision.reason
        tell(f"{guest.label}: runs already; nothing to do")
        return done
    if decision.verdict == HandoverVerdict.REFUSE:
        return _refused(done, decision, tell)
    if dry_run:
        for stop in decision.stops:
            done.holders.append(HolderOutcome(stop.holder, stop.address, Action.WOULD_SHUT_DOWN))
            tell(f"{stop.holder.guest.label}: would shut down (it holds {stop.address})")
        done.result = Result.WOULD_START
        tell(f"{guest.label}: would start" if start else f"{guest.label}: would go on starting")
        return done
    if decision.stops:
        store = StateStore(report=log.file)
        wait = float(timing.lock_wait(settings))
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        # the hook and recover change who runs under this lock: no start of theirs in between
        with store.hold(wait, f"hand-over to {guest.label}"):
            decision = decide(settings.protect)  # again: the node may have changed meanwhile
            if decision.verdict == HandoverVerdict.REFUSE:
                return _refused(done, decision, tell)
            if not _free(done, decision.stops, settings, inventory, deadline, tell):
                return done
            again = decide(frozenset())
            if again.stops:  # an HA manager or an admin took it while we waited
                late = again.stops[0]
                done.result = Result.FAILED
                done.reason = f"{late.holder.guest.label} holds {late.address} now"
                tell(f"{guest.label}: not started: {done.reason}")
                return done
    if not start:
        done.result = Result.FREED
        if decision.stops:
            tell(f"{guest.label}: its devices are free; PVE goes on starting it")
        return done
    outcome = act.start(
        guest.kind, vmid, timing.start_wait(guest.kind, guest.config, settings.start_timeout)
    )
    if not outcome.ok:
        done.result, done.reason = Result.FAILED, outcome.detail
        tell(f"{guest.label}: did not start: {outcome.detail}")
        return done
    done.result = Result.STARTED
    tell(f"{guest.label}: started in {duration(outcome.seconds)}")
    return done


def _refused(done: Handover, decision: HandoverDecision, tell: Callable[[str], None]) -> Handover:
    done.result, done.reason = Result.REFUSED, decision.reason
    if decision.refusal is not None:
        refusal = decision.refusal
        done.holders.append(
            HolderOutcome(refusal.holder, refusal.address, Action.REFUSED, refusal.reason)
        )
        tell(
            f"{refusal.holder.guest.label}: {refusal.reason}; it holds {refusal.address}: "
            "nobody was stopped"
        )
    else:
        tell(f"{done.guest.label}: {decision.reason}; nobody was stopped")
    return done


def _free(
    done: Handover,
    stops: list[Stop],
    settings: Settings,
    inventory: Inventory,
    deadline: float | None,
    tell: Callable[[str], None],
) -> bool:
    """Shut the holders down one by one; the first that does not go ends the hand-over."""
    for index, stop in enumerate(stops):
        outcome = _shut_down(done.guest, stop, settings, inventory, deadline)
        done.holders.append(outcome)
        label = stop.holder.guest.label
        if outcome.action in (Action.SHUT_DOWN, Action.STOPPED_HARD):
            tell(f"{label}: {outcome.detail}")
            continue
        tell(f"{label}: {outcome.detail}")
        for rest in stops[index + 1 :]:
            done.holders.append(HolderOutcome(rest.holder, rest.address, Action.UNTOUCHED))
        done.result = Result.FAILED
        done.reason = f"{label} {outcome.detail}"
        tell(f"{done.guest.label}: not started: {stop.address} is not free")
        return False
    return True


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _shut_down(
    target: Guest, stop: Stop, settings: Settings, inventory: Inventory, deadline: float | None
) -> HolderOutcome:
    """One holder, gracefully (``qm stop`` only with ``force_stop``), confirmed gone.

    An HA resource is taken out of HA's hands first (HA would kill a VM that ignores the request,
    or leave a CT in ``error``), and given back in state ``stopped`` once it is off: in
    ``started`` HA would start it again and take the device back (docs/pve-facts.md §9, §10).
    """
    guest = stop.holder.guest
    kind, vmid = guest.kind, guest.vmid
    sid = act.ha_sid(kind, vmid)
    ha_state = inventory.ha_states().get(vmid)
    if ha_state == "ignored":
        ha_state = None  # HA leaves it alone: qm/pct act on it directly
    if ha_state is not None:
        taken = act.ha_set(kind, vmid, "ignored")
        if not taken.ok:
            act.ha_set(kind, vmid, ha_state)  # whatever happened, give it back
            detail = f"is HA resource {sid}, and could not be taken out of HA's hands: "
            detail += taken.detail
            return HolderOutcome(stop.holder, stop.address, Action.FAILED, detail)
    timeout = timing.shutdown_timeout(guest.config, settings.shutdown_timeout)
    began = time.monotonic()
    outcome = act.shutdown(kind, vmid, timeout, wait=_remaining(deadline))
    action = Action.SHUT_DOWN
    if not outcome.ok and settings.force_stop and not outcome.left_running:
        outcome = act.hard_stop(kind, vmid, wait=_remaining(deadline))
        action = Action.STOPPED_HARD
    took = duration(time.monotonic() - began)
    if not outcome.ok:
        if ha_state is not None:
            act.ha_set(kind, vmid, ha_state)
        if outcome.left_running:
            why = (
                f"still shutting down after {took} (the request stays delivered: it may power "
                f"off later, and stays off then)"
            )
        elif action == Action.STOPPED_HARD:
            why = f"could not be stopped: {outcome.detail}"
        elif outcome.seconds < timeout:  # refused at once, e.g. "VM is paused"
            why = f"could not be shut down: {outcome.detail}"
        else:
            why = (
                f"did not shut down within {timeout} s (it may still power off, and stays off "
                f"then): {outcome.detail}"
            )
        return HolderOutcome(stop.holder, stop.address, Action.FAILED, why)
    via = ""
    if ha_state is not None:
        back = "stopped" if ha_state in ("started", "enabled") else ha_state
        given = act.ha_set(kind, vmid, back)
        via = (
            f"; HA resource {sid} set to {back}"
            if given.ok
            else f"; HA resource {sid} stays ignored ({given.detail})"
        )
    how = "shut down" if action == Action.SHUT_DOWN else "stopped hard (force_stop)"
    detail = f"{how} in {took}{via}: it held {stop.address}, needed by {target.label}; it stays off"
    return HolderOutcome(stop.holder, stop.address, action, detail)


# ---- handover enable|disable: the guest hookscript ---------------------------------------------


def snippet_storage() -> tuple[str, str] | str:
    """(storage id, snippets directory) of the first directory storage of this node whose content
    includes ``snippets`` (``local`` first), or why there is none."""
    from pvegpuhook.pveconf import node_name, parse_storage_cfg, read_text

    path = paths.host(paths.STORAGE_CFG)
    text = read_text(path)
    shown = paths.shown(paths.STORAGE_CFG)
    if text is None:
        return f"cannot read {shown}"
    node = node_name()
    storages = [
        s
        for s in parse_storage_cfg(text)
        if s.type == "dir" and s.path and not s.disabled and (not s.nodes or node in s.nodes)
    ]
    usable = [s for s in storages if "snippets" in s.content]
    usable.sort(key=lambda s: s.storeid != "local")
    if usable:
        storage = usable[0]
        assert storage.path is not None
        return storage.storeid, paths.host(storage.path, "snippets")
    hint = ""
    local = next((s for s in storages if s.storeid == "local"), None)
    if local is not None:
        hint = "; add it to 'local' with: pvesm set local --content " + ",".join(
            [*local.content, "snippets"]
        )
    return f"no directory storage in {shown} has the content type 'snippets'{hint}"


def volid(storeid: str) -> str:
    return f"{storeid}:snippets/{paths.GUEST_HOOK_SNIPPET}"


def is_ours(hookscript: str | None) -> bool:
    """Whether a guest's ``hookscript`` option names our snippet (on any storage)."""
    return bool(hookscript) and str(hookscript).endswith(f":snippets/{paths.GUEST_HOOK_SNIPPET}")


def enable(vmid: int) -> str:
    """Attach the guest hookscript to guest ``vmid``; what was done. GpuHookError when it cannot
    be done (exit 1) or the guest is unknown (exit 2)."""
    guest = load_guest(vmid)
    if guest is None:
        raise GpuHookError(f"no guest {vmid} on this node", EXIT_USAGE)
    current = guest.config.values().get("hookscript")
    if is_ours(current):
        return f"{guest.label}: hand-over is enabled already ({current})"
    if current:
        raise GpuHookError(
            f"{guest.label} has the hookscript {current} already, and PVE runs one hookscript "
            "per guest: pve-gpu-hook did not replace it. To have both, call "
            f"'{paths.shown(paths.GUEST_HOOK)} <vmid> <phase>' from that script (its exit status "
            "on pre-start decides whether the start goes on), or remove it with "
            f"'{'qm' if guest.kind == GuestKind.QEMU else 'pct'} set {vmid} --delete hookscript' "
            "first"
        )
    found = snippet_storage()
    if isinstance(found, str):
        raise GpuHookError(f"cannot enable the hand-over for {guest.label}: {found}")
    storeid, directory = found
    problem = act.link_snippet(
        os.path.join(directory, paths.GUEST_HOOK_SNIPPET), paths.host(paths.GUEST_HOOK)
    )
    if problem:
        raise GpuHookError(f"cannot enable the hand-over for {guest.label}: {problem}")
    outcome = act.set_hookscript(guest.kind, vmid, volid(storeid))
    if not outcome.ok:
        raise GpuHookError(f"cannot enable the hand-over for {guest.label}: {outcome.detail}")
    message = (
        f"{guest.label}: hand-over enabled (hookscript {volid(storeid)}): each start of it "
        "shuts down the guests holding its devices"
    )
    Log(PHASE, vmid, echo=False).file(message)
    return message


def disable(vmid: int) -> str:
    guest = load_guest(vmid)
    if guest is None:
        raise GpuHookError(f"no guest {vmid} on this node", EXIT_USAGE)
    current = guest.config.values().get("hookscript")
    if not current:
        return f"{guest.label}: hand-over is not enabled; nothing to do"
    if not is_ours(current):
        raise GpuHookError(
            f"{guest.label} has another hookscript ({current}), not pve-gpu-hook's: left as it is"
        )
    outcome = act.set_hookscript(guest.kind, vmid, None)
    if not outcome.ok:
        raise GpuHookError(f"cannot disable the hand-over for {guest.label}: {outcome.detail}")
    message = f"{guest.label}: hand-over disabled (hookscript {current} removed)"
    Log(PHASE, vmid, echo=False).file(message)
    return message
