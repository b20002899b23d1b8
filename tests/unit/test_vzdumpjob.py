"""Unit tests of pvegpuhook.vzdumpjob: the backup job's identity as PVE records it.

UPIDs (pve-common PVE/UPID.pm), whether a task still runs (PVE/ProcFSTools.pm
check_process_running: pid and start time), the job line of the task log (pve-guest-common
PVE/VZDump/Common.pm command_line: options in Perl's random hash order, shell-quoted values) and
the guests' backup logs. Every reader says why when it could not learn something.
"""

from __future__ import annotations

import itertools
import random
import shlex
from pathlib import Path

import pytest

from pvegpuhook import vzdumpjob
from pvegpuhook.vzdumpjob import (
    JobSpec,
    Unknown,
    Upid,
    included_guests,
    parse_job_line,
    parse_pools,
)

UPID = "UPID:pve1:000A1B2C:0012D687:6650A1F3:vzdump::root@pam:"


def decoded(text: str = UPID) -> Upid:
    upid = vzdumpjob.decode_upid(text)
    assert isinstance(upid, Upid), upid
    return upid


def write_stat(root: Path, pid: int, starttime: int, state: str = "S", comm: str = "task") -> None:
    """/proc/<pid>/stat in the kernel's format (field 3 the state, field 22 the start time)."""
    fields = [state, "1", str(pid), str(pid), "0", "-1", "4194560", *["0"] * 10, "1", "0"]
    fields += [str(starttime), *["0"] * 30]
    path = root / "proc" / str(pid) / "stat"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


# ---- UPIDs --------------------------------------------------------------------------------------


def test_decode_upid_as_pve() -> None:
    upid = decoded()
    assert (upid.node, upid.pid, upid.pstart, upid.starttime) == (
        "pve1",
        0xA1B2C,
        0x12D687,
        0x6650A1F3,
    )
    assert (upid.type, upid.id, upid.user, upid.text) == ("vzdump", "", "root@pam", UPID)
    single = decoded("UPID:node-2:00001234:100000000:6650A1F3:vzdump:104:backup@pve!tok:")
    assert (single.node, single.pstart, single.id) == ("node-2", 0x100000000, "104")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPID:pve1:000A1B2C:0012D687:6650A1F3:vzdump::root@pam",  # no trailing colon
        "UPID:pve1:A1B2C:0012D687:6650A1F3:vzdump::root@pam:",  # pid not 8 digits
        "UPID:pve1:000A1B2C:12D687:6650A1F3:vzdump::root@pam:",  # pstart too short
        "UPID:pve1:000A1B2C:0012D687:6650A1F:vzdump::root@pam:",  # starttime 7 digits
        "UPID:pve1:000A1B2G:0012D687:6650A1F3:vzdump::root@pam:",  # not hex
        "UPID:-pve1:000A1B2C:0012D687:6650A1F3:vzdump::root@pam:",  # node
        "UPID:pve1:000A1B2C:0012D687:6650A1F3:vzdump::root @pam:",  # white space
        "UPID:pve1:000A1B2C:0012D687:6650A1F3:vz/dump::root@pam:",  # a slash
        "UPID:pve1:000A1B2C:0012D687:6650A1F3:::root@pam:",  # no type
        "UPID:pve1:000A1B2C:0012D687:6650A1F3:vzdump::root@pam:extra:",
        "PID:pve1:000A1B2C:0012D687:6650A1F3:vzdump::root@pam:",
    ],
)
def test_decode_refuses_what_pve_refuses(text: str) -> None:
    result = vzdumpjob.decode_upid(text)
    assert isinstance(result, Unknown) and "is not a UPID" in result.reason


def test_task_log_path_uses_the_last_hex_digit_of_the_start_time(host_root: Path) -> None:
    assert decoded().log_path == str(host_root / "var/log/pve/tasks/3" / UPID)
    upper = decoded(UPID.replace("6650A1F3", "6650A1FC"))
    assert Path(upper.log_path).parent.name == "C"


# ---- the pid file and liveness ------------------------------------------------------------------


def pid_file(root: Path, content: bytes) -> None:
    path = root / "run/vzdump.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_running_job_by_pid_and_start_time(host_root: Path) -> None:
    pid_file(host_root, UPID.encode())  # as vzdump writes it: no newline
    write_stat(host_root, 0xA1B2C, 0x12D687, comm="task UPID:pve1:")
    job = vzdumpjob.running_job()
    assert isinstance(job, Upid) and job.text == UPID
    assert vzdumpjob.task_running(job) is True


def test_reused_pid_is_not_the_job(host_root: Path) -> None:
    pid_file(host_root, UPID.encode())
    write_stat(host_root, 0xA1B2C, 0x12D687 + 4711, comm="postgres")
    assert vzdumpjob.task_running(decoded()) is False
    job = vzdumpjob.running_job()
    assert isinstance(job, Unknown) and "has ended" in job.reason


def test_after_a_reboot_the_job_is_over(host_root: Path) -> None:
    """A reboot empties /run; a record's UPID may name a pid that runs again, started anew."""
    write_stat(host_root, 0xA1B2C, 1234)  # early after boot: a small start time
    assert vzdumpjob.task_running(decoded()) is False
    assert isinstance(vzdumpjob.running_job(), Unknown)  # no pid file at all
    assert "no /var/run/vzdump.pid" in vzdumpjob.running_job().reason  # type: ignore[union-attr]


def test_a_zombie_or_a_missing_process_does_not_run(host_root: Path) -> None:
    write_stat(host_root, 0xA1B2C, 0x12D687, state="Z")
    assert vzdumpjob.task_running(decoded()) is False
    assert vzdumpjob.task_running(decoded(UPID.replace("000A1B2C", "000A1B2D"))) is False


def test_a_command_name_with_spaces_and_parentheses(host_root: Path) -> None:
    write_stat(host_root, 0xA1B2C, 0x12D687, comm="a) b (c")
    assert vzdumpjob.task_running(decoded()) is True


def test_garbled_stat_is_unknown_not_false(host_root: Path) -> None:
    path = host_root / "proc" / str(0xA1B2C) / "stat"
    path.parent.mkdir(parents=True)
    path.write_text("garbage\n")
    result = vzdumpjob.task_running(decoded())
    assert isinstance(result, Unknown) and "kernel's format" in result.reason


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "is not a UPID"),
        (b"12345\n", "is not a UPID"),
        (b"\xff\xfe", "does not hold a UPID"),
        (UPID.replace("vzdump", "qmstart").encode(), "names a 'qmstart' task"),
    ],
)
def test_garbled_pid_file(host_root: Path, content: bytes, says: str) -> None:
    pid_file(host_root, content)
    write_stat(host_root, 0xA1B2C, 0x12D687)
    result = vzdumpjob.running_job()
    assert isinstance(result, Unknown) and says in result.reason
    assert "/var/run/vzdump.pid" in result.reason


def test_pid_file_with_a_newline_is_read(host_root: Path) -> None:
    pid_file(host_root, UPID.encode() + b"\n")
    write_stat(host_root, 0xA1B2C, 0x12D687)
    assert isinstance(vzdumpjob.running_job(), Upid)


# ---- the job line -------------------------------------------------------------------------------

# what command_line prints for a job's options: --key shell-quoted value
OPTIONS = {
    "mode": "stop",
    "storage": "local",
    "quiet": "1",
    "notes-template": "{{guestname}} on {{node}}: it's nightly",
    "compress": "zstd",
    "mailto": "admin@example.com,ops@example.com",
    "prune-backups": "keep-daily=7,keep-last=3",
    "node": "pve1",
}


def line(command: str) -> str:
    return f"INFO: starting new backup job: {command}"


@pytest.mark.parametrize("seed", range(12))
def test_job_line_with_options_in_any_order(seed: int) -> None:
    keys = list(OPTIONS)
    random.Random(seed).shuffle(keys)
    options = " ".join(f"--{k} {shlex.quote(OPTIONS[k])}" for k in keys)
    spec = vzdumpjob.parse_job_line(line(f"vzdump 105 102 103 {options}"))
    assert isinstance(spec, JobSpec), spec
    assert spec.vmids == [105, 102, 103]  # as given, not sorted
    assert (spec.mode, spec.node, spec.all, spec.pool, spec.exclude) == (
        "stop",
        "pve1",
        False,
        None,
        [],
    )


def test_all_with_exclude_and_pool() -> None:
    for order in itertools.permutations(["--all 1", "--exclude '101,102;103'", "--mode suspend"]):
        spec = vzdumpjob.parse_job_line(line("vzdump " + " ".join(order)))
        assert isinstance(spec, JobSpec)
        assert (spec.vmids, spec.all, spec.exclude, spec.mode) == (
            [],
            True,
            [101, 102, 103],
            "suspend",
        )
    spec = vzdumpjob.parse_job_line(line("vzdump --pool 'gpu guests' --storage pbs"))
    assert isinstance(spec, JobSpec)
    assert (spec.pool, spec.all, spec.mode) == ("gpu guests", False, None)  # mode: vzdump.conf's


def test_repeated_exclude_path_and_unknown_options_are_ignored() -> None:
    spec = vzdumpjob.parse_job_line(
        line("vzdump 104 --exclude-path '/tmp/?*' --exclude-path /var/cache --bwlimit 0")
    )
    assert isinstance(spec, JobSpec) and spec.vmids == [104]


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("vzdump 102 --notes-template 'unclosed", "cannot split"),
        ("qm 102", "does not start with vzdump"),
        ("vzdump 10x2", "is not a VMID"),
        ("vzdump 102 --mode", "cannot read '--mode'"),
        ("vzdump 102 stray --mode stop", "'stray' in the job's command line is not a VMID"),
        ("vzdump 102 --mode stop stray", "cannot read 'stray'"),
        ("vzdump --all yes", "is not 0 or 1"),
        ("vzdump --all 1 --exclude 101,abc", "is not a list of VMIDs"),
        ("vzdump 102 --mode fast", "is not a backup mode"),
        ("vzdump 102 --all 1", "both VMIDs and --all"),
    ],
)
def test_job_lines_it_cannot_read_say_why(command: str, says: str) -> None:
    result = vzdumpjob.parse_job_line(line(command))
    assert isinstance(result, Unknown) and says in result.reason, result


def test_the_job_line_is_not_always_the_first_line() -> None:
    log = "\n".join(
        [
            "INFO: job-init output of a chained hook",
            "INFO: trying to get global lock - waiting...",
            "INFO: got global lock",
            line("vzdump 102 --mode stop"),
            "INFO: skip external VMs: 201",
            line("vzdump 999 --mode snapshot"),  # a guest phase's output that looks alike
        ]
    )
    found = vzdumpjob.find_job_line(log)
    assert found == line("vzdump 102 --mode stop")
    assert isinstance(vzdumpjob.find_job_line("INFO: got global lock\n"), Unknown)


def test_read_job_from_the_task_log(host_root: Path) -> None:
    upid = decoded()
    missing = vzdumpjob.read_job(upid)
    assert isinstance(missing, Unknown) and missing.reason.startswith("no task log /var/log/pve")
    path = Path(upid.log_path)
    path.parent.mkdir(parents=True)
    path.write_text("INFO: job-init says hello\n")
    early = vzdumpjob.read_job(upid)  # a CLI vzdump's copy may lag behind
    assert isinstance(early, Unknown) and "no job line (yet)" in early.reason
    path.write_text(f"INFO: hello\n{line('vzdump --storage local --all 1 --mode stop')}\n")
    spec = vzdumpjob.read_job(upid)
    assert isinstance(spec, JobSpec) and spec.all and spec.mode == "stop"


# ---- a guest's last backup ----------------------------------------------------------------------


def guest_log(root: Path, name: str, text: str) -> None:
    path = root / "var/log/vzdump" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_last_backup_duration(host_root: Path) -> None:
    guest_log(
        host_root,
        "qemu-104.log",
        "2026-05-24 01:00:00 INFO: Starting Backup of VM 104 (qemu)\n"
        "2026-05-24 01:00:00 INFO: status = stopped\n"
        "2026-05-24 02:14:05 INFO: Finished Backup of VM 104 (01:14:05)\n"
        "2026-05-24 02:14:05 INFO: Backup finished at 2026-05-24 02:14:05\n",
    )
    assert vzdumpjob.last_backup_seconds("qemu", 104) == 4445
    guest_log(host_root, "lxc-200.log", "x INFO: Finished Backup of VM 200 (123:00:01)\n")
    assert vzdumpjob.last_backup_seconds("lxc", 200) == 123 * 3600 + 1


def test_last_backup_duration_unknown_says_why(host_root: Path) -> None:
    result = vzdumpjob.last_backup_seconds("qemu", 105)
    assert isinstance(result, Unknown) and "no earlier backup" in result.reason
    guest_log(host_root, "qemu-105.log", "x ERROR: Backup of VM 105 failed - no space\n")
    result = vzdumpjob.last_backup_seconds("qemu", 105)
    assert isinstance(result, Unknown) and "last backup failed" in result.reason
    guest_log(host_root, "qemu-105.log", "x INFO: Starting Backup of VM 105 (qemu)\n")
    result = vzdumpjob.last_backup_seconds("qemu", 105)
    assert isinstance(result, Unknown) and "no 'Finished Backup' line" in result.reason
    guest_log(host_root, "qemu-105.log", "x INFO: Finished Backup of VM 105 (1:2:3)\n")
    result = vzdumpjob.last_backup_seconds("qemu", 105)
    assert isinstance(result, Unknown) and "cannot read the duration" in result.reason
    # another guest's line does not count
    guest_log(host_root, "qemu-105.log", "x INFO: Finished Backup of VM 1050 (00:00:09)\n")
    assert isinstance(vzdumpjob.last_backup_seconds("qemu", 105), Unknown)


def test_a_long_log_is_read_from_its_end(host_root: Path) -> None:
    noise = "x INFO: 100% (32.0 GiB of 32.0 GiB) in 1s\n" * 5000
    guest_log(host_root, "qemu-106.log", noise + "x INFO: Finished Backup of VM 106 (00:09:59)\n")
    assert vzdumpjob.last_backup_seconds("qemu", 106) == 599


def test_importing_it_is_cheap() -> None:
    """The hook's phases import it: nothing but os (and the paths module)."""
    import subprocess
    import sys

    code = (
        "import sys; before = set(sys.modules); import pvegpuhook.vzdumpjob; "
        "print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout
    loaded = eval(out)  # our own printed list
    assert [m for m in loaded if not m.startswith(("pvegpuhook", "__future__"))] == []


# ---- the job's guests -----------------------------------------------------------------------


def test_pools_as_pve_reads_user_cfg() -> None:
    text = (
        "user:root@pam:1:0:::root@example.invalid:::\n"
        "pool:gpu:GPU guests:102,103 105:local:\n"
        "pool:other::103,110::\n"  # 103 is in gpu already: PVE ignores it here
        "pool:empty::::\n"
    )
    assert parse_pools(text) == {"gpu": {102, 103, 105}, "other": {110}, "empty": set()}


def test_included_guests_in_vzdumps_order() -> None:
    local = {100, 102, 103, 104, 105, 110}
    spec = parse_job_line("INFO: starting new backup job: vzdump 105 102 999 --mode stop")
    assert included_guests(spec, local) == [102, 105]  # sorted; 999 is not on this node
    spec = parse_job_line("INFO: starting new backup job: vzdump --exclude 104,110 --all 1")
    assert included_guests(spec, local) == [100, 102, 103, 105]
    spec = parse_job_line("INFO: starting new backup job: vzdump --pool gpu --exclude 102")
    assert included_guests(spec, local, {"gpu": {102, 105, 300}}) == [102, 105]  # no exclude
    unknown = included_guests(spec, local, {})
    assert isinstance(unknown, Unknown) and "pool 'gpu'" in unknown.reason
