"""Every answer of the admin command is true, or says what it could not read (issue 10).

Over the simulator, with the real command as a process: run as an unprivileged user on a root
whose files have the modes of a real host; a damaged state file; a recorded guest whose device
an ``onboot`` guest of a PCI mapping took after a power loss; ``status`` as an admin reads it;
usage and configuration errors. None of these may answer exit 0 with an empty or false result.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvegpuhook.registration import HOOK_PATH
from tests.fronts import REPO, cli, commands, records, seed_node
from tests.sim.node import FakeNode, reboot
from tests.sim.vzdump import run_job

IN_CI = bool(os.environ.get("CI"))
NOBODY = 65534
STATE_DIR = "var/lib/pve-gpu-hook"
STOCK = "# vzdump default settings\n\n#tmpdir: DIR\n#script: FILENAME\n"


def registered(node: FakeNode) -> FakeNode:
    """The package installed and registered on the node: status has nothing else to say."""
    hook = node.root / HOOK_PATH.lstrip("/")
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    node.write_vzdump_conf(STOCK)
    assert cli(node, "register").returncode == 0
    return node


def crashed_with_104_off(root: Path) -> FakeNode:
    """The seed's lab after vzdump died right after VM 104 was shut down for VM 102."""
    node = registered(seed_node(root))
    assert run_job(node, [102], mode="stop", crash_after=("backup-start", 102)).crashed
    assert 104 not in node.running_guests()
    assert [r["vmid"] for r in records(node)] == [104]
    return node


# ---- 1. not root --------------------------------------------------------------------------------


def as_on_a_real_host(root: Path) -> None:
    """File modes as a PVE host has them: pmxcfs shows /etc/pve's files 0640 root:www-data and
    its directories 0755 (pve-cluster src/pmxcfs/pmxcfs.c cfs_fuse_getattr); dpkg installs the
    override file 0644; the package's state directory is 0700 and its files and log 0600."""
    try:
        www = grp.getgrnam("www-data").gr_gid
    except KeyError:
        www = 0
    for path in [root / "etc/pve", *(root / "etc/pve").rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, 0, www)
        path.chmod(0o755 if path.is_dir() else 0o640)
    for path in (root / "etc/pve-gpu-hook/config.yaml", root / "etc/vzdump.conf"):
        if path.exists():
            path.chmod(0o644)
    state = root / STATE_DIR
    state.chmod(0o700)
    for path in state.iterdir():
        path.chmod(0o600)
    (root / "var/log/pve-gpu-hook.log").chmod(0o600)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can traverse (mkdtemp and pytest's are 0700), with a copy of the
    package in it: the checkout itself may lie in root's home."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running the command as another user needs root and setpriv")
    base = Path(tempfile.mkdtemp(prefix="pve-gpu-hook-nonroot-"))
    try:
        base.chmod(0o755)
        shutil.copytree(REPO / "pvegpuhook", base / "src/pvegpuhook")
        for path in [base / "src", *(base / "src").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def unprivileged_python(src: Path) -> str:
    """An interpreter the unprivileged user can run, with PyYAML: this one, or Debian's."""
    for candidate in dict.fromkeys((sys.executable, "/usr/bin/python3")):
        probe = as_nobody(candidate, src, "-c", "import yaml, pvegpuhook.cli")
        if probe.returncode == 0:
            return candidate
    message = "no python3 with PyYAML that an unprivileged user can run (apt install python3-yaml)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def as_nobody(python: str, src: Path, *args: str, root: Path | None = None):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "PYTHONPATH": str(src)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if root is not None:
        env["PVE_GPU_HOOK_ROOT"] = str(root)
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


NOT_ROOT = re.compile(r"pve-gpu-hook: must be run as root: cannot read (/\S+)\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["scan"],
        ["scan", "104"],
        ["scan", "--output-format", "json"],
        ["dry-run", "--all"],
        ["dry-run", "102", "--mode", "stop", "--output-format", "json"],
        ["status"],
        ["status", "--output-format", "json"],
        ["recover"],
        ["recover", "--dry-run"],
        ["recover", "--output-format", "json"],
        ["register"],
        ["unregister"],
    ],
    ids=" ".join,
)
def test_not_root_says_so_in_one_line_and_answers_nothing(
    shared_dir: Path, argv: list[str]
) -> None:
    """A monitoring agent's run: configs 0640, the state dir 0700. Before, scan listed the GPUs
    with nobody holding them, dry-run --all printed a header only and status said "waiting
    guests: none", all with exit 0."""
    node = crashed_with_104_off(shared_dir / "root")
    as_on_a_real_host(node.root)
    python = unprivileged_python(shared_dir / "src")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in node.root.rglob("*"))
    result = as_nobody(python, shared_dir / "src", "-m", "pvegpuhook", *argv, root=node.root)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    match = NOT_ROOT.fullmatch(result.stderr)
    assert match, result.stderr
    assert (node.root / match.group(1).lstrip("/")).exists()  # the file it names, as on the host
    # nothing written: not even root's lock file, which another user's copy would lock root out of
    assert sorted((str(p), p.stat().st_mtime_ns) for p in node.root.rglob("*")) == before
    # root gets the true answer from the same files
    assert '"vmid": 104' in cli(node, "status", "--output-format", "json").stdout


# ---- 3. removing the package never forgets a waiting guest ------------------------------------


def test_removal_check_names_the_waiting_guests_and_the_ways_out(tmp_path: Path) -> None:
    """The prerm asks 'unregister --check-waiting' before a removal (the packaging tests run it
    through apt); it changes nothing."""
    node = crashed_with_104_off(tmp_path)
    conf = (node.root / "etc/vzdump.conf").read_bytes()
    check = cli(node, "unregister", "--check-waiting")
    assert check.returncode == 1 and check.stdout == ""
    assert check.stderr.splitlines() == [
        "pve-gpu-hook: guests it stopped are waiting to be started again: VM 104 (win11)",
        "pve-gpu-hook: start them with 'pve-gpu-hook recover', or drop a record with "
        "'pve-gpu-hook recover --forget VMID' (the guest is left as it is)",
    ]
    assert (node.root / "etc/vzdump.conf").read_bytes() == conf
    assert [r["vmid"] for r in records(node)] == [104]
    assert cli(node, "recover").returncode == 0
    assert cli(node, "unregister", "--check-waiting").returncode == 0


def test_removal_check_refuses_while_the_state_is_damaged(tmp_path: Path) -> None:
    node = crashed_with_104_off(tmp_path)
    (node.root / STATE_DIR / "state.json").write_text('{"format": 2}\n{"vmid": 1')
    check = cli(node, "unregister", "--check-waiting")
    assert check.returncode == 1
    assert "the state is damaged, guests it named may be waiting" in check.stderr
    assert "Traceback" not in check.stderr


# ---- 3. a damaged state file --------------------------------------------------------------------


def damaged_pair(root: Path) -> FakeNode:
    """VM 104 and CT 110 shut down for VM 106 (it needs both GPUs), then vzdump died; the
    state file was cut in the middle of 110's record line."""
    node = registered(seed_node(root, "shutdown_timeout: 2\nstart_timeout: 5\n"))
    node.add_gpu("0000:02:00", group=15, functions=("0",), nvidia_minor=1, drm=("renderD129",))
    node.add_ct(110, hostname="plex", dev=["/dev/dri/renderD129,gid=104"], running=True)
    node.add_vm(106, name="both", hostpci=["01:00,pcie=1", "02:00"])
    assert run_job(node, [106], crash_after=("backup-start", 106)).crashed
    assert node.running_guests() == set()
    state = node.root / STATE_DIR / "state.json"
    lines = state.read_text().splitlines(keepends=True)
    assert '"vmid":110' in lines[2]
    state.write_text("".join(lines[:2]) + lines[2][:40])
    return node


def test_a_damaged_state_file_is_never_nothing_to_recover(tmp_path: Path) -> None:
    """Before: status listed the file but said "waiting guests: none"; recover --dry-run printed
    its warning twice on stdout with Python's JSON error text, then "nothing to recover", exit 0."""
    node = damaged_pair(tmp_path)
    aside_glob = "state.json.corrupt-*"

    status = cli(node, "status")
    assert status.returncode == 1
    assert len(status.stderr.splitlines()) == 1 and "is corrupt" in status.stderr
    squeezed = [" ".join(line.split()) for line in status.stdout.splitlines()]
    assert "Waiting guests: 1: VM 104 (win11)" in squeezed
    assert any(line.startswith("Not started again: CT 110") for line in squeezed), squeezed

    dry = cli(node, "recover", "--dry-run")
    assert dry.returncode == 1
    assert "nothing to recover" not in dry.stdout and "corrupt" not in dry.stdout
    assert dry.stdout.split() == ["GUEST", "RESULT", "VM", "104", "(win11)", "would", "start"]
    err = dry.stderr.splitlines()
    assert sum("corrupt" in line for line in err) == 1, err
    assert "Expecting" not in dry.stderr  # no parser's own words
    [shown] = [line for line in err if "CT 110 (plex) shut down in" in line]
    assert shown.endswith("[still off]") and " backup-start 106 " in shown
    assert list((node.root / STATE_DIR).glob(aside_glob)) == []  # a dry run moves nothing

    done = cli(node, "recover")
    assert done.returncode == 1  # the damaged file is kept aside: the admin must look at it
    assert node.running_guests() == {104}
    [aside] = (node.root / STATE_DIR).glob(aside_glob)
    assert f"rm {aside}" in done.stderr
    assert "CT 110 (plex) shut down in" in done.stderr

    # the admin starts CT 110, deletes the kept file: all is well again
    node.start(110)
    again = cli(node, "recover")
    assert again.returncode == 1 and str(aside) in again.stderr
    aside.unlink()
    assert cli(node, "recover").returncode == 0
    final = cli(node, "status")
    assert final.returncode == 0 and final.stderr == "", final.stdout + final.stderr


@pytest.mark.parametrize(
    "argv", [["scan"], ["scan", "--output-format", "json"], ["dry-run", "103", "--mode", "stop"]]
)
def test_every_command_says_the_damage_once(tmp_path: Path, argv: list[str]) -> None:
    """scan and dry-run answer what they were asked, and say the damage once, on stderr."""
    node = damaged_pair(tmp_path)
    result = cli(node, *argv)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("pve-gpu-hook: warning: the state file ") and "is corrupt" in line
    assert line.endswith("'pve-gpu-hook recover --dry-run' shows which")
    assert "corrupt" not in result.stdout
    # once kept aside by recover, the kept file is said until the admin deletes it
    cli(node, "recover")
    [line] = cli(node, *argv).stderr.splitlines()
    assert "a damaged state file is kept aside: " in line


def test_damage_in_json_is_one_object_and_one_stderr_block(tmp_path: Path) -> None:
    node = damaged_pair(tmp_path)
    result = cli(node, "recover", "--dry-run", "--output-format", "json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert [g["vmid"] for g in data["guests"]] == [104]
    damage = data["damage"]
    assert "is corrupt" in damage["state_file"]
    assert [(n["vmid"], n["type"], n["running"]) for n in damage["not_started_again"]] == [
        (110, "lxc", False)
    ]
    status = json.loads(cli(node, "status", "--output-format", "json").stdout)
    assert [n["vmid"] for n in status["not_started_again"]] == [110]


@pytest.mark.parametrize("what", ["state", "log"])
def test_a_directory_where_a_file_belongs_is_reported_not_a_traceback(
    tmp_path: Path, what: str
) -> None:
    node = crashed_with_104_off(tmp_path)
    path = node.root / (
        f"{STATE_DIR}/state.json" if what == "state" else "var/log/pve-gpu-hook.log"
    )
    path.unlink()
    path.mkdir()
    readers = [["status"], ["status", "--output-format", "json"]]
    if what == "state":  # recover reads the log only for a damaged state
        readers.append(["recover", "--dry-run"])
    for argv in readers:
        result = cli(node, *argv)
        assert "Traceback" not in result.stderr and "Errno" not in result.stdout + result.stderr
        assert result.returncode in (1, 2), (argv, result.stdout, result.stderr)
        named = "state.json is not a regular file" if what == "state" else "pve-gpu-hook.log"
        assert named in result.stdout + result.stderr, (argv, result)
    status = " ".join(cli(node, "status").stdout.split())
    if what == "state":
        assert "Waiting guests: UNKNOWN" in status  # never "none"
        assert cli(node, "recover").returncode == 1
    else:
        assert "cannot read the log file /var/log/pve-gpu-hook.log: Is a directory" in status


def test_an_empty_state_file_is_damage_not_nothing(tmp_path: Path) -> None:
    node = crashed_with_104_off(tmp_path)
    (node.root / STATE_DIR / "state.json").write_text("")
    result = cli(node, "recover", "--dry-run")
    assert result.returncode == 1
    assert "nothing to recover" not in result.stdout
    assert "no intact record to recover" in result.stdout
    assert "VM 104 (win11) shut down in" in result.stderr and "[still off]" in result.stderr


# ---- 6. recover shows the way out ---------------------------------------------------------------

POOL = """\
gpu
\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=14
\tmap node=pve1,path=0000:41:00.0,id=10de:2204,iommugroup=41
"""


def power_loss_with_onboot_mapped_vm(root: Path, override: str = "") -> FakeNode:
    """VM 104 (01:00.0) was shut down for VM 102's backup; then the power went. At boot VM 105
    (onboot, mapping "gpu": 01:00.0 or 41:00.0) took the first free device: 104's."""
    node = seed_node(root, "shutdown_timeout: 3\nstart_timeout: 5\n" + override)
    node.add_gpu("0000:41:00", group=41, functions=("0",))
    node.set_mapping(POOL)
    node.add_vm(105, name="render", hostpci=["mapping=gpu"], onboot=True)
    assert run_job(node, [102], mode="stop", crash_after=("backup-start", 102)).crashed
    assert reboot(node, onboot=True) == []
    assert node.running_guests() == {105}
    assert node.reservations()["0000:01:00.0"]["vmid"] == 105
    return node


def test_recover_names_the_way_out_and_takes_it_only_when_asked(tmp_path: Path) -> None:
    node = power_loss_with_onboot_mapped_vm(tmp_path)
    result = cli(node, "recover")
    assert result.returncode == 1
    assert "kept: 0000:01:00.0 is held by VM 105 (render)" in result.stdout
    assert (
        "way out for VM 104 (win11): VM 105 (render) would take 0000:41:00.0 if started after "
        "VM 104 (win11): 'pve-gpu-hook recover 104 --swap'" in result.stdout
    )
    assert commands(node, "shutdown") == [["qm", "shutdown", "104", "--timeout", "3"]]  # none new
    data = json.loads(cli(node, "recover", "--output-format", "json").stdout)
    [guest] = data["guests"]
    assert guest["result"] == "kept"
    assert guest["way_out"] == {
        "blocker": 105,
        "address": "0000:01:00.0",
        "moves_to": ["0000:41:00.0"],
        "command": "pve-gpu-hook recover 104 --swap",
    }
    assert node.running_guests() == {105}  # a report stops nobody

    swap = cli(node, "recover", "104", "--swap")
    assert swap.returncode == 0, swap.stdout + swap.stderr
    assert node.running_guests() == {104, 105}
    reservations = node.reservations()
    assert reservations["0000:01:00.0"]["vmid"] == 104
    assert reservations["0000:41:00.0"]["vmid"] == 105
    assert records(node) == []
    calls = [c for c in commands(node) if c[1] in ("shutdown", "stop", "start")][1:]
    assert calls == [
        ["qm", "shutdown", "105", "--timeout", "3"],
        ["qm", "start", "104"],
        ["qm", "start", "105"],
    ]  # gracefully, one step after the other; never a hard stop
    assert "running again on 0000:41:00.0" in swap.stdout


def test_no_way_out_through_a_protected_guest(tmp_path: Path) -> None:
    node = power_loss_with_onboot_mapped_vm(tmp_path, "protect: [105]\n")
    result = cli(node, "recover", "--output-format", "json")
    [guest] = json.loads(result.stdout)["guests"]
    assert guest["way_out"] is None and "VM 105 (render) is protected" in guest["no_way_out"]
    swap = cli(node, "recover", "104", "--swap")
    assert swap.returncode == 1 and "no swap: VM 105 (render) is protected" in swap.stdout
    assert node.running_guests() == {105} and [r["vmid"] for r in records(node)] == [104]


def test_recover_of_a_guest_that_is_not_waiting_is_no_error(tmp_path: Path) -> None:
    node = crashed_with_104_off(tmp_path)
    assert cli(node, "recover").returncode == 0
    result = cli(node, "recover", "104")
    assert result.returncode == 0, result.stderr
    assert "VM 104 (win11)  not waiting" in result.stdout
    data = json.loads(cli(node, "recover", "104", "--output-format", "json").stdout)
    assert data["guests"][0]["result"] == "not-waiting"
    assert data["format"] == 1 and data["damage"] is None
    assert cli(node, "recover", "104", "--forget").returncode == 0


# ---- 8. status reads like PVE -------------------------------------------------------------------


def squeezed_status(node: FakeNode, *args: str) -> tuple[int, list[str]]:
    result = cli(node, "status", *args)
    return result.returncode, [" ".join(line.split()) for line in result.stdout.splitlines()]


def test_status_sums_up_the_night_and_clears_unfinished(tmp_path: Path) -> None:
    node = crashed_with_104_off(tmp_path)
    code, lines = squeezed_status(node)
    assert code == 1
    assert "Result: unfinished: guests it shut down are still off: 104" in lines
    [numbers] = [line for line in lines if line.startswith("Guests shut down:")]
    assert numbers.startswith("Guests shut down: 1 (VM 104 (win11)), 1 shutdown/boot cycle, ")
    assert numbers.endswith("no failed restarts; still off: 104")
    assert not any("qemu" in line for line in lines)

    assert cli(node, "recover").returncode == 0
    code, lines = squeezed_status(node)
    assert code == 0, lines
    assert "Result: every guest it shut down runs again" in lines
    assert "Waiting guests: none" in lines

    job = run_job(node, [103], mode="stop")
    assert job.ok, job.log
    code, lines = squeezed_status(node)
    assert code == 0
    assert "Result: ok" in lines
    started = [line for line in lines if line.startswith("Started:")]
    assert re.fullmatch(r"Started: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", started[0])
    data = json.loads(cli(node, "status", "--output-format", "json").stdout)
    night = data["night"]
    assert (night["holders_stopped"], night["failed_restarts"]) == (1, 0)
    assert night["still_down"] == [] and night["ended"] is not None
    _, verbose = squeezed_status(node, "--verbose")
    assert any("VM 104 (win11) started again" in line for line in verbose)


# ---- 9. usage and configuration errors ----------------------------------------------------------


def test_usage_errors_belong_to_their_sub_command(tmp_path: Path) -> None:
    node = seed_node(tmp_path)
    both = cli(node, "dry-run", "102", "--all")
    assert both.returncode == 2 and both.stdout == ""
    assert "--all conflicts with the VMIDs given (102)" in both.stderr
    assert cli(node, "dry-run", "102", "--exclude", "103").returncode == 2
    extra = cli(node, "scan", "102", "103")
    assert extra.returncode == 2
    assert extra.stderr.startswith("usage: pve-gpu-hook scan ")
    assert "pve-gpu-hook scan: error: unrecognized arguments: 103" in extra.stderr
    typo = cli(node, "--verison")
    assert typo.returncode == 2 and "COMMAND" not in typo.stderr.splitlines()[-1]
    assert typo.stderr.splitlines()[-1].endswith("unrecognized arguments: --verison")
    listed = cli(node, "--help").stdout
    order = [listed.index(f"    {name} ") for name in ("status", "scan", "dry-run", "recover")]
    assert order == sorted(order) and listed.index("    register") < listed.index("unregister")
    assert "(default: 10" in cli(node, "recover", "--help").stdout.replace("\n", " ")


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("shutdown_timeout: 60\n\tforce_stop: true\n", "config.yaml:2: invalid YAML: indent with "),
        ("force_stop: maybe\n", "config.yaml:1: force_stop: expected true or false"),
    ],
)
def test_config_errors_read_plainly(tmp_path: Path, text: str, said: str) -> None:
    node = seed_node(tmp_path, override=text)
    result = cli(node, "dry-run", "102")
    assert result.returncode == 2 and said in result.stderr, result.stderr


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    node = seed_node(tmp_path, override="")
    (node.root / "etc/pve-gpu-hook/config.yaml").mkdir(parents=True)
    for argv in (["status"], ["dry-run", "102"], ["recover"]):
        result = cli(node, *argv)
        text = result.stdout + result.stderr
        assert "Errno" not in text and "Traceback" not in text
        assert "config.yaml: cannot read: it is a directory" in text


@pytest.mark.parametrize("word", ["yes", '"yes"', "'on'", "1"])
def test_force_stop_words_are_read_alike(tmp_path: Path, word: str) -> None:
    node = seed_node(tmp_path, override=f"force_stop: {word}\n")
    data = json.loads(cli(node, "status", "--output-format", "json").stdout)
    assert data["override"]["valid"] is True
    assert data["override"]["values"]["force_stop"] is True


def test_protecting_a_guest_that_does_not_exist_is_a_warning(tmp_path: Path) -> None:
    node = registered(seed_node(tmp_path, override="protect: [104, 140]\n"))
    result = cli(node, "status")
    assert result.returncode == 1
    assert (
        "warning: /etc/pve-gpu-hook/config.yaml: protect: 140 is no guest of this node (a typo? "
        "the guest meant is not protected)" in result.stdout
    )
    data = json.loads(cli(node, "status", "--output-format", "json").stdout)
    assert data["override"]["unknown_protect"] == [140]
