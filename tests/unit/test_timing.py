"""Unit tests of pvegpuhook.timing: PVE's own time limits, derived from a guest's config.

The expected values are PVE's, worked out from qemu-server PVE/QemuServer/Helpers.pm
config_aware_timeout and the waits around it (docs/pve-facts.md §8).
"""

from __future__ import annotations

import pytest

from pvegpuhook import timing
from pvegpuhook.pveconf import GuestConfig, parse_guest_config, startup_down
from pvegpuhook.settings import Settings

NIC = "virtio=BC:24:11:00:00:01,bridge=vmbr0"


def config(text: str) -> GuestConfig:
    return parse_guest_config(text, "/etc/pve/qemu-server/104.conf")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("", 30),  # 512 MiB by default
        ("memory: 30720\n", 30),  # 30 GiB is not above 30 GiB
        ("memory: 65536\n", 64),
        ("memory: current=65536\n", 64),  # the property string form
        ("memory: 16384\nhostpci0: 01:00,pcie=1\nnet0: " + NIC + "\n", 125),
        ("memory: 65536\nhostpci0: 01:00\nnet0: " + NIC + "\n", 261),  # 64 * 4 + 5
        ("memory: 131072\nhostpci0: 01:00\nhostpci1: 02:00\nnet0: x\nnet1: y\n", 522),
        ("memory: 4096\nhugepages: 2\n", 150),
        ("memory: 4096\nhugepages: 1024\nhostpci0: 01:00\n", 150),  # 120, raised to 150
        ("memory: 4096\nhugepages: 0\n", 30),
        ("memory: 4096\nvmstate: local:state-104\n", 300),  # resuming from hibernation
        ("memory: 4096\nlock: suspended\nhostpci0: 01:00\n", 300),
        ("memory: 65536\nhostpci0: 01:00\nlock: suspended\n", 300),  # 256 raised to 300
        ("hostpci0: 01:00\n\n[PENDING]\nmemory: 65536\n", 256),  # a start applies pending
        ("hostpci0: 01:00\n[snap1]\nmemory: 65536\nnet0: x\n", 120),  # snapshots do not count
        ("memory: lots\nhostpcix: 01:00\nnetwork: x\n", 30),  # not what PVE counts
    ],
)
def test_config_aware_timeout_as_qemu_server(text: str, seconds: int) -> None:
    guest = config(text)
    own = timing.pve_start_limit("qemu", guest)
    assert own == seconds + timing.CONFIG_LOCK + timing.SCOPE_GONE


def test_start_wait_and_an_explicit_start_timeout() -> None:
    big = config("memory: 65536\nhostpci0: 01:00\nnet0: " + NIC + "\n")
    wait = timing.start_wait("qemu", big, 0)
    assert wait == 261 + 10 + 20 + timing.HA_LOOPS + timing.OVERHEAD
    assert timing.start_wait("qemu", big, 120) == wait  # shorter: no effect
    assert timing.start_wait("qemu", big, 900) == 900  # longer: the hook waits that long
    ct = timing.start_wait("lxc", config("hostname: web\n"), 0)
    assert ct == timing.CONFIG_LOCK + timing.CT_MONITOR + timing.HA_LOOPS + timing.OVERHEAD
    assert timing.start_wait("qemu", None, 0) > 0  # an unreadable config still has a limit


@pytest.mark.parametrize(
    ("startup", "setting", "timeout"),
    [
        (None, 180, 180),
        ("order=1,down=300", 180, 300),  # the guest's own longer timeout
        ("down=60,order=2", 180, 180),  # shorter: the setting
        ("order=3", 180, 180),
        ("down=0", 30, 30),  # PVE ignores 0
        ("down=abc", 30, 30),
        ("2", 30, 30),  # a bare order
    ],
)
def test_shutdown_timeout_honours_startup_down(
    startup: str | None, setting: int, timeout: int
) -> None:
    guest = config(f"startup: {startup}\n" if startup else "")
    assert timing.shutdown_timeout(guest, setting) == timeout
    assert timing.shutdown_timeout(None, setting) == setting


def test_startup_down() -> None:
    assert startup_down("order=1,up=30,down=300") == 300
    assert [startup_down(v) for v in (None, "", "order=2", "down=0", "down=x")] == [None] * 5


def test_a_shutdown_may_take_twice_its_timeout() -> None:
    # qm: lock, agent ping, guest-shutdown up to T, then polling up to T
    assert timing.shutdown_wait("qemu", 180) >= 10 + 3 + 2 * 180
    # pct: lock, lxc-stop under T + 5, then the socket poll up to T + 5
    assert timing.shutdown_wait("lxc", 180) >= 10 + 2 * 180 + 10
    assert timing.hard_stop_wait() >= 10 + 60 + 10 + 1


def test_the_lock_wait_covers_another_runs_shutdown_and_start() -> None:
    settings = Settings()
    assert timing.lock_wait(settings) >= timing.shutdown_wait("lxc", settings.shutdown_timeout)
    settings.start_timeout = 3600
    assert timing.lock_wait(settings) >= 3600
