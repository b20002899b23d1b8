"""Builder for a fake PVE node under a test root (the root stands for ``/``).

Tests describe the host (GPUs, IOMMU groups, guests, mappings, HA, faults) with :class:`FakeNode`;
the library then reads the same files and runs the fake ``qm``/``pct`` it finds in ``usr/sbin``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from tests.sim.pve import (
    HOST_SOCKETS,
    NO_CT_CGROUP,
    REPO,
    UNIX_HEADER,
    Out,
    Pve,
    PveError,
    flocked,
    is_true,
    remove,
    symlink,
    write_atomic,
)

# Class codes and default drivers of the extra functions of a GPU card (audio, USB-C, UCSI).
FUNCTION_CLASSES = {
    "0": ("0x030000", None),
    "1": ("0x040300", "snd_hda_intel"),
    "2": ("0x0c0330", "xhci_hcd"),
    "3": ("0x0c8000", "nvidia-gpu"),
}
FAKE_COMMANDS = ("qm", "pct", "ha-manager")
DEFAULT_STORAGE = (
    "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup\n\n"
    "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n"
)


class FakeNode:
    """A PVE node under ``root``: creates the skeleton and the fake commands on construction."""

    def __init__(
        self, root: Path | str, node: str = "pve1", *, iommu: bool = True, ct_cgroup: bool = True
    ) -> None:
        """``iommu=False``: a host with the IOMMU off (no ``/sys/class/iommu`` entry).
        ``ct_cgroup=False``: a host where a running CT has no ``/sys/fs/cgroup/lxc/<vmid>``
        (cgroup v1); PVE sees it running by its command socket in ``/proc/net/unix`` alone."""
        self.root = Path(root)
        self.node = node
        self.pve = Pve(self.root)
        self._nodes = {node}
        self._skeleton(ct_cgroup)
        self.set_iommu(iommu)

    # ---- skeleton ---------------------------------------------------------------------------

    def _skeleton(self, ct_cgroup: bool) -> None:
        r = self.root
        (r / "etc").mkdir(parents=True, exist_ok=True)
        (r / "etc/hostname").write_text(self.node + "\n")
        self._node_dirs(self.node)
        pve = r / "etc/pve"
        symlink(pve / "qemu-server", f"nodes/{self.node}/qemu-server")
        symlink(pve / "lxc", f"nodes/{self.node}/lxc")
        symlink(pve / "local", f"nodes/{self.node}")
        for d in (
            "etc/pve/ha",
            "etc/pve/mapping",
            "run/qemu-server",
            "run/lock",
            "run/fake-pve",
            "proc",
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/kernel/iommu_groups",
            "sys/class/drm",
            "var/lib/fake-pve",
            "var/log",
            "usr/sbin",
        ):
            (r / d).mkdir(parents=True, exist_ok=True)
        marker = r / NO_CT_CGROUP
        if ct_cgroup:
            (r / "sys/fs/cgroup/lxc").mkdir(parents=True, exist_ok=True)
            remove(marker)
        else:
            marker.touch()
        if not (r / "proc/net/unix").exists():
            write_atomic(r / "proc/net/unix", UNIX_HEADER + HOST_SOCKETS)
        if not (pve / "storage.cfg").exists():
            # what a fresh PVE install writes: 'local' without the snippets content type
            write_atomic(pve / "storage.cfg", DEFAULT_STORAGE)
        if not (pve / ".vmlist").exists():
            write_atomic(pve / ".vmlist", json.dumps({"version": 1, "ids": {}}, indent=1) + "\n")
        self._write_members()
        for prog in FAKE_COMMANDS:
            path = r / "usr/sbin" / prog
            path.write_text(
                f"#!{sys.executable}\n"
                f"# Fake PVE '{prog}' of the pve-gpu-hook test simulator.\n"
                "import sys\n"
                "from pathlib import Path\n\n"
                f"sys.path.insert(0, {str(REPO)!r})\n"
                "from tests.sim import pve  # noqa: E402\n\n"
                # The caller may empty the environment: the root is where this file lives.
                f"sys.exit(pve.main({prog!r}, sys.argv[1:], Path(__file__).resolve().parents[2]))\n"
            )
            path.chmod(0o755)

    def _node_dirs(self, node: str) -> None:
        for sub in ("qemu-server", "lxc"):
            (self.root / f"etc/pve/nodes/{node}/{sub}").mkdir(parents=True, exist_ok=True)

    def _write_members(self) -> None:
        nodelist = {
            n: {"id": i + 1, "online": 1, "ip": f"192.0.2.{i + 1}"}
            for i, n in enumerate(sorted(self._nodes))
        }
        data = {"nodename": self.node, "version": len(nodelist), "nodelist": nodelist}
        write_atomic(self.root / "etc/pve/.members", json.dumps(data, indent=1) + "\n")

    # ---- PCI / sysfs ------------------------------------------------------------------------

    def set_iommu(self, on: bool) -> None:
        """An IOMMU the kernel uses (``/sys/class/iommu/dmar0``), or none (``intel_iommu=off``):
        PVE then refuses every PCI pass-through (SysFSTools.pm check_iommu_support)."""
        unit = self.root / "sys/class/iommu/dmar0"
        if on:
            unit.mkdir(parents=True, exist_ok=True)
        else:
            remove(unit)
            unit.parent.mkdir(parents=True, exist_ok=True)

    def set_pci_attribute(self, addr: str, name: str, value: str | None) -> None:
        """A sysfs attribute of a PCI function (``power_state``, ``reset_method``,
        ``subsystem_vendor``...); None removes it (an older kernel has no such file)."""
        path = self.root / f"sys/bus/pci/devices/{_full_addr(addr)}/{name}"
        if value is None:
            remove(path)
        else:
            path.write_text(f"{value}\n")

    def add_pci_device(
        self,
        addr: str,
        *,
        group: int | None,
        class_: str = "0x030000",
        vendor: str = "10de",
        device: str = "2204",
        driver: str | None = None,
        power_state: str | None = None,
        reset_method: str | None = None,
    ) -> None:
        """One PCI function ``dddd:bb:dd.f`` in sysfs, in IOMMU group ``group`` (None: none).
        ``power_state`` (``D0``, ``D3cold``...) and ``reset_method`` (``flr bus``, or ``""`` for
        none) are written only when given: without them the function looks like an older
        kernel's."""
        addr = _full_addr(addr)
        d = self.root / f"sys/bus/pci/devices/{addr}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "vendor").write_text(f"0x{vendor.removeprefix('0x')}\n")
        (d / "device").write_text(f"0x{device.removeprefix('0x')}\n")
        (d / "class").write_text(f"{class_}\n")
        for name, value in (("power_state", power_state), ("reset_method", reset_method)):
            if value is not None:
                (d / name).write_text(f"{value}\n")
        if group is not None:
            symlink(d / "iommu_group", f"../../../../kernel/iommu_groups/{group}")
            symlink(
                self.root / f"sys/kernel/iommu_groups/{group}/devices/{addr}",
                f"../../../../bus/pci/devices/{addr}",
            )
        self.pve.set_driver(addr, driver)
        self._boot_drivers_update(addr, driver)

    def add_gpu(
        self,
        addr: str,
        *,
        group: int | None,
        functions: Sequence[str] = ("0",),
        vendor: str = "10de",
        device: str = "2204",
        driver: str = "nvidia",
        nvidia_minor: int | None = None,
        drm: Sequence[str] = (),
        vf_of: str | None = None,
        mdev_types: Sequence[str] = (),
        model: str = "NVIDIA GeForce RTX 3080",
        mdev_instances: int = 4,
        power_state: str | None = None,
        reset_method: str | None = None,
    ) -> None:
        """A GPU card ``dddd:bb:dd`` with its functions (".0" GPU, ".1" audio, ...) in one group.

        ``nvidia_minor`` adds /proc/driver/nvidia/gpus/<addr>/information; ``drm`` names DRM nodes
        (card0, renderD128) linking to function 0; ``vf_of`` makes it an SR-IOV VF of that parent;
        ``mdev_types`` makes function 0 an mdev parent; ``power_state`` and ``reset_method`` are
        every function's (see add_pci_device).
        """
        slot = _full_addr(addr)
        slot = slot.rsplit(".", 1)[0] if re.search(r"\.[0-7]$", slot) else slot
        for fn in functions:
            fn = fn.lstrip(".")
            class_, fdriver = FUNCTION_CLASSES.get(fn, ("0x0c8000", None))
            self.add_pci_device(
                f"{slot}.{fn}",
                group=group,
                class_=class_,
                vendor=vendor,
                device=device if fn == "0" else f"{int(device, 16) + int(fn):04x}",
                driver=driver if fn == "0" else fdriver,
                power_state=power_state,
                reset_method=reset_method,
            )
        first = f"{slot}.{functions[0].lstrip('.')}" if functions else f"{slot}.0"
        dev_dir = self.root / f"sys/bus/pci/devices/{first}"
        for name in drm:
            if not re.fullmatch(r"(card|renderD)(\d+)", name):
                raise ValueError(f"bad DRM node name {name!r}")
        self.pve.register_host_nodes(first, list(drm), nvidia_minor, model)
        if vf_of is not None:
            parent = _full_addr(vf_of)
            if not re.search(r"\.[0-7]$", parent):
                parent += ".0"
            symlink(dev_dir / "physfn", f"../{parent}")
            pdir = self.root / f"sys/bus/pci/devices/{parent}"
            n = len(list(pdir.glob("virtfn*"))) if pdir.is_dir() else 0
            symlink(pdir / f"virtfn{n}", f"../{first}")
        for t in mdev_types:
            tdir = dev_dir / "mdev_supported_types" / t
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / "name").write_text(f"{model} {t}\n")
            (tdir / "device_api").write_text("vfio-pci\n")
            (tdir / "available_instances").write_text(f"{mdev_instances}\n")
            (tdir / "create").touch()
        self.pve.sync_mdev_types(first)  # only under its vendor driver

    def _boot_drivers_update(self, addr: str, driver: str | None) -> None:
        """Remember the host driver a device gets at boot (reboot() rebinds it)."""
        path = self.root / "var/lib/fake-pve/boot-drivers.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[addr] = driver
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    # ---- guests -----------------------------------------------------------------------------

    def add_vm(
        self,
        vmid: int,
        config: str = "",
        *,
        running: bool = False,
        name: str | None = None,
        node: str | None = None,
        hostpci: Sequence[str] = (),
        template: bool = False,
        onboot: bool | None = None,
        startup: str | None = None,
        args: str | None = None,
        lock: str | None = None,
        paused: bool = False,
        **keys: str,
    ) -> None:
        """A QEMU guest. ``config`` is PVE config text (main section, [PENDING], snapshots...);
        the keyword arguments add main-section keys. ``running`` starts it like ``qm start``."""
        extra = _main_keys(
            {"name": name}, "hostpci", hostpci, template, onboot,
            {"startup": startup, "args": args, "lock": lock}, keys,
        )  # fmt: skip
        self._add_guest("qemu", vmid, config, extra, node)
        if running or paused:
            self._start_checked(vmid, paused=paused)

    def add_ct(
        self,
        vmid: int,
        config: str = "",
        *,
        running: bool = False,
        node: str | None = None,
        hostname: str | None = None,
        dev: Sequence[str] = (),
        template: bool = False,
        onboot: bool | None = None,
        startup: str | None = None,
        lock: str | None = None,
        **keys: str,
    ) -> None:
        """An LXC guest; ``dev`` entries become dev0.. (e.g. "/dev/dri/renderD128,gid=104")."""
        extra = _main_keys(
            {"hostname": hostname}, "dev", dev, template, onboot,
            {"startup": startup, "lock": lock}, keys,
        )  # fmt: skip
        self._add_guest("lxc", vmid, config, extra, node)
        if running:
            self._start_checked(vmid)

    def _add_guest(
        self, kind: str, vmid: int, config: str, extra: dict[str, str], node: str | None
    ) -> None:
        node = node or self.node
        if node not in self._nodes:
            self._nodes.add(node)
            self._node_dirs(node)
            self._write_members()
        text = textwrap.dedent(config).lstrip("\n")
        if extra:
            # Extra keys belong to the main section, i.e. before the first [section].
            lines = text.splitlines()
            cut = next((n for n, line in enumerate(lines) if line.startswith("[")), len(lines))
            main = [line for line in lines[:cut]]
            keep = [ln for ln in main if ln.split(":", 1)[0].strip() not in extra]
            keep += [f"{k}: {v}" for k, v in extra.items()]
            rest = lines[cut:]
            text = "\n".join(keep) + "\n" + ("\n" + "\n".join(rest) if rest else "")
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomic(self.pve.conf_path(kind, vmid, node), text)
        with flocked(self.root / "run/lock/fake-pve-vmlist.lock"):
            vmlist = self.pve.vmlist()
            old = vmlist["ids"].get(str(vmid), {})
            vmlist["ids"][str(vmid)] = {
                "node": node,
                "type": kind,
                "version": int(old.get("version", 0)) + 1,
            }
            vmlist["version"] = int(vmlist.get("version", 1)) + 1
            write_atomic(self.root / "etc/pve/.vmlist", json.dumps(vmlist, indent=1) + "\n")

    def _start_checked(self, vmid: int, paused: bool = False) -> None:
        if self.pve.guest_type(vmid) is None:
            raise ValueError(f"guest {vmid} is not on this node ({self.node})")
        try:
            self.start(vmid, paused=paused)
        except PveError as e:
            raise RuntimeError(f"cannot start guest {vmid}: {e.message} {e.before}") from None

    # ---- cluster files ----------------------------------------------------------------------

    def set_mapping(self, text: str) -> None:
        """/etc/pve/mapping/pci.cfg in PVE's format (tab-indented ``map`` lines)."""
        write_atomic(self.root / "etc/pve/mapping/pci.cfg", textwrap.dedent(text).lstrip("\n"))

    def set_ha(self, *vmids_or_sids: int | str, state: str = "started") -> None:
        """Make guests HA-managed (replaces resources.cfg); ints become vm:/ct: by guest type."""
        res: dict[str, dict[str, str]] = {}
        for item in vmids_or_sids:
            if isinstance(item, int):
                kind = self.pve.vmlist()["ids"].get(str(item), {}).get("type", "qemu")
                sid = f"{'ct' if kind == 'lxc' else 'vm'}:{item}"
            else:
                sid = item
            res[sid] = {"state": state}
        self.pve.write_ha_resources(res)

    def set_storage(self, text: str) -> None:
        """/etc/pve/storage.cfg in PVE's format (tab-indented property lines)."""
        write_atomic(self.root / "etc/pve/storage.cfg", textwrap.dedent(text).lstrip("\n"))

    def set_fault(self, vmid: int, **faults: object) -> None:
        """Merge faults for a guest: ignore_shutdown, start_fails, shutdown_delay, start_delay,
        ha_delay, start_paused, cleanup_delay (s between QEMU exit and reservation release),
        agent_reply_delay and agent_down (a VM with ``agent: 1``: see Pve.shutdown_vm),
        backup_delay (s its backup's archive step takes), hookscript_delay (s its guest
        hookscript takes at a VM's pre-start, which PVE does not bound), kill_caller (one shot:
        the next ``qm/pct shutdown`` SIGKILLs the pve-gpu-hook process that called it, then
        shuts down anyway), task_stop (one shot, a number of s: the next ``qm/pct start`` of
        it stops the backup task first, as the GUI's "Stop" does: see pve.stop_caller_task),
        late_poweroff (one shot: N s after a shutdown that timed out, the guest powers off
        anyway), ha_rebalance_to (HA starts the guest on that node instead: its config moves
        there). Delays are simulated seconds (see set_time_scale). A value of None removes that
        fault."""
        path = self.root / "run/fake-pve/faults.json"
        with flocked(self.root / "run/fake-pve/faults.lock"):
            data = json.loads(path.read_text()) if path.exists() else {}
            entry = data.setdefault(str(vmid), {})
            for k, v in faults.items():
                if v is None:
                    entry.pop(k, None)
                else:
                    entry[k] = v
            write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def clear_faults(self, vmid: int | None = None) -> None:
        path = self.root / "run/fake-pve/faults.json"
        with flocked(self.root / "run/fake-pve/faults.lock"):
            data = json.loads(path.read_text()) if path.exists() else {}
            if vmid is None:
                data = {}
            else:
                data.pop(str(vmid), None)
            write_atomic(path, json.dumps(data, indent=1) + "\n")

    def set_time_scale(self, scale: float) -> None:
        """Real seconds per simulated second of the fake PVE (its timeouts, waits and delays)."""
        write_atomic(self.root / "run/fake-pve/clock.json", json.dumps({"scale": scale}) + "\n")

    def add_pool(self, name: str, vmids: list[int]) -> None:
        """A resource pool in user.cfg (Datacenter → Permissions → Pools)."""
        path = self.root / "etc/pve/user.cfg"
        text = path.read_text() if path.exists() else ""
        write_atomic(path, text + f"pool:{name}::{','.join(map(str, vmids))}::\n")

    def write_override(self, yaml_text: str) -> None:
        write_atomic(
            self.root / "etc/pve-gpu-hook/config.yaml", textwrap.dedent(yaml_text).lstrip("\n")
        )

    def write_vzdump_conf(self, text: str) -> None:
        write_atomic(self.root / "etc/vzdump.conf", textwrap.dedent(text).lstrip("\n"))

    def install_node_exporter(self) -> Path:
        """The textfile directory of Debian's prometheus-node-exporter, which passes
        ``--collector.textfile.directory=/var/lib/prometheus/node-exporter`` in
        /etc/default/prometheus-node-exporter (docs/pve-facts.md §11); the collector reads every
        ``*.prom`` file there (node_exporter collector/textfile.go)."""
        directory = self.root / "var/lib/prometheus/node-exporter"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        return directory

    # ---- observation ------------------------------------------------------------------------

    def is_running(self, vmid: int) -> bool:
        return self.pve.is_running(vmid)

    def qmp_status(self, vmid: int) -> str | None:
        return self.pve.qmp_status(vmid)

    def vm_pid(self, vmid: int) -> int | None:
        return self.pve.vm_pid(vmid)

    def config_text(self, vmid: int) -> str:
        kind = self.pve.guest_type(vmid)
        if kind is None:
            raise KeyError(f"no guest {vmid} on {self.node}")
        return self.pve.conf_path(kind, vmid).read_text()

    def config_value(self, vmid: int, key: str) -> str | None:
        """A main-section value (what PVE considers the current config)."""
        kind = self.pve.guest_type(vmid)
        if kind is None:
            raise KeyError(f"no guest {vmid} on {self.node}")
        return self.pve.read_config(kind, vmid).get(key)

    def reservations(self) -> dict[str, dict]:
        """pci-id-reservations as {pci_id: {"vmid": n, "pid"|"time": n}}."""
        return self.pve.read_reservations()

    def driver(self, addr: str) -> str | None:
        return self.pve.driver(_full_addr(addr))

    def bind_host_driver(self, addr: str, driver: str) -> None:
        """What an admin does after a VM used a GPU: give it back to the host driver."""
        self.pve.set_driver(_full_addr(addr), driver)

    def calls(self, prog: str | None = None) -> list[dict]:
        """Every fake command call: {"argv", "exit", "t", "t_end", "out"}; HA workers log
        ``["ha-worker", action, sid]``. ``prog`` filters on argv[0] ("qm", "pct", ...)."""
        path = self.root / "run/fake-pve/calls.log"
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line.strip()]
        return [e for e in entries if prog is None or e["argv"][:1] == [prog]]

    def running_guests(self) -> set[int]:
        return {v for v in self.pve.local_guests() if self.pve.is_running(v)}

    # ---- direct actions (no call log, faults ignored) ---------------------------------------

    def start(self, vmid: int, *, paused: bool = False) -> None:
        """Start a guest as `qm start --skiplock` would, ignoring faults; raises PveError."""
        kind = self.pve.guest_type(vmid)
        if kind == "lxc":
            self.pve.ct_start(vmid, skiplock=True, use_faults=False)
        else:
            self.pve.vm_start(vmid, skiplock=True, paused=paused, use_faults=False)

    def start_async(self, vmid: int) -> subprocess.Popen[bytes]:
        """``qm start`` (or ``pct start``) in the background, faults applied (e.g. start_delay):
        a guest that is starting right now, as HA, onboot or an admin start it."""
        prog = "pct" if self.pve.guest_type(vmid) == "lxc" else "qm"
        return subprocess.Popen(
            [str(self.root / "usr/sbin" / prog), "start", str(vmid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def ct_start_under_way(self, vmid: int) -> bool:
        """Whether ``pct start`` holds the CT's config flock now: it does for the whole start
        (pve-container PVE/API2/LXC/Status.pm vm_start, PVE/LXC/Config.pm lock_config)."""
        import fcntl

        try:
            with open(self.pve.guest_lock_file("lxc", vmid)[0]) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False
        return False

    def kernel_faults(self) -> list[list[str]]:
        """What the host's kernel would have suffered from the hook, or from a start the hook
        let through: a device unbound from vfio-pci while a running QEMU used it (see
        Pve.check_vfio_unbind), a GPU taken from the host driver a running CT used."""
        self.pve.apply_sysfs_writes()
        return [c["argv"] for c in self.calls("kernel")]

    def stop(self, vmid: int) -> None:
        """Hard stop (no-op when not running)."""
        kind = self.pve.guest_type(vmid)
        if kind is not None and self.pve.is_running(vmid):
            with self.pve.guest_lock(kind, vmid):
                self.pve.kill_guest(kind, vmid)

    def wait_settled(self, timeout: float = 5) -> None:
        """Wait until every asynchronous HA worker has finished."""
        pending = self.root / "run/fake-pve/ha-pending"
        deadline = time.monotonic() + timeout
        while pending.is_dir() and any(pending.iterdir()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"HA workers still pending: {sorted(os.listdir(pending))}")
            time.sleep(0.02)

    def reboot(self, *, onboot: bool = False) -> list[str]:
        return reboot(self, onboot=onboot)

    def spawn_process(self, argv: Sequence[str], pid: int | None = None) -> int:
        """Another process on the node (``pid``: one that got a pid used before)."""
        return self.pve.spawn_proc(argv, os.path.basename(argv[0]), pid=pid)

    def end_process(self, pid: int) -> None:
        self.pve.end_proc(pid)


def _main_keys(
    first: dict[str, str | None],
    prefix: str,
    listed: Sequence[str],
    template: bool,
    onboot: bool | None,
    rest: dict[str, str | None],
    keys: dict[str, str],
) -> dict[str, str]:
    """The main-section keys the builder's keyword arguments stand for, in config order."""
    extra = {k: v for k, v in first.items() if v is not None}
    extra.update({f"{prefix}{i}": value for i, value in enumerate(listed)})
    if template:
        extra["template"] = "1"
    if onboot is not None:
        extra["onboot"] = "1" if onboot else "0"
    extra.update({k: v for k, v in rest.items() if v is not None})
    extra.update(keys)
    return extra


def reboot(node: FakeNode, *, onboot: bool = False) -> list[str]:
    """A host reboot: /run, guest processes, cgroups and mdevs are gone; configs and /var/lib stay
    (so a ``lock: backup`` left by a crash stays). Devices get their boot driver back. With
    ``onboot`` guests with ``onboot: 1`` (and HA ones in state started) start in startup order.
    Returns messages of guests that failed to start."""
    r = node.root
    pending = r / "run/fake-pve/ha-pending"
    if pending.is_dir():
        for marker in pending.iterdir():
            # Our own HA workers die with the host.
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(marker.read_text().strip()), signal.SIGKILL)
    run = r / "run"
    for entry in run.iterdir() if run.is_dir() else []:
        if entry.name != "fake-pve":
            remove(entry)
    for entry in (r / "run/fake-pve").iterdir():
        if entry.name.startswith(("qmp-", "ct-")) or entry.name == "ha-pending":
            remove(entry)
    for d in ("run/qemu-server", "run/lock"):
        (r / d).mkdir(parents=True, exist_ok=True)
    for entry in (r / "proc").iterdir():
        if entry.name.isdigit():
            remove(entry)
    # processes started from now on count their start time from this boot
    write_atomic(r / "run/fake-pve/boot-time", f"{time.time():.2f}\n")
    cgroups = r / "sys/fs/cgroup/lxc"
    for entry in cgroups.iterdir() if cgroups.is_dir() else []:
        remove(entry)
    write_atomic(r / "proc/net/unix", UNIX_HEADER + HOST_SOCKETS)
    node.pve.remove_mdevs(None)
    boot = r / "var/lib/fake-pve/boot-drivers.json"
    if boot.exists():
        for addr, driver in json.loads(boot.read_text()).items():
            node.pve.set_driver(addr, driver)
    failures: list[str] = []
    if onboot:
        for vmid in _boot_order(node):
            kind = node.pve.guest_type(vmid)
            try:
                if kind == "lxc":
                    node.pve.ct_start(vmid, out=Out())
                else:
                    node.pve.vm_start(vmid, out=Out())
            except PveError as e:
                failures.append(f"{vmid}: {e.message}")
    return failures


def _boot_order(node: FakeNode) -> list[int]:
    """pve-guests: onboot guests by startup order=N (unordered last), then VMID; plus HA."""
    ordered: list[tuple[int, int]] = []
    for vmid in node.pve.local_guests():
        kind = node.pve.guest_type(vmid)
        if kind is None:
            continue
        cfg = node.pve.read_config(kind, vmid)
        ha = node.pve.ha_state(vmid) == "started"
        if not (is_true(cfg.get("onboot")) or ha) or is_true(cfg.get("template")):
            continue
        m = re.search(r"(?:^|,)order=(\d+)", cfg.get("startup") or "")
        ordered.append((int(m.group(1)) if m else 1 << 30, vmid))
    return [vmid for _, vmid in sorted(ordered)]


def _full_addr(addr: str) -> str:
    a = addr.strip().lower()
    return a if re.match(r"^[0-9a-f]{4,}:", a) else "0000:" + a
