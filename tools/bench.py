"""``make bench``: wall time of one hook call, as vzdump makes it, on nodes of 100-10,000 guests.

Method: a node tree is written under a temp root (configs, pid files, /proc cmdlines, PCI
reservations, sysfs for two GPUs); 10 % of the guests run. Each case runs the hook as the package
installs it, ``/usr/bin/python3 bin/vzdump-hook ...``, with vzdump's emptied environment, ``RUNS``
times round-robin, and reports the median and the 90th percentile. The library is byte-compiled
first, as the Debian package is. "bare" is ``/usr/bin/python3 -c pass``.
Results are printed as a Markdown table for BENCHMARKS.md; nothing is asserted.
"""

from __future__ import annotations

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
    spawns()
    return 0


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
