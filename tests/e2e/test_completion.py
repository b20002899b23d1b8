"""Tab completion through argcomplete's shell protocol, and the committed bash completion script.

The shell runs the command with ``_ARGCOMPLETE=1``, ``COMP_LINE`` and ``COMP_POINT`` set and reads
the candidates, separated by ``_ARGCOMPLETE_IFS``, from file descriptor 8 (stdout and stderr go to
/dev/null). :func:`complete` does exactly that, through bash as the generated script does, with
``python3 -m pvegpuhook`` standing for the installed command and a fake node as the root.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvegpuhook.model import GuestKind
from pvegpuhook.records import Record, RecordStatus
from pvegpuhook.state import StateStore
from tests.fronts import REPO

argcomplete = pytest.importorskip(
    "argcomplete", reason="argcomplete is not installed (pip install argcomplete; make test has it)"
)
if shutil.which("bash") is None:
    pytest.skip("bash is not installed", allow_module_level=True)

SCRIPT = REPO / "completion" / "pve-gpu-hook"
IFS = "\n"
# argcomplete's protocol, as __python_argcomplete_run_inner in the generated script runs it
PROTOCOL = '"$@" 8>&1 9>/dev/null 1>/dev/null 2>/dev/null </dev/null'


def fake_node(root: Path, vms=(102, 103, 104, 1050), cts=(110,)) -> Path:
    """Guest configs only: completion reads the directory names and nothing else."""
    for folder, vmids in (("qemu-server", vms), ("lxc", cts)):
        directory = root / "etc" / "pve" / folder
        directory.mkdir(parents=True, exist_ok=True)
        for vmid in vmids:
            (directory / f"{vmid}.conf").write_text("memory: 1024\n")
    # not guests: completion must skip them
    (root / "etc" / "pve" / "qemu-server" / "notes.conf").write_text("")
    (root / "etc" / "pve" / "qemu-server" / "106.conf.tmp.1234").write_text("")
    return root


def env_for(root: Path, line: str, point: int | None = None) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "PVE_GPU_HOOK_ROOT": str(root),
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_SHELL": "bash",
        "_ARGCOMPLETE_IFS": IFS,
        "COMP_LINE": line,
        "COMP_POINT": str(len(line) if point is None else point),
        "COMP_TYPE": "9",  # TAB
    }


def complete(root: Path, line: str) -> list[str]:
    result = subprocess.run(
        ["bash", "-c", PROTOCOL, "complete", sys.executable, "-m", "pvegpuhook"],
        env=env_for(root, line),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result
    return [word.strip() for word in result.stdout.split(IFS) if word.strip()]


def test_subcommands(tmp_path: Path) -> None:
    assert sorted(complete(tmp_path, "pve-gpu-hook re")) == ["recover", "register"]
    assert complete(tmp_path, "pve-gpu-hook un") == ["unregister"]
    assert complete(tmp_path, "pve-gpu-hook d") == ["dry-run"]


def test_options_and_choices(tmp_path: Path) -> None:
    assert complete(tmp_path, "pve-gpu-hook dry-run --mo") == ["--mode"]
    assert complete(tmp_path, "pve-gpu-hook dry-run --mode s") == ["stop", "snapshot", "suspend"]
    assert complete(tmp_path, "pve-gpu-hook status --output-format json") == [
        "json",
        "json-pretty",
    ]
    assert complete(tmp_path, "pve-gpu-hook register --c") == ["--chain"]
    assert complete(tmp_path, "pve-gpu-hook --v") == ["--version"]


def test_vmids_from_the_local_guest_configs(tmp_path: Path) -> None:
    root = fake_node(tmp_path)
    assert complete(root, "pve-gpu-hook dry-run 1") == ["102", "103", "104", "110", "1050"]
    assert complete(root, "pve-gpu-hook dry-run 10") == ["102", "103", "104", "1050"]
    assert complete(root, "pve-gpu-hook dry-run --all --mode stop 11") == ["110"]
    assert complete(root, "pve-gpu-hook scan 10") == ["102", "103", "104", "1050"]


def test_vmids_already_given_are_not_offered_again(tmp_path: Path) -> None:
    root = fake_node(tmp_path)
    assert complete(root, "pve-gpu-hook dry-run 102 104 10") == ["103", "1050"]
    assert complete(root, "pve-gpu-hook dry-run --all --exclude 102,1") == [
        "102,103",
        "102,104",
        "102,110",
        "102,1050",
    ]


def test_no_guests_no_vmids(tmp_path: Path) -> None:
    assert complete(tmp_path, "pve-gpu-hook dry-run 1") == []


def save_records(root: Path, vmids: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(root))
    with StateStore().hold(5, "test") as store:
        for vmid in vmids:
            store.add(
                Record(
                    vmid,
                    GuestKind.QEMU,
                    f"vm{vmid}",
                    102,
                    ["0000:01:00.0"],
                    since=time.time(),
                    status=RecordStatus.STOPPED,
                )
            )
    monkeypatch.delenv("PVE_GPU_HOOK_ROOT")


def tree(root: Path) -> dict[str, tuple[int, float]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime)
        for path in sorted(root.rglob("*"))
    }


def test_recover_completes_the_recorded_guests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_node(tmp_path)
    save_records(root, [104, 1050], monkeypatch)
    before = tree(root)
    assert complete(root, "pve-gpu-hook recover 1") == ["104", "1050"]
    assert complete(root, "pve-gpu-hook recover --forget 104 1") == ["1050"]
    assert tree(root) == before, "completion must not write (no lock file, no state)"


def test_recover_falls_back_to_the_local_guests(tmp_path: Path) -> None:
    root = fake_node(tmp_path)
    assert complete(root, "pve-gpu-hook recover 10") == ["102", "103", "104", "1050"]
    # a corrupt state file: read-only completion neither repairs nor moves it
    state_dir = root / "var" / "lib" / "pve-gpu-hook"
    state_dir.mkdir(parents=True, mode=0o700)
    (state_dir / "state.json").write_text("{not json")
    before = tree(root)
    assert complete(root, "pve-gpu-hook recover 11") == ["110"]
    assert tree(root) == before


def test_completion_imports_nothing_heavy(tmp_path: Path) -> None:
    # rich (tables) and yaml (override file) are for running a command, not for completing it
    env = env_for(fake_node(tmp_path), "pve-gpu-hook dry-run 10")
    out = tmp_path / "out"
    env["_ARGCOMPLETE_STDOUT_FILENAME"] = str(out)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pvegpuhook"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    modules = {text.split("|")[-1].strip() for text in result.stderr.splitlines() if "|" in text}
    # (modules imported with importlib.import_module, as cli imports the commands, are not listed)
    assert {"argcomplete", "pvegpuhook.inventory", "pvegpuhook.output"} <= modules
    assert not {m for m in modules if m.split(".")[0] in ("rich", "yaml")}, sorted(modules)
    assert out.read_text().split(IFS) == ["102", "103", "104", "1050"]


def test_a_normal_run_does_not_import_argcomplete() -> None:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pvegpuhook", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "argcomplete" not in result.stderr


def test_latency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """How long a TAB takes, end to end (process start included). Reported, not asserted."""
    root = fake_node(tmp_path)
    complete(root, "pve-gpu-hook dry-run 10")  # warm the page cache and __pycache__
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        complete(root, "pve-gpu-hook dry-run 10")
        timings.append(time.perf_counter() - start)
    bare = []  # the interpreter's own start, for comparison
    for _ in range(7):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        bare.append(time.perf_counter() - start)
    median, fastest = statistics.median(timings) * 1000, min(timings) * 1000
    python, startup = f"{Path(sys.executable).name} -c pass", statistics.median(bare) * 1000
    with capsys.disabled():
        print(
            f"\ncompletion latency: median {median:.0f} ms, min {fastest:.0f} ms over "
            f"{len(timings)} runs (a bare '{python}': median {startup:.0f} ms)"
        )


# ---- the committed bash completion script ------------------------------------------------------


def test_committed_script_is_current() -> None:
    # what `register-python-argcomplete pve-gpu-hook` (make completion) prints
    expected = argcomplete.shellcode(["pve-gpu-hook"])
    assert SCRIPT.exists(), "completion/pve-gpu-hook is missing: run `make completion`"
    assert SCRIPT.read_text(encoding="utf-8") == expected, (
        "completion/pve-gpu-hook is not what register-python-argcomplete generates with the "
        "installed argcomplete: run `make completion` and commit it"
    )


def test_committed_script_completes_in_bash(tmp_path: Path) -> None:
    # the real thing: bash sources the script and calls its completion function the way
    # programmable completion does; `pve-gpu-hook` on PATH runs this checkout
    bindir = tmp_path / "bin"
    bindir.mkdir()
    command = bindir / "pve-gpu-hook"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pvegpuhook "$@"\n')
    command.chmod(0o755)
    root = fake_node(tmp_path / "root")
    line = "pve-gpu-hook scan 10"
    driver = (
        f'source "{SCRIPT}"\n'
        'COMP_LINE="$1"; COMP_POINT=${#1}; COMP_TYPE=9\n'
        'read -r -a COMP_WORDS <<< "$1"; COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n'
        '_python_argcomplete pve-gpu-hook "${COMP_WORDS[COMP_CWORD]}" pve-gpu-hook\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {
        "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(REPO),
        "PVE_GPU_HOOK_ROOT": str(root),
    }
    result = subprocess.run(
        ["bash", "-c", driver, "driver", line],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["102", "103", "104", "1050"]
