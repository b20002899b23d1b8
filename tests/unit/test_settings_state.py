"""Unit tests of the override file, the state store and the log."""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest

from pvegpuhook import files, registration
from pvegpuhook import log as logmod
from pvegpuhook.errors import EXIT_USAGE, ConfigError, LockTimeout, StateError
from pvegpuhook.model import GuestKind
from pvegpuhook.records import Record, RecordStatus
from pvegpuhook.settings import Settings, load_settings, parse_settings
from pvegpuhook.state import StateStore


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --------------------------------------------------------------------------------------------
# settings

TEMPLATE = """\
# /etc/pve-gpu-hook/config.yaml — overrides for pve-gpu-hook (every key is optional)
---
# shutdown_timeout: 180   # s to wait for a holder's graceful shutdown
# force_stop: false       # after that, hard-stop it instead of failing the backup
# start_timeout: 120      # s to wait for a restarted guest to be confirmed running
#protect: []              # VMIDs never stopped to free a GPU
    # restart: after-guest  # after-guest or after-job
...
"""

DEFAULTS = {
    "shutdown_timeout": 180,
    "force_stop": False,
    "start_timeout": 0,  # no wait beyond what PVE allows for the guest
    "shutdown_watch": 1800,
    "protect": [],
    "metrics_file": "/var/lib/prometheus/node-exporter/pve-gpu-hook.prom",
    "restart": "job-aware",
    "keep_down_max": 1800,
}


def write_override(root: Path, text: str | bytes) -> Path:
    path = root / "etc/pve-gpu-hook/config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def config_error(text: str, path: str = "/etc/pve-gpu-hook/config.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, path)
    return info.value


def test_defaults_when_absent(host_root: Path) -> None:
    settings = load_settings()
    assert settings.as_dict() == DEFAULTS
    assert settings.source is None
    assert load_settings(str(host_root / "nope.yaml")).as_dict() == DEFAULTS
    assert Settings().as_dict() == DEFAULTS


@pytest.mark.parametrize("text", [TEMPLATE, "", "\n\n", "---\n", "# only\n# comments\n"])
def test_commented_file_gives_defaults_without_yaml(
    host_root: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # any `import yaml` now fails
    path = write_override(host_root, text)
    settings = load_settings()
    assert settings.as_dict() == DEFAULTS
    assert settings.source == str(path)


def test_yaml_comment_only_document_parses_to_defaults() -> None:
    assert parse_settings("# nothing\n", "/x").as_dict() == DEFAULTS


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("shutdown_timeout: 30", "shutdown_timeout", 30),
        ("shutdown_timeout: 1", "shutdown_timeout", 1),
        ("shutdown_timeout: 86400", "shutdown_timeout", 86400),
        ("start_timeout: 5", "start_timeout", 5),
        ("start_timeout: 0", "start_timeout", 0),
        ("start_timeout: 600", "start_timeout", 600),
        ("shutdown_watch: 0", "shutdown_watch", 0),
        ("shutdown_watch: 600", "shutdown_watch", 600),
        ("force_stop: true", "force_stop", True),
        ("force_stop: false", "force_stop", False),
        # PVE's boolean words, read the same whether YAML takes them for booleans or strings
        ("force_stop: yes", "force_stop", True),
        ('force_stop: "yes"', "force_stop", True),
        ("force_stop: 'On'", "force_stop", True),
        ("force_stop: 1", "force_stop", True),
        ('force_stop: "no"', "force_stop", False),
        ("force_stop: off", "force_stop", False),
        ("force_stop: 0", "force_stop", False),
        ("protect: [104, 105]", "protect", [104, 105]),
        ("protect:\n  - 105\n  - 104\n  - 104", "protect", [104, 105]),
        ("protect: []", "protect", []),
        ("protect:", "protect", []),
        ("restart: after-job", "restart", "after-job"),
        ("restart: after-guest", "restart", "after-guest"),
        ("restore: after-job", "restart", "after-job"),  # the old name, still read
        ("metrics_file: /srv/textfiles/gpu.prom", "metrics_file", "/srv/textfiles/gpu.prom"),
        ("metrics_file: false", "metrics_file", False),
        ("metrics_file: off", "metrics_file", False),  # YAML 1.1: off is false
        ("metrics_file:", "metrics_file", False),
        ('metrics_file: ""', "metrics_file", False),
    ],
)
def test_each_key(host_root: Path, text: str, key: str, value: object) -> None:
    write_override(host_root, f"# override\n{text}\n")
    assert load_settings().as_dict() == {**DEFAULTS, key: value}


def test_all_keys_together(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "---\nshutdown_timeout: 20  # short\nforce_stop: true\nstart_timeout: 10\n"
        "protect: [101]\nrestart: after-job\nmetrics_file: /run/m.prom\n"
    )
    settings = load_settings(str(path))
    assert settings.as_dict() == {
        "shutdown_timeout": 20,
        "force_stop": True,
        "start_timeout": 10,
        "shutdown_watch": 1800,
        "protect": [101],
        "restart": "after-job",
        "metrics_file": "/run/m.prom",
        "keep_down_max": 1800,
    }
    assert settings.protect == frozenset({101})
    assert settings.source == str(path)


def test_unknown_key_names_file_line_and_key(host_root: Path) -> None:
    path = write_override(host_root, "# colours\nshutdown_timeout: 10\ncolour: red\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{path}:3: ")
    assert "colour" in str(info.value)
    assert info.value.exit_code == EXIT_USAGE == 2
    assert info.value.line == 3
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ('shutdown_timeout: "180"', 2, "shutdown_timeout"),
        ("shutdown_timeout: 180s", 2, "shutdown_timeout"),
        ("shutdown_timeout: true", 2, "shutdown_timeout"),
        ("shutdown_timeout: 0", 2, "shutdown_timeout"),
        ("shutdown_timeout: -5", 2, "shutdown_timeout"),
        ("shutdown_timeout: 86401", 2, "shutdown_timeout"),
        ("shutdown_timeout: 1.5", 2, "shutdown_timeout"),
        ("shutdown_timeout:", 2, "shutdown_timeout"),
        ("start_timeout: false", 2, "start_timeout"),
        ("start_timeout: -1", 2, "start_timeout"),
        ("start_timeout: 86401", 2, "start_timeout"),
        ("shutdown_watch: -1", 2, "shutdown_watch"),
        ("shutdown_watch: 30m", 2, "shutdown_watch"),
        ("start_timeout: [1]", 2, "start_timeout"),
        ('force_stop: "maybe"', 2, "force_stop"),
        ("force_stop: 2", 2, "force_stop"),
        ("force_stop: [yes]", 2, "force_stop"),
        ("force_stop:", 2, "force_stop"),
        ("protect: 104", 2, "protect"),
        ("protect: {104: x}", 2, "protect"),
        ("protect: [abc]", 2, "protect"),
        ("protect: [99]", 2, "protect"),
        ("protect: [104, true]", 2, "protect"),
        ("protect: ['104']", 2, "protect"),
        ("restart: sometimes", 2, "restart"),
        ("restart: true", 2, "restart"),
        ("restart: [after-job]", 2, "restart"),
        ("restore: sometimes", 2, "restart"),
        ("metrics_file: true", 2, "metrics_file"),
        ("metrics_file: gpu.prom", 2, "metrics_file"),  # relative: to what?
        ("metrics_file: /var/lib/prometheus/node-exporter/gpu.txt", 2, "metrics_file"),
        ("metrics_file: [/a.prom]", 2, "metrics_file"),
        ("metrics_file: 5", 2, "metrics_file"),
    ],
)
def test_wrong_type_names_key_and_line(text: str, line: int, key: str) -> None:
    error = config_error(f"# override\n{text}\n")
    assert str(error).startswith(f"/etc/pve-gpu-hook/config.yaml:{line}: {key}")
    assert "given twice" not in str(error)
    assert error.exit_code == 2


def test_wrong_type_line_of_a_later_key() -> None:
    error = config_error("# c\nshutdown_timeout: 10\n\nforce_stop: true\nrestart: sometimes\n")
    assert str(error).startswith("/etc/pve-gpu-hook/config.yaml:5: restart: ")
    assert "sometimes" in str(error)


def test_duplicate_key() -> None:
    error = config_error("restart: after-job\nshutdown_timeout: 5\nrestart: after-guest\n")
    assert str(error).startswith("/etc/pve-gpu-hook/config.yaml:3: ")
    assert "restart" in str(error)
    # the old and the new name of one key: given twice
    error = config_error("restore: after-job\nrestart: after-guest\n")
    assert str(error) == "/etc/pve-gpu-hook/config.yaml:2: restart: given twice"


def test_old_key_name_is_read_with_a_note() -> None:
    settings = parse_settings("restore: after-job\n", "/etc/pve-gpu-hook/config.yaml")
    assert settings.restart == "after-job"
    assert settings.notes == [
        "/etc/pve-gpu-hook/config.yaml:1: 'restore:' is the old name of 'restart:'; it is still "
        "read, rename it when convenient"
    ]
    assert parse_settings("restart: after-job\n", "/x").notes == []


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("shutdown_timeout: 10\nforce_stop: false: true\n", 2),
        ("shutdown_timeout: 10\n\tforce_stop: true\n", 2),
        ("shutdown_timeout: 10\nprotect: [104\nrestart: after-job\n", 3),
        ("shutdown_timeout: *nothing\n", 1),
        ("shutdown_timeout: 1\n---\nforce_stop: true\n", 2),
    ],
)
def test_yaml_syntax_error_names_the_line(text: str, line: int) -> None:
    error = config_error(text)
    assert str(error).startswith(f"/etc/pve-gpu-hook/config.yaml:{line}: invalid YAML")
    assert error.exit_code == 2


@pytest.mark.parametrize(("text", "line"), [("- 104\n- 105\n", 1), ("# c\nhello\n", 2)])
def test_top_level_must_be_a_mapping(text: str, line: int) -> None:
    error = config_error(text)
    assert str(error).startswith(f"/etc/pve-gpu-hook/config.yaml:{line}: ")
    assert "mapping" in str(error)


def test_unreadable_file_is_a_config_error(host_root: Path) -> None:
    path = write_override(host_root, b"shutdown_timeout: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(str(path))
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "text",
    [
        "shutdown_timeout: !!int abc\n",
        "force_stop: !!bool maybe\n",
        "restart: !!timestamp 2020-13-45\n",
        "shutdown_timeout: !!python/name:os.system\n",
        "shutdown_timeout: !custom 3\n",
    ],
)
def test_bad_tagged_value_is_a_config_error(text: str) -> None:
    error = config_error(text)
    assert str(error).startswith("/etc/pve-gpu-hook/config.yaml:1: ")


def test_bad_protect_item_names_its_own_line() -> None:
    error = config_error("protect:\n  - 104\n  - abc\n")
    assert str(error).startswith("/etc/pve-gpu-hook/config.yaml:3: protect: ")


# --------------------------------------------------------------------------------------------
# state

RECORDS = [
    Record(
        104,
        GuestKind.QEMU,
        "win11",
        102,
        ["0000:01:00.0", "0000:01:00.1"],
        since=1700000000.5,
        status=RecordStatus.STOPPED,
        job=4242,
        note="shut down for the backup of VM 102",
    ),
    Record(
        200, GuestKind.LXC, None, None, [], since=1700000001.0, status=RecordStatus.START_FAILED
    ),
    Record(105, GuestKind.QEMU, 'n\u00e4me "quoted"\n', 103, ["0000:04:00.0"], since=1.0),
]


def as_dicts(records: list[Record]) -> list[dict[str, object]]:
    return [r.to_dict() for r in records]


def save(records: list[Record]) -> StateStore:
    """Make the state hold exactly ``records``, through the store's own operations."""
    store = StateStore()
    with store.hold(1.0, "test"):
        store.drop(*(r.vmid for r in store.records()))
        for record in records:
            store.add(record)
    return store


def load(store: StateStore | None = None) -> list[Record]:
    """The records as a holder of the lock reads them (a damaged file is then kept aside)."""
    store = store or StateStore()
    with store.hold(1.0, "test"):
        return store.records()


def state_dir(root: Path) -> Path:
    return root / "var/lib/pve-gpu-hook"


def test_acquire_release_and_lock_owner(host_root: Path) -> None:
    first = StateStore()
    first.acquire(1.0, "backup-start of VM 102")
    lock = host_root / "run/lock/pve-gpu-hook.lock"
    assert lock.read_text() == f"pid {os.getpid()} backup-start of VM 102\n"
    assert mode(lock) == 0o600
    first.release()
    second = StateStore()
    with second.hold(0.3, "job-end"):
        assert lock.read_text() == f"pid {os.getpid()} job-end\n"
    second.release()  # releasing twice is harmless


def test_second_acquire_times_out(host_root: Path) -> None:
    holder = StateStore()
    holder.acquire(1.0, "log-end of VM 102")  # flock is per open file: a second fd conflicts
    try:
        waiter = StateStore()
        started = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            waiter.acquire(0.3, "job-end")
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed < 2.0
        assert "log-end of VM 102" in str(info.value)  # who holds it
        assert "job-end not done" in str(info.value)
        assert info.value.exit_code == 1
    finally:
        holder.release()
    waiter.acquire(0.3, "job-end")  # free again
    waiter.release()


def test_changes_require_the_lock(host_root: Path) -> None:
    store = StateStore()
    for change in (
        lambda: store.add(RECORDS[0]),
        lambda: store.mark(104, RecordStatus.STOPPED),
        lambda: store.drop(104),
    ):
        with pytest.raises(StateError):
            change()
    assert not state_dir(host_root).exists()


def test_round_trip(host_root: Path) -> None:
    assert not StateStore().exists()
    assert StateStore().records() == []
    store = save(RECORDS)
    assert store.exists()
    assert as_dicts(StateStore().records()) == as_dicts(RECORDS)
    lines = (state_dir(host_root) / "state.json").read_text().splitlines()
    assert json.loads(lines[0]) == {"format": 2}
    assert [json.loads(line)["record"]["vmid"] for line in lines[1:]] == [104, 200, 105]
    assert all(re.fullmatch(r"[0-9a-f]{8}", json.loads(line)["crc"]) for line in lines[1:])
    assert StateStore().salvaged is None


def test_named_operations(host_root: Path) -> None:
    save(RECORDS)
    store = StateStore()
    with store.hold(1.0, "test"):
        store.mark(105, RecordStatus.STOP_FAILED, "got timeout " * 100)
        store.add(Record(104, GuestKind.QEMU, "win11", 103, ["0000:01:00.0"], since=5.0))
        store.drop(200, 999)  # an unknown VMID is no error
        held = store.records()
    assert as_dicts(held) == as_dicts(StateStore().records())
    after = {r.vmid: r for r in StateStore().records()}
    assert sorted(after) == [104, 105]
    assert after[105].status == RecordStatus.STOP_FAILED
    assert after[105].note is not None and len(after[105].note) == 500
    assert (after[104].for_vmid, after[104].status) == (103, RecordStatus.STOPPING)


def test_one_read_per_hold(host_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(RECORDS)
    reads = []
    real = files.read_private
    monkeypatch.setattr(files, "read_private", lambda path: reads.append(path) or real(path))
    store = StateStore()
    with store.hold(1.0, "test"):
        store.mark(104, RecordStatus.STOPPED)
        store.drop(200)
        store.add(Record(106, GuestKind.QEMU, None, 102, []))
        assert [r.vmid for r in store.records()] == [104, 105, 106]
    assert len(reads) == 1


def test_permissions(host_root: Path) -> None:
    save(RECORDS)
    assert mode(state_dir(host_root)) == 0o700
    assert mode(state_dir(host_root) / "state.json") == 0o600


def test_loose_state_dir_is_tightened(host_root: Path) -> None:
    state_dir(host_root).mkdir(parents=True)
    os.chmod(state_dir(host_root), 0o755)
    save(RECORDS[:1])
    assert mode(state_dir(host_root)) == 0o700


def test_dropping_the_last_record_removes_the_file(host_root: Path) -> None:
    save([])  # nothing to remove
    store = save(RECORDS)
    save([])
    assert not store.exists()
    assert load() == []
    assert os.listdir(state_dir(host_root)) == []


def test_symlinked_state_dir_is_refused(host_root: Path) -> None:
    elsewhere = host_root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state_dir(host_root).parent.mkdir(parents=True)
    state_dir(host_root).symlink_to(elsewhere)
    with pytest.raises(StateError):
        save(RECORDS)
    assert os.listdir(elsewhere) == []


def test_load_refuses_symlinked_state_dir(host_root: Path) -> None:
    elsewhere = host_root / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "state.json").write_text(
        '{"format": 1, "records": [\n{"vmid": 104, "kind": "qemu"}\n]}\n'
    )
    state_dir(host_root).parent.mkdir(parents=True)
    state_dir(host_root).symlink_to(elsewhere)
    with pytest.raises(StateError):
        StateStore().records()
    with pytest.raises(StateError):
        load()


def test_symlinked_state_file_is_not_followed(host_root: Path) -> None:
    target = host_root / "target.json"
    target.write_text('{"format": 1, "records": [{"vmid": 104, "kind": "qemu"}]}')
    state_dir(host_root).mkdir(parents=True, mode=0o700)
    (state_dir(host_root) / "state.json").symlink_to(target)
    with pytest.raises(StateError):
        StateStore().records()
    with pytest.raises(StateError):
        load()


def write_state(root: Path, data: bytes) -> Path:
    directory = state_dir(root)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / "state.json"
    path.write_bytes(data)
    return path


def test_garbage_state_is_kept_aside(host_root: Path) -> None:
    garbage = b"\x00\xffnot json at all\n"
    path = write_state(host_root, garbage)
    store = StateStore()
    assert load(store) == []
    assert store.salvaged is not None
    corrupt = store.corrupt_files()
    assert len(corrupt) == 1
    assert os.path.basename(corrupt[0]).startswith("state.json.corrupt-")
    assert Path(corrupt[0]).read_bytes() == garbage
    assert corrupt[0] in store.salvaged
    assert not path.exists()


def test_truncated_state_keeps_intact_records(host_root: Path) -> None:
    save(RECORDS)
    path = state_dir(host_root) / "state.json"
    full = path.read_bytes()
    cut = full.index(b'"vmid":105') + 5  # in the middle of the third record
    write_state(host_root, full[:cut])
    store = StateStore()
    loaded = load(store)
    assert as_dicts(loaded) == as_dicts(RECORDS[:2])
    assert store.salvaged is not None
    assert "2 intact record(s) kept" in store.salvaged
    assert [Path(p).read_bytes() for p in store.corrupt_files()] == [full[:cut]]
    again = StateStore()
    assert as_dicts(load(again)) == as_dicts(RECORDS[:2])  # rewritten clean
    assert again.salvaged is None


@pytest.mark.parametrize("victim", [0, 1, 2])
@pytest.mark.parametrize("damage", ["flip a byte", "cut the line", "swap a digit"])
def test_damage_loses_only_the_damaged_record(host_root: Path, victim: int, damage: str) -> None:
    """One record per line, each with its checksum: every other record survives any damage."""
    save(RECORDS)
    path = state_dir(host_root) / "state.json"
    lines = path.read_bytes().split(b"\n")
    line = lines[victim + 1]
    if damage == "flip a byte":
        at = line.index(b'"name"') + 2
        line = line[:at] + bytes([line[at] ^ 0x20]) + line[at + 1 :]
    elif damage == "cut the line":
        line = line[: len(line) // 2]
    else:  # still valid JSON, a different VMID: only the checksum can tell
        line = line.replace(b'"since":1', b'"since":2', 1)
    lines[victim + 1] = line
    write_state(host_root, b"\n".join(lines))
    store = StateStore()
    loaded = load(store)
    assert as_dicts(loaded) == as_dicts([r for i, r in enumerate(RECORDS) if i != victim])
    assert store.salvaged is not None and f"line {victim + 2}" in store.salvaged
    assert len(store.corrupt_files()) == 1


def test_format_1_is_read_and_rewritten_as_format_2(host_root: Path) -> None:
    lines = ",\n".join(json.dumps(r.to_dict()) for r in RECORDS)
    write_state(host_root, f'{{"format": 1, "records": [\n{lines}\n]}}\n'.encode())
    assert as_dicts(StateStore().records()) == as_dicts(RECORDS)
    with StateStore().hold(1.0, "test") as store:
        assert store.salvaged is None
        store.drop(200)
    text = (state_dir(host_root) / "state.json").read_text()
    assert text.startswith('{"format": 2}\n')
    assert [r.vmid for r in StateStore().records()] == [104, 105]


def test_a_directory_as_state_file_is_an_error_not_a_traceback(host_root: Path) -> None:
    (state_dir(host_root) / "state.json").mkdir(parents=True)
    with pytest.raises(StateError, match="not a regular file"):
        StateStore().records()


def test_bad_record_sends_the_file_to_salvage(host_root: Path) -> None:
    write_state(
        host_root,
        b'{"format": 1, "records": [\n{"vmid": 104, "kind": "qemu"},\n'
        b'{"vmid": 5, "kind": "qemu"},\n{"vmid": 200, "kind": "vm"}\n]}\n',
    )
    store = StateStore()
    assert [r.vmid for r in load(store)] == [104]
    assert len(store.corrupt_files()) == 1


def test_corrupt_state_without_the_lock_is_left_in_place(host_root: Path) -> None:
    path = write_state(host_root, b'{"format": 1, "records": [\n{"vmid": 104, "kind": "qemu"},\n{')
    reader = StateStore()
    assert [r.vmid for r in reader.records()] == [104]
    assert reader.salvaged is not None
    assert path.exists()
    assert reader.corrupt_files() == []


def test_two_corrupt_files_in_one_second_are_both_kept(
    host_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20250101T000000")
    write_state(host_root, b"first corrupt copy")
    load()
    write_state(host_root, b"second corrupt copy")
    store = StateStore()
    load(store)
    kept = sorted(Path(p).read_bytes() for p in store.corrupt_files())
    assert kept == [b"first corrupt copy", b"second corrupt copy"]


def test_newer_format_is_refused(host_root: Path) -> None:
    data = b'{"format": 3}\n{"something": "new"}\n'
    path = write_state(host_root, data)
    store = StateStore()
    with pytest.raises(StateError) as info:
        load(store)
    assert "format" in str(info.value)
    assert path.read_bytes() == data  # left alone for the newer version
    assert store.corrupt_files() == []


def test_older_file_without_format_loads(host_root: Path) -> None:
    write_state(host_root, b'{"records": [{"vmid": 104, "kind": "qemu", "for_vmid": 102}]}')
    store = StateStore()
    (record,) = load(store)
    assert (record.vmid, record.kind, record.for_vmid, record.status) == (
        104,
        GuestKind.QEMU,
        102,
        RecordStatus.STOPPED,
    )
    assert (record.name, record.addresses, record.job, record.note) == (None, [], None, None)
    assert store.salvaged is None


def test_full_disk_leaves_previous_state(host_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(RECORDS[:1])
    path = state_dir(host_root) / "state.json"
    before = path.read_bytes()

    def no_space(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = StateStore()
    with store.hold(1.0, "test"):
        monkeypatch.setattr(os, "write", no_space)
        with pytest.raises(StateError) as info:
            store.add(RECORDS[1])
        monkeypatch.undo()
        # the store still holds what the file holds
        assert as_dicts(store.records()) == as_dicts(RECORDS[:1])
    assert "No space left on device" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(state_dir(host_root))) == ["state.json"]


def test_record_defaults() -> None:
    record = Record(104, GuestKind.QEMU, None, 102, ["0000:01:00.0"])
    assert record.status == RecordStatus.STOPPING
    assert (record.since, record.job, record.note) == (None, None, None)
    assert record.label == "VM 104"
    # a damaged record without a time stays "unknown", never "since now"
    damaged = Record.from_dict({"vmid": 104, "kind": "qemu"})
    assert damaged.since is None
    # a status a newer release wrote is read as the safest one: still off
    assert Record.from_dict({"vmid": 104, "kind": "qemu", "status": "x"}).status == "stopped"


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"kind": "qemu"},
        {"vmid": "104", "kind": "qemu"},
        {"vmid": True, "kind": "qemu"},
        {"vmid": 99, "kind": "qemu"},
        {"vmid": 104, "kind": "openvz"},
    ],
)
def test_record_from_bad_dict(data: object) -> None:
    with pytest.raises(ValueError):
        Record.from_dict(data)


def test_job_tally(host_root: Path) -> None:
    store = StateStore()
    assert store.job() is None
    win11 = Record(104, GuestKind.QEMU, "win11", 102, [])
    plex = Record(110, GuestKind.LXC, "plex", 103, [])
    with store.hold(1.0, "test"):
        store.note_stop("4242", None, win11, at=100.0)
        store.note_start(104, at=160.0, ok=True)
        win11.for_vmid = 103
        store.note_stop("4242", None, win11, at=200.0)
        store.note_stop("4242", None, plex, at=200.0)
        store.note_start(110, at=230.0, ok=False)
        store.note_start(999, at=230.0, ok=True)  # stopped by no job of the tally: ignored
        tally = store.end_job("4242", "job-end", at=300.0)
        assert store.end_job("other", "job-end", at=300.0) is None
    assert tally is not None
    read = StateStore().job()
    assert read is not None and read.to_dict() == tally.to_dict()
    assert (read.holders_stopped, read.cycles, read.failed_restarts) == (2, 3, 1)
    assert read.downtime(now=300.0) == 60.0 + 100.0 + 100.0  # 104 back, 104 and 110 still off
    assert (read.ended, read.end_phase) == (300.0, "job-end")
    assert read.summary(now=300.0) == (
        "this job: 2 guest(s) shut down to free a GPU, 3 shutdown/boot cycle(s), 4 min down "
        "in all, 1 failed restart(s): VM 104 (win11) shut down 2 times for 102, 103, down "
        "3 min (not started again); CT 110 (plex) shut down once for 103, down 100 s "
        "(not started again)"
    )
    with store.hold(1.0, "test"):
        store.note_stop("4343", "UPID:pve1:x", win11, at=400.0)  # the next job: a new tally
    again = StateStore().job()
    assert again is not None and (again.job, again.upid, again.cycles) == ("4343", "UPID:pve1:x", 1)
    (state_dir(host_root) / "job.json").write_text("{damaged")
    assert StateStore().job() is None  # numbers only: replaced at the next change


def test_chain(host_root: Path) -> None:
    assert registration.chain() is None
    registration._save_chain("/usr/local/bin/old-hook.sh")
    assert registration.chain() == "/usr/local/bin/old-hook.sh"
    assert mode(state_dir(host_root) / "chain") == 0o600
    registration._save_chain(None)
    assert registration.chain() is None
    registration._save_chain(None)  # already gone
    assert not (state_dir(host_root) / "chain").exists()


# --------------------------------------------------------------------------------------------
# log


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("plain text: ok", "plain text: ok"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("two\nlines", "two\\x0alines"),
        ("carriage\rreturn", "carriage\\x0dreturn"),
        ("tab\there", "tab\\x09here"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),
        ("nel\x85", "nel\\x85"),
        ("surrogate\udcff", "surrogate\\udcff"),
        ("Ümlaut 日本 ✓", "Ümlaut 日本 ✓"),
        ("", ""),
    ],
)
def test_clean(text: str, cleaned: str) -> None:
    assert logmod.clean(text) == cleaned


LINE_RE = re.compile(r"^(\S+) (\S+) (\S+) (.*)$")


def log_lines(root: Path) -> list[tuple[str, str, str, str]]:
    text = (root / "var/log/pve-gpu-hook.log").read_text()
    assert text.endswith("\n")
    result = []
    for line in text.splitlines():
        match = LINE_RE.match(line)
        assert match, line
        stamp, phase, vmid, message = match.groups()
        assert datetime.datetime.fromisoformat(stamp).tzinfo is not None
        result.append((stamp, phase, vmid, message))
    return result


def test_log_file_lines(host_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logmod.Log("backup-start", 102, echo=False).file("stopping VM 104\x1b[2J")
    logmod.Log("job-end", echo=False).file("done\nforged line")
    assert [line[1:] for line in log_lines(host_root)] == [
        ("backup-start", "102", "stopping VM 104\\x1b[2J"),
        ("job-end", "-", "done\\x0aforged line"),
    ]
    assert mode(host_root / "var/log/pve-gpu-hook.log") == 0o600
    assert capsys.readouterr() == ("", "")


def test_log_say_and_error(host_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quiet = logmod.Log("log-end", 102, echo=False)
    quiet.say("started VM 104")
    quiet.error("VM 105 did not start")
    assert quiet.lines == ["started VM 104", "VM 105 did not start"]
    assert capsys.readouterr() == ("", "")
    loud = logmod.Log("log-end", 102)
    loud.say("hello\x07")
    loud.error("bad\x1b")
    out, err = capsys.readouterr()
    assert out == "pve-gpu-hook: hello\\x07\n"
    assert err == "pve-gpu-hook: bad\\x1b\n"
    assert [line[3] for line in log_lines(host_root)] == [
        "started VM 104",
        "ERROR: VM 105 did not start",
        "hello\\x07",
        "ERROR: bad\\x1b",
    ]


def test_log_appends_to_existing_file(host_root: Path) -> None:
    path = host_root / "var/log/pve-gpu-hook.log"
    path.parent.mkdir(parents=True)
    path.write_text("old line\n")
    os.chmod(path, 0o600)
    logmod.Log("job-start", echo=False).file("new")
    assert path.read_text().startswith("old line\n")
    assert path.read_text().endswith(" job-start - new\n")


@pytest.mark.parametrize("dangling", [False, True])
def test_log_does_not_follow_a_symlink(host_root: Path, dangling: bool) -> None:
    target = host_root / "etc/shadow"
    target.parent.mkdir(parents=True)
    if not dangling:
        target.write_text("root:x:\n")
    path = host_root / "var/log/pve-gpu-hook.log"
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    logmod.Log("job-start", echo=False).file("must not land in the target")  # never raises
    if dangling:
        assert not target.exists()
    else:
        assert target.read_text() == "root:x:\n"
    assert path.is_symlink()


def test_log_unwritable_location_never_raises(host_root: Path) -> None:
    (host_root / "var").mkdir()
    (host_root / "var/log").write_text("a file where the directory should be")
    logmod.Log("job-start", echo=False).file("lost")
    assert (host_root / "var/log").read_text() == "a file where the directory should be"


def test_timestamp_is_iso_with_offset() -> None:
    stamp = logmod.timestamp(0)
    parsed = datetime.datetime.fromisoformat(stamp)
    assert parsed.timestamp() == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", stamp)
