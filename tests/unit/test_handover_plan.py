"""Unit tests of the hand-over's pure decision (pvegpuhook.plan.decide_handover): who gives a
guest's devices up before the admin's start of it, decided in full before anyone is stopped."""

from __future__ import annotations

import pytest

from pvegpuhook.model import Holder
from pvegpuhook.plan import HandoverVerdict, decide_handover
from tests.unit.test_plan import (
    CT_GPU,
    GPU,
    GPU2,
    LXC,
    NO_MDEV,
    NONE,
    RESERVED_GPU,
    RESERVED_GPU2,
    claim,
    guest,
    holder,
    need,
)

START, REFUSE, RUNNING = HandoverVerdict.START, HandoverVerdict.REFUSE, HandoverVerdict.RUNNING

CASES = [
    # (id, target keys, needs, holders, protect, verdict, stops [vmid], refusing vmid)
    ("the holder shuts down", {}, [need([GPU])], [holder(104, GPU)], NONE, START, [104], None),
    ("nobody holds it", {}, [need([GPU])], [], NONE, START, [], None),
    ("no passthrough", {}, [], [holder(104, GPU)], NONE, START, [], None),
    (
        "a protected holder: nobody is stopped, not even the other holder",
        {},
        [need([GPU]), need([GPU2])],
        [holder(104, GPU), holder(106, GPU2)],
        frozenset({106}),
        REFUSE,
        [],
        106,
    ),
    (
        "a locked holder (its backup runs)",
        {},
        [need([GPU])],
        [holder(103, RESERVED_GPU, lock="backup")],
        NONE,
        REFUSE,
        [],
        103,
    ),
    (
        "a mapping pool with a free device: nobody",
        {},
        [need([GPU], [GPU2], mapping="gpu")],
        [holder(104, RESERVED_GPU)],
        NONE,
        START,
        [],
        None,
    ),
    (
        "a mapping pool, every device busy: the first",
        {},
        [need([GPU], [GPU2], mapping="gpu")],
        [holder(104, RESERVED_GPU), holder(106, RESERVED_GPU2)],
        NONE,
        START,
        [104],
        None,
    ),
    (
        "a mapping pool, the first device's holder protected: the other",
        {},
        [need([GPU], [GPU2], mapping="gpu")],
        [holder(104, RESERVED_GPU), holder(106, RESERVED_GPU2)],
        frozenset({104}),
        START,
        [106],
        None,
    ),
    ("a CT holder", {}, [need([GPU])], [holder(200, CT_GPU, kind=LXC)], NONE, START, [200], None),
    (
        "a start PVE will fail: nobody is stopped for it",
        {},
        [need([GPU]), NO_MDEV],
        [holder(104, GPU)],
        NONE,
        REFUSE,
        [],
        None,
    ),
    ("a template", {"template": "1"}, [need([GPU])], [], NONE, REFUSE, [], None),
    ("a locked guest", {"lock": "backup"}, [need([GPU])], [], NONE, REFUSE, [], None),
    (
        "a hibernated guest is resumed by its start",
        {"lock": "suspended"},
        [need([GPU])],
        [holder(104, GPU)],
        NONE,
        START,
        [104],
        None,
    ),
]


@pytest.mark.parametrize(
    "keys, needs, holders, protect, verdict, stops, refusing",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide_handover(
    keys: dict[str, str],
    needs: list,
    holders: list[Holder],
    protect: frozenset[int],
    verdict: HandoverVerdict,
    stops: list[int],
    refusing: int | None,
) -> None:
    decision = decide_handover(
        guest(102, **keys), running=False, needs=needs, holders=holders, protect=protect
    )
    assert decision.verdict == verdict, decision.reason
    assert [s.holder.vmid for s in decision.stops] == stops
    assert (decision.refusal.holder.vmid if decision.refusal else None) == refusing
    if verdict == REFUSE:
        assert decision.reason
    if any(n.failure for n in needs):
        assert decision.reason.startswith("PVE will not start it: hostpci1: could not create")


def test_a_ct_target_and_a_vm_holder() -> None:
    decision = decide_handover(
        guest(200, LXC),
        running=False,
        needs=[need([CT_GPU])],
        holders=[holder(104, GPU), holder(201, claim("0000:01:00.0", "group:14", CT_GPU.kind))],
        protect=NONE,
    )
    assert [s.holder.vmid for s in decision.stops] == [104]  # CTs share the host driver


def test_running_already() -> None:
    decision = decide_handover(
        guest(102), running=True, needs=[need([GPU])], holders=[holder(104, GPU)], protect=NONE
    )
    assert decision.verdict == RUNNING and decision.stops == []


def test_a_starting_holder_is_not_stopped_half_started() -> None:
    starting = Holder(guest(104), [RESERVED_GPU], starting=True)
    decision = decide_handover(
        guest(102), running=False, needs=[need([GPU])], holders=[starting], protect=NONE
    )
    assert decision.verdict == REFUSE and "starting right now" in decision.reason


def test_the_hookscript_start_skips_pves_own_checks() -> None:
    """At pre-start PVE has decided to start it (e.g. qm start --skiplock)."""
    decision = decide_handover(
        guest(102, lock="migrate"),
        running=False,
        needs=[need([GPU])],
        holders=[holder(104, GPU)],
        protect=NONE,
        starting=True,
    )
    assert decision.verdict == START and [s.holder.vmid for s in decision.stops] == [104]
