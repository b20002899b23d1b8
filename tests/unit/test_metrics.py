"""Unit tests of the metrics file: the text :func:`pvegpuhook.metrics.render` makes, read back with
prometheus_client's parser (the format node_exporter's textfile collector reads), and how
:func:`pvegpuhook.metrics.update` writes it."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pvegpuhook import __version__, files, metrics
from pvegpuhook.errors import ConfigError
from pvegpuhook.log import Log
from pvegpuhook.model import GuestKind
from pvegpuhook.records import Cycle, JobTally, Record, RecordStatus
from pvegpuhook.settings import Settings, parse_settings
from pvegpuhook.state import StateStore

PROM_DIR = "var/lib/prometheus/node-exporter"
NOW = 1_800_000_000.0


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{family name: [(labels, value)]}, after checking what the collector would refuse."""
    families = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} twice"
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type == "gauge", family.name
        for sample in family.samples:
            # the collector skips a whole file with a client-side timestamp
            assert sample.timestamp is None, sample
        families[family.name] = [(dict(s.labels), s.value) for s in family.samples]
    return families


def record(vmid: int, **kwargs: object) -> Record:
    options = {"since": NOW - 600, "status": RecordStatus.STOPPED, **kwargs}
    name = options.pop("name", f"vm{vmid}")
    for_vmid = options.pop("for_vmid", 102)
    kind = options.pop("kind", GuestKind.QEMU)
    return Record(vmid, kind, name, for_vmid, ["0000:01:00.0"], **options)  # type: ignore[arg-type]


def test_render_names_every_fact_the_admin_alerts_on() -> None:
    job = metrics.LastJob(NOW, True, 1, 3, 42.5, 0)
    text = metrics.render(
        [record(104, name="win11"), record(110, kind=GuestKind.LXC, name="plex", for_vmid=106)],
        registered=True,
        corrupt=False,
        last_job=job,
    )
    got = parse(text)
    assert got == {
        "pve_gpu_hook_build_info": [({"version": __version__}, 1)],
        "pve_gpu_hook_registered": [({}, 1)],
        "pve_gpu_hook_guests_waiting": [({}, 2)],
        "pve_gpu_hook_guest_waiting_since_timestamp_seconds": [
            ({"vmid": "104", "type": "qemu", "name": "win11", "for_vmid": "102"}, NOW - 600),
            ({"vmid": "110", "type": "lxc", "name": "plex", "for_vmid": "106"}, NOW - 600),
        ],
        "pve_gpu_hook_guests_watched": [({}, 0)],
        "pve_gpu_hook_state_corrupt": [({}, 0)],
        "pve_gpu_hook_last_job_end_timestamp_seconds": [({}, NOW)],
        "pve_gpu_hook_last_job_success": [({}, 1)],
        "pve_gpu_hook_last_job_holders_stopped": [({}, 1)],
        "pve_gpu_hook_last_job_shutdown_cycles": [({}, 3)],
        "pve_gpu_hook_last_job_holder_downtime_seconds": [({}, 42.5)],
        "pve_gpu_hook_last_job_failed_restarts": [({}, 0)],
    }
    assert set(got) == {metric.name for metric in metrics.METRICS}


def test_names_follow_the_prometheus_conventions() -> None:
    for metric in metrics.METRICS:
        assert re.fullmatch(r"pve_gpu_hook_[a-z_]+", metric.name), metric.name
        assert not metric.name.endswith("_total"), "every metric is a gauge, no counter"
        if "timestamp" in metric.name or "downtime" in metric.name:
            assert metric.name.endswith("_seconds"), metric.name  # the unit in the name


def test_nothing_waiting_and_no_job_yet() -> None:
    got = parse(metrics.render([], registered=False, corrupt=True, last_job=None))
    assert got["pve_gpu_hook_guests_waiting"] == [({}, 0)]
    assert got["pve_gpu_hook_registered"] == [({}, 0)]
    assert got["pve_gpu_hook_state_corrupt"] == [({}, 1)]
    # no guest: no series (a family without samples is left out); no job seen: no job figures
    assert "pve_gpu_hook_guest_waiting_since_timestamp_seconds" not in got
    assert not [name for name in got if name.startswith("pve_gpu_hook_last_job_")]


def test_a_guest_whose_shutdown_timed_out_is_watched_not_waiting() -> None:
    """It still runs: starting it is not what anyone waits for; it is watched for a late
    power-off (docs/pve-facts.md §8)."""
    records = [
        record(104, status=RecordStatus.STOP_FAILED),
        record(110, status=RecordStatus.STOPPING),  # under way: may be down already
        record(111, status=RecordStatus.START_FAILED),
    ]
    got = parse(metrics.render(records, registered=True, corrupt=False, last_job=None))
    assert got["pve_gpu_hook_guests_waiting"] == [({}, 2)]
    assert got["pve_gpu_hook_guests_watched"] == [({}, 1)]
    since = got["pve_gpu_hook_guest_waiting_since_timestamp_seconds"]
    assert [labels["vmid"] for labels, _ in since] == ["110", "111"]


def test_unknown_since_reads_as_long_ago() -> None:
    """A damaged record without its time must still trip an alert on the waiting age."""
    got = parse(
        metrics.render([record(104, since=None)], registered=True, corrupt=True, last_job=None)
    )
    assert got["pve_gpu_hook_guest_waiting_since_timestamp_seconds"][0][1] == 0


@pytest.mark.parametrize(
    "name",
    ['say "hi"', "back\\slash", "new\nline", "esc\x1b[31m", "ünïcode", None, "trailing\\"],
)
def test_any_guest_name_gives_a_valid_file(name: str | None) -> None:
    text = metrics.render([record(104, name=name)], registered=True, corrupt=False, last_job=None)
    assert len(text.splitlines()) == text.count("\n")  # one sample per line, whatever the name
    labels, _ = parse(text)["pve_gpu_hook_guest_waiting_since_timestamp_seconds"][0]
    assert labels["vmid"] == "104"
    assert "\x1b" not in labels["name"] and "\n" not in labels["name"]
    if name is not None and name.isprintable():
        assert labels["name"] == name
    text.encode("utf-8")  # the format is UTF-8


def test_last_job_at_its_end_from_its_tally() -> None:
    tally = JobTally("4242", None, NOW - 3600)
    tally.stops += [
        Cycle(104, "VM 104", 102, NOW - 3000, back=NOW - 2900),
        Cycle(104, "VM 104", 103, NOW - 2000, back=NOW - 1950),
        Cycle(110, "CT 110", 106, NOW - 1000, failed=True),
    ]
    job = metrics.LastJob.at_end(NOW, False, tally)
    assert (job.holders_stopped, job.cycles, job.failed_restarts) == (2, 3, 1)
    assert job.downtime == pytest.approx(100 + 50 + 1000)  # one still down at the end
    idle = metrics.LastJob.at_end(NOW, True, None)  # a job that stopped nobody
    assert (idle.ended, idle.ok, idle.holders_stopped, idle.cycles, idle.downtime) == (
        NOW,
        True,
        0,
        0,
        0,
    )


def test_last_job_is_carried_over_from_the_file() -> None:
    job = metrics.LastJob(NOW + 0.123, False, 2, 5, 1234.567, 1)
    text = metrics.render([record(104)], registered=True, corrupt=False, last_job=job)
    again = metrics.carried(text)
    assert again is not None
    for name in metrics.LastJob.__slots__:
        assert getattr(again, name) == pytest.approx(getattr(job, name)), name
    assert metrics.carried("") is None
    assert (
        metrics.carried(metrics.render([], registered=True, corrupt=False, last_job=None)) is None
    )
    assert metrics.carried("pve_gpu_hook_last_job_success garbage\n") is None


# ---- the file -----------------------------------------------------------------------------


@pytest.fixture
def prom_dir(host_root: Path) -> Path:
    directory = host_root / PROM_DIR
    directory.mkdir(parents=True)
    return directory


def write_now(job: metrics.LastJob | None = None, settings: Settings | None = None) -> Log:
    store = StateStore()
    log = Log("test", echo=False)
    with store.hold(5, "test"):
        metrics.update(log, store, settings or Settings(), job)
    return log


def test_written_only_when_the_directory_exists(host_root: Path) -> None:
    write_now(metrics.LastJob(NOW, True))
    assert not (host_root / "var/lib/prometheus").exists()  # never created


def test_turned_off_by_the_setting(prom_dir: Path) -> None:
    settings = parse_settings("metrics_file: false\n", "config.yaml")
    write_now(metrics.LastJob(NOW, True), settings)
    assert os.listdir(prom_dir) == []


def test_a_moved_file(host_root: Path) -> None:
    (host_root / "srv/textfiles").mkdir(parents=True)
    settings = parse_settings("metrics_file: /srv/textfiles/gpu.prom\n", "config.yaml")
    write_now(metrics.LastJob(NOW, True), settings)
    assert "pve_gpu_hook_guests_waiting 0" in (host_root / "srv/textfiles/gpu.prom").read_text()


def test_a_file_the_collector_would_not_read_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"config.yaml:1: metrics_file: .* must end in .prom"):
        parse_settings("metrics_file: /var/lib/prometheus/node-exporter/gpu.txt\n", "config.yaml")


def test_mode_0644_whatever_the_umask(prom_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        write_now()
    finally:
        os.umask(old)
    path = prom_dir / "pve-gpu-hook.prom"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.stat().st_uid == os.geteuid()


def test_other_collectors_files_are_untouched(prom_dir: Path) -> None:
    others = {
        "apt.prom": "apt_upgrades_pending 3\n",
        ".smartmon.prom.tmp-77": "half written by another script\n",
        "pve-gpu-hook.prom.bak": "the admin's copy\n",
    }
    for name, text in others.items():
        (prom_dir / name).write_text(text)
    stale = prom_dir / ".pve-gpu-hook.prom.tmp-4242"  # ours, left by a killed writer
    stale.write_text("half")
    before = {name: (prom_dir / name).stat() for name in others}
    write_now()
    assert not stale.exists()
    for name, text in others.items():
        assert (prom_dir / name).read_text() == text
        assert (prom_dir / name).stat().st_mtime_ns == before[name].st_mtime_ns
    assert sorted(p.name for p in prom_dir.iterdir()) == sorted([*others, "pve-gpu-hook.prom"])


def test_a_symlink_in_its_place_is_replaced_not_followed(prom_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (prom_dir / "pve-gpu-hook.prom").symlink_to(victim)
    write_now()
    assert victim.read_text() == "precious\n"
    assert (prom_dir / "pve-gpu-hook.prom").is_file()
    assert not (prom_dir / "pve-gpu-hook.prom").is_symlink()


def test_last_job_survives_writes_between_jobs(prom_dir: Path) -> None:
    write_now(metrics.LastJob(NOW, False, 1, 1, 60.0, 1))
    write_now()  # e.g. recover: no job ends
    got = parse((prom_dir / "pve-gpu-hook.prom").read_text())
    assert got["pve_gpu_hook_last_job_end_timestamp_seconds"] == [({}, NOW)]
    assert got["pve_gpu_hook_last_job_failed_restarts"] == [({}, 1)]
    write_now(metrics.LastJob(NOW + 86400, True))  # the next night: nothing failed
    got = parse((prom_dir / "pve-gpu-hook.prom").read_text())
    assert got["pve_gpu_hook_last_job_failed_restarts"] == [({}, 0)]
    assert got["pve_gpu_hook_last_job_success"] == [({}, 1)]


def test_a_file_planted_by_someone_else_is_not_carried_over(prom_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a file owned by another user")
    path = prom_dir / "pve-gpu-hook.prom"
    path.write_text(
        metrics.render([], registered=True, corrupt=False, last_job=metrics.LastJob(NOW, True))
    )
    os.chown(path, 65534, 65534)
    write_now()
    assert "pve_gpu_hook_last_job_" not in path.read_text()
    assert path.stat().st_uid == 0


def test_a_failed_write_is_logged_and_never_raised(
    prom_dir: Path, host_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_atomic", full)
    write_now()  # does not raise
    log = (host_root / "var/log/pve-gpu-hook.log").read_text()
    assert "metrics file" in log and "No space left on device" in log
    assert os.listdir(prom_dir) == []


def test_the_waiting_guests_come_from_the_state(prom_dir: Path) -> None:
    store = StateStore()
    with store.hold(5, "test"):
        store.add(record(104, name="win11"))
        metrics.update(Log("test", echo=False), store, Settings())
    got = parse((prom_dir / "pve-gpu-hook.prom").read_text())
    assert got["pve_gpu_hook_guests_waiting"] == [({}, 1)]
    labels, since = got["pve_gpu_hook_guest_waiting_since_timestamp_seconds"][0]
    assert labels["vmid"] == "104" and since == NOW - 600
