"""``pve-gpu-hook status``: every reason for exit status 1, the JSON/YAML shape, the piped text.

Monitoring runs ``status`` and alerts on exit status 1; each test builds one thing an admin must
hear about and checks that status says it (``attention``) and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pvegpuhook import cli
from pvegpuhook.log import Log, LogLine, last_job, read_tail
from pvegpuhook.model import GuestKind
from pvegpuhook.records import Record, RecordStatus
from pvegpuhook.registration import HOOK_PATH
from pvegpuhook.state import StateStore
from tests.fronts import REPO, run_main, seed_node
from tests.sim.vzdump import run_job

STOCK = "# vzdump default settings\n\n#tmpdir: DIR\n#script: FILENAME\n"
KEYS = {
    "registered",
    "script",
    "script_line",
    "vzdump_conf",
    "vzdump_conf_exists",
    "hook_path",
    "hook_executable",
    "chain",
    "bypassing_jobs",
    "override",
    "waiting",
    "state_error",
    "corrupt_state",
    "not_started_again",
    "last_job",
    "night",
    "format",
    "notes",
    "attention",
}


@pytest.fixture
def root(host_root: Path) -> Path:
    """A PVE host with the package installed and registered: status is all fine."""
    (host_root / "etc/pve").mkdir(parents=True)
    install(host_root, HOOK_PATH)
    (host_root / "etc/vzdump.conf").write_text(STOCK)
    assert cli.main(["register"]) == 0
    return host_root


def install(root: Path, path: str, mode: int = 0o755) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\nexit 0\n")
    target.chmod(mode)
    return target


def status(
    capsys: pytest.CaptureFixture[str], *args: str, damaged: bool = False
) -> tuple[int, dict]:
    code, out, err = run_main(capsys, "status", "--output-format", "json", *args)
    # a damaged state is said once on stderr (and in "attention"); nothing else goes there
    assert (err != "") == damaged, err
    assert len(err.splitlines()) == (1 if damaged else 0), err
    data = json.loads(out)
    assert set(data) == KEYS
    assert data["format"] == 1
    assert (code == 1) == bool(data["attention"])  # exit status and reasons agree
    return code, data


def status_text(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code, out, _ = run_main(capsys, "status", *args)
    return code, out


def add_record(vmid: int = 104, for_vmid: int = 102, since: float = 1714590190.0) -> None:
    with StateStore().hold(1, "test") as store:
        store.add(
            Record(
                vmid,
                GuestKind.QEMU,
                "win11",
                for_vmid,
                ["0000:01:00.0"],
                since=since,
                status=RecordStatus.STOPPED,
            )
        )


def write_log(root: Path, *lines: str) -> None:
    path = root / "var/log/pve-gpu-hook.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write("".join(line + "\n" for line in lines))


T0 = "2024-05-01T21:00:00+02:00"
T1 = "2024-05-01T21:03:10+02:00"
T2 = "2024-05-01T21:20:03+02:00"
GOOD_JOB = (
    f"{T0} job-init - called: job-init",
    f"{T0} job-start - called: job-start",
    f"{T1} backup-start 102 called: backup-start stop 102",
    f"{T1} backup-start 102 VM 104 (win11) shut down in 12 s: it held 0000:01:00.0",
    f"{T2} log-end 102 called: log-end stop 102",
    f"{T2} log-end 102 VM 104 (win11) started again after 17 min off",
    f"{T2} job-end - called: job-end",
)
FAILED_JOB = (
    f"{T0} job-start - called: job-start",
    f"{T1} backup-start 103 ERROR: cannot free 0000:01:00.0 for VM 103: VM 104 is protected",
    f"{T2} job-end - called: job-end",
)


# ---- all fine -----------------------------------------------------------------------------------


def test_all_fine(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = status(capsys)
    assert code == 0
    assert data["registered"] is True
    assert data["script"] == HOOK_PATH and data["script_line"] == 6
    assert data["hook_path"] == HOOK_PATH and data["hook_executable"] is True
    assert data["chain"] is None
    assert data["bypassing_jobs"] == [] and data["waiting"] == [] and data["corrupt_state"] == []
    assert data["last_job"] is None
    assert data["override"] == {
        "path": "/etc/pve-gpu-hook/config.yaml",
        "exists": False,
        "valid": True,
        "error": None,
        "values": {
            "shutdown_timeout": 180,
            "force_stop": False,
            "start_timeout": 0,
            "shutdown_watch": 1800,
            "protect": [],
            "metrics_file": "/var/lib/prometheus/node-exporter/pve-gpu-hook.prom",
            "restart": "job-aware",
            "keep_down_max": 1800,
        },
        "unknown_protect": [],
    }
    assert data["state_error"] is None and data["not_started_again"] == []
    assert data["night"] is None


def test_quiet_answers_by_exit_status_alone(root: Path, capsys) -> None:
    """For Nagios/Zabbix/CheckMK style checks: nothing printed, 0 or 1 as status says."""
    assert run_main(capsys, "status", "--quiet") == (0, "", "")
    add_record()
    assert run_main(capsys, "status", "-q") == (1, "", "")
    assert status(capsys)[0] == 1  # the same answer as the full view


def test_metrics_file_turned_off_is_shown(root: Path, capsys) -> None:
    (root / "etc/pve-gpu-hook").mkdir()
    (root / "etc/pve-gpu-hook/config.yaml").write_text("metrics_file: off\n")
    code, data = status(capsys)
    assert code == 0
    assert data["override"]["values"]["metrics_file"] is False
    code, text = status_text(capsys)
    assert "metrics_file=no" in text


def test_override_values_in_force(root: Path, capsys) -> None:
    (root / "etc/pve-gpu-hook").mkdir()
    (root / "etc/pve-gpu-hook/config.yaml").write_text("protect: [104, 101]\nforce_stop: true\n")
    (root / "etc/pve/qemu-server").mkdir()
    for vmid in (101, 104):
        (root / f"etc/pve/qemu-server/{vmid}.conf").write_text("memory: 512\n")
    code, data = status(capsys)
    assert code == 0
    assert data["override"]["exists"] is True
    assert data["override"]["values"]["protect"] == [101, 104]
    assert data["override"]["values"]["force_stop"] is True


def test_without_vzdump_conf_nothing_is_fine(tmp_path: Path, monkeypatch, capsys) -> None:
    """No /etc/vzdump.conf: vzdump does not call the hook, whatever else this host is."""
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(tmp_path))
    code, data = status(capsys)
    assert code == 1
    assert data["registered"] is False and data["vzdump_conf_exists"] is False
    assert data["attention"] == [
        "not registered: /etc/vzdump.conf does not exist (is this a Proxmox VE host? the file "
        "belongs to pve-manager): restore it, then run 'pve-gpu-hook register'"
    ]


def test_status_writes_nothing(root: Path, capsys) -> None:
    add_record()
    (root / "var/lib/pve-gpu-hook/state.json").write_text("{garbage")  # corrupt, not moved
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))
    status(capsys, damaged=True)
    status_text(capsys)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


# ---- every reason for exit status 1 ------------------------------------------------------------


def test_not_registered(root: Path, capsys) -> None:
    assert cli.main(["unregister"]) == 0
    code, data = status(capsys)
    assert code == 1
    assert data["registered"] is False and data["script"] is None
    assert data["attention"] == [
        "not registered: /etc/vzdump.conf sets no hook script; run 'pve-gpu-hook register'"
    ]


def test_vzdump_conf_missing_on_a_pve_host(root: Path, capsys) -> None:
    (root / "etc/vzdump.conf").unlink()
    code, data = status(capsys)
    assert code == 1 and data["vzdump_conf_exists"] is False
    assert "does not exist" in data["attention"][0]


def test_another_hook_active_without_chain(root: Path, capsys) -> None:
    with (root / "etc/vzdump.conf").open("a") as f:
        f.write("script: /usr/local/bin/old-hook\n")
    code, data = status(capsys)
    assert code == 1
    assert data["registered"] is False
    assert (data["script"], data["script_line"]) == ("/usr/local/bin/old-hook", 8)
    assert len(data["attention"]) == 1 and "register --chain" in data["attention"][0]


def test_hook_file_missing(root: Path, capsys) -> None:
    (root / HOOK_PATH.lstrip("/")).unlink()
    code, data = status(capsys)
    assert code == 1 and data["hook_executable"] is False
    assert "missing or not executable" in data["attention"][0]


def test_chained_hook_ok_and_failing_its_checks(root: Path, capsys) -> None:
    assert cli.main(["unregister"]) == 0
    script = install(root, "/usr/local/bin/old-hook")
    with (root / "etc/vzdump.conf").open("a") as f:
        f.write("script: /usr/local/bin/old-hook\n")
    assert cli.main(["register", "--chain"]) == 0
    code, data = status(capsys)
    assert code == 0
    assert data["chain"] == {"path": "/usr/local/bin/old-hook", "ok": True, "problem": None}
    script.chmod(0o777)  # someone loosened it later: the hook will refuse to run it
    code, data = status(capsys)
    assert code == 1
    assert data["chain"]["ok"] is False
    assert data["chain"]["problem"] == "is writable by group or others"
    assert "/usr/local/bin/old-hook is writable by group or others" in data["attention"][0]


def test_job_bypassing_the_hook(root: Path, capsys) -> None:
    (root / "etc/pve/jobs.cfg").write_text(
        "vzdump: backup-1a2b3c4d-0001\n\tschedule 21:00\n\tall 1\n\tscript /root/hook.sh\n\n"
        "vzdump: backup-1a2b3c4d-0002\n\tschedule 22:00\n\tvmid 102\n"
    )
    code, data = status(capsys)
    assert code == 1
    assert data["bypassing_jobs"] == ["backup-1a2b3c4d-0001"]
    assert len(data["attention"]) == 1 and "backup-1a2b3c4d-0001" in data["attention"][0]


def test_invalid_override_file_names_file_and_line(root: Path, capsys) -> None:
    (root / "etc/pve-gpu-hook").mkdir()
    path = root / "etc/pve-gpu-hook/config.yaml"
    path.write_text("shutdown_timeout: 60\nforce_stop: maybe\n")
    code, data = status(capsys)
    assert code == 1
    assert data["override"]["valid"] is False and data["override"]["values"] is None
    assert data["override"]["error"].startswith(f"{path}:2: force_stop")
    assert "the hook stops no guest until it is fixed" in data["attention"][0]


def test_guests_waiting_to_be_started(root: Path, capsys) -> None:
    add_record(104, 102, since=1714590190.0)
    code, data = status(capsys)
    assert code == 1
    [waiting] = data["waiting"]
    assert waiting == {
        "vmid": 104,
        "type": "qemu",
        "name": "win11",
        "status": "stopped",
        "since": waiting["since"],
        "for_vmid": 102,
        "note": None,
    }
    # ISO 8601 with the local offset, the same instant
    parsed = time.strptime(waiting["since"][:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(parsed) - 1714590190.0) < 1
    assert "pve-gpu-hook recover" in data["attention"][0]


def test_corrupt_state_kept_aside(root: Path, capsys) -> None:
    aside = root / "var/lib/pve-gpu-hook/state.json.corrupt-20240501T210500"
    aside.parent.mkdir(parents=True, exist_ok=True)
    aside.write_text("{broken")
    code, data = status(capsys, damaged=True)
    assert code == 1
    assert data["corrupt_state"] == [str(aside)]
    assert "damaged state file(s) kept aside" in data["attention"][0]


def test_corrupt_live_state_file_still_shows_intact_records(root: Path, capsys) -> None:
    add_record(104, 102)
    path = root / "var/lib/pve-gpu-hook/state.json"
    path.write_text(path.read_text().replace('{"format": 2}', '{"format": [[[', 1))
    code, data = status(capsys, damaged=True)
    assert code == 1
    assert data["corrupt_state"] == [str(path)]
    assert [w["vmid"] for w in data["waiting"]] == [104]  # salvaged, not forgotten
    assert any("is corrupt" in item for item in data["attention"])


def test_last_job_with_errors(root: Path, capsys) -> None:
    write_log(root, *GOOD_JOB, *FAILED_JOB)
    code, data = status(capsys)
    assert code == 1
    job = data["last_job"]
    assert (job["start"], job["end"], job["end_phase"]) == (T0, T2, "job-end")
    assert (job["result"], job["errors"]) == ("error", 1)
    assert job["actions"] == [
        {
            "time": T1,
            "phase": "backup-start",
            "vmid": 103,
            "message": "ERROR: cannot free 0000:01:00.0 for VM 103: VM 104 is protected",
        }
    ]
    assert "logged 1 error(s)" in data["attention"][0]


def test_an_older_failed_job_does_not_alarm(root: Path, capsys) -> None:
    write_log(root, *FAILED_JOB, *GOOD_JOB)
    code, data = status(capsys)
    assert code == 0
    job = data["last_job"]
    assert job["result"] == "ok" and job["errors"] == 0
    assert [a["message"] for a in job["actions"]] == [
        "VM 104 (win11) shut down in 12 s: it held 0000:01:00.0",
        "VM 104 (win11) started again after 17 min off",
    ]


# ---- the log parser ------------------------------------------------------------------------------


def parsed_job(lines: list[str]) -> dict[str, object] | None:
    """last_job over log lines as the log file holds them (unparsable ones are dropped)."""
    return last_job([parsed for line in lines if (parsed := LogLine.parse(line))])


def test_last_job_parser_edge_cases() -> None:
    assert parsed_job([]) is None
    assert parsed_job(["garbage", f"{T0} recover 104 record dropped"]) is None
    # still running (or vzdump was killed): no end
    job = parsed_job(list(GOOD_JOB[:4]))
    assert job is not None and job["result"] == "unfinished" and job["end"] is None
    # job-end failed, then job-abort ran too: the end is job-abort's
    job = parsed_job([*FAILED_JOB, f"{T2} job-abort - called: job-abort"])
    assert job is not None and job["end_phase"] == "job-abort" and job["result"] == "error"
    job = parsed_job([*GOOD_JOB[:-1], f"{T2} job-abort - called: job-abort"])
    assert job is not None and job["result"] == "aborted"
    # the next queued job's job-init and a recover after the end are not part of the job
    job = parsed_job([*GOOD_JOB, f"{T2} job-init - called: job-init", f"{T2} recover 104 started"])
    assert job is not None and len(job["actions"]) == 2 and job["result"] == "ok"


def test_log_line_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Log.file writes, LogLine.parse reads back: the format has one owner."""
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(tmp_path))
    Log("backup-start", 102, echo=False).file("VM 104 (win 11) shut down in 3 s")
    Log("job-end", echo=False).file("done")
    (first, second) = read_tail()
    assert (first.phase, first.vmid, first.message) == (
        "backup-start",
        102,
        "VM 104 (win 11) shut down in 3 s",
    )
    assert (second.phase, second.vmid, second.message) == ("job-end", None, "done")


# ---- output forms ----------------------------------------------------------------------------


def test_piped_text(root: Path, capsys) -> None:
    """Sections of "Key: value" lines as pvecm status prints them; VM/CT; PVE's local times."""
    add_record(104, 102, since=1714590190.0)
    write_log(root, *GOOD_JOB)
    code, out = status_text(capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[:2] == ["Hook", "----"]
    assert "ITEM" not in out and "STATE" not in out
    squeezed = [" ".join(line.split()) for line in lines]
    assert "Registered: yes (/etc/vzdump.conf line 6)" in squeezed
    assert "Waiting guests: 1: VM 104 (win11)" in squeezed
    assert "Damaged state: none" in squeezed
    assert lines[lines.index("Last job") : lines.index("Last job") + 2] == ["Last job", "--------"]
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1714590190.0))
    header = next(line for line in lines if line.startswith("VMID"))
    assert header.split("  ")[0:2] == ["VMID", "TYPE"]
    row = lines[lines.index(header) + 1]
    assert row.split()[:4] == ["104", "VM", "win11", "stopped"]
    assert local in row and row.split()[6] == "102"
    assert "\x1b" not in out and "─" not in out  # plain: no colours, no box drawing
    assert any(line.startswith("warning: 1 guest(s) stopped by pve-gpu-hook") for line in lines)
    # the job summed up; its every action only with --verbose
    assert "VM 104 (win11) started again after 17 min off" not in out
    code, out = status_text(capsys, "--verbose")
    assert "VM 104 (win11) started again after 17 min off" in out


def test_piped_text_noheader(root: Path, capsys) -> None:
    code, out = status_text(capsys, "--noheader")
    assert code == 0
    assert out.splitlines()[0].startswith("Registered:")
    assert "----" not in out and "all fine: nothing needs attention" in out


@pytest.mark.parametrize("fmt", ["json-pretty", "yaml"])
def test_other_machine_formats_carry_the_same_data(root: Path, capsys, fmt: str) -> None:
    add_record()
    _, data = status(capsys)
    code = cli.main(["status", "--output-format", fmt])
    out = capsys.readouterr().out
    assert code == 1
    assert (json.loads(out) if fmt == "json-pretty" else yaml.safe_load(out)) == data


def test_subprocess_json(root: Path) -> None:
    (root / "etc/pve/jobs.cfg").write_text("vzdump: backup-x\n\tscript /root/h.sh\n")
    env = dict(os.environ, PVE_GPU_HOOK_ROOT=str(root), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "pvegpuhook", "status", "--output-format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    data = json.loads(result.stdout)
    assert set(data) == KEYS
    assert data["registered"] is True and data["bypassing_jobs"] == ["backup-x"]


# ---- against the simulator: a real job's log and a crashed job's record -------------------------


def test_after_a_real_job_and_after_a_crash(tmp_path: Path, monkeypatch, capsys) -> None:
    node = seed_node(tmp_path)
    monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(tmp_path))
    install(tmp_path, HOOK_PATH)
    node.write_vzdump_conf(STOCK)
    assert cli.main(["register"]) == 0
    assert run_job(node, [102], mode="stop").ok
    code, data = status(capsys)
    assert code == 0, data["attention"]
    job = data["last_job"]
    assert job["result"] == "ok" and job["end_phase"] == "job-end"
    assert [a["phase"] for a in job["actions"]] == ["backup-start", "log-end", "job-end"]
    assert "VM 104 (win11) shut down" in job["actions"][0]["message"]
    assert job["actions"][2]["message"].startswith("this job: 1 guest(s) shut down")

    # vzdump dies after VM 104 was shut down for VM 103: 104 stays off, status must say so
    run_job(node, [103], mode="stop", crash_after=("backup-start", 103))
    code, data = status(capsys)
    assert code == 1
    assert [(w["vmid"], w["for_vmid"], w["name"]) for w in data["waiting"]] == [(104, 103, "win11")]
    assert data["last_job"]["result"] == "unfinished"


def test_symlinked_vzdump_conf_is_read_like_vzdump_reads_it(root: Path, capsys) -> None:
    real = root / "srv/vzdump.conf"
    real.parent.mkdir()
    (root / "etc/vzdump.conf").rename(real)
    (root / "etc/vzdump.conf").symlink_to(real)
    code, data = status(capsys)
    assert code == 0 and data["registered"] is True


def test_unreadable_vzdump_conf(root: Path, capsys) -> None:
    (root / "etc/vzdump.conf").unlink()
    (root / "etc/vzdump.conf").mkdir()
    code, data = status(capsys)
    assert code == 1 and data["registered"] is False
    assert "not a regular file" in data["attention"][0]
