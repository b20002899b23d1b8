"""Security review in tests (issue 5): the hook and the CLI against a hostile node.

* state dir, state file, lock file and log file: never written, created or removed through a
  symlink, never used when someone else owns them, and records found there only trusted when
  they are ours;
* what we create is 0600 in a 0700 directory, whatever the umask;
* VMIDs that are not plain decimal 100-999999999 are refused before anything runs;
* control characters from guest configs never reach the task log, the log file or a terminal raw;
* a chained hook that others could change is refused, and not run;
* no command is built through a shell: argv lists, absolute paths under the root, and only
  ``act.py`` imports ``subprocess``.

Everything runs against the real code: in-process with ``PVE_GPU_HOOK_ROOT`` set, or through the
subprocess helpers of ``tests/fronts.py`` that call the hook the way vzdump does.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvegpuhook import act, cli, hook, output, paths, registration
from pvegpuhook.state import StateStore
from tests.fronts import FAST, REPO, commands, records, seed_node
from tests.fronts import cli as run_cli
from tests.fronts import hook as run_hook
from tests.sim.node import FakeNode

NOBODY = 65534
STATE_FILE = f"{paths.STATE_DIR}/state.json"
PRIVATE = {
    "state dir": paths.STATE_DIR,
    "state file": STATE_FILE,
    "lock file": paths.LOCK_FILE,
    "log file": paths.LOG_FILE,
}
EMPTY_STATE = b'{"format": 1, "records": [\n]}\n'
BAD_VMIDS = [
    "../1",
    "100;reboot",
    "-1",
    "99",
    "1000000000",
    "0102",
    "１０２",
    "1e3",
    " 102",
    "",
    "9" * 30,
]
EVIL_VM = "\x1b[31mevil\x07"  # colour escape and bell in a VM name
EVIL_CT = "\x1b]0;pwn\x07ct"  # an OSC sequence (sets the terminal title) in a CT hostname


def raw_controls(text: str) -> list[str]:
    """Control characters that are not line ends (C0, DEL, C1), as a readable list."""
    return sorted({repr(c) for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0})


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(path: Path) -> dict[str, tuple[object, int, int]]:
    """Everything under ``path`` (itself included): content or link target, mode, owner."""
    found: dict[str, tuple[object, int, int]] = {}
    entries = [path] if not path.is_dir() or path.is_symlink() else [path, *path.rglob("*")]
    for entry in entries:
        if not os.path.lexists(entry):
            continue
        info = entry.lstat()
        if entry.is_symlink():
            content: object = ("link", os.readlink(entry))
        elif entry.is_dir():
            content = "dir"
        else:
            content = entry.read_bytes()
        found[str(entry.relative_to(path.parent))] = (
            content,
            stat.S_IMODE(info.st_mode),
            info.st_uid,
        )
    return found


# ---- private paths: symlinks and foreign owners -----------------------------------------------


def plant(root: Path, relative: str, attack: str, elsewhere: Path) -> Path:
    """Turn a private path into a symlink to ``elsewhere`` (or a dangling one), or make it a
    real file/directory owned by uid 65534. Returns the planted path."""
    path = root / relative
    is_dir = relative == paths.STATE_DIR
    if relative.startswith(paths.STATE_DIR + "/"):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if attack == "foreign owner":
        if is_dir:
            path.mkdir(mode=0o700)
        else:
            path.write_bytes(EMPTY_STATE if relative == STATE_FILE else b"")
            path.chmod(0o600)
        os.chown(path, NOBODY, NOBODY)
        return path
    target = elsewhere / path.name
    if attack == "symlink":
        if is_dir:
            target.mkdir()
            (target / "precious").write_text("not yours\n")
        else:
            target.write_bytes(EMPTY_STATE if relative == STATE_FILE else b"not yours\n")
    path.symlink_to(target)
    return path


ATTACKS = ["symlink", "dangling symlink", "foreign owner"]
WRITE_CASES = [
    pytest.param(what, attack, id=f"{what}-{attack}".replace(" ", "-"))
    for what in PRIVATE
    for attack in ATTACKS
]


@pytest.mark.parametrize(("what", "attack"), WRITE_CASES)
def test_hook_never_writes_through_symlinks_or_into_foreign_files(
    tmp_path: Path, what: str, attack: str
) -> None:
    node = seed_node(tmp_path / "root")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = plant(node.root, PRIVATE[what], attack, elsewhere)
    watched = planted if attack == "foreign owner" else elsewhere
    before = snapshot(watched)
    result = run_hook(node, "backup-start", "stop", "102")
    assert snapshot(watched) == before  # nothing written, created or removed through it
    assert planted.is_symlink() is (attack != "foreign owner")
    if what == "log file":
        # a log that cannot be written never breaks a backup: the work is done, unlogged
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 1, result.stdout + result.stderr
    assert commands(node) == [] and node.running_guests() == {104}  # nobody stopped
    (line,) = result.stderr.splitlines()
    assert line.startswith("pve-gpu-hook: ") and os.path.basename(PRIVATE[what]) in line


@pytest.mark.parametrize("owner", ["symlink", "foreign owner"])
def test_stale_temp_cleanup_never_deletes_through_the_state_dir(tmp_path: Path, owner: str) -> None:
    """StateStore.acquire() removes stale '.*.tmp-*' files only in a state dir it checked."""
    node = seed_node(tmp_path / "root")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = plant(node.root, paths.STATE_DIR, owner, elsewhere)
    directory = elsewhere / planted.name if owner == "symlink" else planted
    (directory / ".vzdump.conf.tmp-4242").write_text("someone else's temp file\n")
    run_hook(node, "backup-start", "stop", "102")
    assert (directory / ".vzdump.conf.tmp-4242").exists()


PLANTED_RECORD = {
    "vmid": 106,
    "kind": "qemu",
    "name": "was-off",
    "for_vmid": 102,
    "addresses": [],
    "since": 1.0,
    "status": "stopped",
}


def plant_records(root: Path, how: str, elsewhere: Path) -> None:
    """A state file naming VM 106 (off, no GPU: nothing keeps it from starting), put where we
    must not trust it: a directory or file owned by uid 65534, or behind a symlink."""
    text = json.dumps({"format": 1, "records": [PLANTED_RECORD]})
    state_dir = root / paths.STATE_DIR
    if how == "symlinked state dir":
        (elsewhere / "state.json").write_text(text)
        state_dir.symlink_to(elsewhere)
        return
    state_dir.mkdir(mode=0o700, parents=True)
    if how == "symlinked state file":
        (elsewhere / "state.json").write_text(text)
        (state_dir / "state.json").symlink_to(elsewhere / "state.json")
        return
    (state_dir / "state.json").write_text(text)
    os.chown(state_dir / "state.json", NOBODY, NOBODY)
    if how == "foreign state dir":
        os.chown(state_dir, NOBODY, NOBODY)


@pytest.mark.parametrize(
    "entry",
    [("cli", "recover"), ("hook", "job-end"), ("hook", "log-end", "stop", "102")],
    ids=["recover", "job-end", "log-end"],
)
@pytest.mark.parametrize(
    "how",
    [
        "foreign state dir",
        "foreign state file",
        "symlinked state file",
        "symlinked state dir",
    ],
)
def test_records_we_did_not_write_start_nobody(tmp_path: Path, how: str, entry: tuple) -> None:
    node = seed_node(tmp_path / "root")
    node.add_vm(106, name="was-off")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plant_records(node.root, how, elsewhere)
    front, *args = entry
    result = run_cli(node, *args) if front == "cli" else run_hook(node, *args)
    assert "Traceback" not in result.stderr
    assert commands(node, "start") == []
    assert node.running_guests() == {104}


def test_private_files_are_0600_in_a_0700_dir_whatever_the_umask(tmp_path: Path) -> None:
    """After register --chain and a backup-start that stopped the holder, with umask 0."""
    node = seed_node(tmp_path)
    old_hook = install_script(node.root, "/usr/local/bin/old-hook", tmp_path / "ran")
    conf = node.root / "etc/vzdump.conf"
    conf.write_text("# admin's settings\nscript: /usr/local/bin/old-hook\n")
    conf.chmod(0o644)
    saved = os.umask(0)
    try:
        registered = run_cli(node, "register", "--chain")
        result = run_hook(node, "backup-start", "stop", "102")
    finally:
        os.umask(saved)
    assert registered.returncode == 0, registered.stderr
    assert result.returncode == 0, result.stderr
    assert 104 not in node.running_guests()
    state_dir = node.root / paths.STATE_DIR
    assert mode_of(state_dir) == 0o700 and state_dir.stat().st_uid == 0
    assert sorted(os.listdir(state_dir)) == ["chain", "job.json", "registration.json", "state.json"]
    for path in [*state_dir.iterdir(), node.root / paths.LOCK_FILE, node.root / paths.LOG_FILE]:
        assert (path.name, mode_of(path), path.stat().st_uid) == (path.name, 0o600, 0)
    assert mode_of(conf) == 0o644  # the admin's file keeps its own mode
    assert mode_of(old_hook) == 0o755


# ---- VMIDs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> FakeNode:
    """The seed's node, for tests that must leave it as they found it."""
    return seed_node(tmp_path_factory.mktemp("shared"))


def log_size(node: FakeNode) -> int:
    path = node.root / paths.LOG_FILE
    return path.stat().st_size if path.exists() else 0


def logged_since(node: FakeNode, size: int) -> str:
    return (node.root / paths.LOG_FILE).read_bytes()[size:].decode("utf-8")


@pytest.mark.parametrize("phase", hook.GUEST_PHASES)
@pytest.mark.parametrize("vmid", BAD_VMIDS)
def test_hook_refuses_bad_vmids_in_every_guest_phase(
    shared_node: FakeNode,
    at_root: Callable[[Path], None],
    capsys: pytest.CaptureFixture[str],
    vmid: str,
    phase: str,
) -> None:
    at_root(shared_node.root)
    size = log_size(shared_node)
    code = hook.main([phase, "stop", vmid])
    out, err = capsys.readouterr()
    assert code == (0 if phase in hook.NEVER_FAIL else 2)  # pre-restart: vzdump must restart
    assert (out, err) == ("", f"pve-gpu-hook: invalid VMID {vmid!r}\n")
    logged = logged_since(shared_node, size)
    assert len(logged.splitlines()) == 1 and "invalid VMID" in logged
    assert commands(shared_node) == [] and not (shared_node.root / paths.STATE_DIR).exists()


@pytest.mark.parametrize("vmid", BAD_VMIDS)
def test_hook_subprocess_refuses_bad_vmids(shared_node: FakeNode, vmid: str) -> None:
    """As vzdump calls it (emptied environment): one task-log line, exit 2, nothing run."""
    result = run_hook(shared_node, "backup-start", "stop", vmid)
    assert result.returncode == 2
    assert (result.stdout, result.stderr) == ("", f"pve-gpu-hook: invalid VMID {vmid!r}\n")
    assert commands(shared_node) == [] and shared_node.running_guests() == {104}


CLI_VMID_ARGV = {
    "recover": ["recover"],
    "recover --forget": ["recover", "--forget"],
    "dry-run": ["dry-run"],
    "scan": ["scan"],
}


@pytest.mark.parametrize("vmid", BAD_VMIDS)
@pytest.mark.parametrize("command", CLI_VMID_ARGV)
def test_cli_refuses_bad_vmids(
    shared_node: FakeNode,
    at_root: Callable[[Path], None],
    capsys: pytest.CaptureFixture[str],
    command: str,
    vmid: str,
) -> None:
    at_root(shared_node.root)
    with pytest.raises(SystemExit) as leaving:
        cli.main([*CLI_VMID_ARGV[command], vmid])
    out, err = capsys.readouterr()
    assert leaving.value.code == 2 and out == ""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [err.splitlines()[-1]]  # one error line, after argparse's usage
    assert f"invalid VMID {vmid!r}" in errors[0] and "Traceback" not in err
    assert commands(shared_node) == []


@pytest.mark.parametrize("vmid", [v for v in BAD_VMIDS if v.strip() not in ("", "102")])
def test_dry_run_refuses_bad_excluded_vmids(
    shared_node: FakeNode,
    at_root: Callable[[Path], None],
    capsys: pytest.CaptureFixture[str],
    vmid: str,
) -> None:
    at_root(shared_node.root)
    assert cli.main(["dry-run", "--all", "--exclude", f"105,{vmid}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pve-gpu-hook: --exclude: invalid VMID {vmid!r}\n"


def test_lock_wait_nan_is_refused_or_times_out(
    shared_node: FakeNode, at_root: Callable[[Path], None]
) -> None:
    """time.monotonic() >= nan is never true: '--wait nan' must not wait forever."""
    at_root(shared_node.root)
    store = StateStore()
    store.acquire(5, "a test holding the lock")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pvegpuhook", "recover", "--wait", "nan"],
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=3,
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("recover --wait nan still waits for the lock after 3 s")
    finally:
        store.release()
    assert result.returncode in (1, 2)


# ---- control characters -----------------------------------------------------------------------


def evil_node(root: Path) -> FakeNode:
    """Two GPUs: VM 104 (escape-laden name) holds one, CT 200 (escape-laden hostname) shares the
    other through the host driver; VM 103 has junk lines with escapes; 102/103 need the GPUs."""
    node = FakeNode(root)
    node.write_override(FAST)
    node.add_gpu("0000:01:00", group=14, functions=("0", "1"), nvidia_minor=0, drm=("renderD128",))
    node.add_gpu("0000:02:00", group=15, drm=("renderD129",))
    node.add_vm(104, name=EVIL_VM, hostpci=["02:00"], running=True)
    node.add_vm(103, "\x1b[2Jjunk: line\nname \x1b]0;t\x07\n", hostpci=["02:00", "\x1b[31m"])
    node.add_vm(102, name="plain", hostpci=["01:00"])
    node.add_ct(200, hostname=EVIL_CT, dev=["/dev/dri/renderD128"], running=True)
    return node


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> FakeNode:
    """The evil node after both backup-starts: VM 104 and CT 200 are off, with records."""
    node = evil_node(tmp_path_factory.mktemp("evil"))
    for vmid in ("102", "103"):
        result = run_hook(node, "backup-start", "stop", vmid)
        assert result.returncode == 0, result.stderr
    assert node.running_guests() == set() and len(records(node)) == 2
    return node


def test_escapes_never_reach_the_task_log_or_the_log_file(tmp_path: Path) -> None:
    """A whole job's hook calls: stop both holders, start them again, end the job."""
    node = evil_node(tmp_path)
    calls = [
        ("backup-start", "stop", "102"),
        ("backup-start", "stop", "103"),
        ("log-end", "stop", "102"),
        ("log-end", "stop", "103"),
        ("job-end",),
    ]
    said = ""
    for call in calls:
        result = run_hook(node, *call)
        assert result.returncode == 0, result.stderr
        said += result.stdout + result.stderr
    assert node.running_guests() == {104, 200}
    assert raw_controls(said) == []
    assert "VM 104 (\\x1b[31mevil\\x07) shut down" in said
    assert "CT 200 (\\x1b]0;pwn\\x07ct) started again" in said
    assert "103.conf:1: cannot parse '\\x1b[2Jjunk: line'" in said
    log = (node.root / paths.LOG_FILE).read_text()
    assert raw_controls(log) == []
    assert log.count("\\x1b[31mevil\\x07") >= 2


VIEWS = {
    "scan": ["scan"],
    "scan 104": ["scan", "104"],
    "scan 200": ["scan", "200"],
    "scan --cluster": ["scan", "--cluster"],
    "status": ["status"],
    "dry-run --all": ["dry-run", "--all", "--mode", "stop"],
    "dry-run 103 104": ["dry-run", "103", "104"],
}
CLI_OUTPUTS = [
    pytest.param([*argv, "--output-format", fmt], id=f"{name}-{fmt}")
    for name, argv in VIEWS.items()
    for fmt in ("text", "json", "json-pretty", "yaml")
]
CLI_OUTPUTS += [
    pytest.param(["recover", "--dry-run"], id="recover-dry-run"),
    pytest.param(["recover", "--dry-run", "104"], id="recover-dry-run-104"),
]


@pytest.mark.parametrize("tty", [False, True], ids=["piped", "terminal"])
@pytest.mark.parametrize("argv", CLI_OUTPUTS)
def test_escapes_never_reach_the_cli_output_raw(
    evil: FakeNode,
    at_root: Callable[[Path], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    tty: bool,
) -> None:
    at_root(evil.root)
    monkeypatch.setattr(output, "_isatty", lambda: tty)  # the rich tables, if rich is there
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    assert raw_controls(out + err) == []
    assert "evil" in out or "pwn" in out  # the names are shown, escaped
    assert commands(evil, "start") == []


@pytest.mark.parametrize(
    ("argv", "setup"),
    [
        pytest.param(
            ["register"],
            "script: /usr/local/bin/\x1b[31mold\x07\n",
            id="register-names-the-other-hook",
        ),
        pytest.param(["status"], "script: /usr/local/bin/\x1b[31mold\x07\n", id="status"),
    ],
)
def test_cli_error_lines_escape_what_they_quote(
    tmp_path: Path,
    at_root: Callable[[Path], None],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    setup: str,
) -> None:
    node = FakeNode(tmp_path)
    (node.root / "etc/vzdump.conf").write_text(setup)
    at_root(node.root)
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert raw_controls(out + err) == [] and "old" in out + err


def test_control_characters_in_the_phase_never_reach_the_log_file(tmp_path: Path) -> None:
    """An unknown phase (argv[0]) with ESC or a newline must not forge a log line."""
    node = seed_node(tmp_path)
    forged = "job-\x1b[31mx\x07\n2026-01-01T00:00:00+00:00 job-start - forged line"
    result = run_hook(node, forged)
    assert result.returncode == 0 and raw_controls(result.stdout + result.stderr) == []
    log = (node.root / paths.LOG_FILE).read_text()
    assert raw_controls(log) == [] and len(log.splitlines()) == 1


# ---- the chained hook -----------------------------------------------------------------------


def install_script(root: Path, host_path: str, marker: Path, mode: int = 0o755) -> Path:
    """A hook script at ``host_path`` under the root that appends its argv to ``marker``."""
    path = root / host_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n')
    path.chmod(mode)
    return path


def make_chain(root: Path, case: str, marker: Path) -> str:
    """Set up the chained hook of ``case``; returns the path as the chain file names it."""
    good = "/usr/local/bin/old-hook"
    if case in ("good", "relative"):
        install_script(root, good, marker)
        return good if case == "good" else good.lstrip("/")
    if case in ("group-writable", "world-writable", "not executable"):
        mode = {"group-writable": 0o775, "world-writable": 0o757, "not executable": 0o644}[case]
        install_script(root, good, marker, mode)
        return good
    if case == "not root-owned":
        os.chown(install_script(root, good, marker), NOBODY, NOBODY)
        return good
    if case == "symlink to a world-writable file":
        install_script(root, "/usr/local/lib/hooks/evil", marker, 0o777)
        (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
        (root / good.lstrip("/")).symlink_to("../lib/hooks/evil")
        return good
    if case in ("in a world-writable directory", "in a group-writable directory"):
        drop = root / "srv/drop"
        install_script(root, "/srv/drop/old-hook", marker)
        drop.chmod(0o777 if "world" in case else 0o775)
        return "/srv/drop/old-hook"
    if case == "symlink in a world-writable directory":
        install_script(root, good, marker)
        drop = root / "srv/drop"
        drop.mkdir(parents=True)
        drop.chmod(0o777)
        (drop / "old-hook").symlink_to("../../usr/local/bin/old-hook")
        return "/srv/drop/old-hook"
    if case == "a directory":
        (root / good.lstrip("/")).mkdir(parents=True)
        return good
    assert case == "missing"
    return good


CHAIN_CASES = [
    pytest.param("relative", "is not an absolute path"),
    pytest.param("group-writable", "is writable by group or others"),
    pytest.param("world-writable", "is writable by group or others"),
    pytest.param("not root-owned", f"is owned by uid {NOBODY}, not root"),
    pytest.param("symlink to a world-writable file", "is writable by group or others"),
    pytest.param("in a world-writable directory", "lies in /srv/drop, which others can write"),
    pytest.param("in a group-writable directory", "lies in /srv/drop, which others can write"),
    pytest.param("not executable", "is not executable"),
    pytest.param("missing", "cannot be read: No such file or directory"),
    pytest.param("a directory", "is not a regular file"),
    # the directories of the link itself count too: anyone can replace it, and the hook runs the
    # unresolved path (so even a check-then-swap race would win)
    pytest.param("symlink in a world-writable directory", "which others can write"),
    pytest.param("good", None),
]


@pytest.mark.parametrize(("case", "problem"), CHAIN_CASES)
def test_chain_problem(
    tmp_path: Path, at_root: Callable[[Path], None], case: str, problem: str | None
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    at_root(root)
    script = make_chain(root, case, tmp_path / "ran")
    found = registration.chain_problem(script)
    assert found == problem or (problem is not None and found is not None and problem in found)


def write_chain(root: Path, script: str) -> None:
    state_dir = root / paths.STATE_DIR
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state_dir / "chain").write_text(script + "\n")
    (state_dir / "chain").chmod(0o600)


def test_unregister_escapes_the_chained_hook_it_forgets(
    tmp_path: Path, at_root: Callable[[Path], None], capsys: pytest.CaptureFixture[str]
) -> None:
    node = FakeNode(tmp_path)
    script = "/usr/local/bin/\x1b[31mold\x07"
    (node.root / "etc/vzdump.conf").write_text(f"script: {script}\n")  # our block taken out
    write_chain(node.root, script)
    at_root(node.root)
    assert cli.main(["unregister"]) == 0
    out, err = capsys.readouterr()
    assert raw_controls(out + err) == [] and "old" in out


@pytest.mark.parametrize(("case", "problem"), CHAIN_CASES)
def test_hook_refuses_and_never_runs_a_bad_chained_hook(
    tmp_path: Path, case: str, problem: str | None
) -> None:
    node = FakeNode(tmp_path / "root")
    marker = tmp_path / "ran"
    script = make_chain(node.root, case, marker)
    write_chain(node.root, script)
    result = run_hook(node, "job-start")
    if problem is None:
        assert result.returncode == 0, result.stderr
        assert marker.read_text() == "job-start\n"  # same argv as ours
        return
    assert result.returncode == 1
    assert not marker.exists()
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"pve-gpu-hook: chained hook {script} ") and problem in line
    assert line.endswith(": not run")


@pytest.mark.parametrize("phase", hook.NEVER_FAIL)
def test_refused_chain_never_fails_a_never_fail_phase(tmp_path: Path, phase: str) -> None:
    """In pre-restart vzdump would not restart the guest it stopped (docs/pve-facts.md §1)."""
    node = FakeNode(tmp_path / "root")
    marker = tmp_path / "ran"
    write_chain(node.root, make_chain(node.root, "world-writable", marker))
    args = [phase] if phase in hook.JOB_PHASES else [phase, "stop", "104"]
    result = run_hook(node, *args)
    assert not marker.exists() and "not run" in result.stderr
    assert result.returncode == 0


# ---- no shell: how commands are built -------------------------------------------------------

SOURCES = sorted((REPO / "pvegpuhook").rglob("*.py"))
SHELL_CALLS = {
    "os.system",
    "os.popen",
    "subprocess.getoutput",
    "subprocess.getstatusoutput",
    "pty.spawn",
    "asyncio.create_subprocess_shell",
    "platform.popen",
}
RUNNERS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call"}
RUNNERS |= {"subprocess.check_output"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def trees() -> dict[str, ast.Module]:
    assert SOURCES, "no library source found"
    return {
        str(p.relative_to(REPO / "pvegpuhook")): ast.parse(p.read_text(), str(p)) for p in SOURCES
    }


def calls_in(tree: ast.AST) -> Iterator[ast.Call]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def test_no_command_goes_through_a_shell() -> None:
    offences = []
    for name, tree in trees().items():
        for call in calls_in(tree):
            called = dotted(call.func)
            if called in SHELL_CALLS or called.startswith(
                ("os.exec", "os.spawn", "os.posix_spawn")
            ):
                offences.append(f"{name}:{call.lineno}: {called}")
            for keyword in call.keywords:
                if keyword.arg == "shell" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    offences.append(f"{name}:{call.lineno}: shell=")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "pty"):
                offences += [
                    f"{name}:{node.lineno}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name in ("system", "popen", "getoutput", "getstatusoutput", "spawn")
                ]
    assert offences == []


def test_every_subprocess_call_takes_a_list_argv() -> None:
    checked = []
    for name, tree in trees().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            annotations = {
                a.arg: ast.unparse(a.annotation) if a.annotation else None
                for a in function.args.args + function.args.kwonlyargs
            }
            for call in calls_in(function):
                if dotted(call.func) not in RUNNERS:
                    continue
                argv = call.args[0] if call.args else None
                listed = isinstance(argv, ast.List) or (
                    isinstance(argv, ast.Name) and annotations.get(argv.id) == "list[str]"
                )
                assert listed, (
                    f"{name}:{call.lineno}: argv is {ast.unparse(argv) if argv else None}"
                )
                checked.append(f"{name}:{function.name}")
    assert sorted(set(checked)) == ["act.py:run", "act.py:run_chained", "act.py:spawn_detached"]


def test_only_act_imports_subprocess() -> None:
    importers = set()
    for name, tree in trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "subprocess" for a in node.names):
                importers.add(name)
            if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
                importers.add(name)
            if isinstance(node, ast.Constant) and node.value == "subprocess":
                importers.add(name)  # importlib.import_module("subprocess") and the like
    assert importers == {"act.py"}


def test_commands_are_absolute_paths_under_the_root(
    tmp_path: Path,
    at_root: Callable[[Path], None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A whole job in-process with every process start watched: VM and CT holders stopped and
    started, each qm/pct in its own session (out of reach of a signal to the task's group)."""
    node = evil_node(tmp_path)
    at_root(node.root)
    seen: list[tuple[object, dict[str, object]]] = []
    real_popen = subprocess.Popen

    def watching(argv: object, *args: object, **kwargs: object) -> object:
        seen.append((argv, kwargs))
        return real_popen(argv, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", watching)
    for call in (["backup-start", "stop", "102"], ["backup-start", "stop", "103"]):
        assert hook.main(call) == 0
    assert node.running_guests() == set()
    for call in (["log-end", "stop", "102"], ["log-end", "stop", "103"], ["job-end"]):
        assert hook.main(call) == 0
    assert node.running_guests() == {104, 200}
    capsys.readouterr()
    tools = {str(node.root / paths.QM), str(node.root / paths.PCT)}
    assert seen
    for argv, kwargs in seen:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        assert argv[0] in tools and os.path.isabs(argv[0])
        assert "shell" not in kwargs and kwargs["env"] == act.COMMAND_ENV
        assert kwargs["start_new_session"] is True
    assert {os.path.basename(str(argv[0])) for argv, _ in seen} == {"qm", "pct"}
    assert {c["argv"][0] for c in node.calls()} == {"qm", "pct"}
    monkeypatch.delenv("PVE_GPU_HOOK_ROOT")  # the real host: /usr/sbin, never a PATH lookup
    assert (act.tool("qemu"), act.tool("lxc")) == ("/usr/sbin/qm", "/usr/sbin/pct")
