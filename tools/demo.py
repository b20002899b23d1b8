"""``make demo``: a simulated backup night on the bundled demo node, through the real hook.

The demo node is a home lab like the one the product was made for: four VMs share one RTX card
and only one of them runs; a Plex VM and a Jellyfin container share the iGPU. Two nights are run:
a normal one, and one where the host dies in the middle of a backup, followed by ``recover``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.sim.node import FakeNode, reboot
from tests.sim.vzdump import JobOutcome, run_job

REPO = Path(__file__).resolve().parents[1]
# the two lines of the system's pci.ids that name the demo node's cards
PCI_IDS = """\
8086  Intel Corporation
\t4680  AlderLake-S GT1 [UHD Graphics 770]
10de  NVIDIA Corporation
\t2204  GA102 [GeForce RTX 3090]
"""


def build_demo_node(root: Path) -> FakeNode:
    node = FakeNode(root)
    node.add_gpu(
        "0000:01:00",
        group=14,
        functions=("0", "1"),
        device="2204",
        nvidia_minor=0,
        model="NVIDIA GeForce RTX 3090",
    )
    node.add_gpu(
        "0000:00:02", group=2, functions=("0",), vendor="8086", device="4680", driver="i915",
        drm=("card0", "renderD128"),
    )  # fmt: skip
    node.add_vm(102, name="win-gaming", hostpci=["01:00,pcie=1,x-vga=1"])
    node.add_vm(103, name="ml-trainer", hostpci=["0000:01:00.0,pcie=1"])
    # started by hand when needed: not onboot, so only the hook's record brings it back
    node.add_vm(104, name="win11-desk", hostpci=["01:00.0;01:00.1,pcie=1"], running=True)
    node.add_vm(105, name="steam-box", hostpci=["01:00,pcie=1"])
    node.add_vm(106, name="plex", hostpci=["00:02.0"])
    node.add_ct(200, hostname="jellyfin", dev=["/dev/dri/renderD128,gid=104"], running=True,
                onboot=True)  # fmt: skip
    node.add_vm(110, name="pihole", running=True, onboot=True, startup="order=1")
    node.add_vm(9000, name="gpu-template", hostpci=["01:00.0"], template=True)
    node.write_override("shutdown_timeout: 60\nstart_timeout: 30\n")
    (root / "usr/share/misc").mkdir(parents=True, exist_ok=True)
    (root / "usr/share/misc/pci.ids").write_text(PCI_IDS)
    node.write_vzdump_conf("# vzdump default settings\n\n#tmpdir: DIR\n#mode: snapshot\n")
    hook = root / "usr/share/pve-gpu-hook/vzdump-hook"  # as the package installs it
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text((REPO / "bin/vzdump-hook").read_text())
    hook.chmod(0o755)
    return node


def power(node: FakeNode, vmids: list[int]) -> str:
    running = node.running_guests()
    return "  ".join(f"{v}:{'on' if v in running else 'off'}" for v in vmids)


def show_job(title: str, job: JobOutcome) -> None:
    print(f"\n== {title}")
    for line in job.log:
        text = line.removeprefix("INFO: ")
        if (
            text.startswith(("Starting Backup", "Finished Backup", "pve-gpu-hook:"))
            or line.startswith("ERROR")
            or "Backup job finished" in text
        ):
            print(f"   {text}")
    if job.crashed:
        print("   *** the host lost power here: vzdump ran nothing more ***")


def command(env: dict[str, str], *args: str) -> None:
    print(f"\n$ pve-gpu-hook {' '.join(args)}")
    subprocess.run([sys.executable, "-m", "pvegpuhook", *args], env=env, check=False)


def main() -> int:
    # the commands below write to the same terminal or pipe: keep the order of the lines
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory(prefix="pve-gpu-hook-demo-") as tmp:
        root = Path(tmp)
        node = build_demo_node(root)
        guests = [102, 103, 104, 105, 106, 110, 200, 9000]
        env = dict(os.environ, PVE_GPU_HOOK_ROOT=str(root), PYTHONPATH=str(REPO))
        print("Demo node pve1 (simulated under a temporary root; no Proxmox needed)")
        command(env, "register")
        command(env, "scan")
        command(env, "dry-run", "--all", "--mode", "stop")
        print(f"\nbefore:  {power(node, guests)}")
        show_job("Night 1: vzdump --all --mode stop", run_job(node, mode="stop"))
        print(f"\nafter:   {power(node, guests)}")

        show_job(
            "Night 2: the host dies while VM 103 is being backed up",
            run_job(node, mode="stop", crash_after=("archive", 103)),
        )
        reboot(node, onboot=True)
        print(f"\nafter the reboot (onboot guests only): {power(node, guests)}")
        command(env, "status")
        command(env, "recover")
        print(f"\nfinally: {power(node, guests)}")
        print("\nThe hook's own log (/var/log/pve-gpu-hook.log), last lines:")
        log = (root / "var/log/pve-gpu-hook.log").read_text().splitlines()
        for line in [x for x in log if " called: " not in x][-4:]:
            print(f"   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
