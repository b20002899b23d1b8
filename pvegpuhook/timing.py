"""How long PVE itself may take to start or shut down a guest, derived from its config as PVE does.

The hook waits for a ``qm``/``pct`` command as long as PVE may take to finish it, and never kills
one: the CLI hands the work to a detached worker, so a killed ``qm start`` leaves that worker half
done (docs/pve-facts.md §8). Pure functions of a guest's config and the settings; no I/O.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pvegpuhook.pveconf import GuestConfig
    from pvegpuhook.settings import Settings

# PVE's own waits around a start or a shutdown, in seconds
CONFIG_LOCK = 10  # lock_config: the guest's config flock, "got timeout" after 10 s
SCOPE_GONE = 20  # vm_start_nolock: waits for the guest's old systemd scope to be removed
CT_MONITOR = 10  # pve-container vm_start: lxc's monitor confirms the start within 10 s
AGENT_PING = 3  # _do_vm_stop: guest-ping before guest-shutdown
LXC_STOP_EXTRA = 10  # pve-container vm_stop: lxc-stop gets T+5, then the socket poll T+5
QM_STOP_TIMEOUT = 60  # qm stop: quit, wait 60 s, SIGTERM, wait 10 s, SIGKILL, 1 s
QM_STOP_KILL = 11
HA_LOOPS = 20  # an HA-managed guest: the CRM and then the LRM act on a request, each every ~10 s
# the CLI's Perl start-up, the cluster file system, volume activation, a PCI reset: PVE bounds
# none of these; this is the margin the hook allows for them
OVERHEAD = 20
MEMORY_DEFAULT = 512  # MiB, qemu-server's default for "memory"


def _memory_mib(value: str | None) -> int:
    """``memory: 65536`` or ``memory: current=65536`` (a property string whose default key is
    ``current``); PVE's default when absent. A value PVE cannot parse fails the start at once."""
    if not value:
        return MEMORY_DEFAULT
    for item in value.split(","):
        key, eq, number = item.strip().partition("=")
        text = number if eq else key
        if (not eq or key == "current") and text.isascii() and text.isdigit():
            return int(text)
    return MEMORY_DEFAULT


def _indexed(key: str, prefix: str) -> bool:
    rest = key[len(prefix) :]
    return key.startswith(prefix) and rest.isascii() and rest.isdigit()


def resuming(config: GuestConfig) -> bool:
    """A start resumes from hibernation: ``lock: suspended`` or a ``vmstate`` (qemu-server
    vm_start sets ``resume`` then, and applies no pending changes)."""
    values = config.values()
    return values.get("lock") == "suspended" or "vmstate" in values


def config_aware_timeout(values: dict[str, str], resume: bool = False) -> int:
    """qemu-server's start timeout for a VM (PVE/QemuServer/Helpers.pm config_aware_timeout).

    30 s, or the memory in GiB when above 30 GiB; four times that with any ``hostpciN``; at least
    300 s when resuming from hibernation and 150 s with hugepages; plus 5 s per ``netN`` (since
    qemu-server 8.3.1; older ones allow less, never more).
    """
    memory = _memory_mib(values.get("memory"))
    timeout = 30
    if memory > 30720:
        timeout = memory // 1024
    if any(_indexed(key, "hostpci") for key in values):
        timeout *= 4
    if resume and timeout < 300:
        timeout = 300
    if values.get("hugepages", "0") not in ("", "0") and timeout < 150:
        timeout = 150
    # PVE counts keys matching /^net\d+/
    timeout += 5 * sum(1 for key in values if key.startswith("net") and key[3:4].isdigit())
    return timeout


def pve_start_limit(kind: str, config: GuestConfig | None) -> int:
    """How long PVE may take for ``qm start``/``pct start`` of this guest, its own waits included
    (not its guest hookscripts, which PVE does not bound)."""
    if kind != "qemu":
        # pct start: config lock, systemctl start pve-container@<vmid>, monitor_start
        return CONFIG_LOCK + CT_MONITOR
    if config is None:
        return CONFIG_LOCK + SCOPE_GONE + config_aware_timeout({})
    resume = resuming(config)
    # a start applies [PENDING] first, except when resuming (vm_start_nolock)
    values = config.values(with_pending=not resume)
    return CONFIG_LOCK + SCOPE_GONE + config_aware_timeout(values, resume)


def start_wait(kind: str, config: GuestConfig | None, start_timeout: int) -> int:
    """How long the hook waits for a guest it starts: what PVE may take, plus an HA request's
    hand-over and the CLI's overhead; an explicit ``start_timeout`` can only make it longer."""
    return max(pve_start_limit(kind, config) + HA_LOOPS + OVERHEAD, start_timeout)


def shutdown_timeout(config: GuestConfig | None, setting: int) -> int:
    """The ``--timeout`` for ``qm/pct shutdown``: the setting, or the guest's own ``startup:
    down=N`` (its PVE shutdown timeout) when that is longer."""
    from pvegpuhook.pveconf import startup_down

    down = startup_down(config.values().get("startup")) if config is not None else None
    return max(setting, down or 0)


def shutdown_wait(kind: str, timeout: int) -> int:
    """How long ``qm shutdown --timeout T`` / ``pct shutdown --timeout T`` may take.

    qm: the config lock, the guest-agent ping, then up to T for the agent's ``guest-shutdown``
    and up to T more polling for the power-off (qemu-server _do_vm_stop). pct: the config lock,
    lxc-stop under T+5, then up to T+5 waiting for the command socket to close (pve-container
    vm_stop). Plus an HA request's hand-over and the CLI's overhead.
    """
    own = AGENT_PING if kind == "qemu" else LXC_STOP_EXTRA
    return CONFIG_LOCK + own + 2 * timeout + HA_LOOPS + OVERHEAD


def hard_stop_wait() -> int:
    """How long ``qm stop``/``pct stop`` may take: quit, 60 s, SIGTERM, 10 s, SIGKILL."""
    return CONFIG_LOCK + QM_STOP_TIMEOUT + QM_STOP_KILL + HA_LOOPS + OVERHEAD


def lock_wait(settings: Settings) -> int:
    """How long a phase waits for the state lock: another run holding it may be in the middle of
    a shutdown or a start (a larger guest's start can take longer; then the phase reports it)."""
    return max(
        shutdown_wait("lxc", settings.shutdown_timeout),
        start_wait("qemu", None, settings.start_timeout),
    )


# a CT's start has no time limit of its own: a hand-over to one gets what PVE gives a GPU VM of
# up to 30 GiB (30 s, four times for its hostpci)
CT_HANDOVER_BUDGET = 120


def handover_budget(kind: str, config: GuestConfig | None) -> int:
    """How long a guest hookscript's hand-over may take at a start (``pre-start``): the guest's
    own start timeout, as PVE computes it for this start (config_aware_timeout). PVE does not
    bound hookscripts, but whoever starts the guest (the GUI, ``qm start``, the hook's own
    restarts) waits about that long for a start to finish."""
    if kind != "qemu" or config is None:
        return CT_HANDOVER_BUDGET
    resume = resuming(config)
    return config_aware_timeout(config.values(with_pending=not resume), resume)
