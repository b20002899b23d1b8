"""Unit tests of the pure planner (pvegpuhook.plan): model objects in, decisions out, no node.

Each table row is one situation an admin meets; the expected decision is what the hook does and
``dry-run`` predicts (both call these functions).
"""

from __future__ import annotations

import pytest

from pvegpuhook.model import (
    IOMMU_MISSING,
    MDEV_UNAVAILABLE,
    RESERVED,
    Claim,
    ClaimKind,
    Guest,
    GuestKind,
    Holder,
    Need,
)
from pvegpuhook.plan import (
    Forecast,
    RestartAction,
    Verdict,
    decide_backup,
    forecast_job,
    hold_back,
    keep_down_through,
    keep_down_until,
    plan_free,
    plan_restart,
)
from pvegpuhook.pveconf import parse_guest_config

QEMU, LXC = GuestKind.QEMU, GuestKind.LXC
EXCLUSIVE, MDEV, SHARED = ClaimKind.EXCLUSIVE, ClaimKind.MDEV, ClaimKind.SHARED
NONE: frozenset[int] = frozenset()


def guest(vmid: int, kind: GuestKind = QEMU, **keys: str) -> Guest:
    text = "".join(f"{key}: {value}\n" for key, value in keys.items())
    return Guest(vmid, kind, parse_guest_config(text, f"/etc/pve/x/{vmid}.conf"))


def claim(address: str, unit: str, kind: ClaimKind = EXCLUSIVE, source: str = "hostpci0") -> Claim:
    return Claim(address, frozenset({unit}), kind, source)


def need(*alternatives: list[Claim], mapping: str | None = None) -> Need:
    return Need("hostpci0", [tuple(alt) for alt in alternatives], mapping=mapping)


def holder(vmid: int, *claims: Claim, kind: GuestKind = QEMU, **keys: str) -> Holder:
    return Holder(guest(vmid, kind, **keys), list(claims))


GPU = claim("0000:01:00.0", "group:14")
AUDIO = claim("0000:01:00.1", "group:14")
GPU2 = claim("0000:02:00.0", "group:15")
SIBLING = claim("0000:00:1f.0", "group:14")  # another device in the GPU's IOMMU group
RESERVED_GPU = claim("0000:01:00.0", "group:14", source=RESERVED)
RESERVED_GPU2 = claim("0000:02:00.0", "group:15", source=RESERVED)
CT_GPU = claim("0000:01:00.0", "group:14", SHARED, "dev0 (line 3)")
CT_GPU2 = claim("0000:02:00.0", "group:15", SHARED, "dev0 (line 3)")
CT_SIBLING = claim("0000:00:1f.0", "group:14", SHARED, "dev0 (line 3)")
MDEV_GPU = claim("0000:01:00.0", "group:14", MDEV)
MDEV_GPU2 = claim("0000:02:00.0", "group:15", MDEV)
RUNNING_GPU = claim("0000:01:00.0", "group:14", source="running")  # an args device: not reserved
CARD = claim("0000:01:00", "group:14")  # host=01:00: every function of the device
GPU3 = claim("0000:03:00.0", "group:16")
RESERVED_GPU3 = claim("0000:03:00.0", "group:16", source=RESERVED)


# ---- plan_free ----------------------------------------------------------------------------------

FREE_CASES = [
    # (id, needs, holders, protect, expected stops [(vmid, address)], expected refusal)
    ("nobody holds it", [need([GPU])], [], NONE, [], None),
    (
        "the holder of the same function",
        [need([GPU])],
        [holder(104, GPU)],
        NONE,
        [(104, GPU.address)],
        None,
    ),
    (
        "another function of the device",
        [need([GPU])],
        [holder(104, AUDIO)],
        NONE,
        [(104, AUDIO.address)],
        None,
    ),
    (
        "another device of the IOMMU group",
        [need([GPU])],
        [holder(104, SIBLING)],
        NONE,
        [(104, SIBLING.address)],
        None,
    ),
    ("another group is no conflict", [need([GPU])], [holder(104, GPU2)], NONE, [], None),
    (
        "a CT using it through the host driver",
        [need([GPU])],
        [holder(200, CT_GPU, kind=LXC)],
        NONE,
        [(200, CT_GPU.address)],
        None,
    ),
    ("an mdev beside an mdev", [need([MDEV_GPU])], [holder(104, MDEV_GPU)], NONE, [], None),
    ("an mdev beside a CT", [need([MDEV_GPU])], [holder(200, CT_GPU, kind=LXC)], NONE, [], None),
    (
        "an mdev needs the parent back from a full passthrough",
        [need([MDEV_GPU])],
        [holder(104, GPU)],
        NONE,
        [(104, GPU.address)],
        None,
    ),
    (
        "two needs, one holder: one stop",
        [need([GPU]), need([AUDIO])],
        [holder(104, GPU, AUDIO)],
        NONE,
        [(104, GPU.address)],
        None,
    ),
    (
        "two holders, sorted by VMID",
        [need([GPU]), need([GPU2])],
        [holder(110, GPU2), holder(104, GPU)],
        NONE,
        [(104, GPU.address), (110, GPU2.address)],
        None,
    ),
    (
        "a protected holder refuses",
        [need([GPU])],
        [holder(104, GPU)],
        frozenset({104}),
        [],
        (104, "is protected"),
    ),
    (
        "a locked holder refuses",
        [need([GPU])],
        [holder(104, GPU, lock="backup")],
        NONE,
        [],
        (104, "is locked (backup)"),
    ),
    # mappings: PVE takes the first alternative none of whose functions a running VM reserved
    (
        "mapping: first alternative reserved, second free",
        [need([GPU], [GPU2], mapping="m")],
        [holder(104, RESERVED_GPU)],
        NONE,
        [],
        None,
    ),
    (
        "mapping: first alternative only held by a CT, so PVE takes it",
        [need([GPU], [GPU2], mapping="m")],
        [holder(200, CT_GPU, kind=LXC)],
        NONE,
        [(200, CT_GPU.address)],
        None,
    ),
    (
        "mapping: all reserved, the cheapest is freed",
        [need([GPU], [GPU2], mapping="m")],
        [holder(104, RESERVED_GPU), holder(110, RESERVED_GPU2), holder(111, SIBLING)],
        NONE,
        [(110, RESERVED_GPU2.address)],
        None,
    ),
    (
        "mapping: all reserved, the protected one is avoided",
        [need([GPU], [GPU2], mapping="m")],
        [holder(104, RESERVED_GPU), holder(110, RESERVED_GPU2)],
        frozenset({104}),
        [(110, RESERVED_GPU2.address)],
        None,
    ),
    (
        "mapping: all reserved and all protected",
        [need([GPU], [GPU2], mapping="m")],
        [holder(104, RESERVED_GPU), holder(110, RESERVED_GPU2)],
        frozenset({104, 110}),
        [],
        (104, "is protected"),
    ),
    # PVE's $used: an alternative an earlier hostpciN of the same VM took is skipped
    (
        "mapping twice: the second takes the next alternative, and its holder stops",
        [need([GPU], [GPU2], mapping="m"), need([GPU], [GPU2], mapping="m")],
        [holder(200, CT_GPU2, kind=LXC)],
        NONE,
        [(200, CT_GPU2.address)],
        None,
    ),
    (
        "mapping twice: the first reserved, so the second can only get it back",
        [need([GPU], [GPU2], mapping="m"), need([GPU], [GPU2], mapping="m")],
        [holder(104, RESERVED_GPU)],
        NONE,
        [(104, RESERVED_GPU.address)],
        None,
    ),
    (
        "mapping twice: the second one's holder is protected",
        [need([GPU], [GPU2], mapping="m"), need([GPU], [GPU2], mapping="m")],
        [holder(200, CT_GPU2, kind=LXC)],
        frozenset({200}),
        [],
        (200, "is protected"),
    ),
    (
        "mapping thrice on two alternatives: each is freed once, the third has none left",
        [need([GPU], [GPU2], mapping="m")] * 3,
        [holder(104, RESERVED_GPU), holder(110, RESERVED_GPU2)],
        NONE,
        [(104, RESERVED_GPU.address), (110, RESERVED_GPU2.address)],
        None,
    ),
    (
        "a fixed device marks its functions taken for a later mapping",
        [need([GPU]), need([GPU], [GPU2], mapping="m")],
        [holder(200, CT_GPU2, kind=LXC)],
        NONE,
        [(200, CT_GPU2.address)],
        None,
    ),
    (
        "a whole device marks each of its functions taken",
        [need([CARD]), need([AUDIO], [GPU2], mapping="m")],
        [holder(200, CT_GPU2, kind=LXC)],
        NONE,
        [(200, CT_GPU2.address)],
        None,
    ),
    (
        "a mapping after the fixed device of another group is not affected",
        [need([GPU2]), need([GPU], [GPU3], mapping="m")],
        [holder(200, CT_GPU2, kind=LXC)],
        NONE,
        [(200, CT_GPU2.address)],
        None,
    ),
    (
        "an mdev marks nothing taken",
        [need([MDEV_GPU]), need([GPU], [GPU2], mapping="m")],
        [holder(200, CT_GPU2, kind=LXC)],
        NONE,
        [],
        None,
    ),
    (
        "an mdev of a mapping goes where it can be created, reservation or not",
        [need([MDEV_GPU], [MDEV_GPU2], mapping="m")],
        [holder(104, RUNNING_GPU)],
        NONE,
        [],
        None,
    ),
    # PVE chooses after every stop: a VM stopped for a later need frees an earlier alternative
    (
        "a VM stopped for another need frees the first alternative, which PVE then takes",
        [need([GPU], [GPU2], mapping="m"), need([GPU3])],
        [
            holder(104, RESERVED_GPU, RESERVED_GPU3),
            holder(200, CT_GPU2, kind=LXC),
            holder(201, CT_SIBLING, kind=LXC),
        ],
        NONE,
        [(104, RESERVED_GPU.address), (201, CT_SIBLING.address)],
        None,
    ),
]


@pytest.mark.parametrize(
    ("needs", "holders", "protect", "stops", "refusal"),
    [case[1:] for case in FREE_CASES],
    ids=[case[0] for case in FREE_CASES],
)
def test_plan_free(
    needs: list[Need],
    holders: list[Holder],
    protect: frozenset[int],
    stops: list[tuple[int, str]],
    refusal: tuple[int, str] | None,
) -> None:
    plan = plan_free(guest(102), needs, holders, protect)
    assert [(s.holder.vmid, s.address) for s in plan.stops] == stops
    if refusal is None:
        assert plan.refusal is None
    else:
        assert plan.refusal is not None
        assert plan.refusal.holder.vmid == refusal[0] and refusal[1] in plan.refusal.reason


def test_plan_free_never_stops_the_target_itself() -> None:
    plan = plan_free(guest(102), [need([GPU])], [holder(102, GPU)], NONE)
    assert plan.stops == [] and plan.refusal is None


# ---- decide_backup: one guest of a job ---------------------------------------------------------

DECISIONS = [
    # (id, guest, job mode, running, needs, holders, ha_started, verdict, effective mode, reason)
    (
        "a CT",
        guest(200, LXC),
        "stop",
        False,
        [],
        [holder(104, GPU)],
        False,
        Verdict.NOTHING,
        "stop",
        "never starts a stopped CT",
    ),
    (
        "a running VM",
        guest(104),
        "snapshot",
        True,
        [need([GPU])],
        [],
        False,
        Verdict.NOTHING,
        "snapshot",
        "running",
    ),
    (
        "a running VM in stop mode",
        guest(104),
        "stop",
        True,
        [need([GPU])],
        [],
        False,
        Verdict.NOTHING,
        "stop",
        "running",
    ),
    (
        "no passthrough",
        guest(101),
        "snapshot",
        False,
        [],
        [holder(104, GPU)],
        False,
        Verdict.NOTHING,
        "stop",
        "no passthrough",
    ),
    (
        "a template",
        guest(9000, template="1"),
        "stop",
        False,
        [need([GPU])],
        [holder(104, GPU)],
        False,
        Verdict.NOTHING,
        "stop",
        "backed up without its devices",
    ),
    (
        "its GPU is free",
        guest(102),
        "snapshot",
        False,
        [need([GPU])],
        [holder(110, GPU2)],
        False,
        Verdict.NOTHING,
        "stop",
        "every device it needs is free",
    ),
    (
        "its GPU is held",
        guest(102),
        "snapshot",
        False,
        [need([GPU])],
        [holder(104, GPU)],
        False,
        Verdict.FREE,
        "stop",
        "",
    ),
    (
        "its GPU is held by a protected guest",
        guest(102),
        "stop",
        False,
        [need([GPU])],
        [holder(104, GPU, lock="snapshot")],
        False,
        Verdict.REFUSE,
        "stop",
        "cannot free 0000:01:00.0: VM 104 is locked (snapshot)",
    ),
    (
        "HA-managed in a stop-mode job",
        guest(102),
        "stop",
        False,
        [need([GPU])],
        [holder(104, GPU)],
        True,
        Verdict.REFUSE,
        "stop",
        "vzdump refuses stop mode",
    ),
    (
        "HA-managed in a snapshot job, stopped",
        guest(102),
        "snapshot",
        False,
        [need([GPU])],
        [holder(104, GPU)],
        True,
        Verdict.FREE,
        "stop",
        "",
    ),
]


MISSING = Need(
    "hostpci1", [(claim("0000:09:00.0", "dev:0000:09:00"),)], failure="no PCI device found"
)
NO_IOMMU = Need("hostpci0", [(GPU,)], failure=IOMMU_MISSING)
NO_MDEV = Need(  # its parent is bound to vfio-pci (docs/pve-facts.md §5)
    "hostpci1",
    [(claim("0000:03:00.0", "group:20", MDEV),)],
    failure=f"{MDEV_UNAVAILABLE}: pci device '0000:03:00.0' does not support mediated devices",
)
DECISIONS += [
    # PVE refuses the start whoever holds what: nobody is stopped, the forecast says why
    (
        "a device sysfs lacks, its other GPU held",
        guest(102),
        "stop",
        False,
        [need([GPU]), MISSING],
        [holder(104, GPU)],
        False,
        Verdict.NOTHING,
        "stop",
        "vzdump will fail: hostpci1: no PCI device found",
    ),
    (
        "no IOMMU and a line PVE refuses: the line is what PVE says first",
        guest(102),
        "snapshot",
        False,
        [NO_IOMMU, MISSING],
        [],
        False,
        Verdict.NOTHING,
        "stop",
        "vzdump will fail: hostpci1: no PCI device found",
    ),
    (
        "a running VM in stop mode would be left off by vzdump: refused, it keeps running",
        guest(104),
        "stop",
        True,
        [MISSING],
        [],
        False,
        Verdict.REFUSE,
        "stop",
        "vzdump will fail: hostpci1: no PCI device found; its backup is refused, as vzdump "
        "would shut it down",
    ),
    (
        "an mdev PVE cannot create, no other device: PVE's own error is enough",
        guest(132),
        "stop",
        False,
        [NO_MDEV],
        [holder(130, GPU)],
        False,
        Verdict.NOTHING,
        "stop",
        "vzdump will fail: hostpci1: could not create mediated device",
    ),
    (
        "an mdev PVE cannot create after it bound the VM's other GPU: refused before its start",
        guest(133),
        "stop",
        False,
        [need([GPU2]), NO_MDEV],
        [holder(200, claim("0000:02:00.0", "group:15", SHARED), kind=LXC)],
        False,
        Verdict.REFUSE,
        "stop",
        "vzdump will fail: hostpci1: could not create mediated device: pci device "
        "'0000:03:00.0' does not support mediated devices; its backup is refused before vzdump "
        "starts it",
    ),
    (
        "an mdev PVE cannot create comes after a line PVE refuses at once",
        guest(134),
        "stop",
        False,
        [NO_MDEV, MISSING],
        [],
        False,
        Verdict.NOTHING,
        "stop",
        "vzdump will fail: hostpci1: no PCI device found",
    ),
    (
        "a running VM in snapshot mode keeps running",
        guest(104),
        "snapshot",
        True,
        [MISSING],
        [],
        False,
        Verdict.NOTHING,
        "snapshot",
        "running",
    ),
    (
        "a template starts without its devices",
        guest(9000, template="1"),
        "stop",
        False,
        [MISSING],
        [],
        False,
        Verdict.NOTHING,
        "stop",
        "template: backed up without its devices",
    ),
]


@pytest.mark.parametrize(
    ("subject", "job_mode", "running", "needs", "holders", "ha", "verdict", "mode", "reason"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decide_backup(
    subject: Guest,
    job_mode: str,
    running: bool,
    needs: list[Need],
    holders: list[Holder],
    ha: bool,
    verdict: Verdict,
    mode: str,
    reason: str,
) -> None:
    decision = decide_backup(
        subject,
        job_mode=job_mode,
        running=running,
        needs=needs,
        holders=holders,
        protect=NONE,
        ha_started=ha,
    )
    assert (decision.verdict, decision.mode) == (verdict, mode)
    assert reason in decision.reason
    assert bool(decision.stops) == (verdict == Verdict.FREE)
    assert decision.template == subject.template
    assert (decision.failure is not None) == decision.reason.startswith("vzdump will fail")


# ---- plan_restart ------------------------------------------------------------------------------


def test_running_vm_with_a_mapping_twice_keeps_both_devices_in_stop_mode() -> None:
    """vzdump's restart gives hostpci1 the alternative hostpci0 does not take (PVE's $used):
    each line gets back the device it had, and nothing moves."""
    needs = [need([GPU], [GPU2], mapping="m"), need([GPU], [GPU2], mapping="m")]
    decision = decide_backup(
        guest(120),
        job_mode="stop",
        running=True,
        needs=needs,
        holders=[holder(120, RESERVED_GPU, RESERVED_GPU2)],
        protect=NONE,
    )
    assert decision.verdict == Verdict.NOTHING
    assert decision.moves == [] and decision.restart_first == []


def test_restart_order_mapped_last_then_startup_order_then_vmid() -> None:
    steps = plan_restart(
        [110, 104, 105, 103, 120],
        running=set(),
        orders={104: 2, 105: None, 103: 1, 110: None, 120: 1},
        missing=set(),
        blocked={},
        ranks={120: 1, 110: 2},
    )
    assert [s.vmid for s in steps] == [103, 104, 105, 120, 110]
    assert {s.action for s in steps} == {RestartAction.START}


def test_restart_actions() -> None:
    steps = plan_restart(
        [101, 102, 103, 104, 105],
        running={101, 102},
        orders={},
        missing={103},
        blocked={104: "0000:01:00.0 is held by VM 109"},
        settling={102},
    )
    assert [(s.vmid, s.action, s.reason) for s in steps] == [
        (101, RestartAction.DROP, "already running"),
        (102, RestartAction.WAIT, "its interrupted shutdown may still be under way"),
        (103, RestartAction.MISSING, "its config no longer exists"),
        (104, RestartAction.BLOCKED, "0000:01:00.0 is held by VM 109"),
        (105, RestartAction.START, ""),
    ]


# ---- forecast_job: the seed's night ------------------------------------------------------------


def seed_night(restart: str, protect: frozenset[int] = NONE) -> object:
    """VMs 102-105 share the GPU; only 104 runs. vzdump 102 103 104 105 --mode stop."""
    order = [
        (guest(102), False, [need([GPU])]),
        (guest(103), False, [need([GPU])]),
        (guest(104), True, []),
        (guest(105), False, [need([GPU])]),
    ]
    return forecast_job(
        order, [holder(104, GPU)], mode="stop", protect=protect, restart=restart, ha=set()
    )


def test_forecast_after_guest_stops_the_holder_for_each_needing_guest() -> None:
    forecast = seed_night("after-guest")
    assert [[s.holder.vmid for s in g.stops] for g in forecast.guests] == [[104], [104], [], [104]]
    assert [g.restarted for g in forecast.guests] == [[104], [104], [], [104]]
    assert forecast.restarted_at_end == []
    assert forecast.down_for == {104: 3}
    assert forecast.ok and {g.outcome for g in forecast.guests} == {Forecast.OK}


def test_forecast_after_job_stops_the_holder_once() -> None:
    forecast = seed_night("after-job")
    assert [[s.holder.vmid for s in g.stops] for g in forecast.guests] == [[104], [], [], []]
    # 104 is down when its own turn comes: backed up in stop mode as a stopped guest
    assert [g.mode for g in forecast.guests] == ["stop"] * 4
    assert forecast.restarted_at_end == [104]
    assert forecast.down_for == {104: 4}


def test_forecast_with_a_protected_holder_fails_those_backups() -> None:
    forecast = seed_night("after-guest", frozenset({104}))
    assert [g.outcome for g in forecast.guests] == [
        Forecast.FAIL,
        Forecast.FAIL,
        Forecast.OK,
        Forecast.FAIL,
    ]
    assert not forecast.ok
    assert "VM 104 is protected" in forecast.guests[0].reason
    assert forecast.down_for == {}


# ---- job-aware restarts ------------------------------------------------------------------------


def night(restart: str, *, durations: dict[int, float], between: list[int] = ()) -> object:
    """vzdump 102 103 [between...] 104 105 --mode stop; 102-105 share the GPU; only 104 runs;
    the guests ``between`` have no passthrough."""
    order = [
        (guest(102), False, [need([GPU])]),
        (guest(103), False, [need([GPU])]),
        *[(guest(v), False, []) for v in between],
        (guest(104), True, []),
        (guest(105), False, [need([GPU])]),
    ]
    order.sort(key=lambda item: item[0].vmid)
    return forecast_job(
        order,
        [holder(104, GPU)],
        mode="stop",
        protect=NONE,
        restart=restart,
        ha=set(),
        durations=durations,
        keep_down_max=1800,
    )


def test_job_aware_shuts_the_holder_down_once_for_the_night() -> None:
    forecast = night("job-aware", durations={102: 300, 103: 300, 104: 600, 105: 300})
    cost = forecast.holders[104]
    assert cost.cycles == 1
    assert cost.during == [102, 103, 104, 105]  # its own backup too: it is down for it
    assert [g.restarted for g in forecast.guests] == [[], [], [], [104]]
    assert cost.down_seconds == 300 + 300 + 600 + 300
    assert forecast.restarted_at_end == []


def test_after_guest_cycles_once_per_needing_backup() -> None:
    forecast = night("after-guest", durations={102: 300, 103: 300, 104: 600, 105: 300})
    assert forecast.holders[104].cycles == 3
    assert forecast.holders[104].down_seconds == 900


def gap_night(durations: dict[int, float]) -> object:
    """vzdump 102 110 111 120 --mode stop: 102 and 120 need the GPU VM 150 holds (150 is not
    in the job); 110 and 111 have no passthrough."""
    order = [
        (guest(102), False, [need([GPU])]),
        (guest(110), False, []),
        (guest(111), False, []),
        (guest(120), False, [need([GPU])]),
    ]
    return forecast_job(
        order,
        [holder(150, GPU)],
        mode="stop",
        protect=NONE,
        restart="job-aware",
        ha=set(),
        durations=durations,
        keep_down_max=1800,
    )


def test_job_aware_starts_the_holder_in_a_long_gap() -> None:
    """Unrelated backups between two needers longer than keep_down_max: start it in between."""
    forecast = gap_night({102: 300, 110: 1500, 111: 1500, 120: 300})
    cost = forecast.holders[150]
    assert cost.cycles == 2  # down for 102, up during 110 and 111, down again for 120
    assert [g.guest.vmid for g in forecast.guests if g.restarted] == [102, 120]
    assert cost.down_seconds == 300 + 300
    assert cost.during == [102, 120]


def test_job_aware_bridges_a_short_gap() -> None:
    forecast = gap_night({102: 300, 110: 60, 111: 60, 120: 300})
    cost = forecast.holders[150]
    assert cost.cycles == 1
    assert cost.during == [102, 110, 111, 120]
    assert cost.down_seconds == 300 + 60 + 60 + 300


def test_unknown_durations_count_ten_minutes() -> None:
    # 110 and 111 were never backed up: 2 x 600 s <= 1800 s; 2 x 1000 s > 1800 s
    assert gap_night({102: 300, 120: 300}).holders[150].cycles == 1
    assert gap_night({102: 300, 110: 1000, 111: 1000, 120: 300}).holders[150].cycles == 2


def test_keep_down_through_follows_the_needers() -> None:
    """After 102: 103 and 105 need the GPU next; 104 (the holder, stopped) in between."""
    later = [
        (guest(103), False, [need([GPU])]),
        (guest(104), False, []),
        (guest(105), False, [need([GPU])]),
        (guest(110), False, []),
    ]
    desk = holder(104, RESERVED_GPU)
    assert keep_down_until(desk, later, {}, 1800, []) == 103
    assert keep_down_through(desk, later, {}, 1800, []) == 105
    assert keep_down_through(desk, later, {104: 2000}, 1800, []) == 103  # 104 takes > 30 min
    assert keep_down_through(desk, later[3:], {}, 1800, []) is None  # nobody needs it: start now


def test_a_needer_whose_start_fails_keeps_nobody_down() -> None:
    """103's start fails whoever holds what (its mdev cannot be created): its backup stops
    nobody, so the holder is not kept down for it."""
    later = [(guest(103), False, [need([GPU]), NO_MDEV]), (guest(105), False, [need([GPU])])]
    desk = holder(104, RESERVED_GPU)
    assert keep_down_until(desk, later, {}, 1800, []) == 105
    assert keep_down_until(desk, later[:1], {}, 1800, []) is None


def test_a_pool_needer_needs_the_holder_only_when_the_other_card_is_taken() -> None:
    """VM 120 has a mapping of two GPUs. Holder 104 (stopped) had the first; with the second
    free, 120 takes it and 104 may start; with VM 130 running on the second, 120's backup
    would shut 104 down again: keep it down."""
    later = [(guest(120), False, [need([GPU], [GPU2], mapping="pool")])]
    desk = holder(104, RESERVED_GPU)
    assert keep_down_until(desk, later, {}, 1800, []) is None
    assert keep_down_until(desk, later, {}, 1800, [holder(130, RESERVED_GPU2)]) == 120


def test_a_holder_pve_would_not_start_again_is_never_stopped() -> None:
    """Stopped, it would stay off: the backup is refused instead, naming why."""
    doomed = holder(104, GPU)
    doomed.restart_failure = "hostpci0: PCI device mapping invalid (hardware probably changed)"
    decision = decide_backup(
        guest(102), job_mode="stop", running=False, needs=[need([GPU])], holders=[doomed],
        protect=NONE,
    )  # fmt: skip
    assert decision.verdict == Verdict.REFUSE and decision.stops == []
    assert decision.refusal is not None and decision.refusal.holder is doomed
    assert decision.reason == (
        "cannot free 0000:01:00.0: VM 104 could not be started again: PVE will not start it "
        "(hostpci0: PCI device mapping invalid (hardware probably changed))"
    )
    fine = decide_backup(
        guest(102), job_mode="stop", running=False, needs=[need([GPU])],
        holders=[holder(104, GPU)], protect=NONE,
    )  # fmt: skip
    assert fine.verdict == Verdict.FREE


# ---- a mapped guest started while another holder stays down ------------------------------------

POOL = need([GPU], [GPU2], mapping="pool")


def again(vmid: int, held: Claim, *needs: Need) -> Holder:
    """A recorded VM as it will start again: it held ``held``; its start needs ``needs``."""
    found = holder(vmid, held)
    found.restart_needs = list(needs)
    return found


def test_a_mapped_guest_waits_for_the_holder_whose_device_it_would_take() -> None:
    """PVE gives a mapped VM the first device no running VM reserved: with 107 down, 109 would
    take 107's 01:00.0 instead of the 02:00.0 it had, and 107 could not start again."""
    mapped = again(109, RESERVED_GPU2, POOL)
    kept = again(107, RESERVED_GPU, need([GPU]))
    assert hold_back([mapped], [], [kept]) == {
        109: "its start now would take 0000:01:00.0 (mapping pool), which VM 107, still down, "
        "needs: it starts after VM 107"
    }
    # 01:00.0 reserved by a running VM: it takes 02:00.0, which nobody down needs
    assert hold_back([mapped], [holder(130, RESERVED_GPU)], [kept]) == {}
    # started together, 107 first (fixed devices first): 109 takes 02:00.0 again
    assert hold_back([kept, mapped], [], []) == {}
    # a holder down that needs neither of its devices keeps nobody waiting
    assert hold_back([mapped], [], [holder(108, RESERVED_GPU3)]) == {}


def test_a_guest_held_back_keeps_its_own_device_for_itself() -> None:
    """109 waits for 107; 111 (another mapping of 02:00.0 and 03:00.0) would then take 109's
    02:00.0: it waits too. (107's record knows only what it held: a CT's, say.)"""
    other = need([GPU2], [GPU3], mapping="other")
    # 01:00.0 stays 107's: 02:00.0 is all that is left for 109
    starting = [again(109, RESERVED_GPU2, POOL), again(111, RESERVED_GPU3, other)]
    held = hold_back(starting, [], [holder(107, RESERVED_GPU)])
    assert sorted(held) == [109, 111]
    assert "0000:02:00.0 (mapping other), which VM 109, still down, needs" in held[111]


def test_a_guest_down_with_a_mapping_of_its_own_is_robbed_of_nothing() -> None:
    """``recover 104 --swap``: 105 (mapping 01:00.0 or 41:00.0) was shut down to give 104 its
    01:00.0 back. 104 starts first; 105, started after it, takes the other device."""
    mapped = again(105, RESERVED_GPU, POOL)
    fixed = again(104, RESERVED_GPU, need([GPU]))
    assert hold_back([fixed], [], [mapped]) == {}
    # with 02:00.0 reserved by a running VM, 01:00.0 is the only one left for 105
    held = hold_back([fixed], [holder(130, RESERVED_GPU2)], [mapped])
    assert held == {104: "its start now would take 0000:01:00.0, which VM 105, still down, "
                    "needs: it starts after VM 105"}  # fmt: skip


def test_forecast_keeps_a_mapped_holder_down_until_the_fixed_one_starts() -> None:
    """vzdump 101 110 111: 101 needs both GPUs, 110 the second, 111 the first. Job-aware,
    109 (mapped, on 02:00.0) is needed last by 110, 107 (01:00.0) by 111: 109 waits for 107."""
    mapped = again(109, RESERVED_GPU2, POOL)
    order = [
        (guest(101), False, [need([GPU]), need([GPU2])]),
        (guest(110), False, [need([GPU2])]),
        (guest(111), False, [need([GPU])]),
    ]
    forecast = forecast_job(
        order, [holder(107, RESERVED_GPU), mapped], mode="stop", protect=NONE,
        restart="job-aware", ha=set(),
    )  # fmt: skip
    assert [[s.holder.vmid for s in g.stops] for g in forecast.guests] == [[107, 109], [], []]
    assert [g.restarted for g in forecast.guests] == [[], [], [107, 109]]
    assert forecast.down_for == {107: 3, 109: 3}
