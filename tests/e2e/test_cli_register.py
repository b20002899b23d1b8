"""``pve-gpu-hook register [--chain]`` / ``unregister`` on real-world ``/etc/vzdump.conf`` files.

The promise to the admin: register adds one marked block and touches nothing else; unregister
gives back the file byte for byte; another hook is never switched off silently.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvegpuhook import cli, files, registration, vzdumpconf
from pvegpuhook.errors import GpuHookError
from pvegpuhook.state import StateStore
from pvegpuhook.vzdumpconf import BEGIN_MARK, END_MARK, HOOK_PATH, SCRIPT_LINE
from tests.fronts import run_main

# /etc/vzdump.conf as pve-manager ships it (every setting commented out).
STOCK = (
    b"# vzdump default settings\n"
    b"\n"
    b"#tmpdir: DIR\n"
    b"#dumpdir: DIR\n"
    b"#storage: STORAGE_ID\n"
    b"#mode: snapshot|suspend|stop\n"
    b"#bwlimit: KBPS\n"
    b"#performance: [max-workers=N][,pbs-entries-max=N]\n"
    b"#ionice: PRI\n"
    b"#lockwait: MINUTES\n"
    b"#stopwait: MINUTES\n"
    b"#stdexcludes: BOOLEAN\n"
    b"#mailto: ADDRESSLIST\n"
    b"#prune-backups: keep-INTERVAL=N[,...]\n"
    b"#script: FILENAME\n"
    b"#exclude-path: PATHLIST\n"
    b"#pigz: N\n"
    b"#notes-template: {{guestname}}\n"
    b"#pbs-change-detection-mode: legacy|data|metadata\n"
    b"#fleecing: enabled=BOOLEAN,storage=STORAGE_ID\n"
)

VARIANTS: dict[str, bytes] = {
    "empty": b"",
    "stock": STOCK,
    "stock-crlf": STOCK.replace(b"\n", b"\r\n"),
    "stock-no-final-newline": STOCK.rstrip(b"\n"),
    "commented-script": b"# my settings\n#script: /usr/local/bin/old-hook\nbwlimit: 50000\n",
    "no-final-newline": b"bwlimit: 1000\nionice: 7",
    "crlf-no-final-newline": b"bwlimit: 1000\r\nionice: 7",
    "blank-lines-only": b"\n\n\n",
    "indented-and-tabs": b"  tmpdir: /var/tmp\n\tmode:\tsnapshot \nmailto: root@localhost\t\n",
    "empty-script-value": b"script:\nmode: stop\n",
    "not-utf8": b"# caf\xe9 cr\xe8me\nmailto: r\xf6ot@example.com\n",
    "trailing-blank-lines": b"mode: snapshot\n\n\n",
    "only-cr": b"mode: snapshot\r",
}
OTHER_HOOK = "/usr/local/bin/old-hook"


@pytest.fixture
def root(host_root: Path) -> Path:
    """A PVE host with the package's hook installed, not registered."""
    (host_root / "etc/pve").mkdir(parents=True)
    install(host_root, HOOK_PATH)
    return host_root


def install(root: Path, path: str, mode: int = 0o755, uid: int = 0) -> Path:
    """An executable script at host path ``path`` under the root."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\nexit 0\n")
    target.chmod(mode)
    os.chown(target, uid, 0)
    return target


def conf(root: Path) -> Path:
    return root / "etc/vzdump.conf"


def active(root: Path) -> str | None:
    setting = vzdumpconf.active_script(conf(root).read_bytes().decode("utf-8", "surrogateescape"))
    return setting.value if setting else None


def state_files(root: Path) -> set[str]:
    directory = root / "var/lib/pve-gpu-hook"
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def leftovers_in_etc(root: Path) -> list[str]:
    return [p.name for p in (root / "etc").iterdir() if p.name.startswith(".")]


# ---- every variant: register, register again, unregister, unregister again -------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_register_then_unregister_is_byte_identical(
    root: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    original = VARIANTS[name]
    conf(root).write_bytes(original)
    conf(root).chmod(0o640)
    os.chown(conf(root), 0, 4)

    code, out, err = run_main(capsys, "register")
    assert code == 0, err
    assert out.startswith("registered: /etc/vzdump.conf line ")
    assert active(root) == HOOK_PATH
    registered = conf(root).read_bytes()
    assert registered.startswith(original)  # nothing of the admin's changed
    info = conf(root).stat()
    assert stat.S_IMODE(info.st_mode) == 0o640 and (info.st_uid, info.st_gid) == (0, 4)
    assert leftovers_in_etc(root) == []  # the temp file was renamed, not left behind
    assert "registration.json" in state_files(root)

    code, out, _ = run_main(capsys, "register")  # idempotent
    assert code == 0 and out.startswith("already registered: line ")
    assert conf(root).read_bytes() == registered

    code, out, err = run_main(capsys, "unregister")
    assert code == 0, err
    assert "the file is as it was before register" in out
    assert conf(root).read_bytes() == original
    info = conf(root).stat()
    assert stat.S_IMODE(info.st_mode) == 0o640 and (info.st_uid, info.st_gid) == (0, 4)
    assert state_files(root) == set()

    code, out, _ = run_main(capsys, "unregister")  # idempotent
    assert code == 0 and out.startswith("not registered:")
    assert conf(root).read_bytes() == original


def test_block_is_exactly_the_three_lines_at_the_end(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    assert run_main(capsys, "register")[0] == 0
    assert conf(root).read_bytes() == STOCK + (
        f"{BEGIN_MARK}\n{SCRIPT_LINE}\n{END_MARK}\n".encode()
    )
    assert BEGIN_MARK == (
        "# pve-gpu-hook: begin (added by 'pve-gpu-hook register'; removed by 'unregister')"
    )
    assert SCRIPT_LINE == "script: /usr/share/pve-gpu-hook/vzdump-hook"


def test_crlf_file_gets_crlf_lines(root: Path, capsys) -> None:
    original = VARIANTS["stock-crlf"]
    conf(root).write_bytes(original)
    assert run_main(capsys, "register")[0] == 0
    added = conf(root).read_bytes()[len(original) :]
    assert added == f"{BEGIN_MARK}\r\n{SCRIPT_LINE}\r\n{END_MARK}\r\n".encode()


def test_missing_final_newline_is_added_before_the_block(root: Path, capsys) -> None:
    conf(root).write_bytes(b"bwlimit: 1000\nionice: 7")
    assert run_main(capsys, "register")[0] == 0
    text = conf(root).read_text()
    assert text.startswith("bwlimit: 1000\nionice: 7\n# pve-gpu-hook: begin")
    assert vzdumpconf.parse(text)[1].value == "7"  # the admin's last value is still intact
    assert run_main(capsys, "unregister")[0] == 0
    assert conf(root).read_bytes() == b"bwlimit: 1000\nionice: 7"


def test_commented_script_line_is_not_another_hook(root: Path, capsys) -> None:
    conf(root).write_bytes(b"#script: /usr/local/bin/old-hook\n  # script: /x\n")
    code, out, err = run_main(capsys, "register")
    assert code == 0 and "chain" not in out + err


def test_register_writes_a_log_line(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    run_main(capsys, "register")
    run_main(capsys, "unregister")
    log = (root / "var/log/pve-gpu-hook.log").read_text().splitlines()
    assert [line.split(" ")[1] for line in log] == ["register", "unregister"]


# ---- no file, symlinks, races, lock -----------------------------------------------------------


def test_no_vzdump_conf_is_not_a_pve_host(root: Path, capsys) -> None:
    code, _, err = run_main(capsys, "register")
    assert code == 1
    assert err.strip() == (
        "pve-gpu-hook: /etc/vzdump.conf does not exist: not a Proxmox VE host? nothing registered"
    )
    assert not conf(root).exists()
    assert state_files(root) == set()
    code, out, _ = run_main(capsys, "unregister")
    assert code == 0 and "does not exist" in out


def test_symlinked_vzdump_conf_is_refused(root: Path, capsys) -> None:
    real = root / "srv/vzdump.conf"
    real.parent.mkdir()
    real.write_bytes(STOCK)
    conf(root).symlink_to(real)
    code, _, err = run_main(capsys, "register")
    assert code == 1 and "is a symlink" in err and "refusing" in err
    assert real.read_bytes() == STOCK and conf(root).is_symlink()
    code, _, err = run_main(capsys, "unregister")
    assert code == 1 and "is a symlink" in err
    assert real.read_bytes() == STOCK and conf(root).is_symlink()


def test_a_change_made_while_we_edit_is_not_overwritten(root: Path) -> None:
    conf(root).write_bytes(STOCK)
    before = registration.read_conf()
    assert before is not None
    conf(root).write_bytes(STOCK + b"mode: stop\n")  # the admin saves in an editor meanwhile
    with pytest.raises(GpuHookError, match="changed while"):
        registration._write_conf(before, vzdumpconf.add_block(before.text)[0])
    assert conf(root).read_bytes() == STOCK + b"mode: stop\n"


def test_register_waits_for_the_lock(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    other = StateStore()
    other.acquire(1, "a backup job")
    try:
        code, _, err = run_main(capsys, "register", "--wait", "0.2")
    finally:
        other.release()
    assert code == 1 and "a backup job" in err
    assert conf(root).read_bytes() == STOCK


# ---- another hook: refuse, --chain ------------------------------------------------------------

FOREIGN = b"# vzdump default settings\n\nscript: /usr/local/bin/old-hook\nmailto: root\n"


def test_another_active_hook_is_refused_with_an_explanation(root: Path, capsys) -> None:
    install(root, OTHER_HOOK)
    conf(root).write_bytes(FOREIGN)
    code, out, err = run_main(capsys, "register")
    assert code == 1 and out == ""
    assert "line 3 already sets another hook script: '/usr/local/bin/old-hook'" in err
    assert "register --chain" in err and "Nothing changed" in err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
    assert conf(root).read_bytes() == FOREIGN
    assert state_files(root) == set()


@pytest.mark.parametrize(
    "original",
    [
        FOREIGN,
        FOREIGN.replace(b"\n", b"\r\n"),
        FOREIGN.rstrip(b"\n"),
        b"  script:/usr/local/bin/old-hook",
    ],
    ids=["lf", "crlf", "no-final-newline", "indented-no-space"],
)
def test_chain_keeps_the_other_hook_and_unregister_restores_it(
    root: Path, capsys: pytest.CaptureFixture[str], original: bytes
) -> None:
    install(root, OTHER_HOOK)
    conf(root).write_bytes(original)
    code, out, err = run_main(capsys, "register", "--chain")
    assert code == 0, err
    assert "'/usr/local/bin/old-hook'" in out and "chained" in out
    assert conf(root).read_bytes().startswith(original)  # the admin's line is left as it was
    assert active(root) == HOOK_PATH
    assert registration.chain() == OTHER_HOOK

    code, out, _ = run_main(capsys, "register", "--chain")
    assert code == 0 and "already registered" in out and OTHER_HOOK in out

    code, out, _ = run_main(capsys, "unregister")
    assert code == 0
    assert "vzdump's hook script is '/usr/local/bin/old-hook' again" in out
    assert conf(root).read_bytes() == original
    assert registration.chain() is None
    assert active(root) == OTHER_HOOK


@pytest.mark.parametrize(
    ("script", "setup", "problem"),
    [
        ("/usr/local/bin/old-hook", {"mode": 0o775}, "writable by group or others"),
        ("/usr/local/bin/old-hook", {"mode": 0o757}, "writable by group or others"),
        ("/usr/local/bin/old-hook", {"uid": 1000}, "owned by uid 1000, not root"),
        ("/usr/local/bin/old-hook", {"mode": 0o644}, "is not executable"),
        ("/usr/local/bin/missing", None, "cannot be read"),
        ("old-hook", None, "is not an absolute path"),
    ],
)
def test_chain_refuses_a_script_failing_the_checks(
    root: Path, capsys: pytest.CaptureFixture[str], script: str, setup: dict | None, problem: str
) -> None:
    if setup is not None:
        install(root, script, **setup)
    original = f"script: {script}\n".encode()
    conf(root).write_bytes(original)
    code, _, err = run_main(capsys, "register", "--chain")
    assert code == 1
    assert f"cannot chain the hook script '{script}'" in err and problem in err
    assert conf(root).read_bytes() == original
    assert registration.chain() is None


def test_chain_without_another_hook_just_registers(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    code, out, _ = run_main(capsys, "register", "--chain")
    assert code == 0 and "nothing to chain" in out
    assert registration.chain() is None
    assert run_main(capsys, "unregister")[0] == 0
    assert conf(root).read_bytes() == STOCK


def test_later_foreign_hook_shadowing_ours_can_be_chained(root: Path, capsys) -> None:
    install(root, OTHER_HOOK)
    conf(root).write_bytes(STOCK)
    run_main(capsys, "register")
    with conf(root).open("ab") as f:  # an admin (or another package) appends its own hook
        f.write(b"script: /usr/local/bin/old-hook\n")
    code, _, err = run_main(capsys, "register")
    assert code == 1 and "old-hook" in err
    code, out, _ = run_main(capsys, "register", "--chain")
    assert code == 0 and "no longer active was removed" in out
    text = conf(root).read_text()
    assert text.count(BEGIN_MARK) == 1 and active(root) == HOOK_PATH
    assert run_main(capsys, "unregister")[0] == 0
    assert conf(root).read_bytes() == STOCK + b"script: /usr/local/bin/old-hook\n"


# ---- edits by the admin after register ----------------------------------------------------------


def test_lines_added_after_the_block_are_kept(root: Path, capsys) -> None:
    conf(root).write_bytes(b"bwlimit: 1000\nionice: 7")  # no final newline: register adds one
    run_main(capsys, "register")
    with conf(root).open("ab") as f:
        f.write(b"mailto: admin@example.com\n")
    code, out, err = run_main(capsys, "unregister")
    assert code == 0 and "as it was before" not in out and err == ""
    assert conf(root).read_bytes() == b"bwlimit: 1000\nionice: 7\nmailto: admin@example.com\n"


def test_lines_added_inside_the_block_are_kept_and_named(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    run_main(capsys, "register")
    text = conf(root).read_text().replace(END_MARK, "# keep: ask Bob\nmode: stop\n" + END_MARK)
    conf(root).write_text(text)
    code, _, err = run_main(capsys, "unregister")
    assert code == 0
    assert "kept 2 line(s)" in err and "# keep: ask Bob | mode: stop" in err
    assert conf(root).read_bytes() == STOCK + b"# keep: ask Bob\nmode: stop\n"


def test_unregister_without_the_record_removes_only_our_lines(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    run_main(capsys, "register")
    (root / "var/lib/pve-gpu-hook/registration.json").unlink()
    assert run_main(capsys, "unregister")[0] == 0
    assert conf(root).read_bytes() == STOCK


def test_hand_written_line_for_our_hook_is_not_removed(root: Path, capsys) -> None:
    original = STOCK + f"script: {HOOK_PATH}\n".encode()
    conf(root).write_bytes(original)
    code, out, _ = run_main(capsys, "register")
    assert code == 0 and "already registered: line 21" in out
    code, _, err = run_main(capsys, "unregister")
    assert code == 1 and "not added by register" in err and "left in place" in err
    assert conf(root).read_bytes() == original


# ---- jobs.cfg: jobs with their own script bypass the hook ---------------------------------------

JOBS = """\
vzdump: backup-1a2b3c4d-0001
\tschedule 21:00
\tall 1
\tenabled 1
\tmode snapshot
\tscript /usr/local/bin/job-hook
\tstorage local

vzdump: backup-1a2b3c4d-0002
\tschedule sat 02:00
\tvmid 102,103
\tmode stop
\tstorage pbs

vzdump: backup-1a2b3c4d-0003
\tschedule mon 03:00
\tenabled 0
\tscript /root/hook.sh
\tvmid 105

vzdump: backup-1a2b3c4d-0004
\tschedule daily
\tscript /usr/share/pve-gpu-hook/vzdump-hook
\tvmid 106

realm-sync: sync-ldap
\tschedule daily
\tscript /not/a/backup/job
"""


def test_jobs_with_their_own_script_are_named(root: Path, capsys) -> None:
    conf(root).write_bytes(STOCK)
    (root / "etc/pve/jobs.cfg").write_text(JOBS)
    code, _, err = run_main(capsys, "register")
    assert code == 0
    assert "backup-1a2b3c4d-0001 (script /usr/local/bin/job-hook)" in err
    assert "backup-1a2b3c4d-0003 (script /root/hook.sh, disabled)" in err
    assert "0002" not in err and "0004" not in err and "sync-ldap" not in err
    code, _, err = run_main(capsys, "unregister")
    assert code == 0 and "backup-1a2b3c4d-0001" in err


def test_parse_jobs() -> None:
    jobs = vzdumpconf.parse_jobs(JOBS.replace("\n", "\r\n"))
    assert [(j.id, j.script, j.enabled) for j in jobs] == [
        ("backup-1a2b3c4d-0001", "/usr/local/bin/job-hook", True),
        ("backup-1a2b3c4d-0003", "/root/hook.sh", False),
    ]
    assert vzdumpconf.parse_jobs("") == []
    assert vzdumpconf.parse_jobs("# comment\nvzdump: x\n\tscript\n") == []


# ---- the parser agrees with PVE's ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("script: /a\nscript: /b\n", ("/b", 2)),  # the last one wins
        ("script: /a\nscript:\n", None),  # set empty: no hook
        ("#script: /a\n", None),
        ("   #script: /a\n", None),
        ("  script: /a  \r\n", ("/a", 1)),
        ("\tscript:\t/a", ("/a", 1)),
        ("script:/a\n", ("/a", 1)),
        ("script : /a\n", None),  # PVE ignores this line (no `key:`)
        ("scripts: /a\n", None),
        ("x\nscript: /a b\n", ("/a b", 2)),
        ("script: /a\fmode: stop\n", ("/a\fmode: stop", 1)),  # only \n ends a line, as in Perl
    ],
)
def test_active_script_like_pve(text: str, expected: tuple[str, int] | None) -> None:
    setting = vzdumpconf.active_script(text)
    assert (None if setting is None else (setting.value, setting.line)) == expected


# ---- property: any plausible file without another hook round-trips -----------------------------

KEYS = ["tmpdir", "dumpdir", "storage", "mode", "bwlimit", "ionice", "mailto", "pigz", "script"]
comment = st.builds(
    lambda k, v: f"#{k}: {v}", st.sampled_from(KEYS), st.text("abc/ |=", max_size=8)
)
setting_line = st.builds(
    lambda ws, k, v: f"{ws}{k}:{v}",
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from([k for k in KEYS if k != "script"]),
    st.text("abc/ 01,=\t", max_size=10),
)
line = st.one_of(
    comment,
    setting_line,
    st.just(""),
    st.sampled_from([" ", "\t", "#", "# vzdump default settings", "script:", "junk line"]),
    st.text(
        st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=12
    ).filter(lambda s: not s.strip(" \t\f\v").startswith("script:")),
)


@st.composite
def vzdump_conf_text(draw: st.DrawFn) -> str:
    """Plausible vzdump.conf text: LF or CRLF (mixed too), with or without a final newline."""
    lines = draw(st.lists(line, max_size=12))
    ends = [draw(st.sampled_from(["\n", "\r\n"])) for _ in lines]
    if lines and not draw(st.booleans()):
        ends[-1] = ""
    return "".join(text + end for text, end in zip(lines, ends, strict=True))


@settings(max_examples=500, deadline=None)
@given(vzdump_conf_text())
def test_property_text_round_trip(text: str) -> None:
    assert vzdumpconf.active_script(text) is None
    new, added = vzdumpconf.add_block(text)
    assert new.startswith(text)
    assert vzdumpconf.active_script(new).value == HOOK_PATH  # type: ignore[union-attr]
    assert vzdumpconf.remove_block(new, added) == (text, [])
    if text.endswith("\n") or not text:
        # without the record (lost state dir), line-wise removal gives the same bytes
        assert vzdumpconf.remove_block(new, None) == (text, [])


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=vzdump_conf_text())
def test_property_cli_round_trip(capsys: pytest.CaptureFixture[str], text: str) -> None:
    original = text.encode("utf-8", "surrogateescape")
    saved = os.environ.get("PVE_GPU_HOOK_ROOT")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["PVE_GPU_HOOK_ROOT"] = directory
        try:
            (Path(directory) / "etc").mkdir()
            conf(Path(directory)).write_bytes(original)
            assert cli.main(["register"]) == 0
            assert cli.main(["register"]) == 0
            assert cli.main(["unregister"]) == 0
            assert conf(Path(directory)).read_bytes() == original
        finally:
            if saved is None:
                del os.environ["PVE_GPU_HOOK_ROOT"]
            else:
                os.environ["PVE_GPU_HOOK_ROOT"] = saved
    capsys.readouterr()


def test_register_warns_when_the_hook_file_is_missing(root: Path, capsys) -> None:
    (root / HOOK_PATH.lstrip("/")).unlink()
    conf(root).write_bytes(STOCK)
    code, _, err = run_main(capsys, "register")
    assert code == 0 and "missing or not executable" in err


def test_failed_write_leaves_file_and_records_unchanged(
    root: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(root, OTHER_HOOK)
    conf(root).write_bytes(FOREIGN)

    real_write = files.write_atomic

    def full_disk(path: str, data: bytes, **kwargs: object) -> None:
        if path.endswith("vzdump.conf"):
            raise OSError(28, "No space left on device")
        real_write(path, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "write_atomic", full_disk)
    code, _, err = run_main(capsys, "register", "--chain")
    assert code == 1 and "cannot write /etc/vzdump.conf: No space left on device" in err
    assert conf(root).read_bytes() == FOREIGN
    assert registration.chain() is None and registration.load_added() is None
