"""How the tests and tools run the two fronts (hook, CLI) on a fake node, and the seed's node.

Two ways to run the admin command, both here: :func:`cli`, a process as typed in a root shell,
and :func:`run_main`, ``pvegpuhook.cli.main`` in this process (fast; the root is whatever
``PVE_GPU_HOOK_ROOT`` says, see the ``at_root`` fixture). The hook runs as a process
(:func:`hook`), the way vzdump starts it, or through ``tests.sim.vzdump.run_job``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tests.sim.node import FakeNode
from tests.sim.vzdump import JobOutcome

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = "shutdown_timeout: 3\nstart_timeout: 5\n"  # time limits come from the override file


def seed_node(root: Path, override: str = FAST) -> FakeNode:
    """The seed's home lab: VMs 102-105 share one RTX card (group 14), only 104 runs."""
    node = FakeNode(root)
    node.add_gpu("0000:01:00", group=14, functions=("0", "1"), nvidia_minor=0, drm=("renderD128",))
    for vmid in (102, 103, 105):
        node.add_vm(vmid, name=f"vm{vmid}", hostpci=["01:00,pcie=1,x-vga=1"])
    node.add_vm(104, name="win11", hostpci=["0000:01:00.0,pcie=1"], running=True)
    if override:
        node.write_override(override)
    return node


def wait_for(condition: Callable[[], object], seconds: float = 20.0) -> bool:
    """Whether ``condition`` holds within ``seconds`` (for what PVE's workers do later)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def hook(node: FakeNode, *args: str, vmtype: str | None = "qemu") -> subprocess.CompletedProcess:
    """Call the hook the way vzdump does: emptied environment, no PATH."""
    env = {"LC_ALL": "C", "PVE_GPU_HOOK_ROOT": str(node.root), "PYTHONPATH": str(REPO)}
    if vmtype and len(args) > 1:
        env["VMTYPE"] = vmtype
    return _run(["pvegpuhook.hook", *args], env)


GUEST_HOOK = "usr/share/pve-gpu-hook/guest-hook"


def install_guest_hook(node: FakeNode) -> Path:
    """The package's guest hookscript under the node's root, as ``bin/guest-hook`` but finding
    the library in this checkout. PVE runs it with its caller's environment, maybe emptied: the
    root is where this file lives (after the snippet's symlink)."""
    path = node.root / GUEST_HOOK
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\n"
        "import os\nimport sys\nfrom pathlib import Path\n\n"
        'os.environ["PVE_GPU_HOOK_ROOT"] = str(Path(__file__).resolve().parents[3])\n'
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pvegpuhook.guesthook import main  # noqa: E402\n\n"
        "sys.exit(main())\n"
    )
    path.chmod(0o755)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``pve-gpu-hook ARGV`` in this process: (exit status, stdout, stderr)."""
    from pvegpuhook import cli as front

    capsys.readouterr()
    code = front.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli(node: FakeNode, *args: str) -> subprocess.CompletedProcess:
    """The admin command, as typed in a root shell."""
    env = dict(os.environ, PVE_GPU_HOOK_ROOT=str(node.root), PYTHONPATH=str(REPO))
    return _run(["pvegpuhook", *args], env)


def _run(module_and_args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *module_and_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


def records(node: FakeNode) -> list[dict]:
    """The records of the node's state file, read independently of the library."""
    return read_state(node.root / "var/lib/pve-gpu-hook/state.json")


def read_state(path: Path) -> list[dict]:
    """The records of a state file: format 2 (a header line, then one checksummed record per
    line) or format 1 (one JSON object); an absent file holds none. Damage is an error here."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if json.loads(lines[0]).get("format") != 2:
        return json.loads(text)["records"]
    found = []
    for line in lines[1:]:
        entry = json.loads(line)
        payload = json.dumps(entry["record"], sort_keys=True, separators=(",", ":"))
        assert entry["crc"] == f"{zlib.crc32(payload.encode()):08x}", line
        found.append(entry["record"])
    return found


def write_state(path: Path, entries: list[dict]) -> None:
    """A format-2 state file holding ``entries`` (as the library writes it)."""
    lines = ['{"format": 2}']
    for entry in entries:
        payload = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        lines.append(f'{{"crc": "{zlib.crc32(payload.encode()):08x}", "record": {payload}}}')
    path.write_text("\n".join(lines) + "\n")


def commands(node: FakeNode, verb: str | None = None) -> list[list[str]]:
    """qm/pct calls the hook made, e.g. ``[["qm", "shutdown", "104", ...]]``."""
    calls = [c["argv"] for c in node.calls()]
    return [c for c in calls if verb is None or (len(c) > 1 and c[1] == verb)]


def hook_lines(job: JobOutcome) -> list[str]:
    """Task-log lines that came from our hook."""
    return [line for line in job.log if "pve-gpu-hook:" in line]
