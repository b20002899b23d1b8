"""The optional override file ``/etc/pve-gpu-hook/config.yaml``, validated with file:line errors.

:data:`OPTIONS` is the one schema of the file: it drives the validation here, the commented
template the package installs (``etc/config.yaml``) and the KEYS section of
``pve-gpu-hook.yaml(5)``; ``tools/manpage.py`` writes both from it and the tests check that the
committed files are current.

PyYAML is imported only when the file holds more than comments: the package installs a fully
commented template, and the hook should not pay for a parser it does not need.
"""

from __future__ import annotations

from pvegpuhook import paths
from pvegpuhook.errors import ConfigError
from pvegpuhook.vmid import is_vmid

RESTART_POLICIES = ("job-aware", "after-guest", "after-job")
SECONDS = "a whole number of seconds (1-86400)"
# the directory Debian's prometheus-node-exporter reads with its textfile collector
METRICS_FILE = "/var/lib/prometheus/node-exporter/pve-gpu-hook.prom"
START_SECONDS = "a whole number of seconds (0-86400)"


class Option:
    """One key of the override file: its type, default, and how the template and the man page
    describe it (``doc`` uses two marks: ````literal```` and ``*word*``)."""

    __slots__ = ("name", "expected", "default", "comment", "doc", "example")

    def __init__(
        self, name: str, expected: str, default: object, comment: str, doc: str, example: str = ""
    ) -> None:
        self.name = name
        self.expected = expected  # the type, as error messages say it
        self.default = default
        self.comment = comment  # one line above the key in the template
        self.doc = doc
        self.example = example  # a further commented line in the template


OPTIONS: tuple[Option, ...] = (
    Option(
        "shutdown_timeout",
        SECONDS,
        180,
        "Seconds a guest that holds the GPU gets to shut down gracefully (qm/pct shutdown "
        "--timeout); a guest's own longer 'startup: down=' wins.",
        "How long a guest that holds a needed GPU gets to shut down gracefully: the "
        "``--timeout`` of ``qm shutdown`` and ``pct shutdown``. A guest whose own ``startup: "
        "down=`` (its shutdown timeout in Proxmox VE) is longer gets that instead. When it is "
        "still running after that, the backup that needs the GPU fails, unless ``force_stop`` "
        "is set. PVE itself may take up to about twice the timeout (with the QEMU guest agent, "
        "first the agent's answer, then the power-off; for a container, ``lxc-stop`` and then "
        "the wait for its end), plus its config lock: the hook waits that long for the command, "
        "and never kills it. ``shutdown_timeout`` is also how long the hook waits, at the end "
        "of a guest's backup, for the paused QEMU vzdump started to be gone before it starts "
        "the holders again.",
    ),
    Option(
        "force_stop",
        "true or false",
        False,
        "After that wait, hard-stop the holder (qm/pct stop) instead of failing the backup "
        "that needs it.",
        "When a holder did not shut down within ``shutdown_timeout``, hard-stop it "
        "(``qm stop``, ``pct stop``) instead of failing the backup that needs its GPU. A hard "
        "stop is like pulling the power cord of the guest: leave this off unless the guest is "
        "known to cope.",
    ),
    Option(
        "start_timeout",
        START_SECONDS,
        0,
        "Least seconds to wait until a guest the hook starts again is confirmed running; 0: as "
        "long as Proxmox VE allows for that guest's start.",
        "The least time the hook waits until a guest it starts again is confirmed running. "
        "The hook always waits as long as Proxmox VE may take to start that guest: for a VM "
        "PVE's own start timeout (30 s, or the memory in GiB above 30 GiB; four times that "
        "with a passed-through PCI device; at least 150 s with hugepages, 300 s when resuming "
        "from hibernation; plus 5 s per network device: 125 s for a GPU VM with 16 GiB and one "
        "network device, 261 s with 64 GiB), plus PVE's waits for the config lock and the "
        "previous QEMU's scope, an HA request's hand-over and a margin; for a container PVE's "
        "config lock and start confirmation plus the same. ``0``, the default, adds nothing to "
        "that; a larger value makes the wait at least that long, for example for a guest "
        "hookscript that takes long at ``pre-start``. A smaller value has no effect: the hook "
        "never gives up on a start PVE may still complete. It never kills ``qm start`` or "
        "``pct start``: when the wait is over and the command still runs, the hook stops "
        "waiting and says so. A guest that is not confirmed running keeps its record in the "
        "state file; ``job-end`` then fails, so the backup notification says so, and "
        "``pve-gpu-hook status`` and ``pve-gpu-hook recover`` show it (a later phase or "
        "``recover`` drops the record once the guest runs).",
    ),
    Option(
        "shutdown_watch",
        "a whole number of seconds (0-86400)",
        1800,
        "Seconds a holder whose shutdown timed out is watched: if it powers off late, it is "
        "started again (0: not watched).",
        "A guest that did not shut down within ``shutdown_timeout`` still got the request, and "
        "may power off minutes later (a Windows guest installing updates). For this long after "
        "the request the hook keeps its record and watches it: when it powers off it is started "
        "again — by the phase that runs then, or after the job by a ``pve-gpu-hook recover "
        "--watch`` the hook leaves running (``pve-gpu-hook recover`` leaves one too, when the "
        "job was killed before its end). Once this time is over, a guest that still runs is "
        "as it was before the job, and its record is dropped. 0 drops it at once.",
    ),
    Option(
        "protect",
        "a list of VMIDs",
        [],
        "VMIDs never stopped to free a GPU; the backups that need their GPU fail with a clear "
        "message.",
        "Guests that are never stopped to free a GPU, for example a VM whose GPU workload must "
        "not be interrupted. A backup that needs the GPU a protected guest holds fails with one "
        "clear line naming it, instead of the guest being shut down. ``protect:`` with no value "
        "means no guest. Each VMID is a whole number from 100 to 999999999.",
        example="for example: protect: [104, 110]",
    ),
    Option(
        "restart",
        ", ".join(RESTART_POLICIES[:-1]) + " or " + RESTART_POLICIES[-1],
        "job-aware",
        "When stopped holders start again: job-aware (once the job no longer needs their GPU), "
        "after-guest or after-job.",
        "When the guests the hook stopped are started again. ``job-aware`` (the default): the "
        "hook reads which guests the backup job still has to back up (from vzdump's task log) "
        "and keeps a holder down while a later guest of the job needs its GPU and that guest's "
        "backup is expected to begin within ``keep_down_max``; it starts the holder right after "
        "the last such backup. A holder is then shut down once per night instead of once per "
        "backup that needs its GPU. When the job's guest list cannot be learned, it behaves as "
        "``after-guest`` and says so once in the task log. ``after-guest``: as soon as the "
        "backup that needed their GPU is done (at its ``log-end`` phase); the next backup that "
        "needs the same GPU stops them again. ``after-job``: at the end of the whole backup job "
        "(``job-end`` or ``job-abort``). In every case every guest still recorded is started at "
        "the end of the job. Before version 0.2 this key was called ``restore``; that name is "
        "still read (``pve-gpu-hook status`` notes it).",
    ),
    Option(
        "keep_down_max",
        "a whole number of seconds (0-86400)",
        1800,
        "job-aware: the longest expected wait (s) until the next backup that needs a holder's "
        "GPU for which it stays down.",
        "With ``restart: job-aware``, a holder stays down between two backups that need its GPU "
        "only when the backups in between are expected to take at most this long: the sum of "
        "their previous durations, read from vzdump's per-guest logs (a guest never backed up "
        "counts 10 minutes). A longer gap starts it in between, as ``after-guest`` would.",
    ),
    Option(
        "metrics_file",
        "an absolute path ending in .prom, or false",
        METRICS_FILE,
        "The metrics file for node_exporter's textfile collector, written only when its "
        "directory exists; false: none.",
        "Where the hook and the command write their metrics for Prometheus' node_exporter "
        "(its textfile collector reads every ``*.prom`` file of its directory) or any other "
        "monitoring that reads files: guests waiting to be started again, a damaged state file, "
        "the registration, the last job's result; see ``pve-gpu-hook(8)``, METRICS. The file "
        "is written only when its directory exists, so installing ``prometheus-node-exporter`` "
        "is all it takes, and it is readable by every user (mode 0644). ``false`` (or ``off``, "
        "or no value) writes none.",
        example="for example: metrics_file: false",
    ),
)
SCHEMA: dict[str, Option] = {option.name: option for option in OPTIONS}
# old names still read from upgraded hosts: old → new
RENAMED = {"restore": "restart"}


class Settings:
    __slots__ = (
        "shutdown_timeout",
        "force_stop",
        "start_timeout",
        "shutdown_watch",
        "protect",
        "keep_down_max",
        "restart",
        "metrics_file",
        "source",
        "notes",
    )

    def __init__(self) -> None:
        self.shutdown_timeout = 180
        self.force_stop = False
        self.start_timeout = 0  # 0: as long as PVE allows for the guest (pvegpuhook.timing)
        self.shutdown_watch = 1800
        self.protect: frozenset[int] = frozenset()
        self.metrics_file: str | None = METRICS_FILE  # None: no metrics file
        self.restart = "job-aware"
        self.keep_down_max = 1800
        self.source: str | None = None  # the file the values came from, None for defaults
        self.notes: list[str] = []  # e.g. an old key name that was read

    def as_dict(self) -> dict[str, object]:
        return {
            "shutdown_timeout": self.shutdown_timeout,
            "force_stop": self.force_stop,
            "start_timeout": self.start_timeout,
            "shutdown_watch": self.shutdown_watch,
            "protect": sorted(self.protect),
            "restart": self.restart,
            "metrics_file": self.metrics_file or False,
            "keep_down_max": self.keep_down_max,
        }


def _only_comments(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and stripped not in ("---", "..."):
            return False
    return True


def load_settings(path: str | None = None) -> Settings:
    """Settings from the override file; defaults when it is absent. Raises ConfigError."""
    path = path or paths.host(paths.OVERRIDE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return Settings()
    except IsADirectoryError:
        raise ConfigError(path, None, "cannot read: it is a directory") from None
    except PermissionError:
        from pvegpuhook.errors import NotPermitted

        raise NotPermitted(path) from None
    except OSError as error:
        raise ConfigError(path, None, f"cannot read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, None, f"cannot read: not UTF-8 text ({error.reason})") from None
    settings = Settings()
    settings.source = path
    if _only_comments(text):
        return settings
    return parse_settings(text, path, settings)


def parse_settings(text: str, path: str, settings: Settings | None = None) -> Settings:
    import yaml

    settings = settings or Settings()
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        if line is not None and line > len(text.splitlines()) and error.context_mark is not None:
            line = error.context_mark.line + 1  # "end of file": point at what was left open
        problem = error.problem or error.context or "invalid YAML"
        if "\t" in problem or "\\t" in problem or "tab" in problem.lower():
            problem = "indent with spaces, not tabs"
        raise ConfigError(path, line, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as error:  # e.g. a control character: no mark, but a position
        position = getattr(error, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else None
        raise ConfigError(path, line, f"invalid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(path, None, "invalid YAML: nested too deeply") from None
    if document is None:
        return settings
    if not isinstance(document, yaml.MappingNode):
        raise ConfigError(path, document.start_mark.line + 1, "expected a mapping of key: value")
    loader = yaml.SafeLoader("")

    def construct(node: yaml.Node, key: str) -> object:
        # tagged values (!!int abc, !!python/name:...) fail here, not later as a traceback
        try:
            return loader.construct_object(node, deep=True)
        except Exception as error:  # noqa: BLE001 - any failure here is the file's, not ours
            reason = getattr(error, "problem", None) or str(error) or type(error).__name__
            raise ConfigError(path, node.start_mark.line + 1, f"{key}: {reason}") from None

    seen: set[str] = set()
    for key_node, value_node in document.value:
        line = key_node.start_mark.line + 1
        given = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        key = RENAMED.get(given, given) if isinstance(given, str) else None
        if key not in SCHEMA:
            known = ", ".join(SCHEMA)
            raise ConfigError(path, line, f"unknown key {given!r} (known keys: {known})")
        assert isinstance(key, str) and isinstance(given, str)
        if key in seen:
            raise ConfigError(path, line, f"{key}: given twice")
        seen.add(key)
        if given != key:
            settings.notes.append(
                f"{path}:{line}: '{given}:' is the old name of '{key}:'; it is still read, "
                f"rename it when convenient"
            )
        if key == "protect" and isinstance(value_node, yaml.SequenceNode):
            settings.protect = frozenset(
                _vmid(construct(item, key), path, item.start_mark.line + 1)
                for item in value_node.value
            )
            continue
        _apply(settings, key, construct(value_node, key), path, value_node.start_mark.line + 1)
    return settings


TRUE_WORDS = ("1", "on", "yes", "true")  # pve-common JSONSchema.pm parse_boolean
FALSE_WORDS = ("0", "off", "no", "false")


def boolean(value: object) -> bool | None:
    """A boolean as PVE reads one in its own files; YAML reads ``yes`` as true but ``"yes"`` as a
    string, and an admin means the same by both. None when it is none of these words."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    return None


def _vmid(item: object, path: str, line: int) -> int:
    if not is_vmid(item):
        raise ConfigError(path, line, f"protect: {item!r} is not a VMID (100-999999999)")
    assert isinstance(item, int)
    return item


def _apply(settings: Settings, key: str, value: object, path: str, line: int) -> None:
    expected = SCHEMA[key].expected

    def wrong() -> ConfigError:
        return ConfigError(path, line, f"{key}: expected {expected}, got {value!r}")

    if key in ("shutdown_timeout", "start_timeout"):
        least = 0 if key == "start_timeout" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 86400:
            raise wrong()
        setattr(settings, key, value)
    elif key == "shutdown_watch":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 86400:
            raise wrong()
        settings.shutdown_watch = value
    elif key == "keep_down_max":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 86400:
            raise wrong()
        settings.keep_down_max = value
    elif key == "force_stop":
        flag = boolean(value)
        if flag is None:
            raise ConfigError(
                path,
                line,
                f"{key}: expected true or false (yes/no, on/off and 1/0 too, quoted or not, as "
                f"PVE reads its own booleans), got {value!r}",
            )
        settings.force_stop = flag
    elif key == "protect":
        if value is not None:  # "protect:" with nothing after it means none
            raise wrong()
        settings.protect = frozenset()
    elif key == "restart":
        if value not in RESTART_POLICIES:
            raise wrong()
        settings.restart = str(value)
    elif key == "metrics_file":
        if value is None or value is False or value == "":  # no value, "", false, off, no
            settings.metrics_file = None
        elif not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise wrong()
        elif not value.endswith(".prom"):
            # node_exporter reads nothing else: a file it never reads would say all is fine
            raise ConfigError(
                path,
                line,
                f"{key}: {value!r} must end in .prom (node_exporter reads only those files)",
            )
        else:
            settings.metrics_file = value
