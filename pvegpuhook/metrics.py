"""The metrics file: what the hook knows, for monitoring that runs without root.

Prometheus' node_exporter (Debian: ``prometheus-node-exporter``) reads every ``*.prom`` file of
``/var/lib/prometheus/node-exporter`` with its textfile collector at each scrape
(docs/pve-facts.md §11); a Zabbix or CheckMK agent, or a shell script, can read the same file.
This module is its only writer. :func:`render` is pure: the facts in, the text exposition format
out. :func:`update` gathers the facts and replaces the file

* only when ``metrics_file:`` is set (it is by default) and its directory exists: installing the
  collector is all it takes;
* atomically (:func:`pvegpuhook.files.write_atomic`: a temp file whose name does not end in
  ``.prom``, so the collector never reads it, then a rename), and only while the caller holds the
  state lock, so that an older view never replaces a newer one;
* without fsync: two fsyncs cost several milliseconds each on a loaded disk, ten times the rest
  of the write (BENCHMARKS.md). The state file, synced just before, is the truth; this file may
  come back one write old only after a host crash within the file system's commit interval
  (seconds; a guest's shutdown, which follows the write, takes longer);
* mode 0644, as the collector runs as an unprivileged user;
* with samples without timestamps: the collector skips a whole file that has one.

The hook calls it wherever what the file shows changes: when a holder is recorded (before it is
touched, so that a crash mid-job leaves a file that already says a guest is off), after restarts
and at the end of every job; the command after ``recover`` (also each start of
``recover --watch``), ``register`` and ``unregister``. A
failure to write is logged in the log file and never fails anything.

The last job's figures are those of the last job whose end the hook saw, whether or not it stopped
a guest (a job that did nothing leaves no tally in the state directory). Between jobs they are
carried over from the metrics file itself: they belong to it, and nothing else keeps them.
"""

from __future__ import annotations

import os

from pvegpuhook import __version__, files, paths
from pvegpuhook.log import Log, clean

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pvegpuhook.records import JobTally, Record
    from pvegpuhook.settings import Settings
    from pvegpuhook.state import StateStore

PREFIX = "pve_gpu_hook_"
LAST_JOB = PREFIX + "last_job_"
CARRY_LIMIT = 64 * 1024  # our own file is a few hundred bytes per waiting guest


class Metric:
    """One metric family of the file: its name, labels and ``# HELP`` text (also the man page's
    METRICS section). Every one is a gauge: the per-job figures start again with each job, so
    none is a counter."""

    __slots__ = ("name", "labels", "help")

    def __init__(self, name: str, help_: str, labels: tuple[str, ...] = ()) -> None:
        self.name = PREFIX + name
        self.labels = labels
        self.help = help_


BUILD_INFO = Metric(
    "build_info",
    "Always 1; the label version is the version of pve-gpu-hook that wrote this file.",
    ("version",),
)
REGISTERED = Metric(
    "registered",
    "1 when /etc/vzdump.conf runs the hook (pve-gpu-hook register), 0 when not; as of the last "
    "write of this file.",
)
GUESTS_WAITING = Metric(
    "guests_waiting",
    "Guests the hook stopped (or is stopping) to free a GPU that are not running again yet "
    "('pve-gpu-hook status' lists them, 'pve-gpu-hook recover' starts them).",
)
GUESTS_WATCHED = Metric(
    "guests_watched",
    "Guests whose shutdown timed out and that still run: watched for shutdown_watch seconds, "
    "and started again if they power off late.",
)
WAITING_SINCE = Metric(
    "guest_waiting_since_timestamp_seconds",
    "When the hook stopped this guest, which waits to be started again (Unix time; 0 when not "
    "known). for_vmid: the VM whose backup needed its GPU.",
    ("vmid", "type", "name", "for_vmid"),
)
STATE_CORRUPT = Metric(
    "state_corrupt",
    "1 when a damaged state file was found (and kept aside): guests it named may still be off; "
    "see 'pve-gpu-hook status'.",
)
LAST_JOB_END = Metric(
    "last_job_end_timestamp_seconds",
    "When the last backup job the hook saw ended (its job-end or job-abort phase), Unix time.",
)
LAST_JOB_SUCCESS = Metric(
    "last_job_success",
    "1 when every guest the hook had stopped ran again at the end of the last job, 0 when one "
    "was left off (the job's end failed).",
)
LAST_JOB_HOLDERS = Metric(
    "last_job_holders_stopped",
    "Guests the hook shut down in the last job to free a GPU for a backup.",
)
LAST_JOB_CYCLES = Metric(
    "last_job_shutdown_cycles",
    "Shutdowns of GPU holders in the last job, each to be followed by a start; a holder is "
    "cycled once per backup that needs its GPU (restart: after-guest).",
)
LAST_JOB_DOWNTIME = Metric(
    "last_job_holder_downtime_seconds",
    "Seconds the holders stopped in the last job were down, summed over the holders.",
)
LAST_JOB_FAILED = Metric(
    "last_job_failed_restarts",
    "Holders stopped in the last job whose start again failed (the last try of each).",
)
METRICS = (
    BUILD_INFO,
    REGISTERED,
    GUESTS_WAITING,
    WAITING_SINCE,
    GUESTS_WATCHED,
    STATE_CORRUPT,
    LAST_JOB_END,
    LAST_JOB_SUCCESS,
    LAST_JOB_HOLDERS,
    LAST_JOB_CYCLES,
    LAST_JOB_DOWNTIME,
    LAST_JOB_FAILED,
)


class LastJob:
    """The figures of the last job whose end the hook saw."""

    __slots__ = ("ended", "ok", "holders_stopped", "cycles", "downtime", "failed_restarts")

    def __init__(
        self,
        ended: float,
        ok: bool,
        holders_stopped: int = 0,
        cycles: int = 0,
        downtime: float = 0.0,
        failed_restarts: int = 0,
    ) -> None:
        self.ended = ended
        self.ok = ok
        self.holders_stopped = holders_stopped
        self.cycles = cycles
        self.downtime = downtime
        self.failed_restarts = failed_restarts

    @classmethod
    def at_end(cls, ended: float, ok: bool, tally: JobTally | None) -> LastJob:
        """The job that ends now; ``tally`` is its own (None when it stopped nobody)."""
        if tally is None:
            return cls(ended, ok)
        return cls(
            ended,
            ok,
            tally.holders_stopped,
            tally.cycles,
            tally.downtime(ended),
            tally.failed_restarts,
        )

    def samples(self) -> list[tuple[Metric, float]]:
        return [
            (LAST_JOB_END, self.ended),
            (LAST_JOB_SUCCESS, 1 if self.ok else 0),
            (LAST_JOB_HOLDERS, self.holders_stopped),
            (LAST_JOB_CYCLES, self.cycles),
            (LAST_JOB_DOWNTIME, self.downtime),
            (LAST_JOB_FAILED, self.failed_restarts),
        ]


# ---- the text format (pure) ---------------------------------------------------------------------


def render(
    records: list[Record],
    *,
    registered: bool,
    corrupt: bool,
    last_job: LastJob | None,
    version: str = __version__,
) -> str:
    """The file's text: Prometheus' text exposition format, without timestamps."""
    from pvegpuhook.records import RecordStatus

    # a guest whose shutdown timed out still runs: watched, not waiting to be started
    watched = [r for r in records if r.status == RecordStatus.STOP_FAILED]
    waiting = sorted((r for r in records if r not in watched), key=lambda r: r.vmid)
    since = [
        (
            {
                "vmid": str(r.vmid),
                "type": str(r.kind),
                "name": r.name or "",
                "for_vmid": str(r.for_vmid) if r.for_vmid is not None else "",
            },
            r.since or 0,  # unknown (a damaged record): an age alert fires at once
        )
        for r in waiting
    ]
    families: list[tuple[Metric, list[tuple[dict[str, str], float]]]] = [
        (BUILD_INFO, [({"version": version}, 1)]),
        (REGISTERED, [({}, 1 if registered else 0)]),
        (GUESTS_WAITING, [({}, len(waiting))]),
        (WAITING_SINCE, since),
        (GUESTS_WATCHED, [({}, len(watched))]),
        (STATE_CORRUPT, [({}, 1 if corrupt else 0)]),
    ]
    if last_job is not None:
        families += [(metric, [({}, value)]) for metric, value in last_job.samples()]
    out: list[str] = []
    for metric, samples in families:
        if not samples:
            continue
        out.append(f"# HELP {metric.name} {_help(metric.help)}")
        out.append(f"# TYPE {metric.name} gauge")
        for labels, value in samples:
            out.append(f"{metric.name}{_labels(labels)} {_number(value)}")
    return "\n".join(out) + "\n"


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_label_value(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _label_value(value: str) -> str:
    # control characters escaped as the log does; then the format's own three escapes
    return clean(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}"


def carried(text: str) -> LastJob | None:
    """The last job's figures as an earlier :func:`render` wrote them; None when absent."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(LAST_JOB):
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                return None
    try:
        return LastJob(
            values[LAST_JOB_END.name],
            values[LAST_JOB_SUCCESS.name] == 1,
            int(values[LAST_JOB_HOLDERS.name]),
            int(values[LAST_JOB_CYCLES.name]),
            values[LAST_JOB_DOWNTIME.name],
            int(values[LAST_JOB_FAILED.name]),
        )
    except (KeyError, ValueError, OverflowError):
        return None


# ---- the file -----------------------------------------------------------------------------------


def target(settings: Settings) -> str | None:
    """The metrics file's host path, or None when there is none to write: turned off, or its
    directory does not exist (no collector installed)."""
    if settings.metrics_file is None:
        return None
    path = paths.host(settings.metrics_file)
    return path if os.path.isdir(os.path.dirname(path)) else None


def wanted() -> bool:
    """Whether a metrics file is to be written (cheap: for a phase with nothing else to do)."""
    from pvegpuhook.errors import ConfigError
    from pvegpuhook.settings import Settings, load_settings

    try:
        settings = load_settings()
    except ConfigError:
        settings = Settings()  # as the hook does: an invalid file never stops the metrics
    return target(settings) is not None


def update(log: Log, store: StateStore, settings: Settings, job: LastJob | None = None) -> None:
    """Rewrite the metrics file from the state as it is now. The caller holds ``store``; ``job``:
    the job that ends now (else the last job's figures are carried over from the file)."""
    path = target(settings)
    if path is None:
        return
    from pvegpuhook import registration

    try:
        corrupt = bool(store.corrupt_files()) or store.salvaged is not None
        text = render(
            store.records(),
            registered=registration.registered(),
            corrupt=corrupt,
            last_job=job if job is not None else carried(_read_own(path)),
        )
        files.remove_own_temps(path)
        files.write_atomic(path, text.encode("utf-8"), mode=0o644, sync=False)
    except Exception as error:  # noqa: BLE001 - the metrics never fail a phase or a command
        reason = (error.strerror if isinstance(error, OSError) else None) or error
        log.file(f"metrics file {path} not written: {type(error).__name__}: {reason}")


def refresh(purpose: str, wait: float) -> None:
    """Rewrite the metrics file from outside the hook (``register``, ``unregister``): takes the
    state lock for as long as that takes, and gives up quietly after ``wait`` seconds (the hook
    writes it again at its next change)."""
    from pvegpuhook.errors import ConfigError, GpuHookError
    from pvegpuhook.settings import Settings, load_settings
    from pvegpuhook.state import StateStore

    try:
        settings = load_settings()
    except ConfigError:
        settings = Settings()
    if target(settings) is None:
        return
    log = Log(purpose, echo=False)
    store = StateStore(report=log.file)
    try:
        with store.hold(wait, f"{purpose}: metrics file"):
            update(log, store, settings)
    except GpuHookError as error:
        log.file(f"metrics file not written: {error}")


def _read_own(path: str) -> str:
    """The metrics file as we wrote it; empty when absent, not ours or not a regular file (the
    collector's directory may be writable by its unprivileged user)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return ""
        return os.read(fd, CARRY_LIMIT).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)
