"""Soak: seeded random nodes and vzdump jobs through the simulator; invariants after every job.

``python3 -m tools.soak [--jobs N] [--seed S] [--max-seconds T] [--workers W]`` generates
*scenarios*: a fake node (1-40 guests, 1-4 GPUs in distinct IOMMU groups, mappings, VMs with
several ``hostpci`` on one mapping, mdev VMs, CTs with GPU device nodes and cgroup rules, templates,
HA, faults, an override file; some hosts without ``/sys/fs/cgroup/lxc/<vmid>``) and 1-4 jobs run
on it one after the other, so that leftovers of one job meet the next. Scenario ``K`` of seed ``S``
is generated from ``random.Random(f"{S}/{K}")`` (and, for what was added later without changing the
scenarios drawn before, ``random.Random(f"{S}/{K}/more")``) alone, so ``--seed S --scenario K``
replays it.

The hook runs in-process (``run_job(hook_cmd=INPROCESS)``); the fake ``qm``/``pct`` stay real
processes. Invariants after every job (and after ``recover`` when vzdump was killed), computed
from the generator's own model, not from the library:

1. a guest that ran before the job runs afterwards, unless it has an injected start failure;
2. a guest that was off before the job is off afterwards;
3. the hook shut down (or, with force_stop only, stopped) only running, unprotected guests that
   claim a GPU (IOMMU group) that one of the job's *stopped* non-template VMs needs;
4. no state record is left, except for guests with an injected start failure;
5. every failed backup names pve-gpu-hook or a known reason (HA refusal, abort, injected start
   failure), and QEMU's/PVE's device conflict errors never appear;
6. the hook never crashed (no "internal error", no traceback, no hung call);
7. every HA resource is in the requested state it had before the job (unless the admin toggled);
8. nothing was unbound from vfio-pci while a running QEMU used it (the kernel's complaint);
9. a guest running before and after the job holds the same PCI functions, unless the hook said
   in the task log that PVE moves it ("will take ...").

The random mix includes HA VMs and CTs, holders that ignore their shutdown and power off later
(watched for ``shutdown_watch`` seconds: the checks wait for that), guests an admin starts right
before a job (still starting when it begins), mapping pools and containers.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.fronts import cli, records
from tests.sim.node import FakeNode
from tests.sim.pve import PveError
from tests.sim.vzdump import INPROCESS, JobOutcome, run_job

DEFAULT_JOBS = 2000
DEFAULT_MAX_SECONDS = 1500.0
# Most of a job's time is spent waiting (fake qm/pct process start-up, fault delays, the hook's
# 0.1 s polls), not on the CPU: measured on 2 cores, 12 scenarios at once do 1.6 jobs/s, 4 only 1.
DEFAULT_WORKERS = min(16, 6 * (os.cpu_count() or 1))
FIRST_GROUP = 30  # IOMMU group of GPU 0; GPU i is in group FIRST_GROUP + i
MDEV_TYPE = "nvidia-35"
SHUTDOWN_TIMEOUT = 1  # s: a holder ignoring its shutdown costs this much per attempt
# s a holder whose shutdown timed out is watched for a late power-off: longer than a CT's
# pct shutdown takes to give up (2 T + 5 s, pve-container vm_stop) plus its late power-off
SHUTDOWN_WATCH = 10
LATE_POWEROFF = 1.5  # s after its shutdown gave up, at the latest

# a failed backup must say why in one of these words (invariant 5)
RAW_DEVICE = re.compile(r"-device vfio-pci,host=(\S+?)\.0,")
KNOWN_FAILURES = (
    "pve-gpu-hook",
    "Cannot execute a backup with stop mode on a HA managed",
    "interrupted by signal",
)
# what QEMU/PVE say when a device is taken: the hook exists so that these never show up
CONFLICT_ERRORS = (
    "already in use by VMID",
    "Device or resource busy",
    "is currently reserved for use by",
    "is in use by",
    "could not find a free device",
)
HOOK_CRASHES = ("internal error", "Traceback (most recent call last)")

STARTING = re.compile(r"^INFO: Starting Backup of VM (\d+) ")
STATUS = re.compile(r"^INFO: status = (running|stopped)$")
INVARIANT = re.compile(r"job \d+: (\(\d\))")


# ---- the generated model --------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    index: int
    functions: tuple[str, ...]  # "0" GPU, "1" audio, "2" USB-C: one IOMMU group
    mdev: bool

    @property
    def short(self) -> str:
        return f"{self.index + 1:02x}:00"

    @property
    def slot(self) -> str:
        return f"0000:{self.short}"

    @property
    def group(self) -> int:
        return FIRST_GROUP + self.index


@dataclass
class Guest:
    vmid: int
    kind: str  # "qemu" | "lxc"
    config: str
    exclusive: frozenset[int] = frozenset()  # GPUs a start takes whole (every alternative)
    mdev: frozenset[int] = frozenset()  # GPUs it uses a mediated device of
    shared: frozenset[int] = frozenset()  # GPUs a CT uses through the host driver
    template: bool = False
    ha: bool = False
    run: bool = False  # tried to start when the node is built (skipped when it cannot)
    faults: dict[str, object] = field(default_factory=dict)

    @property
    def sid(self) -> str:
        """The HA resource id."""
        return f"{'vm' if self.kind == 'qemu' else 'ct'}:{self.vmid}"

    def conflicts_with(self, needer: Guest) -> bool:
        """Whether this guest, running, keeps the stopped VM ``needer`` from starting."""
        held = self.exclusive | self.mdev | self.shared
        return bool(needer.exclusive & held or needer.mdev & self.exclusive)


@dataclass
class JobSpec:
    vmids: list[int] | None  # None: every guest of the node
    mode: str
    abort_during: int | None = None
    crash_after: tuple[str, int | None] | None = None
    toggle: int | None = None  # before the job the admin starts or stops this guest by hand
    starting: int | None = None  # the admin starts this guest right before the job (slowly)


@dataclass
class Scenario:
    seed: int
    number: int
    ct_cgroup: bool  # False: a host without /sys/fs/cgroup/lxc/<vmid> (cgroup v1)
    gpus: list[Gpu]
    mapping: str
    guests: dict[int, Guest]
    start_order: list[int]
    override: str
    force_stop: bool
    protect: frozenset[int]
    jobs: list[JobSpec]

    def start_fails(self, vmid: int) -> bool:
        guest = self.guests.get(vmid)
        return bool(guest and guest.faults.get("start_fails"))


# ---- generation -----------------------------------------------------------------------------


def make_gpus(rng: random.Random) -> list[Gpu]:
    gpus = []
    for index in range(rng.randint(1, 4)):
        functions = rng.choice([("0",), ("0", "1"), ("0", "1"), ("0", "1", "2")])
        gpus.append(Gpu(index, functions, mdev=rng.random() < 0.3))
    return gpus


def make_mappings(rng: random.Random, gpus: list[Gpu]) -> dict[str, list[int]]:
    """Mapping name → the GPUs of its alternatives on this node, in pci.cfg order."""
    mappings: dict[str, list[int]] = {}
    for n in range(rng.randint(0, 2)):
        count = rng.randint(1, min(3, len(gpus)))
        mappings[f"gpu{n}"] = [g.index for g in rng.sample(gpus, count)]
    return mappings


def mapping_text(rng: random.Random, gpus: list[Gpu], mappings: dict[str, list[int]]) -> str:
    chunks = []
    for name, alternatives in mappings.items():
        lines = [name]
        # PVE checks a map line against the hardware (Mapping/PCI.pm assert_valid): the mdev
        # flag must match every device, so a pool mixing mdev-capable GPUs and others is one
        # PVE refuses (the hook then says the backup fails); so is a missing iommugroup
        if all(gpus[index].mdev for index in alternatives):
            lines.append("\tmdev 1")
        for index in alternatives:
            gpu = gpus[index]
            path = f"{gpu.slot}.0"
            if "1" in gpu.functions and rng.random() < 0.3:
                path = gpu.slot  # the whole device: every function passed together
            group = f",iommugroup={gpu.group}" if rng.random() < 0.9 else ""
            lines.append(f"\tmap node=pve1,path={path},id=10de:2204{group}")
        if rng.random() < 0.3:  # another node's entry must be ignored
            lines.append("\tmap node=pve2,path=0000:81:00.0,id=10de:2204,iommugroup=3")
        chunks.append("\n".join(lines) + "\n")
    return "\n".join(chunks)


def pci_id(rng: random.Random, gpu: Gpu) -> str:
    """One of the many ways to write "this GPU" in a hostpci line."""
    forms = [gpu.short, f"{gpu.short}.0", f"{gpu.slot}.0", f"host={gpu.short}.0", gpu.slot]
    if "1" in gpu.functions:
        forms += [f"{gpu.short}.1", f"{gpu.slot}.0;{gpu.slot}.1"]  # audio: the same group
    if "2" in gpu.functions:
        forms.append(f"{gpu.short}.2")
    return rng.choice(forms)


def options(rng: random.Random) -> str:
    return rng.choice(
        ["", "", ",pcie=1", ",pcie=1,x-vga=1", ",rombar=0", ",pcie=1,x-vga=1,rombar=0"]
    )


def make_vm(
    rng: random.Random,
    vmid: int,
    gpus: list[Gpu],
    mappings: dict[str, list[int]],
    more: random.Random,
) -> Guest:
    main = ["memory: 2048", "scsi0: local-lvm:vm-disk-0,size=32G"]
    if rng.random() < 0.9:
        main.insert(0, f"name: vm{vmid}")  # unnamed VMs get no HOSTNAME from vzdump
    pending: list[str] = []
    exclusive: set[int] = set()
    mdev: set[int] = set()
    used: set[int] = set()  # a VM names each GPU once (PVE refuses a device assigned twice)
    pools: list[str] = []  # mappings it uses, once per hostpci line
    count = rng.choice([0, 0, 1, 1, 1, 2])
    slots = sorted(rng.sample(range(16), count)) if rng.random() < 0.3 else list(range(count))
    for slot in slots:
        free = [g for g in gpus if g.index not in used]
        usable = [n for n, alts in mappings.items() if used.isdisjoint(alts)]
        mdev_free = [g for g in free if g.mdev]
        pick = rng.random()
        if usable and pick < 0.25:
            name = rng.choice(usable)
            value = f"mapping={name}{options(rng)}"
            exclusive.update(mappings[name])
            used.update(mappings[name])
            pools.append(name)
        elif mdev_free and pick < 0.45:
            gpu = rng.choice(mdev_free)
            value = f"{gpu.short}.0,mdev={MDEV_TYPE}"
            mdev.add(gpu.index)
            used.add(gpu.index)
        elif free:
            gpu = rng.choice(free)
            value = pci_id(rng, gpu) + options(rng)
            exclusive.add(gpu.index)
            used.add(gpu.index)
        else:
            continue
        # a change made while the VM was off applies at its next start (vzdump's too)
        (pending if rng.random() < 0.08 else main).append(f"hostpci{slot}: {value}")
    # the same mapping again, on a free hostpci slot: PVE gives each line another alternative
    # (there must be one left: otherwise PVE has "could not find a free device" to say)
    for name in pools:
        if len(mappings[name]) > pools.count(name) and more.random() < 0.5:
            taken = {int(x.split(":")[0][7:]) for x in main + pending if x.startswith("hostpci")}
            slot = more.choice([n for n in range(16) if n not in taken])
            main.append(f"hostpci{slot}: mapping={name}{options(more)}")
            pools.append(name)
    free = [g for g in gpus if g.index not in used]
    if free and rng.random() < 0.05:
        gpu = rng.choice(free)
        main.append(f"args: -device vfio-pci,host={gpu.slot}.0,id=raw0 -cpu host")
        exclusive.add(gpu.index)
    template = rng.random() < 0.05
    if template:
        main.append("template: 1")
    text = "\n".join(main) + "\n"
    if pending:
        text += "\n[PENDING]\n" + "\n".join(pending) + "\n"
    if not template and rng.random() < 0.05:
        text += "\n[before-upgrade]\nhostpci0: 01:00.0\nsnaptime: 1700000000\n"  # not current
    return Guest(vmid, "qemu", text, frozenset(exclusive), frozenset(mdev), template=template)


def make_ct(rng: random.Random, vmid: int, gpus: list[Gpu], more: random.Random) -> Guest:
    """A CT with GPU device nodes and cgroup rules. What it uses (the model, by the rule of
    docs/pve-facts.md §6): the GPUs of the nodes it passes or mounts and of the rules for one
    minor; a wildcard rule (``c 195:*``, ``c 226:*``) only in a CT given no GPU node of that
    major — beside one it merely allows it (the common recipe)."""
    lines = [f"hostname: ct{vmid}", "memory: 512", "rootfs: local-lvm:vm-disk-0,size=8G"]
    shared: set[int] = set()
    named: set[int] = set()  # majors of the GPU nodes it is given
    wildcards: set[int] = set()
    eq = " =" if more.random() < 0.3 else ":"  # raw LXC keys take either separator

    def recipe(major: int) -> None:
        if more.random() < 0.35:  # the common recipe: allow every GPU, pass one
            lines.append(f"lxc.cgroup2.devices.allow{eq} c {major}:* rwm")
            wildcards.add(major)

    for n in range(rng.choice([0, 0, 1, 1, 2])):
        gpu = rng.choice(gpus)
        i = gpu.index
        form = rng.randrange(7)
        if form == 0:
            lines.append(f"dev{n}: /dev/dri/renderD{128 + i},gid=104")
            named.add(226)
            recipe(226)
        elif form == 1:
            lines.append(f"dev{n}: /dev/dri/card{i}")
            named.add(226)
            recipe(226)
        elif form == 2:
            lines.append(
                f"lxc.mount.entry{eq} /dev/nvidia{i} dev/nvidia{i} none bind,optional,create=file"
            )
            named.add(195)
            recipe(195)
            if more.random() < 0.5:  # not a GPU of its own
                lines.append(
                    f"lxc.mount.entry{eq} /dev/nvidiactl dev/nvidiactl none bind,optional,"
                    "create=file"
                )
        elif form == 3:
            lines.append(f"lxc.cgroup2.devices.allow: c 195:{i} rwm")
        elif form == 4:
            lines.append(f"lxc.cgroup2.devices.allow: c 226:{128 + i} rwm")
        elif form == 5:
            lines.append("lxc.cgroup2.devices.allow: c 195:* rwm")  # every NVIDIA GPU...
            wildcards.add(195)
            continue
        else:
            lines.append("lxc.mount.entry: /dev/dri dev/dri none bind,optional,create=dir")
            named.add(226)
            shared.update(g.index for g in gpus)
            continue
        shared.add(i)
    if wildcards - named:  # ...unless the CT is given a node of that major
        shared.update(g.index for g in gpus)
    template = rng.random() < 0.05
    if template:
        lines.append("template: 1")
    return Guest(vmid, "lxc", "\n".join(lines) + "\n", shared=frozenset(shared), template=template)


def make_faults(rng: random.Random, guest: Guest) -> dict[str, object]:
    faults: dict[str, object] = {}
    if rng.random() < 0.015:  # costs shutdown_timeout plus a settle second per attempt
        faults["ignore_shutdown"] = True
        if rng.random() < 0.5:  # the request stays delivered: it goes down later anyway
            faults["late_poweroff"] = round(rng.uniform(0.2, LATE_POWEROFF), 1)
    # rare: it leaves a guest off on purpose; never for an HA guest, whose failed start the
    # hook waits for as long as PVE may take (minutes: it cannot tell HA's failure from a delay)
    if rng.random() < 0.01 and not guest.ha:
        faults["start_fails"] = True
    if rng.random() < 0.15:
        faults["shutdown_delay"] = round(rng.uniform(0.05, 0.3), 2)
    if rng.random() < 0.05:
        faults["cleanup_delay"] = round(rng.uniform(0.05, 0.2), 2)
    if rng.random() < 0.05:
        faults["start_delay"] = round(rng.uniform(0.05, 0.2), 2)
    if guest.ha:
        faults["ha_delay"] = round(rng.uniform(0.02, 0.25), 2)
    return faults


def make_jobs(rng: random.Random, vmids: list[int]) -> list[JobSpec]:
    jobs = []
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        subset = (
            None if rng.random() < 0.3 else sorted(rng.sample(vmids, rng.randint(1, len(vmids))))
        )
        members = subset or vmids
        job = JobSpec(subset, rng.choices(["stop", "snapshot", "suspend"], [6, 3, 1.5])[0])
        luck = rng.random()
        if luck < 0.04:
            job.abort_during = rng.choice(members)
        elif luck < 0.09:
            phase = rng.choice(["job-start", "backup-start", "archive", "backup-end", "log-end"])
            job.crash_after = (phase, None if phase == "job-start" else rng.choice(members))
        if rng.random() < 0.15:
            job.toggle = rng.choice(vmids)
        elif rng.random() < 0.08:
            job.starting = rng.choice(vmids)
        jobs.append(job)
    return jobs


def make_scenario(seed: int, number: int) -> Scenario:
    rng = random.Random(f"{seed}/{number}")
    more = random.Random(f"{seed}/{number}/more")  # draws added later: the others stay as they were
    gpus = make_gpus(rng)
    mappings = make_mappings(rng, gpus)
    mapping = mapping_text(rng, gpus, mappings)
    guests: dict[int, Guest] = {}
    vmid = 100
    for _ in range(rng.randint(1, 40)):
        vmid += rng.choice([1, 1, 1, 2, 7])
        if rng.random() < 0.7:
            guest = make_vm(rng, vmid, gpus, mappings, more)
        else:
            guest = make_ct(rng, vmid, gpus, more)
        guest.run = not guest.template and rng.random() < 0.5
        guest.ha = not guest.template and rng.random() < 0.1
        guest.faults = make_faults(rng, guest)
        guests[vmid] = guest
    start_order = list(guests)
    rng.shuffle(start_order)
    force_stop = rng.random() < 0.4
    candidates = sorted(v for v, g in guests.items() if not g.template)
    protect = (
        frozenset(rng.sample(candidates, 1)) if candidates and rng.random() < 0.15 else frozenset()
    )
    # job-aware, the default, most often; its bridged gaps vary with keep_down_max
    restart = more.choices(["job-aware", "after-guest", "after-job"], [2, 1, 1])[0]
    override = (
        f"shutdown_timeout: {SHUTDOWN_TIMEOUT}\nshutdown_watch: {SHUTDOWN_WATCH}\n"
        f"force_stop: {'true' if force_stop else 'false'}\nrestart: {restart}\n"
        f"keep_down_max: {more.choice([0, 60, 1800])}\n"
        + (f"protect: [{', '.join(map(str, sorted(protect)))}]\n" if protect else "")
    )
    return Scenario(
        seed,
        number,
        more.random() < 0.7,
        gpus,
        mapping,
        guests,
        start_order,
        override,
        force_stop,
        protect,
        make_jobs(rng, sorted(guests)),
    )


# ---- running a scenario ---------------------------------------------------------------------


@dataclass
class Result:
    seed: int
    number: int
    jobs: int = 0
    backed_up: int = 0
    holders_stopped: int = 0
    violations: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # verbose report


def build_node(sc: Scenario, root: Path) -> FakeNode:
    node = FakeNode(root, ct_cgroup=sc.ct_cgroup)
    # QEMU opens a raw "args: -device vfio-pci" device only when it is bound to vfio-pci already
    # (PVE binds only hostpci devices): an admin who passes a GPU that way binds it at boot
    raw = {m.group(1) for g in sc.guests.values() for m in RAW_DEVICE.finditer(g.config)}
    for gpu in sc.gpus:
        node.add_gpu(
            gpu.slot,
            group=gpu.group,
            functions=gpu.functions,
            driver="vfio-pci" if gpu.slot in raw else "nvidia",
            nvidia_minor=gpu.index,
            drm=(f"card{gpu.index}", f"renderD{128 + gpu.index}"),
            mdev_types=(MDEV_TYPE,) if gpu.mdev else (),
            mdev_instances=64,
        )
    if sc.mapping:
        node.set_mapping(sc.mapping)
    for guest in sc.guests.values():
        add = node.add_vm if guest.kind == "qemu" else node.add_ct
        add(guest.vmid, guest.config)
    # "startable": only what PVE lets start, in a random order, becomes the running set
    for vmid in sc.start_order:
        if sc.guests[vmid].run:
            with contextlib.suppress(PveError):
                node.start(vmid)
    running = node.running_guests()
    node.pve.write_ha_resources(
        {
            g.sid: {"state": "started" if g.vmid in running else "stopped"}
            for g in sc.guests.values()
            if g.ha
        }
    )
    for guest in sc.guests.values():
        if guest.faults:
            node.set_fault(guest.vmid, **guest.faults)
    node.write_override(sc.override)
    return node


def toggle(node: FakeNode, sc: Scenario, vmid: int) -> str:
    """The admin starts or stops a guest by hand between two jobs (HA told as well)."""
    guest = sc.guests[vmid]
    if node.is_running(vmid):
        node.stop(vmid)
        if guest.ha:
            node.pve.ha_set_state(guest.sid, "stopped")
        return f"admin stopped {vmid}"
    if guest.template:
        return f"admin left template {vmid} alone"
    try:
        node.start(vmid)
    except PveError as error:
        return f"admin could not start {vmid}: {error.message}"
    if guest.ha:
        node.pve.ha_set_state(guest.sid, "started")
    return f"admin started {vmid}"


def start_slowly(node: FakeNode, sc: Scenario, vmid: int) -> subprocess.Popen[bytes] | None:
    """The admin (or HA, or onboot) starts a stopped guest right before the job; it is still
    starting when the job begins (a VM: its devices reserved, no QEMU yet; a CT: its config
    lock held, not running yet)."""
    guest = sc.guests[vmid]
    if node.is_running(vmid) or guest.template or guest.ha:
        return None
    node.set_fault(vmid, start_delay=0.8)
    process = node.start_async(vmid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process.poll() is None:
        # a VM's start reserves its devices first; a CT's holds its config lock throughout
        if guest.kind == "qemu":
            if any(r.get("vmid") == vmid for r in node.reservations().values()):
                break
        elif node.ct_start_under_way(vmid):
            break
        time.sleep(0.02)
    return process


def wait_for_watches(node: FakeNode) -> None:
    """A holder whose shutdown timed out is watched for SHUTDOWN_WATCH seconds after the job
    (``recover --watch``): its record goes once it is started again or the watch ended."""
    deadline = time.monotonic() + SHUTDOWN_WATCH + 20
    while any(r.get("status") == "stop-failed" for r in records(node)):
        if time.monotonic() > deadline:
            raise TimeoutError("a watched holder's record outlived its watch")
        time.sleep(0.1)


def after_crash(node: FakeNode, job: JobSpec, before: set[int]) -> tuple[str, list[str]]:
    """What the admin does after vzdump was killed: unlock the guest it was backing up, stop the
    orphaned paused QEMU of its backup, run ``pve-gpu-hook recover``, and then start the guest
    vzdump itself had stopped for a stop-mode backup (vzdump's restart, not the hook's)."""
    problems: list[str] = []
    assert job.crash_after is not None
    current = job.crash_after[1]
    if current is not None:
        kind = node.pve.guest_type(current) or "qemu"
        node.pve.remove_lock(kind, current, "backup")
        if node.qmp_status(current) == "prelaunch":
            node.stop(current)
    result = cli(node, "recover")
    output = result.stdout + result.stderr
    pending_restart = current is not None and current in before and not node.is_running(current)
    if pending_restart and not any(r["vmid"] == current for r in records(node)):
        try:
            node.start(current)
        except PveError as error:
            problems.append(f"admin could not restart {current} after the crash: {error}")
    return output, problems


def job_vms_stopped_at_backup(log: list[str]) -> set[int]:
    """VMIDs whose backup found them stopped (vzdump's own "status = stopped" line)."""
    found: set[int] = set()
    current: int | None = None
    for line in log:
        m = STARTING.match(line)
        if m:
            current = int(m.group(1))
            continue
        m = STATUS.match(line)
        if m and current is not None and m.group(1) == "stopped":
            found.add(current)
    return found


def hook_stops(calls: list[dict]) -> list[tuple[str, int]]:
    """(verb, vmid) of every shutdown/stop the hook ran through qm/pct, in order."""
    stops = []
    for call in calls:
        argv = call["argv"]
        if argv[0] in ("qm", "pct") and len(argv) > 2 and argv[1] in ("shutdown", "stop"):
            stops.append((argv[1], int(argv[2])))
    return stops


class Checker:
    """The invariants of one job, from the scenario's model and what the node shows."""

    def __init__(self, sc: Scenario, node: FakeNode) -> None:
        self.sc = sc
        self.node = node
        self.kept: set[int] = set()  # records already reported: a leftover counts once

    def check(
        self,
        outcome: JobOutcome,
        before: set[int],
        after: set[int],
        calls: list[dict],
        extra_output: str,
    ) -> list[str]:
        sc = self.sc
        problems: list[str] = []
        # 1, 2: power states
        for vmid in sorted(before - after):
            if not sc.start_fails(vmid):
                problems.append(f"(1) guest {vmid} ran before the job and is off afterwards")
        for vmid in sorted(after - before):
            problems.append(f"(2) guest {vmid} was off before the job and runs afterwards")
        # 3: whom the hook stopped
        problems += self.check_stops(outcome, before, calls)
        # 4: records
        for record in records(self.node):
            if not sc.start_fails(record["vmid"]) and record["vmid"] not in self.kept:
                self.kept.add(record["vmid"])
                problems.append(f"(4) record left for {record['vmid']}: {record}")
        # 5: why backups failed
        for vmid, guest in sorted(outcome.guests.items()):
            error = guest.error or ""
            if guest.ok or any(word in error for word in KNOWN_FAILURES):
                continue
            said = re.compile(rf"PVE will not start VM {vmid}\b")
            if any(said.search(x) and error in x for x in outcome.log):
                continue  # the hook said at its backup-start that PVE refuses this start
            if sc.start_fails(vmid) and error.startswith("start failed"):
                continue  # the injected failure of its own start
            problems.append(f"(5) backup of {vmid} failed for no known reason: {error}")
        text = "\n".join(outcome.log) + "\n" + extra_output
        for needle in CONFLICT_ERRORS:
            if needle in text:
                line = next(x for x in text.splitlines() if needle in x)
                problems.append(f"(5) device conflict reached vzdump: {line.strip()}")
        # 6: the hook itself
        for needle in HOOK_CRASHES:
            if needle in text:
                line = next(x for x in text.splitlines() if needle in x)
                problems.append(f"(6) hook crashed: {line.strip()}")
        problems += [f"(6) {error}" for error in outcome.errors]
        return problems

    def held(self) -> dict[int, set[str]]:
        """Reserved PCI functions of every running VM."""
        held: dict[int, set[str]] = {}
        for address, entry in self.node.reservations().items():
            if "pid" in entry:
                held.setdefault(entry["vmid"], set()).add(address)
        return held

    def check_fidelity(
        self,
        outcome: JobOutcome,
        ha_before: dict[str, dict[str, str]],
        held_before: dict[int, set[str]],
        job: JobSpec,
        calls: list[dict],
    ) -> list[str]:
        problems: list[str] = []
        # 7: HA resources as they were
        for sid, props in self.node.pve.ha_resources().items():
            was = ha_before.get(sid, {}).get("state")
            if job.toggle is None and props.get("state") != was:
                problems.append(f"(7) HA resource {sid} is {props.get('state')}, was {was}")
        # 8: the kernel's view, of this job's calls; the start of a VM the admin began before
        # the job is the admin's, not the hook's (the fault names the VM whose start it was)
        admins = f"VM {job.starting}"
        for call in calls:
            argv = call["argv"]
            if argv[:1] == ["kernel"] and not (job.starting is not None and argv[-1] == admins):
                problems.append(f"(8) {' '.join(argv)}")
        # 9: every guest holds what it held, or the hook said why not
        held_after = self.held()
        for vmid, functions in sorted(held_before.items()):
            after = held_after.get(vmid)
            said = any("will take" in line and f"VM {vmid}" in line for line in outcome.log)
            if after is not None and after != functions and not said:
                problems.append(
                    f"(9) VM {vmid} held {sorted(functions)} and holds {sorted(after)} now"
                )
        return problems

    def check_stops(self, outcome: JobOutcome, before: set[int], calls: list[dict]) -> list[str]:
        sc = self.sc
        problems: list[str] = []
        stopped = job_vms_stopped_at_backup(outcome.log)
        needers = [
            sc.guests[v]
            for v in stopped
            if v in sc.guests and sc.guests[v].kind == "qemu" and not sc.guests[v].template
        ]
        started = {
            int(c["argv"][2])
            for c in calls
            if c["argv"][:1] in (["qm"], ["pct"]) and c["argv"][1:2] == ["start"]
        }
        for verb, vmid in hook_stops(calls):
            guest = sc.guests.get(vmid)
            if guest is None:
                problems.append(f"(3) hook ran {verb} on unknown guest {vmid}")
            elif vmid not in before and vmid not in started:
                problems.append(f"(3) hook ran {verb} on {vmid}, which was not running")
            elif vmid in sc.protect:
                problems.append(f"(3) hook ran {verb} on protected guest {vmid}")
            elif verb == "stop" and not sc.force_stop:
                problems.append(f"(3) hook hard-stopped {vmid} without force_stop")
            elif not any(guest.conflicts_with(n) for n in needers if n.vmid != vmid):
                problems.append(
                    f"(3) hook ran {verb} on {vmid}, which holds nothing a stopped VM of the job "
                    f"needs (stopped VMs: {sorted(stopped)})"
                )
        return problems


def run_scenario(seed: int, number: int, base: Path, verbose: bool = False) -> Result:
    """Build scenario ``number`` under ``base`` and run its jobs, checking after each."""
    sc = make_scenario(seed, number)
    result = Result(seed, number)
    root = base / f"scenario-{number}"
    node = build_node(sc, root)
    if verbose:
        result.lines.append(
            f"scenario {number}: {len(sc.guests)} guests, {len(sc.gpus)} GPU(s), "
            f"running {sorted(node.running_guests())}, root {root}"
            f"{'' if sc.ct_cgroup else ', no CT cgroup dirs'}\n{sc.override.strip()}"
        )
    checker = Checker(sc, node)
    for index, job in enumerate(sc.jobs, 1):
        problems = run_checked_job(checker, index, job, result, verbose)
        result.violations += [f"seed {seed} scenario {number} job {index}: {p}" for p in problems]
        if problems:
            result.lines.append(f"reproduce: {reproduce(seed, number)}")
    node.wait_settled(timeout=60)
    return result


def run_checked_job(
    checker: Checker, index: int, job: JobSpec, result: Result, verbose: bool
) -> list[str]:
    sc, node = checker.sc, checker.node
    note = toggle(node, sc, job.toggle) if job.toggle is not None else ""
    starting = start_slowly(node, sc, job.starting) if job.starting is not None else None
    if starting is not None:
        note = f"admin starts {job.starting} slowly"
    before = node.running_guests() | ({job.starting} if starting is not None else set())
    ha_before = node.pve.ha_resources()
    held_before = checker.held()
    seen = len(node.calls())
    outcome = run_job(
        node,
        job.vmids,
        job.mode,
        hook_cmd=INPROCESS,
        abort_during=job.abort_during,
        crash_after=job.crash_after,
    )
    problems: list[str] = []
    if starting is not None and starting.wait(60) != 0:
        before.discard(job.starting)  # PVE refused the admin's start: it never ran
    extra, crash_problems = after_crash(node, job, before) if outcome.crashed else ("", [])
    problems += crash_problems
    try:
        node.wait_settled(timeout=60)  # HA workers finish what the hook asked for
        wait_for_watches(node)  # holders whose shutdown timed out may still power off
    except TimeoutError as error:
        problems.append(f"(6) {error}")
    node.pve.apply_sysfs_writes()  # the kernel's side of what was written: faults are calls
    calls = node.calls()[seen:]
    problems += checker.check(outcome, before, node.running_guests(), calls, extra)
    problems += checker.check_fidelity(outcome, ha_before, held_before, job, calls)
    result.jobs += 1
    result.backed_up += sum(g.ok for g in outcome.guests.values())
    result.holders_stopped += sum(verb == "shutdown" for verb, _ in hook_stops(calls))  # + its stop
    if verbose or problems:
        result.lines.append(describe_job(index, job, outcome, calls, note, problems))
    return problems


def describe_job(
    index: int, job: JobSpec, outcome: JobOutcome, calls: list[dict], note: str, problems: list[str]
) -> str:
    what = "all" if job.vmids is None else " ".join(map(str, job.vmids))
    extras = [note] if note else []
    if job.abort_during:
        extras.append(f"abort during {job.abort_during}")
    if job.crash_after:
        extras.append(f"crash after {job.crash_after}")
    lines = [f"job {index}: vzdump {what} --mode {job.mode} {'; '.join(extras)}".rstrip()]
    lines += [f"  {line}" for line in outcome.log if "pve-gpu-hook" in line or "ERROR" in line]
    lines += [f"  call: {' '.join(c['argv'])} -> {c['exit']}" for c in calls]
    lines += [f"  VIOLATION {p}" for p in problems]
    return "\n".join(lines)


def reproduce(seed: int, number: int) -> str:
    return f"python3 -m tools.soak --seed {seed} --scenario {number} --verbose"


def _safe_run(task: tuple[int, int, Path]) -> Result:
    """A harness error must be reported with its scenario, not kill the whole pool."""
    seed, number, base = task
    try:
        return run_scenario(seed, number, base)
    except Exception:  # noqa: BLE001 - turned into a violation with its traceback
        result = Result(seed, number)
        result.violations.append(
            f"seed {seed} scenario {number}: harness error:\n{traceback.format_exc()}"
        )
        result.lines.append(f"reproduce: {reproduce(seed, number)}")
        return result
    finally:
        shutil.rmtree(base / f"scenario-{number}", ignore_errors=True)


# ---- the whole soak ---------------------------------------------------------------------------


@dataclass
class Summary:
    jobs: int = 0
    backed_up: int = 0
    holders_stopped: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = True  # False when --max-seconds stopped it early

    def add(self, result: Result) -> None:
        self.jobs += result.jobs
        self.backed_up += result.backed_up
        self.holders_stopped += result.holders_stopped
        self.violations += result.violations

    def line(self) -> str:
        return (
            f"soak: {self.jobs} jobs, {self.backed_up} guests backed up, {self.holders_stopped} "
            f"holders stopped, {len(self.violations)} violations, {self.seconds:.0f} s"
        )


def plan(seed: int, jobs: int) -> list[int]:
    """Scenarios 0, 1, ... until they hold at least ``jobs`` jobs."""
    numbers: list[int] = []
    total = 0
    while total < jobs:
        total += len(make_scenario(seed, len(numbers)).jobs)
        numbers.append(len(numbers))
    return numbers


def run_soak(
    jobs: int,
    seed: int,
    max_seconds: float,
    workers: int,
    say: Callable[[str], None] = print,
) -> Summary:
    began = time.monotonic()
    summary = Summary()
    numbers = plan(seed, jobs)
    # fork: workers inherit the imported library and simulator (no re-import per worker)
    pool = multiprocessing.get_context("fork").Pool(max(1, workers), maxtasksperchild=50)
    base = Path(tempfile.mkdtemp(prefix=f"pve-gpu-hook-soak-{seed}-"))
    try:
        results = pool.imap_unordered(_safe_run, [(seed, n, base) for n in numbers])
        for _ in numbers:
            left = max_seconds - (time.monotonic() - began)
            try:
                result = results.next(timeout=max(left, 0.01))
            except multiprocessing.TimeoutError:
                summary.complete = False
                say(f"soak: --max-seconds {max_seconds:g} reached; stopping")
                break
            summary.add(result)
            for line in result.lines:
                say(line)
    finally:
        pool.terminate()
        pool.join()
        shutil.rmtree(base, ignore_errors=True)  # also what stopped workers left behind
    summary.seconds = time.monotonic() - began
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tools.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="how many jobs at least")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock, printed")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="scenarios at once")
    parser.add_argument("--scenario", type=int, default=None, help="replay only this scenario")
    parser.add_argument("--verbose", action="store_true", help="describe every job")
    parser.add_argument("--keep", action="store_true", help="keep the node tree (--scenario)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    if args.scenario is not None:
        began = time.monotonic()
        base = Path(tempfile.mkdtemp(prefix=f"pve-gpu-hook-soak-{seed}-"))
        result = run_scenario(seed, args.scenario, base, verbose=args.verbose)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        summary = Summary()
        summary.add(result)
        summary.seconds = time.monotonic() - began
        for line in result.lines:
            print(line)
    else:
        print(f"soak: seed {seed}, {args.jobs} jobs, {args.workers} workers", flush=True)
        summary = run_soak(args.jobs, seed, args.max_seconds, args.workers, say=_flush_print)
    for violation in summary.violations:
        print(f"VIOLATION {violation}")
    if summary.violations:
        kinds = Counter(
            m.group(1) if (m := INVARIANT.search(v)) else "harness" for v in summary.violations
        )
        print("violations by invariant: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    print(summary.line() + f" ({summary.jobs / max(summary.seconds, 1e-9):.2f} jobs/s)")
    if summary.violations:
        return 1
    return 0 if summary.complete else 3


def _flush_print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
