"""Property-based fuzzing of every parser and of both fronts' argv (issue 5, "Fuzzing").

Each property feeds a parser arbitrary text (``st.text()``: every code point but surrogates,
control characters included) and structured input that looks like the real file, and asserts:

* no exception other than the documented one: none at all for guest configs, ``pci.cfg``, HA
  resources, ``vzdump.conf`` and ``jobs.cfg``; ``ConfigError`` for the override file;
  ``StateError`` for the state file; the hook's ``parse_argv`` returns a Call or a reason; the
  CLI returns an exit code or leaves through argparse's ``SystemExit(2)``;
* invariants: warnings name ``path:N`` with a real line N; only a well-formed ``[name]`` line
  starts a section (PVE's rule; any other ``[`` line is warned about and the section goes on); the
  main section never shows keys found only in other sections; ``pci.normalize`` is canonical and
  idempotent;
* round trips where we write: ``vzdump.conf`` register/unregister and the state file.

The inputs fuzzing found are kept at the end of this file as regression tests.

The number of inputs each property ran is printed at the end of the module (also without ``-s``).
``PVE_GPU_HOOK_FUZZ_SCALE=10`` runs ten times as many.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from pvegpuhook import cli, hook, pci, pveconf, registration, vzdumpconf
from pvegpuhook import vmid as vmids
from pvegpuhook.claims import ClaimReader
from pvegpuhook.errors import ConfigError, StateError
from pvegpuhook.model import Guest, GuestKind
from pvegpuhook.records import Record, RecordStatus
from pvegpuhook.settings import RENAMED, RESTART_POLICIES, SCHEMA, parse_settings
from pvegpuhook.state import StateStore
from tests.e2e.test_cli_register import vzdump_conf_text
from tests.e2e.test_security import BAD_VMIDS
from tests.fronts import commands, read_state, records, seed_node
from tests.fronts import hook as run_hook
from tests.sim.node import FakeNode

SCALE = float(os.environ.get("PVE_GPU_HOOK_FUZZ_SCALE", "1"))
COUNTS: Counter[str] = Counter()
ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}(\.[0-7])?$")
UNIT = re.compile(r"^(group:.+|dev:[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}|fn:.+)$")
CONF = "/etc/pve/qemu-server/100.conf"
PCI_CFG = "/etc/pve/mapping/pci.cfg"
OVERRIDE = "/etc/pve-gpu-hook/config.yaml"
STATUSES = tuple(RecordStatus)
QEMU, LXC = GuestKind.QEMU, GuestKind.LXC


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,  # nothing written into the repository
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def ran(name: str) -> None:
    COUNTS[name] += 1


@pytest.fixture(scope="module", autouse=True)
def print_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    began = time.monotonic()
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    quiet = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with quiet:
        print(f"\nfuzz: inputs run per property ({time.monotonic() - began:.1f} s in all)")
        for name, count in sorted(COUNTS.items()):
            print(f"  {count:6d}  {name}")
        print(f"  {sum(COUNTS.values()):6d}  in all")


@contextlib.contextmanager
def rooted(root: Path) -> Iterator[None]:
    saved = os.environ.get("PVE_GPU_HOOK_ROOT")
    os.environ["PVE_GPU_HOOK_ROOT"] = str(root)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PVE_GPU_HOOK_ROOT"]
        else:
            os.environ["PVE_GPU_HOOK_ROOT"] = saved


@contextlib.contextmanager
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> FakeNode:
    """The seed's node plus a CT on a second GPU and an SR-IOV VF: sysfs for the claim reader."""
    node = seed_node(tmp_path_factory.mktemp("fuzz-node"))
    node.add_gpu("0000:02:00", group=15, drm=("card1", "renderD129"), nvidia_minor=1)
    node.add_gpu("0000:03:00.4", group=None, vf_of="0000:02:00.0")
    node.add_ct(200, dev=["/dev/dri/renderD129"])
    return node


@pytest.fixture(scope="module")
def empty_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-root")
    (root / "etc/pve").mkdir(parents=True)
    hook_file = root / vzdumpconf.HOOK_PATH.lstrip("/")
    hook_file.parent.mkdir(parents=True)
    hook_file.write_text("#!/bin/sh\nexit 0\n")
    hook_file.chmod(0o755)
    return root


# ---- strategies -----------------------------------------------------------------------------

# unlike st.text(), lone surrogates too: any explicit exclusion drops the default one of "Cs"
line_text = st.text(st.characters(blacklist_characters="\n"), max_size=30)
blank = st.sampled_from(["", " ", "\t", "\r", " \t ", "\f", "\x0b", "\x1c", "\u2028", "\x85"])


@st.composite
def joined(draw: st.DrawFn, lines: st.SearchStrategy[list[str]]) -> str:
    """Lines each ended by LF (mostly), CRLF or a lone CR; the last one maybe without its end."""
    items = draw(lines)
    ends = [draw(st.sampled_from(["\n", "\n", "\n", "\r\n", "\r"])) for _ in items]
    if ends and draw(st.booleans()):
        ends[-1] = ""
    return "".join(item + end for item, end in zip(items, ends, strict=True))


def hex_digits(count: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdefABCDEF", min_size=count, max_size=count)


# A PCI id in every form a config may carry it: valid, short, upper case, wrong widths, junk.
pci_id = st.one_of(
    st.builds(
        lambda domain, bus, slot, function: f"{domain}{bus}:{slot}{function}",
        st.one_of(st.just(""), hex_digits(4).map(lambda d: d + ":"), st.just("000:")),
        st.one_of(hex_digits(2), st.text("0123456789abcdefgx", max_size=3)),
        st.one_of(hex_digits(2), st.text("0123456789abcdefgx", max_size=3)),
        st.sampled_from(["", ".0", ".1", ".7", ".8", ".", ".a", ".00", ".0.0"]),
    ),
    st.sampled_from(["01:00", "0000:01:00.0", "01:00.1", "02:00", "0000:03:00.4", "1:00.0"]),
    st.sampled_from(["zz:zz.9", "", "host", "01:00:00:00", ":", "::", "0000:01:00.", " 01:00 "]),
    line_text,
)
pci_ids = st.lists(pci_id, min_size=1, max_size=3).map(";".join)
option = st.one_of(
    st.sampled_from(
        [
            "pcie=1",
            "x-vga=1",
            "mdev=nvidia-63",
            "mdev=",
            "rombar=0",
            "romfile=vbios.bin",
            "legacy-igd=1",
            "device-id=0x2204",
            "mapping=gpu",
            "mapping=other",
            "mapping=",
            "host=",
            "junk",
            "",
        ]
    ),
    st.builds(lambda k, v: f"{k}={v}", st.from_regex(r"[a-z-]{1,8}", fullmatch=True), line_text),
)
hostpci_value = st.one_of(
    st.builds(
        lambda host, opts: ",".join([host, *opts]),
        st.one_of(pci_ids, pci_ids.map(lambda ids: "host=" + ids)),
        st.lists(option, max_size=4),
    ),
    st.builds(
        lambda name, opts: ",".join([f"mapping={name}", *opts]),
        st.sampled_from(["gpu", "other", "missing", ""]),
        st.lists(option, max_size=3),
    ),
    line_text,
)
device_node = st.one_of(
    st.sampled_from(
        [
            "/dev/dri/renderD128",
            "/dev/dri/renderD129",
            "/dev/dri/card0",
            "/dev/dri/card1",
            "/dev/dri",
            "/dev/dri/",
            "/dev/dri/by-path/pci-0000:01:00.0-render",
            "/dev/dri/by-path/pci-zz-card",
            "/dev/nvidia0",
            "/dev/nvidia1",
            "/dev/nvidia99",
            "/dev/nvidiactl",
            "/dev/null",
            "",
        ]
    ),
    line_text,
)
cgroup_rule = st.one_of(
    st.builds(
        lambda kind, major, minor, access: f"{kind} {major}:{minor} {access}",
        st.sampled_from(["c", "b", "a", ""]),
        st.sampled_from(["195", "226", "1", "x", "", "0195"]),
        st.sampled_from(["*", "0", "1", "128", "129", "", "x", "-1"]),
        st.sampled_from(["rwm", "r", ""]),
    ),
    line_text,
)
args_value = st.one_of(
    st.builds(
        lambda ids, extra: f"-device vfio-pci,host={ids}{extra}",
        pci_id,
        st.sampled_from(["", ",multifunction=on", ",x-vga=on", " -cpu host"]),
    ),
    st.builds(lambda i: f"-device 'vfio-pci,host={i}'", pci_id),
    st.builds(lambda i: f"-device vfio-pci,sysfsdev=/sys/bus/pci/devices/{i}/", pci_id),
    st.sampled_from(["-device vfio-pci", "-device", "'unbalanced vfio-pci", "-cpu host"]),
    line_text,
)
plain_key = st.sampled_from(
    [
        "name",
        "hostname",
        "onboot",
        "startup",
        "template",
        "lock",
        "memory",
        "cores",
        "net0",
        "scsi0",
        "rootfs",
        "mp0",
        "description",
        "digest",
        "parent",
        "snaptime",
        "vmgenid",
        "ostype",
    ]
)
plain_value = st.one_of(
    st.sampled_from(["1", "0", "yes", "backup", "order=2,up=30", "order=x", "3", "", "win11"]),
    line_text,
)
key_value = st.one_of(
    st.tuples(st.integers(0, 17).map(lambda i: f"hostpci{i}"), hostpci_value),
    st.tuples(st.integers(0, 3).map(lambda i: f"dev{i}"), device_node),
    st.tuples(st.just("args"), args_value),
    st.tuples(
        st.just("delete"), st.lists(plain_key | st.just("hostpci0"), max_size=3).map(",".join)
    ),
    st.tuples(plain_key, plain_value),
    st.tuples(st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True), line_text),
    st.tuples(st.sampled_from(["Name", "0key", "", "key with space", "ké", "-x"]), line_text),
)
config_line = st.one_of(
    st.builds(
        lambda lead, kv, sep, trail: f"{lead}{kv[0]}{sep}{kv[1]}{trail}",
        st.sampled_from(["", "", " ", "\t"]),
        key_value,
        st.sampled_from([": ", ":", ":\t", " : ", "=", " "]),
        st.sampled_from(["", "", " ", "\r"]),
    ),
    st.builds(
        lambda key, sep, value: f"{key}{sep}{value}",
        st.sampled_from(
            [
                "lxc.cgroup2.devices.allow",
                "lxc.cgroup.devices.allow",
                "lxc.mount.entry",
                "lxc.apparmor.profile",
                "lxc.",
            ]
        ),
        st.sampled_from([": ", " = ", "=", ":", " "]),
        st.one_of(
            cgroup_rule,
            st.builds(
                lambda n, rest: f"{n} {rest}",
                device_node,
                st.sampled_from(["dev/nvidia0 none bind,optional,create=file", "", "x"]),
            ),
        ),
    ),
    st.sampled_from(["# comment", "#hostpci0: 01:00", "", "   ", "description: a: b"]),
    line_text,
)
# A section header as PVE (and parse_guest_config) reads one: the whole line is [name], name a
# letter then letters, digits, '_' or '-', after at most one 'word:' ([pve:pending],
# [special:cloudinit]). Any other line starting with '[' is warned about and ignored: the section
# it is in goes on.
SECTION_HEADER = re.compile(r"\[(?:[A-Za-z0-9_-]+:)?[A-Za-z][A-Za-z0-9_-]*\]")


def is_header(raw: str) -> bool:
    return SECTION_HEADER.fullmatch(raw.strip()) is not None


main_line = config_line.filter(lambda line: not is_header(line))
section_header = st.one_of(
    st.sampled_from(
        [
            "[PENDING]",
            "[pve:pending]",
            "[Pve:Pending]",
            "[snap1]",
            "[x]",
            "[a-b_C9]",
            "[special:cloudinit]",
            "[special:fleecing]",
            "[vzdump]",
            "[pending]",
            "[snap1] \r",
            # not headers
            "[]",
            "[ PENDING ]",
            "[unterminated",
            "[_snap]",
            "[1snap]",
            "[snap.1]",
            "[snap 1]",
            "[a:b:c]",
            "[snap1] x",
            "[[PENDING]",
            "[PENDING]]",
        ]
    ),
    line_text.map(lambda t: "[" + t),
)


@st.composite
def sectioned_config(draw: st.DrawFn) -> tuple[str, set[str], list[str]]:
    """A guest config with marker keys that live in one section only.

    Returns the text, the markers of the main section and those of the other sections. A marker
    after '[' lines that are no header (only) is still in the main section.
    """
    lines = draw(st.lists(main_line, max_size=8))
    main_markers = {f"mainonly{i}" for i in range(draw(st.integers(0, 2)))}
    lines += [f"{m}: 1" for m in sorted(main_markers)]
    other: list[str] = []
    in_main = True
    for index in range(draw(st.integers(0, 3))):
        body = [draw(section_header), *draw(st.lists(config_line, max_size=5))]
        in_main = in_main and not any(is_header(line) for line in body)
        marker = f"sectiononly{index}"
        lines += [*body, f"{marker}: {draw(plain_value)}"]
        if in_main:
            main_markers.add(marker)
        else:
            other.append(marker)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"])), main_markers, other


guest_config_text = st.one_of(st.text(max_size=300), joined(st.lists(config_line, max_size=15)))


# ---- pci.normalize --------------------------------------------------------------------------


def check_normalize(text: str) -> str | None:
    result = pci.normalize(text)
    if result is not None:
        assert ADDRESS.match(result), (text, result)
        assert pci.normalize(result) == result  # idempotent
    return result


@fuzz(800)
@given(st.one_of(st.text(max_size=20), pci_id))
def test_normalize_any_text(text: str) -> None:
    ran("pci.normalize: arbitrary and id-like text")
    check_normalize(text)


@fuzz(500)
@given(
    domain=st.one_of(st.none(), hex_digits(4)),
    bus=hex_digits(2),
    slot=hex_digits(2),
    function=st.one_of(st.none(), st.integers(0, 7)),
    before=blank,
    after=blank,
)
def test_normalize_valid_ids_are_canonical(
    domain: str | None, bus: str, slot: str, function: int | None, before: str, after: str
) -> None:
    ran("pci.normalize: every valid id form")
    suffix = "" if function is None else f".{function}"
    text = f"{domain + ':' if domain else ''}{bus}:{slot}{suffix}"
    expected = f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}{suffix}"
    assert check_normalize(before + text + after) == expected


# ---- guest configs --------------------------------------------------------------------------


def header_line(lines: list[str]) -> int:
    """The 1-based number of the first valid section header (or one beyond the last line)."""
    for number, raw in enumerate(lines, start=1):
        if is_header(raw):
            return number
    return len(lines) + 1


PLAIN_ENTRY = re.compile(r"([a-z][a-z0-9_-]*)[ \t]*:.*")


def key_of(raw: str) -> str | None:
    line = raw.strip()
    if not line or line.startswith(("#", "[")):
        return None
    cuts = [i for i in (line.find(":"), line.find("=") if line.startswith("lxc.") else -1) if i > 0]
    return line[: min(cuts)].strip() if cuts else None


def check_guest_config(text: str, kind: str = QEMU) -> pveconf.GuestConfig:
    config = pveconf.parse_guest_config(text, CONF)
    lines = text.split("\n")
    first = header_line(lines)
    warned = set()
    for warning in config.warnings:
        match = re.match(re.escape(CONF) + r":(\d+): ", warning)
        assert match, warning
        number = int(match.group(1))
        assert 1 <= number <= len(lines), warning
        assert lines[number - 1].strip(), warning  # a real, non-blank line
        assert warning.isprintable(), warning  # one line, control characters escaped
        warned.add(number)
    for number, raw in enumerate(lines, start=1):
        if raw.strip().startswith("["):  # a header silently, anything else warned (any section)
            assert (number in warned) is not is_header(raw), (number, raw, config.warnings)
    for key, value, number in config.main + config.pending:
        assert 1 <= number <= len(lines)
        assert lines[number - 1].strip().startswith(key)
        assert value == value.strip()
    assert all(number < first for _, _, number in config.main)
    assert all(number > first for _, _, number in config.pending)
    # every plain 'key: value' line before the first header is in the main section, also those
    # after a '[' line that is no header
    main = {(key, number) for key, _, number in config.main}
    for number, raw in enumerate(lines[: first - 1], start=1):
        match = PLAIN_ENTRY.fullmatch(raw.strip())
        if match:
            assert (match.group(1), number) in main, (number, raw)
    # keys found only after the first section header never show in the current config
    before = {key_of(raw) for raw in lines[: first - 1]}
    after = {key_of(raw) for raw in lines[first:]}
    current = config.values(with_pending=False)
    assert not (set(current) & (after - before)), (current, after - before)
    assert config.raw_entries(with_pending=False) == config.main
    for key in current:
        assert config.line_of(key) is not None
    pending_view = config.values(with_pending=True)
    assert set(pending_view) <= set(current) | {k for k, _, _ in config.pending}
    guest = Guest(100, kind, config)
    assert guest.label.startswith(("VM 100", "CT 100"))
    _ = (guest.name, guest.template, guest.onboot, guest.lock)
    order = guest.startup_order
    assert order is None or order >= 0
    return config


@fuzz(500)
@given(guest_config_text, st.sampled_from([QEMU, LXC]))
def test_guest_config_any_text(text: str, kind: str) -> None:
    ran("guest config: arbitrary text")
    check_guest_config(text, kind)


@fuzz(300)
@given(sectioned_config())
def test_guest_config_sections(case: tuple[str, set[str], list[str]]) -> None:
    ran("guest config: sections and markers")
    text, main_markers, other = case
    config = check_guest_config(text)
    current = config.values(with_pending=False)
    assert main_markers <= set(current)
    assert not set(other) & set(current)
    assert not set(other) & {k for k, _, _ in config.raw_entries(with_pending=False)}


# ---- pci.cfg and the claim reader ------------------------------------------------------------

map_props = st.lists(
    st.one_of(
        st.sampled_from(["node=pve1", "node=pve1", "node=pve2", "node=", "id=10de:2204"]),
        st.sampled_from(["iommugroup=14", "iommugroup=", "subsystem-id=1458:4038", "junk", ""]),
        pci_ids.map(lambda ids: "path=" + ids),
        st.builds(
            lambda k, v: f"{k}={v}", st.from_regex(r"[a-z-]{1,6}", fullmatch=True), line_text
        ),
    ),
    max_size=5,
)
mapping_line = st.one_of(
    st.builds(
        lambda indent, key, props: f"{indent}{key}{' ' if props else ''}{','.join(props)}",
        st.sampled_from(["\t", "\t", "  ", " \t"]),
        st.sampled_from(["map", "map", "mdev", "description", "Map", ""]),
        map_props,
    ),
    st.builds(lambda v: f"\tmdev {v}", st.sampled_from(["1", "0", "true", ""])),
    st.one_of(
        st.sampled_from(["gpu", "other", "pci: gpu", "gpu:", "# comment", "\t# indented comment"]),
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
    ),
    line_text,
)
mapping_text = st.one_of(st.text(max_size=300), joined(st.lists(mapping_line, max_size=12)))


def check_mapping(text: str) -> dict[str, pveconf.PciMapping]:
    mappings, warnings = pveconf.parse_pci_mapping(text, PCI_CFG)
    lines = text.split("\n")
    for warning in warnings:
        match = re.match(re.escape(PCI_CFG) + r":(\d+): ", warning)
        assert match, warning
        number = int(match.group(1))
        assert 1 <= number <= len(lines) and lines[number - 1] not in ("", "0"), warning
    for name, mapping in mappings.items():
        assert name == mapping.name
        assert 1 <= mapping.line <= len(lines) and not lines[mapping.line - 1][:1].isspace()
        for entry in mapping.entries:
            assert entry.node and entry.paths and all(entry.paths)
            assert mapping.line < entry.line <= len(lines)
            assert lines[entry.line - 1].split(None, 1)[0] == "map"
    return mappings


@fuzz(300)
@given(mapping_text)
def test_pci_mapping_any_text(text: str) -> None:
    ran("pci.cfg: arbitrary and map-like text")
    check_mapping(text)


@fuzz(300)
@given(guest_config_text, mapping_text, st.booleans())
def test_claim_reader_never_crashes(
    fuzz_node: FakeNode, config: str, mapping: str, pending: bool
) -> None:
    ran("claims: guest config x pci.cfg over a sysfs")
    with rooted(fuzz_node.root):
        reader = ClaimReader(pci.Sysfs(), "pve1", check_mapping(mapping))
        parsed = pveconf.parse_guest_config(config, CONF)
        needs, warnings = reader.vm_needs(parsed, with_pending=pending)
        shared = reader.ct_claims(parsed, with_pending=pending)
    claims = [c for need in needs for c in need.claims()] + shared
    for claim in claims:
        assert ADDRESS.match(claim.address), claim
        assert claim.units and all(UNIT.match(u) for u in claim.units), claim
    for need in needs:
        assert re.fullmatch(r"hostpci(1[0-5]|[0-9])|args", need.source), need.source
    for warning in [*warnings, *reader.mapping_warnings]:
        assert re.match(re.escape(CONF) + r":(\d+|\?): ", warning) or warning.startswith(PCI_CFG)
        assert warning.isprintable(), warning


# ---- HA resources ---------------------------------------------------------------------------

ha_header = st.builds(
    lambda kind, sep, sid: f"{kind}{sep}{sid}",
    st.sampled_from(["vm", "ct", "service", "group", "VM", "vm "]),
    st.sampled_from([": ", ":", " : "]),
    st.one_of(
        st.integers(0, 10**10).map(str),
        st.integers(100, 999999).map(lambda n: f"vm:{n}"),
        st.integers(100, 999999).map(lambda n: f"ct:{n}"),
        st.sampled_from(["", "abc", "104x", "-1", "1e3", "１０４", "١٠٤", "²"]),
    ),
)
ha_line = st.one_of(
    ha_header,
    st.sampled_from(["\tstate started", "\tgroup g1", "\tmax_restart 1", "# comment", ""]),
    line_text,
)


@fuzz(500)
@given(st.one_of(st.text(max_size=200), joined(st.lists(ha_line, max_size=10))))
def test_ha_resources_any_text(text: str) -> None:
    ran("HA resources.cfg: arbitrary and header-like text")
    managed = pveconf.parse_ha_resources(text)
    assert all(isinstance(v, int) and v >= 0 for v in managed)
    ascii_numbers = {int(n) for n in re.findall(r"[0-9]+", text, re.ASCII)}
    assert all(v in ascii_numbers or not text.isascii() for v in managed)
    for raw in text.splitlines():
        match = re.fullmatch(r"(vm|ct|service) ?: ?(?:(?:vm|ct):)?([0-9]+)", raw, re.ASCII)
        if match:
            assert int(match.group(2)) in managed, raw


# ---- vzdump.conf and jobs.cfg ---------------------------------------------------------------

hostile_line = st.one_of(
    st.sampled_from(
        [
            "script: /usr/local/bin/old-hook",
            "script:/usr/local/bin/old-hook",
            "  script:\t/opt/x y ",
            "script:",
            "script: ",
            "#script: /usr/local/bin/old-hook",
            f"script: {vzdumpconf.HOOK_PATH}",
            "# pve-gpu-hook: begin",
            vzdumpconf.BEGIN_MARK,
            vzdumpconf.END_MARK,
            "script : /x",
            "SCRIPT: /x",
            "\x00",
            "mode: stop\x85",
            "storage:\u2028local",
        ]
    ),
    line_text,
)
vzdump_text = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    vzdump_conf_text(),
    joined(st.lists(hostile_line, max_size=10)),
)


def check_vzdump_parse(text: str) -> vzdumpconf.Setting | None:
    lines = vzdumpconf.lines_of(text)
    assert "".join(lines) == text
    settings_ = vzdumpconf.parse(text)
    for setting in settings_:
        assert 1 <= setting.line <= len(lines)
        assert not re.search(r"[ \t\n\r\f\v]", setting.key)
        assert lines[setting.line - 1].strip(" \t\n\r\f\v").startswith(setting.key + ":")
    assert [s.line for s in settings_] == sorted({s.line for s in settings_})
    active = vzdumpconf.active_script(text)
    scripts = [s for s in settings_ if s.key == "script"]
    assert active == (scripts[-1] if scripts and scripts[-1].value else None)
    return active


@fuzz(500)
@given(vzdump_text)
def test_vzdump_conf_parse_any_text(text: str) -> None:
    ran("vzdump.conf: parse arbitrary text")
    check_vzdump_parse(text)


@fuzz(500)
@given(vzdump_text)
def test_vzdump_conf_add_then_remove_is_identical(text: str) -> None:
    ran("vzdump.conf: add_block/remove_block on arbitrary text")
    active = check_vzdump_parse(text)
    new, added = vzdumpconf.add_block(text)  # never refuses: our line is always the last
    assert new.startswith(text)
    assert vzdumpconf.active_script(new).value == vzdumpconf.HOOK_PATH  # type: ignore[union-attr]
    if active is not None and active.value != vzdumpconf.HOOK_PATH:
        return  # register refuses these (see the CLI property below)
    assert vzdumpconf.remove_block(new, added) == (text, [])
    ours = any(vzdumpconf._is_our_script(line) for line in vzdumpconf.lines_of(text))
    if (not text or text.endswith("\n")) and not vzdumpconf.has_block(text) and not ours:
        # without the record (a lost state dir) the line-wise removal gives the same text
        assert vzdumpconf.remove_block(new, None) == (text, [])


def as_bytes(text: str) -> bytes:
    """UTF-8; a lone surrogate U+DC80-U+DCFF as the byte it escapes, any other lone surrogate
    (line_text draws them) as its three bytes, invalid UTF-8 as well."""
    return b"".join(
        c.encode("utf-8", "surrogateescape" if "\udc80" <= c <= "\udcff" else "surrogatepass")
        for c in text
    )


@fuzz(60)
@given(
    st.one_of(
        st.binary(max_size=120),
        joined(st.lists(hostile_line, max_size=8)).map(as_bytes),
    )
)
def test_cli_register_unregister_any_bytes(empty_root: Path, raw: bytes) -> None:
    """Any bytes: with another hook active register refuses and changes nothing; else the
    register/unregister round trip is byte-identical."""
    ran("vzdump.conf: CLI register/unregister on arbitrary bytes")
    text = raw.decode("utf-8", "surrogateescape")
    active = vzdumpconf.active_script(text)
    ours = active is not None and active.value == vzdumpconf.HOOK_PATH
    if ours or vzdumpconf.has_block(text):
        reject()  # already registered: not a round trip
    shutil.rmtree(empty_root / "var/lib/pve-gpu-hook", ignore_errors=True)
    conf = empty_root / "etc/vzdump.conf"
    conf.write_bytes(raw)
    conf.chmod(0o640)
    with rooted(empty_root), captured():
        code = cli.main(["register"])
        if active is not None:
            assert code == 1
            assert conf.read_bytes() == raw
            assert registration.load_added() is None and registration.chain() is None
            return
        assert code == 0
        assert vzdumpconf.active_script(conf.read_bytes().decode("utf-8", "surrogateescape"))
        assert cli.main(["unregister"]) == 0
    assert conf.read_bytes() == raw
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640


@st.composite
def jobs_cfg(draw: st.DrawFn) -> tuple[str, list[vzdumpconf.Job]]:
    """jobs.cfg sections and the jobs that bypass the hook, as PVE's SectionConfig reads them."""
    lines: list[str] = []
    expected: list[vzdumpconf.Job] = []
    value = st.text("abc/-_. 0", max_size=12)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["vzdump", "vzdump", "sync", "realm-sync"]))
        ident = draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,11}", fullmatch=True))
        lines.append(f"{kind}: {ident}")
        props: dict[str, str] = {}
        for _ in range(draw(st.integers(0, 5))):
            key = draw(st.sampled_from(["script", "enabled", "schedule", "storage", "mode"]))
            val = draw(st.one_of(value, st.sampled_from(["0", "1", vzdumpconf.HOOK_PATH])))
            indent = draw(st.sampled_from(["\t", "  "]))
            lines.append(f"{indent}{key} {val}")
            props[key] = val.strip(" \t\n\r\f\v")
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from(["", "# comment", "\t# indented"])))
        script = props.get("script", "")
        if kind == "vzdump" and script and script != vzdumpconf.HOOK_PATH:
            enabled = props.get("enabled", "1") not in ("0", "false", "no", "off")
            expected.append(vzdumpconf.Job(ident, script, enabled))
    return "\n".join(lines) + "\n", expected


@fuzz(250)
@given(jobs_cfg())
def test_jobs_cfg_structured(case: tuple[str, list[vzdumpconf.Job]]) -> None:
    ran("jobs.cfg: structured sections")
    text, expected = case
    assert vzdumpconf.parse_jobs(text) == expected


@fuzz(400)
@given(st.one_of(st.text(max_size=300), joined(st.lists(hostile_line | line_text, max_size=10))))
def test_jobs_cfg_any_text(text: str) -> None:
    ran("jobs.cfg: arbitrary text")
    headers = [line.rstrip(" \t\n\r\f\v") for line in text.split("\n")]
    for job in vzdumpconf.parse_jobs(text):
        assert job.script and job.script != vzdumpconf.HOOK_PATH
        assert job.script == job.script.strip(" \t\n\r\f\v")
        header = re.compile(r"vzdump:[ \t\n\r\f\v]*" + re.escape(job.id))
        assert any(header.fullmatch(line) for line in headers), job


# ---- the override file (YAML) ---------------------------------------------------------------

yaml_scalar = st.one_of(
    st.integers(-5, 100000).map(str),
    st.sampled_from(
        [
            "true",
            "false",
            "yes",
            "no",
            "on",
            "null",
            "~",
            "after-guest",
            "after-job",
            "sometimes",
            "1.5",
            "0x10",
            "0o17",
            "017",
            "1_000",
            "1e3",
            ".inf",
            "-.nan",
            "''",
            '""',
            "2024-01-01",
            "2024-99-99",
            "12:30:00",
            "aGVsbG8=",
            "104",
            "999999999",
            "1000000000",
            "99",
        ]
    ),
    st.text(max_size=8).map(json.dumps),
    st.from_regex(r"[a-z0-9 _-]{0,8}", fullmatch=True),
)
yaml_tag = st.sampled_from(
    [
        "",
        "",
        "!!int ",
        "!!str ",
        "!!bool ",
        "!!float ",
        "!!null ",
        "!!binary ",
        "!!timestamp ",
        "!!python/name:os.system ",
        "!!python/object/apply:os.system ",
        "!custom ",
        "!!set ",
        "!!omap ",
        "!!seq ",
        "!!map ",
    ]
)
yaml_anchor = st.sampled_from(["", "", "&a ", "&b "])
yaml_value = st.one_of(
    st.builds(lambda a, t, s: a + t + s, yaml_anchor, yaml_tag, yaml_scalar),
    st.builds(
        lambda a, t, items: f"{a}{t}[{', '.join(items)}]",
        yaml_anchor,
        yaml_tag,
        st.lists(yaml_scalar | st.sampled_from(["*a", "*b", "[104]", "{a: 1}"]), max_size=4),
    ),
    st.builds(lambda k, v: f"{{{k}: {v}}}", yaml_scalar, yaml_scalar),
    st.sampled_from(["*a", "*b", "", "|\n  text", ">-\n  folded", "[", "{", "'open", '"open']),
)
yaml_key = st.one_of(
    st.sampled_from(list(SCHEMA)),
    st.sampled_from(["<<", "? [a]", "Shutdown_Timeout", "protect ", '"restore"', "'force_stop'"]),
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
yaml_line = st.one_of(
    st.builds(
        lambda indent, key, sep, value: f"{indent}{key}{sep}{value}",
        st.sampled_from(["", "", "", "  ", "\t"]),
        yaml_key,
        st.sampled_from([": ", ":", ":  "]),
        yaml_value,
    ),
    st.builds(lambda value: f"  - {value}", yaml_value),
    st.sampled_from(["---", "...", "# comment", "%YAML 1.1", "%TAG ! tag:x,2000:", "- 104", ""]),
    line_text,
)
yaml_text = st.one_of(st.text(max_size=200), joined(st.lists(yaml_line, max_size=8)))


def check_settings(text: str) -> object:
    """Parse; only ConfigError may come out, and what parses obeys the schema."""
    try:
        result = parse_settings(text, OVERRIDE)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(OVERRIDE + ":") and error.path == OVERRIDE
        assert error.line is None or 1 <= error.line <= len(text.splitlines()) + 1, message
        assert "\n" not in message, message  # one line, also for reader (control character) errors
        return error
    assert type(result.shutdown_timeout) is int and 1 <= result.shutdown_timeout <= 86400
    assert type(result.start_timeout) is int and 0 <= result.start_timeout <= 86400
    assert type(result.shutdown_watch) is int and 0 <= result.shutdown_watch <= 86400
    assert type(result.force_stop) is bool
    assert all(type(v) is int and 100 <= v <= 999999999 for v in result.protect)
    assert result.restart in RESTART_POLICIES
    assert result.metrics_file is None or (
        result.metrics_file.startswith("/") and result.metrics_file.endswith(".prom")
    )
    return result


@fuzz(400)
@given(yaml_text)
def test_override_any_text(text: str) -> None:
    ran("override YAML: arbitrary and YAML-like text")
    check_settings(text)


def as_boolean(value: object) -> bool | None:
    """A boolean as PVE reads its own (pve-common JSONSchema.pm parse_boolean): YAML's true and
    false, 0 and 1, and the words yes/no, on/off, true/false, 1/0 in any case, quoted or not."""
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "on", "yes", "true"):
            return True
        if word in ("0", "off", "no", "false"):
            return False
    return None


def valid_setting(key: object, value: object) -> bool:
    if key in ("shutdown_timeout", "start_timeout"):
        least = 0 if key == "start_timeout" else 1
        return type(value) is int and least <= value <= 86400
    if key in ("shutdown_watch", "keep_down_max"):
        return type(value) is int and 0 <= value <= 86400
    if key == "force_stop":
        return as_boolean(value) is not None
    if key == "protect":
        return value is None or (
            isinstance(value, list) and all(type(v) is int and 100 <= v <= 999999999 for v in value)
        )
    if key in ("restart", *RENAMED):
        return isinstance(value, str) and value in RESTART_POLICIES
    if key == "metrics_file":
        return (
            value is None
            or value is False
            or value == ""
            or (
                isinstance(value, str)
                and value.startswith("/")
                and value.endswith(".prom")
                and "\0" not in value
            )
        )
    return False


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(), st.text(max_size=10)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
setting_value = st.one_of(
    st.integers(-2, 90000),
    st.integers(90, 2 * 10**9),
    st.booleans(),
    st.none(),
    st.sampled_from([*RESTART_POLICIES, "sometimes", "", "180"]),
    st.sampled_from(["/srv/m.prom", "/var/lib/a b.prom", "m.prom", "/m.txt", "/.prom", "/"]),
    st.lists(st.one_of(st.integers(90, 2 * 10**9), st.booleans(), st.text(max_size=3)), max_size=4),
    json_value,
)


@fuzz(400)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from([*SCHEMA, *RENAMED]), st.text(max_size=10)),
        setting_value,
        max_size=6,
    ),
    st.booleans(),
)
def test_override_dumped_documents_agree_with_the_schema(
    document: dict[str, object], flow: bool
) -> None:
    """Any mapping PyYAML writes is accepted exactly when every key and value is valid."""
    ran("override YAML: dumped mappings vs the schema")
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True)
    result = check_settings(text)
    named = [RENAMED.get(key, key) for key in document]
    if all(valid_setting(k, v) for k, v in document.items()) and len(set(named)) == len(named):
        assert not isinstance(result, ConfigError), (text, result)
        expected = {key: option.default for key, option in SCHEMA.items()}
        expected.update({RENAMED.get(k, k): v for k, v in document.items()})
        if "force_stop" in document:
            expected["force_stop"] = as_boolean(document["force_stop"])
        expected["protect"] = sorted(set(expected["protect"] or []))  # type: ignore[call-overload]
        expected["metrics_file"] = expected["metrics_file"] or False  # none: turned off
        assert result.as_dict() == expected  # type: ignore[attr-defined]
    else:
        assert isinstance(result, ConfigError), (text, document)


# ---- the state file -------------------------------------------------------------------------

any_chars = st.text(st.characters(blacklist_categories=()), max_size=20)  # lone surrogates too
valid_record = st.builds(
    Record,
    vmid=st.integers(100, 999999999),
    kind=st.sampled_from([QEMU, LXC]),
    name=st.none() | any_chars,
    for_vmid=st.none() | st.integers(-(2**63), 2**63),
    addresses=st.lists(st.one_of(pci_id, any_chars), max_size=4),
    since=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    status=st.sampled_from(STATUSES),
    job=st.none() | st.integers(-(2**63), 2**63),
    note=st.none() | any_chars,
    upid=st.none() | any_chars.filter(bool),  # an empty UPID reads as none
)
record_dict = st.one_of(
    valid_record.map(Record.to_dict),
    st.dictionaries(
        st.sampled_from(
            ["vmid", "kind", "name", "since", "addresses", "status", "job", "note", "upid"]
        ),
        json_value,
        max_size=9,
    ),
    json_value,
)


@st.composite
def state_bytes(draw: st.DrawFn) -> bytes:
    """State files: ours (one record per line), other JSON shapes, truncated or damaged."""
    items = draw(st.lists(record_dict, max_size=4))
    shape = draw(st.sampled_from(["ours", "json", "other", "binary"]))
    if shape == "ours":
        version = draw(st.one_of(st.just(1), st.just(0), json_leaf))
        body = ",\n".join(json.dumps(i) for i in items)
        raw = f'{{"format": {json.dumps(version)}, "records": [\n{body}\n]}}\n'.encode()
    elif shape == "json":
        extra = draw(st.dictionaries(st.text(max_size=6), json_value, max_size=3))
        raw = json.dumps({**extra, "records": items}).encode()
    elif shape == "other":
        raw = json.dumps(draw(json_value)).encode()
    else:
        raw = draw(st.binary(max_size=200))
    if raw and draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw) - 1))]  # truncated
    if raw and draw(st.booleans()):
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at + 1 :]
    return raw


def state_dir(root: Path) -> Path:
    return root / "var/lib/pve-gpu-hook"


def fresh_state(root: Path, raw: bytes | None = None) -> Path:
    directory = state_dir(root)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True)
    if raw is not None:
        (directory / "state.json").write_bytes(raw)
    return directory


def check_records(loaded: list[Record]) -> None:
    for record in loaded:
        assert isinstance(record.vmid, int) and 100 <= record.vmid <= 999999999
        assert record.kind in (QEMU, LXC)
        assert all(isinstance(a, str) for a in record.addresses)


@fuzz(400)
@given(json_value | record_dict)
def test_record_from_any_json(data: object) -> None:
    ran("state: Record.from_dict on any JSON value")
    try:
        record = Record.from_dict(data)
    except ValueError:
        return
    check_records([record])
    assert Record.from_dict(record.to_dict()).to_dict() == record.to_dict()


@fuzz(200)
@given(state_bytes())
def test_state_load_any_bytes_without_the_lock(empty_root: Path, raw: bytes) -> None:
    """Without the lock load() only reads: records or StateError, the file left as it was."""
    ran("state: load() of any bytes, unlocked")
    directory = fresh_state(empty_root, raw)
    with rooted(empty_root):
        store = StateStore()
        try:
            loaded = store.records()
        except StateError as error:
            assert "newer than this pve-gpu-hook" in str(error)
            loaded = []
    check_records(loaded)
    assert (directory / "state.json").read_bytes() == raw
    assert sorted(p.name for p in directory.iterdir()) == ["state.json"]


@fuzz(100)
@given(state_bytes())
def test_state_load_any_bytes_under_the_lock(empty_root: Path, raw: bytes) -> None:
    """Under the lock a corrupt file is kept aside byte for byte, its intact records saved."""
    ran("state: load() of any bytes, locked (salvage)")
    directory = fresh_state(empty_root, raw)
    with rooted(empty_root):
        store = StateStore()
        try:
            store.acquire(5, "fuzz")  # the file is read as the lock is taken
        except StateError:
            assert (directory / "state.json").read_bytes() == raw  # untouched
            return
        try:
            loaded = store.records()
            check_records(loaded)
            aside = store.corrupt_files()
            if store.salvaged is None:
                assert aside == []
            else:
                assert [Path(a).read_bytes() for a in aside] == [raw]  # never discarded
                again = StateStore()
                assert [r.to_dict() for r in again.records()] == [r.to_dict() for r in loaded]
                assert again.salvaged is None
        finally:
            store.release()


@fuzz(150)
@given(st.lists(valid_record, max_size=5))
def test_state_save_then_load_round_trips(empty_root: Path, saved: list[Record]) -> None:
    ran("state: add() then read back valid records")
    directory = fresh_state(empty_root)
    saved = list({r.vmid: r for r in saved}.values())  # one record per guest
    with rooted(empty_root), StateStore().hold(5, "fuzz") as store:
        for record in saved:
            store.add(record)
        loaded = StateStore().records()
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in saved]
    assert store.salvaged is None
    path = directory / "state.json"
    if saved:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [r["vmid"] for r in read_state(path)] == [r.vmid for r in saved]
    else:
        assert not path.exists()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


# ---- argv: the hook and the CLI -------------------------------------------------------------

vmid_text = st.one_of(
    st.integers(100, 999999999).map(str),
    st.integers(-(10**12), 10**12).map(str),
    st.sampled_from(BAD_VMIDS),
    st.text(max_size=10),
)


@fuzz(1000)
@given(vmid_text)
def test_parse_vmid(text: str) -> None:
    ran("vmid.parse_vmid")
    parsed = vmids.parse_vmid(text)
    canonical = re.fullmatch(r"[1-9][0-9]{2,8}", text, re.ASCII) is not None
    assert (parsed is not None) == canonical, text
    if parsed is not None:
        assert str(parsed) == text and 100 <= parsed <= vmids.MAX_VMID


phase = st.one_of(st.sampled_from([*hook.JOB_PHASES, *hook.GUEST_PHASES]), st.text(max_size=12))
hook_argv = st.one_of(
    st.lists(st.text(max_size=12), max_size=5),
    st.builds(
        lambda p, mode, vmid, extra: [p, mode, vmid, *extra],
        phase,
        st.sampled_from(["stop", "snapshot", "suspend", "", "x"]),
        vmid_text,
        st.lists(st.text(max_size=6), max_size=2),
    ),
    st.builds(lambda p, rest: [p, *rest], phase, st.lists(st.text(max_size=6), max_size=1)),
)


@fuzz(800)
@given(hook_argv)
def test_hook_parse_argv(argv: list[str]) -> None:
    ran("hook.parse_argv")
    call = hook.parse_argv(list(argv))
    if isinstance(call, str):
        assert call and "\n" not in call
        assert not argv or argv[0] in hook.GUEST_PHASES
        return
    assert isinstance(call, hook.Call) and call.argv == argv and call.phase == argv[0]
    if argv[0] in hook.GUEST_PHASES:
        assert call.vmid is not None and str(call.vmid) == argv[2] and call.mode == argv[1]
    else:
        assert call.vmid is None and call.mode is None


guest_vmid = st.sampled_from(["102", "103", "104", "105", "200", "999"])
any_vmid = st.one_of(guest_vmid, guest_vmid, vmid_text)
output_units = st.one_of(
    st.sampled_from(["json", "json-pretty", "yaml", "text", "xml"]).map(
        lambda f: ["--output-format", f]
    ),
    st.sampled_from([["--noheader"], ["--noborder"]]),
)
wait_unit = st.sampled_from(["0.2", "1", "-1", "0", "x"]).map(lambda w: ["--wait", w])
# per command: units of argv (an option with its value stays together), plus stray tokens
COMMAND_UNITS: dict[str, st.SearchStrategy[list[str]]] = {
    "scan": st.one_of(any_vmid.map(lambda v: [v]), st.just(["--cluster"]), output_units),
    "dry-run": st.one_of(
        any_vmid.map(lambda v: [v]),
        st.just(["--all"]),
        st.lists(any_vmid, max_size=3).map(lambda vs: ["--exclude", ",".join(vs)]),
        st.sampled_from(["stop", "snapshot", "suspend", "bogus"]).map(lambda m: ["--mode", m]),
        output_units,
    ),
    "recover": st.one_of(
        any_vmid.map(lambda v: [v]), st.sampled_from([["--dry-run"], ["--forget"]]), wait_unit
    ),
    "status": output_units,
    "register": st.one_of(st.just(["--chain"]), wait_unit),
    "unregister": wait_unit,
}
stray = st.one_of(
    st.sampled_from(["--", "-h", "--version", "--bogus", "-1", "--all", "--mode"]),
    st.text(max_size=8),
).map(lambda t: [t])


@st.composite
def cli_argv(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed sub-command lines, sometimes with a stray token; sometimes junk."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.lists(st.text(max_size=10), max_size=4))
    command = draw(st.sampled_from(list(COMMAND_UNITS)))
    units = draw(st.lists(COMMAND_UNITS[command], max_size=4))
    if draw(st.integers(0, 4)) == 0:
        units.insert(draw(st.integers(0, len(units))), draw(stray))
    return [command, *(token for unit in units for token in unit)]


@fuzz(300)
@given(cli_argv())
def test_cli_main_any_argv(fuzz_node: FakeNode, argv: list[str]) -> None:
    """An exit code or argparse's SystemExit(2), never a traceback; and no command is run."""
    ran("cli.main: argv")
    with rooted(fuzz_node.root), captured() as (_, err):
        try:
            code = cli.main(list(argv))
        except SystemExit as leaving:
            helped = {"-h", "--help", "--version"} & set(argv)
            assert leaving.code == 2 or (leaving.code == 0 and helped), (argv, leaving.code)
            assert "Traceback" not in err.getvalue()
            return
    assert code in (0, 1, 2), (argv, code)
    assert "Traceback" not in err.getvalue()
    assert commands(fuzz_node) == []  # no record to start again: no command is ever run


# ---- inputs found by fuzzing ----------------------------------------------------------------
# Each case is the minimal input of a bug fuzzing found (all fixed); the call must not raise
# anything but the documented type.


def _nested_state(root: Path) -> list[Record]:
    fresh_state(root, b'{"format": 1, "records": [' + b"[" * 100000 + b"]}")
    with rooted(root):
        return StateStore().records()


def _huge_since_state(root: Path) -> list[Record]:
    record = b'{"vmid": 104, "kind": "qemu", "since": 1' + b"0" * 400 + b"}"
    fresh_state(root, b'{"format": 1, "records": [\n' + record + b"\n]}\n")
    with rooted(root):
        return StateStore().records()


def _ct_claims(line: str) -> Callable[[Path], object]:
    def run(root: Path) -> object:
        with rooted(root):
            config = pveconf.parse_guest_config(line + "\n", "/etc/pve/lxc/200.conf")
            return ClaimReader(pci.Sysfs(), "pve1", {}).ct_claims(config)

    return run


FOUND = [
    # str.isdigit() accepts '²' (and ①, ...), int() then raised ValueError
    pytest.param(
        lambda root: pveconf.parse_ha_resources("vm: ²\n"), (), id="ha-resources-superscript-vmid"
    ),
    pytest.param(lambda root: pveconf.startup_order("order=²"), (), id="startup-order-superscript"),
    pytest.param(_ct_claims("dev0: /dev/nvidia²"), (), id="ct-dev-nvidia-superscript"),
    pytest.param(
        _ct_claims("lxc.cgroup2.devices.allow: c ²:* rwm"), (), id="ct-cgroup-major-superscript"
    ),
    pytest.param(
        _ct_claims("lxc.cgroup2.devices.allow: c 226:² rwm"), (), id="ct-cgroup-minor-superscript"
    ),
    # RecursionError, not ConfigError
    pytest.param(
        lambda root: parse_settings("protect: " + "[" * 500 + "]" * 500 + "\n", OVERRIDE),
        (ConfigError,),
        id="override-deeply-nested-list",
    ),
    pytest.param(
        lambda root: parse_settings("restore:" + " {a:" * 500 + " 1" + "}" * 500, OVERRIDE),
        (ConfigError,),
        id="override-deeply-nested-map",
    ),
    # IndexError / AttributeError from PyYAML's int, float and timestamp constructors
    pytest.param(
        lambda root: parse_settings('shutdown_timeout: !!int ""\n', OVERRIDE),
        (ConfigError,),
        id="override-int-tag-on-empty-value",
    ),
    pytest.param(
        lambda root: parse_settings("start_timeout: !!float\n", OVERRIDE),
        (ConfigError,),
        id="override-float-tag-without-value",
    ),
    pytest.param(
        lambda root: parse_settings('restore: !!timestamp ""\n', OVERRIDE),
        (ConfigError,),
        id="override-timestamp-tag-on-empty-value",
    ),
    # OverflowError from float(10**400), RecursionError from json.loads
    pytest.param(_huge_since_state, (StateError,), id="state-since-huge-integer"),
    pytest.param(_nested_state, (StateError,), id="state-deeply-nested-json"),
    pytest.param(
        lambda root: pveconf.startup_order("order=٣"),
        (),
        id="control-arabic-indic-digit-is-fine",
    ),
]


@pytest.mark.parametrize(("call", "allowed"), FOUND)
def test_found_input_raises_only_the_documented_error(
    empty_root: Path, call: Callable[[Path], object], allowed: tuple[type[Exception], ...]
) -> None:
    try:
        call(empty_root)
    except allowed:
        pass


def test_override_with_a_control_character_names_the_line() -> None:
    """A yaml ReaderError is no MarkedYAMLError: still 'file:line: message' on one line."""
    with pytest.raises(ConfigError) as error:
        parse_settings("shutdown_timeout: 5\nrestore: after-guest\x07\n", OVERRIDE)
    assert error.value.line == 2 and "\n" not in str(error.value)


def test_register_chains_a_script_whose_path_is_not_utf8(tmp_path: Path) -> None:
    """Either chained (and unregister gives the bytes back) or refused with exit 1: no traceback."""
    root = tmp_path / "root"
    (root / "etc/pve").mkdir(parents=True)
    for script in (vzdumpconf.HOOK_PATH.encode(), b"/usr/local/bin/old-\xff"):
        host = bytes(root) + script
        os.makedirs(os.path.dirname(host), exist_ok=True)
        with open(host, "wb") as f:
            f.write(b"#!/bin/sh\nexit 0\n")
        os.chmod(host, 0o755)
    raw = b"script: /usr/local/bin/old-\xff\n"
    conf = root / "etc/vzdump.conf"
    conf.write_bytes(raw)
    with rooted(root), captured():
        code = cli.main(["register", "--chain"])
        assert code in (0, 1)
        if code == 0:
            assert registration.chain() == "/usr/local/bin/old-\udcff"  # what the hook runs
            assert cli.main(["unregister"]) == 0
    assert conf.read_bytes() == raw


# (text, key, where key ends up: "main", "pending" or None for a snapshot/special section)
PVE_SECTIONS = [
    pytest.param("[PENDING]\nhostpci0: 01:00\n", "hostpci0", "pending", id="control-pending"),
    pytest.param("[pending]\nhostpci0: 01:00\n", "hostpci0", "pending", id="lower-case-pending"),
    pytest.param("[pve:pending]\ndev0: /dev/nvidia0\n", "dev0", "pending", id="ct-pending"),
    pytest.param("[PVE:Pending]\ndev0: /dev/nvidia0\n", "dev0", "pending", id="ct-pending-case"),
    pytest.param("[snap1]\nhostpci0: 01:00\n", "hostpci0", None, id="snapshot"),
    pytest.param("[special:cloudinit]\nhostpci0: 01:00\n", "hostpci0", None, id="special"),
    pytest.param("[snap1]  \r\nhostpci0: 01:00\n", "hostpci0", None, id="header-trailing-blanks"),
    pytest.param("[oops\nhostpci0: 01:00\n", "hostpci0", "main", id="unterminated-bracket"),
    pytest.param("[]\nhostpci0: 01:00\n", "hostpci0", "main", id="empty-brackets"),
    pytest.param("[ PENDING ]\nhostpci0: 01:00\n", "hostpci0", "main", id="blanks-inside"),
    pytest.param("[_snap]\nhostpci0: 01:00\n", "hostpci0", "main", id="name-not-a-letter-first"),
    pytest.param("[snap.1]\nhostpci0: 01:00\n", "hostpci0", "main", id="dot-in-name"),
    pytest.param("[a:b:c]\nhostpci0: 01:00\n", "hostpci0", "main", id="two-prefixes"),
    pytest.param("[snap1] x\nhostpci0: 01:00\n", "hostpci0", "main", id="text-after-header"),
    pytest.param("[PENDING]\n[oops\nhostpci0: 01:00\n", "hostpci0", "pending", id="stays-pending"),
    pytest.param("[snap1]\n[oops\nhostpci0: 01:00\n", "hostpci0", None, id="stays-in-snapshot"),
    *(
        pytest.param(
            f"[{name}]\nhostpci0: 01:00\n",
            "hostpci0",
            "main",
            id=f"not-a-header-{label}",
        )
        for label, name in [
            ("unicode-letter", "é"),
            ("superscript", "snap²"),
            ("empty-prefix", ":snap"),
            ("blank-in-prefix", "a b:snap"),
        ]
    ),
]


@pytest.mark.parametrize(("text", "key", "where"), PVE_SECTIONS)
def test_sections_as_pve_reads_them(text: str, key: str, where: str | None) -> None:
    """PVE starts a section only at a well-formed header; any other '[' line is warned about and
    ignored, and the section it is in goes on."""
    config = pveconf.parse_guest_config(text, CONF)
    assert (key in config.values(with_pending=False)) is (where == "main")
    assert (key in config.values(with_pending=True)) is (where in ("main", "pending"))
    assert (key in {k for k, _, _ in config.pending}) is (where == "pending")
    lines = text.split("\n")
    bad = [n for n, raw in enumerate(lines, 1) if raw.startswith("[") and not is_header(raw)]
    warned = [int(w.split(":")[1]) for w in config.warnings]
    assert warned == bad, config.warnings


# What those crashes did on a node: the hook stopped the holder, then could not put it back.
HOLDER_DOWN = [
    # 'startup: order=²' (PVE ignores the bad value and runs the VM): ValueError
    pytest.param("holder-config", "order=²", id="holder-startup-order-superscript"),
    # RecursionError / IndexError after backup-start (settings_or_error caught ConfigError only)
    pytest.param(
        "override", "protect: " + "[" * 500 + "]" * 500 + "\n", id="override-deeply-nested"
    ),
    pytest.param("override", "shutdown_timeout: !!int\n", id="override-int-tag-without-value"),
    # state.json 'since': 10**400: OverflowError
    pytest.param("state", "1" + "0" * 400, id="state-since-huge-integer"),
    pytest.param("holder-config", "order=٣", id="control-arabic-indic-startup-order"),
]


@pytest.mark.parametrize(("damage", "text"), HOLDER_DOWN)
def test_found_inputs_never_keep_the_holder_down(tmp_path: Path, damage: str, text: str) -> None:
    """backup-start stops VM 104; then the found input appears; log-end and job-end follow."""
    node = seed_node(tmp_path)
    if damage == "holder-config":
        node.stop(104)
        node.add_vm(104, name="win11", hostpci=["0000:01:00.0"], startup=text, running=True)
    assert run_hook(node, "backup-start", "stop", "102").returncode == 0
    assert 104 not in node.running_guests()
    if damage == "override":
        node.write_override(text)
    elif damage == "state":
        (record,) = records(node)
        record["since"] = "HUGE"
        line = json.dumps(record).replace('"HUGE"', text)
        (state_dir(node.root) / "state.json").write_text(
            f'{{"format": 1, "records": [\n{line}\n]}}\n'
        )
    run_hook(node, "log-end", "stop", "102")
    run_hook(node, "job-end")
    assert node.running_guests() == {104}
    assert records(node) == []
