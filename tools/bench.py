"""``make bench``: wall time of one hook call, as vzdump makes it, on nodes of 100-10,000 guests.

Method: a node tree is written under a temp root (configs, pid files, /proc cmdlines, PCI
reservations, sysfs for two GPUs); 10 % of the guests run. Each case runs the hook as the package
installs it, ``/usr/bin/python3 bin/vzdump-hook ...``, with vzdump's emptied environment, ``RUNS``
times round-robin, and reports the median and the 90th percentile. The library is byte-compiled
first, as the Debian package is. "bare" is ``/usr/bin/python3 -c pass``.
Results are printed as a Markdown table for BENCHMARKS.md; nothing is asserted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
RUNS = int(os.environ.get("BENCH_RUNS", "40"))
SIZES = [int(x) for x in os.environ.get("BENCH_SIZES", "100,1000,10000").split(",")]
TIME = "/usr/bin/time"  # GNU time, for the peak memory of a run
GPU_VM = 100  # stopped, passes the first GPU through; nothing holds it
PLAIN_VM = 101  # stopped, no passthrough


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def build_node(root: Path, guests: int) -> None:
    """A node with ``guests`` guests; every 10th runs; every 50th VM holds the second GPU's VF."""
    write(root / "etc/hostname", "pve1\n")
    (root / "sys/class/iommu/dmar0").mkdir(parents=True, exist_ok=True)  # an IOMMU is on
    conf = root / "etc/pve/qemu-server"
    for fn, group in (("0000:01:00.0", 14), ("0000:01:00.1", 14), ("0000:02:00.0", 15)):
        dev = root / "sys/bus/pci/devices" / fn
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "iommu_group").symlink_to(f"../../../../kernel/iommu_groups/{group}")
        write(dev / "vendor", "0x10de\n")
    write(conf / f"{GPU_VM}.conf", "name: gpu\nmemory: 8192\nhostpci0: 01:00,pcie=1\n")
    write(conf / f"{PLAIN_VM}.conf", "name: plain\nmemory: 2048\nnet0: virtio=AA:BB,bridge=vmbr0\n")
    reservations = []
    pid = 20000
    for vmid in range(102, 100 + guests):
        lines = [f"name: guest{vmid}", "memory: 2048", "scsi0: local-lvm:vm-disk-0,size=32G"]
        running = vmid % 10 == 0
        holds = running and vmid % 50 == 0
        if holds:
            lines.append("hostpci0: 02:00.0")
        write(conf / f"{vmid}.conf", "\n".join(lines) + "\n")
        if running:
            pid += 1
            write(root / f"run/qemu-server/{vmid}.pid", f"{pid}\n")
            argv = [
                "/usr/bin/kvm",
                "-id",
                str(vmid),
                "-pidfile",
                f"/var/run/qemu-server/{vmid}.pid",
            ]
            if holds:
                argv += ["-device", "vfio-pci,host=0000:02:00.0,id=hostpci0"]
                reservations.append(f"0000:02:00.0 {vmid} pid:{pid}")
            write(root / f"proc/{pid}/cmdline", "\0".join(argv) + "\0")
    write(root / "run/qemu-server/pci-id-reservations", "\n".join(reservations) + "\n")
    (root / "usr/sbin").mkdir(parents=True, exist_ok=True)


def run_once(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, check=False)
    elapsed = (time.perf_counter() - began) * 1000
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed: {result.stdout!r} {result.stderr!r}")
    return elapsed


def peak_mib(argv: list[str], env: dict[str, str]) -> float | None:
    """Peak memory (max RSS) of one run, from GNU time: a child forked from this Python would
    count this process's pages too."""
    if not os.path.exists(TIME):
        return None
    result = subprocess.run([TIME, "-f", "%M", *argv], env=env, capture_output=True, text=True)
    return int(result.stderr.strip().splitlines()[-1]) / 1024


Case = tuple[str, list[str], dict[str, str]]


def measure(cases: list[Case], runs: int) -> dict[str, list[float]]:
    """Round-robin over the cases, so that background load hits every case alike."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(runs):
        for label, argv, env in cases:
            times[label].append(run_once(argv, env))
    return times


def row(label: str, times: list[float], bare: float, peak: float | None) -> str:
    p90 = sorted(times)[max(0, int(len(times) * 0.9) - 1)]
    median = statistics.median(times)
    memory = f"{peak:.1f}" if peak is not None else "-"
    return f"| {label} | {median:.1f} | {p90:.1f} | {median / bare:.2f} | {memory} |"


def main() -> int:
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "pvegpuhook")], check=True)
    version = subprocess.run(
        [PYTHON, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"interpreter: {PYTHON} (Python {version}), {RUNS} runs per case, round-robin\n")
    print("| case | median ms | p90 ms | × bare | peak MiB |\n|---|---|---|---|---|")
    for size in SIZES:
        with tempfile.TemporaryDirectory(prefix="pve-gpu-hook-bench-") as tmp:
            root = Path(tmp)
            build_node(root, size)
            base = {"LC_ALL": "C", "STOREID": "local", "PVE_GPU_HOOK_ROOT": tmp}
            base["PYTHONPATH"] = str(REPO)
            hook = [PYTHON, "-m", "pvegpuhook.hook"]
            vm = dict(base, VMTYPE="qemu")
            cases = [
                ("bare interpreter start", [PYTHON, "-c", "pass"], {"LC_ALL": "C"}),
                (
                    "backup-start, stopped VM without GPU",
                    [*hook, "backup-start", "stop", "101"],
                    vm,
                ),
                (
                    "backup-start, stopped GPU VM, no holder",
                    [*hook, "backup-start", "stop", "100"],
                    vm,
                ),
                ("pre-stop (nothing to do)", [*hook, "pre-stop", "stop", "101"], vm),
                ("log-end (no record)", [*hook, "log-end", "stop", "101"], vm),
                ("job-start (no record)", [*hook, "job-start"], base),
                ("job-end (no record)", [*hook, "job-end"], base),
            ]
            times = measure(cases, RUNS)
            bare = statistics.median(times["bare interpreter start"])
            for label, argv, env in cases:
                peak = peak_mib(argv, env)
                print(row(f"{size} guests: {label}", times[label], bare, peak))
            cli = [PYTHON, str(REPO / "bin/pve-gpu-hook")]
            commands: list[Case] = [
                (
                    "dry-run --all (JSON)",
                    [*cli, "dry-run", "--all", "--output-format", "json"],
                    base,
                ),
                ("scan (JSON)", [*cli, "scan", "--output-format", "json"], base),
            ]
            cmd_times = measure(commands, max(3, RUNS // 8))
            for label, argv, env in commands:
                peak = peak_mib(argv, env)
                print(row(f"{size} guests: {label}", cmd_times[label], bare, peak))
    print()
    metrics_write()
    print()
    spawns()
    return 0


# Run in a fresh interpreter, as the hook: after what an acting phase has imported anyway (its
# modules, and re: it has parsed guest configs by then), the first write (with the lazy imports it
# adds) and the writes after it, each timed alone.
METRICS_SCRIPT = """
import json, re, time
import pvegpuhook.phases
from pvegpuhook import files, metrics
from pvegpuhook.log import Log
from pvegpuhook.settings import load_settings
from pvegpuhook.state import StateStore
settings, store, log = load_settings(), StateStore(), Log("bench", echo=False)
def timed(call):
    began, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - began) * 1000, (time.process_time() - cpu) * 1000
with store.hold(5, "bench"):
    times = [timed(lambda: metrics.update(log, store, settings)) for _ in range(WRITES)]
    # the same bytes written the way the state file is: with fsync of the file and directory
    path = metrics.target(settings)
    with open(path, "rb") as f:
        text = f.read()
    synced = [timed(lambda: files.write_atomic(path + ".synced", text, sync=True))
              for _ in range(WRITES)]
print(json.dumps([times, synced]))
"""
METRICS_WRITES = 21


def metrics_write() -> None:
    """What writing the metrics file costs the hook: one waiting guest, a registered vzdump.conf,
    the last job carried over from the file; on the file system of the temp directory (fsync of
    the file and the directory included)."""
    from pvegpuhook import metrics
    from pvegpuhook.registration import HOOK_PATH
    from tests.fronts import write_state

    with tempfile.TemporaryDirectory(prefix="pve-gpu-hook-bench-") as tmp:
        root = Path(tmp)
        build_node(root, 100)
        write(root / "etc/vzdump.conf", f"# vzdump default settings\nscript: {HOOK_PATH}\n")
        state = root / "var/lib/pve-gpu-hook"
        state.mkdir(parents=True, mode=0o700)
        entry = {"vmid": 104, "kind": "qemu", "name": "win11", "for_vmid": 102, "since": 1.0e9}
        write_state(state / "state.json", [{**entry, "status": "stopped"}])
        prom = root / "var/lib/prometheus/node-exporter/pve-gpu-hook.prom"
        last = metrics.LastJob(1.0e9, True, 1, 3, 600.0, 0)
        write(prom, metrics.render([], registered=True, corrupt=False, last_job=last))
        env = {"LC_ALL": "C", "PVE_GPU_HOOK_ROOT": tmp, "PYTHONPATH": str(REPO)}
        script = METRICS_SCRIPT.replace("WRITES", str(METRICS_WRITES))
        first: list[tuple[float, float]] = []
        later: list[tuple[float, float]] = []
        synced: list[tuple[float, float]] = []
        for _ in range(RUNS):
            result = subprocess.run(
                [PYTHON, "-c", script], env=env, capture_output=True, text=True, check=True
            )
            times, synced_times = json.loads(result.stdout)
            first.append(times[0])
            later.extend(times[1:])
            synced.extend(synced_times[1:])
        text = prom.read_text()
        if "pve_gpu_hook_guests_waiting 1" not in text or "last_job_shutdown_cycles 3" not in text:
            raise SystemExit(f"the metrics file was not written as expected:\n{text}")
    # a job that stopped nobody, on a node where the hook never acted: its job-end writes the
    # metrics file only when node_exporter is installed
    with tempfile.TemporaryDirectory(prefix="pve-gpu-hook-bench-") as tmp:
        roots = {name: Path(tmp) / name for name in ("plain", "exporter")}
        for root in roots.values():
            build_node(root, 100)
        (roots["exporter"] / "var/lib/prometheus/node-exporter").mkdir(parents=True)
        hook = [PYTHON, "-m", "pvegpuhook.hook", "job-end"]
        env = {"LC_ALL": "C", "PYTHONPATH": str(REPO)}
        cases: list[Case] = [
            (name, hook, dict(env, PVE_GPU_HOOK_ROOT=str(root))) for name, root in roots.items()
        ]
        ends = measure(cases, RUNS)
    print(f"| metrics file ({RUNS} hook processes) | median ms | p90 ms | min ms | CPU ms |")
    print("|---|---|---|---|---|")
    for label, pairs in (
        ("first write in a hook process (its lazy imports included)", first),
        (f"each further write ({METRICS_WRITES - 1} per process)", later),
        ("for comparison: the same bytes with fsync of file and directory, as state.json", synced),
    ):
        wall = [w for w, _ in pairs]
        cpu = statistics.median(c for _, c in pairs)
        figures = f"{statistics.median(wall):.2f} | {percentile90(wall):.2f} | {min(wall):.2f}"
        print(f"| {label} | {figures} | {cpu:.2f} |")
    for label, times in (
        ("job-end of a job that stopped nobody, no node_exporter (whole process)", ends["plain"]),
        ("the same with node_exporter installed (writes the file)", ends["exporter"]),
    ):
        figures = f"{statistics.median(times):.1f} | {percentile90(times):.1f} | {min(times):.1f}"
        print(f"| {label} | {figures} | - |")


def percentile90(times: list[float]) -> float:
    return sorted(times)[max(0, int(len(times) * 0.9) - 1)]


def spawns() -> None:
    """Processes the hook starts per phase, counted by the simulator's fake qm/pct on the seed's
    node (VMs 102-105 share one GPU, 104 runs), stop mode."""
    from tests.fronts import hook, seed_node

    with tempfile.TemporaryDirectory(prefix="pve-gpu-hook-bench-") as tmp:
        node = seed_node(Path(tmp))
        print("| phase (seed node, VM 102 stopped, 104 holds the GPU) | qm/pct runs |")
        print("|---|---|")
        for args in (
            ["job-init"],
            ["job-start"],
            ["backup-start", "stop", "102"],
            ["pre-stop", "stop", "102"],
            ["backup-end", "stop", "102"],
            ["log-end", "stop", "102"],
            ["job-end"],
            ["backup-start", "stop", "103"],
            ["log-end", "stop", "103"],
        ):
            before = len(node.calls())
            hook(node, *args)
            print(f"| {' '.join(args)} | {len(node.calls()) - before} |")


if __name__ == "__main__":
    sys.exit(main())
