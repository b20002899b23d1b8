"""Parsers for PVE's own files: guest configs, the PCI mapping, HA resources, the node name.

Parsers never raise on bad content: a line they cannot read becomes a warning naming the file and
line, and is skipped. Only the main section of a guest config is its current config; ``[PENDING]``
/ ``[pve:pending]`` holds changes applied at the next start; every other section (snapshots,
``[special:cloudinit]``, ``[vzdump]``...) is ignored.
"""

from __future__ import annotations

from pvegpuhook import paths

PENDING_SECTIONS = ("PENDING", "PVE:PENDING")  # PVE matches them case-insensitively


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes superscripts and full-width digits, which
    int() refuses or PVE never writes."""
    return text.isascii() and text.isdigit()


def read_text(path: str) -> str | None:
    """A file's text, or None when it does not exist (or is not a file, or a process went away
    while it was read). NotPermitted when this user may not read it: a guest config of
    ``/etc/pve`` (0640) read as another user than root must not look like no config at all."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except PermissionError:
        from pvegpuhook.errors import NotPermitted

        raise NotPermitted(path) from None
    except OSError:
        return None


def _valid_section(name: str) -> bool:
    """``[snap1]``, ``[PENDING]``, ``[special:cloudinit]``, ``[pve:pending]`` — ASCII only."""
    prefix, colon, bare = name.rpartition(":")
    if colon and not (prefix and ":" not in prefix and _word(prefix)):
        return False
    return bool(bare) and bare[0].isascii() and bare[0].isalpha() and _word(bare)


def _word(text: str) -> bool:
    return text.isascii() and all(c.isalnum() or c in "_-" for c in text)


def _valid_key(key: str) -> bool:
    if not key or not key[0].isalpha():
        return False
    return all(c.isalnum() or c in "_-." for c in key) and key == key.lower()


class GuestConfig:
    """One guest config file: main-section entries, pending entries and parse warnings.

    Keys that may repeat (``lxc.*``) keep every value; other keys keep the last one, as PVE does.
    """

    __slots__ = ("path", "main", "pending", "pending_delete", "warnings")

    def __init__(self, path: str) -> None:
        self.path = path
        self.main: list[tuple[str, str, int]] = []
        self.pending: list[tuple[str, str, int]] = []
        self.pending_delete: set[str] = set()
        self.warnings: list[str] = []

    def values(self, with_pending: bool = False) -> dict[str, str]:
        """Single-valued keys of the current config (with pending changes applied if asked)."""
        result = {k: v for k, v, _ in self.main if not k.startswith("lxc.")}
        if with_pending:
            for key in self.pending_delete:
                result.pop(key, None)
            result.update({k: v for k, v, _ in self.pending if not k.startswith("lxc.")})
        return result

    def raw_entries(self, with_pending: bool = False) -> list[tuple[str, str, int]]:
        """Every entry of the current config, repeated ``lxc.*`` ones too, with line numbers."""
        if not with_pending or not (self.pending or self.pending_delete):
            return list(self.main)
        pending_keys = {k for k, _, _ in self.pending}
        kept = [
            e for e in self.main if e[0] not in pending_keys and e[0] not in self.pending_delete
        ]
        return kept + list(self.pending)

    def line_of(self, key: str, with_pending: bool = False) -> int | None:
        sections = (self.pending, self.main) if with_pending else (self.main,)
        for entries in sections:
            for k, _, line in reversed(entries):
                if k == key:
                    return line
        return None

    def has_pending(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k, _, _ in self.pending) or any(
            k.startswith(prefix) for k in self.pending_delete
        )


def parse_guest_config(text: str, path: str) -> GuestConfig:
    config = GuestConfig(path)
    section: str | None = None  # None = main section
    for number, raw in enumerate(text.split("\n"), start=1):  # PVE splits on \n only
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            name = line[1:-1] if line.endswith("]") else ""
            if _valid_section(name):
                section = name.upper()
                continue
            # PVE warns about such a line and stays in the section it is in
            config.warnings.append(f"{path}:{number}: cannot parse {_shorten(raw)!r}, line ignored")
            continue
        if section is not None and section not in PENDING_SECTIONS:
            continue  # snapshot and special sections are not the current config
        if line.startswith("lxc."):
            # raw LXC keys may use ':' or '=' as separator
            cuts = [i for i in (line.find(":"), line.find("=")) if i > 0]
            cut = min(cuts) if cuts else -1
        else:
            cut = line.find(":")
        key = line[:cut].strip() if cut > 0 else ""
        if not _valid_key(key):
            config.warnings.append(f"{path}:{number}: cannot parse {_shorten(raw)!r}, line ignored")
            continue
        value = line[cut + 1 :].strip()
        target = config.main if section is None else config.pending
        if section is not None and key == "delete":
            # as PVE's parse_pending_delete: separated by , ; or blanks; "!" marks a forced delete
            for item in value.replace(",", " ").replace(";", " ").split():
                config.pending_delete.add(item.lstrip("!"))
        else:
            target.append((key, value, number))
    return config


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def printable(text: str) -> str:
    """``text`` with each character a terminal would not print escaped as repr escapes it, so
    that a message quoting a config value stays one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def split_options(value: str) -> tuple[str | None, dict[str, str]]:
    """``host,key=v,key2=w`` → (``host``, {key: v}); a first item with ``=`` is an option too."""
    first: str | None = None
    options: dict[str, str] = {}
    for index, item in enumerate(value.split(",")):
        item = item.strip()
        if not item:
            continue
        key, eq, val = item.partition("=")
        if eq:
            options[key.strip()] = val.strip()
        elif index == 0:
            first = item
        else:
            options[item] = ""
    return first, options


def startup_order(value: str | None) -> int | None:
    """``order=2,up=30`` → 2 (PVE also accepts a bare number)."""
    if not value:
        return None
    first, options = split_options(value)
    order = options.get("order", first)
    return int(order) if order and is_number(order) else None


def startup_down(value: str | None) -> int | None:
    """``order=2,down=300`` → 300: the guest's own shutdown timeout (PVE's pve-startup-order
    format; ``qm shutdown`` without ``--timeout`` and the node's stop-all use it)."""
    if not value:
        return None
    _, options = split_options(value)
    down = options.get("down")
    return int(down) if down and is_number(down) and int(down) > 0 else None


# ---- property strings (pve-common JSONSchema.pm parse_property_string, check_object) ------------

TRUE_WORDS = ("1", "on", "yes", "true")
FALSE_WORDS = ("0", "off", "no", "false")


def parse_property_string(value: str, keys: tuple[str, ...], default_key: str | None = None):
    """``k=v,k2=v2`` as PVE reads it: (properties, error). Parts are not trimmed, a key appears
    once, an unknown key or a bare value without a default key is an error."""
    found: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        key, eq, val = part.partition("=")
        if eq:
            if not key or not val:
                return found, "missing key in comma-separated list property"
            if key in found:
                return found, f"duplicate key in comma-separated list property: {key}"
            if key not in keys:
                return found, f"invalid key in comma-separated list property: {key}"
            found[key] = val
        elif default_key is None:
            return found, "value without key, but schema does not define a default key"
        elif default_key in found:
            return found, f"duplicate key in comma-separated list property: {default_key}"
        else:
            found[default_key] = part
    return found, None


def is_boolean(value: str) -> bool:
    return value.lower() in TRUE_WORDS + FALSE_WORDS


# ---- /etc/pve/mapping/pci.cfg (pve-guest-common Mapping/PCI.pm, pve-common SectionConfig.pm) ----

_MAP_KEYS = ("node", "id", "subsystem-id", "path", "iommugroup", "description")
_PCI_PATH = r"[a-f0-9]{4,}:[a-f0-9]{2}:[a-f0-9]{2}(?:\.[a-f0-9])?"  # a domain is required here


class MapEntry:
    """One ``map`` line of a PCI mapping: an alternative set of functions on one node, and what
    PVE expects of that hardware (``id``, ``subsystem-id``, ``iommugroup``)."""

    __slots__ = ("node", "paths", "iommugroup", "line", "id", "subsystem_id")

    def __init__(
        self,
        node: str,
        paths_: list[str],
        iommugroup: str | None,
        line: int,
        id_: str | None = None,
        subsystem_id: str | None = None,
    ) -> None:
        self.node = node
        self.paths = paths_
        self.iommugroup = iommugroup
        self.line = line
        self.id = id_
        self.subsystem_id = subsystem_id


class PciMapping:
    """One mapping section of ``pci.cfg``; ``dropped``: why PVE ignores it whole (a guest using
    it then fails as if it did not exist), None when PVE reads it."""

    __slots__ = ("name", "entries", "mdev", "line", "dropped")

    def __init__(self, name: str, line: int) -> None:
        self.name = name
        self.entries: list[MapEntry] = []
        self.mdev = False
        self.line = line
        self.dropped: str | None = None

    def for_node(self, node: str) -> list[MapEntry]:
        return [e for e in self.entries if e.node == node]


def _map_entry(value: str, line: int) -> tuple[MapEntry | None, str | None]:
    """A ``map`` value as PVE validates it (Mapping/PCI.pm ``$map_fmt``), or why it drops it."""
    import re

    props, error = parse_property_string(value, _MAP_KEYS)
    if error is not None:
        return None, error
    for key in ("node", "id", "path"):
        if key not in props:
            return None, f"{key}= is missing"
    if not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?", props["node"]):
        return None, f"node={props['node']} is not a node name"
    for key in ("id", "subsystem-id"):
        if key in props and not re.fullmatch(r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}", props[key]):
            return None, f"{key}={props[key]} is not vvvv:dddd"
    if not re.fullmatch(f"(?:{_PCI_PATH};)*{_PCI_PATH}", props["path"]):
        return None, f"path={props['path']} is not a list of full PCI ids (0000:01:00.0;...)"
    group = props.get("iommugroup")
    if group is not None and not re.fullmatch(r"[+-]?\d+", group):
        return None, f"iommugroup={group} is not a number"
    entry = MapEntry(
        props["node"], props["path"].split(";"), group, line, props["id"], props.get("subsystem-id")
    )
    return entry, None


def parse_pci_mapping(text: str, path: str) -> tuple[dict[str, PciMapping], list[str]]:
    """``/etc/pve/mapping/pci.cfg`` read as PVE reads it, with what PVE drops as warnings.

    A mapping is a header line ``<name>`` and the indented property lines right after it, up to
    the next blank line (PVE's section config: a line that is not indented before that blank line
    is ignored, not a new mapping). A ``map`` line failing its format is dropped; a mapping left
    without any ``map`` line, or with an invalid name, is dropped whole — a guest using it then
    fails to start with ``PCI device mapping not found``. A mapping without a ``map`` line is
    kept with its ``dropped`` reason, for the readers to blame its line rather than the guests'.
    """
    import re

    mappings: dict[str, PciMapping] = {}
    warnings: list[str] = []
    lines = text.split("\n")
    index = 0

    def next_line() -> tuple[int, str] | None:
        nonlocal index
        while index < len(lines):
            index += 1
            raw = lines[index - 1]
            if not re.match(r"\s*#", raw):
                return index, raw
        return None

    while (item := next_line()) is not None:
        number, raw = item
        if raw in ("", "0"):  # Perl's false strings: skipped
            continue
        header = re.fullmatch(r"(\S+)\s*", raw)
        if header is None:
            warnings.append(f"{path}:{number}: {_shorten(raw)!r} ignored: not a mapping name")
            continue
        name = header.group(1)
        valid = re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_-]+", name) is not None
        if not valid:
            warnings.append(f"{path}:{number}: {name!r} is not a valid mapping name: ignored")
        mapping = PciMapping(name, number)
        seen: set[str] = set()
        while (item := next_line()) is not None and item[1] not in ("", "0"):
            number, raw = item
            if not valid:
                continue
            prop = re.fullmatch(r"\s+(\S+)(?:\s+(.*\S))?\s*", raw)
            if prop is None:
                shown = _shorten(raw.strip() or raw)
                warnings.append(
                    f"{path}:{number}: {shown!r} ignored: PVE reads it as a line of mapping "
                    f"{name!r}, which runs up to the next blank line"
                )
                continue
            key, value = prop.group(1), prop.group(2)
            where = f"{path}:{number}: mapping {name!r}"
            if key == "map":
                entry, error = _map_entry(value or "", number)
                if entry is None:
                    warnings.append(f"{where}: map line ignored: {printable(error or '')}")
                else:
                    mapping.entries.append(entry)
            elif key in ("mdev", "live-migration-capable", "description"):
                if key in seen:
                    warnings.append(f"{where}: {key} ignored: duplicate attribute")
                elif key != "description" and value is not None and not is_boolean(value):
                    warnings.append(f"{where}: {key} {value} ignored: not a boolean")
                elif key == "mdev":
                    mapping.mdev = value is None or value.lower() in TRUE_WORDS
                seen.add(key)
            else:
                warnings.append(f"{where}: unknown property {key!r} ignored")
        if not valid:
            continue
        if not mapping.entries:  # said by whoever reads a guest using it, or scan
            mapping.dropped = "it has no valid map line"
        mappings[name] = mapping
    return mappings, warnings


def load_pci_mapping() -> tuple[dict[str, PciMapping], list[str]]:
    path = paths.host(paths.PCI_MAPPING)
    text = read_text(path)
    if text is None:
        return {}, []
    return parse_pci_mapping(text, path)


def parse_ha_resources(text: str) -> dict[int, str]:
    """HA resources (``vm: 104`` / ``ct: 200`` sections) → their requested state.

    A missing state or ``enabled`` means ``started`` (pve-ha-manager HA/Config.pm
    read_and_check_resources_config); other states (``stopped``, ``disabled``, ``ignored``) as
    written. See docs/pve-facts.md §9 for which of them count as "managed" where.
    """
    states: dict[int, str] = {}
    current: int | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            key, _, value = raw.strip().partition(" ")
            if current is not None and key == "state":
                state = value.strip()
                states[current] = "started" if state in ("", "enabled") else state
            continue
        current = None
        kind, _, rest = raw.partition(":")
        sid = rest.strip()
        if kind.strip() in ("vm", "ct", "service") and sid:
            number = sid.rpartition(":")[2]
            if is_number(number):
                current = int(number)
                states[current] = "started"
    return states


def ha_resources() -> dict[int, str]:
    """This cluster's HA resources: VMID → requested state."""
    return parse_ha_resources(read_text(paths.host(paths.HA_RESOURCES)) or "")


def guest_node(vmid: int) -> str | None:
    """The node a guest lives on, from the cluster's ``/etc/pve/.vmlist`` (None: unknown)."""
    import json

    try:
        data = json.loads(read_text(paths.host(paths.VMLIST)) or "")
        node = data["ids"][str(vmid)]["node"]
    except (ValueError, KeyError, TypeError):
        return None
    return node if isinstance(node, str) else None


def node_name() -> str:
    """The local node's name, as PVE derives it: the short host name."""
    text = read_text(paths.host("etc/hostname")) or ""
    name = text.strip().split(".", 1)[0]
    if name:
        return name
    import socket

    return socket.gethostname().split(".", 1)[0]


class Storage:
    """One storage of ``/etc/pve/storage.cfg`` (only what the hand-over's snippet needs)."""

    __slots__ = ("storeid", "type", "path", "content", "disabled", "nodes")

    def __init__(self, storeid: str, type_: str) -> None:
        self.storeid = storeid
        self.type = type_
        self.path: str | None = None
        self.content: list[str] = []
        self.disabled = False
        self.nodes: list[str] = []  # empty: every node


def parse_storage_cfg(text: str) -> list[Storage]:
    """PVE's section config (pve-storage PVE/Storage/Plugin.pm parse_config): ``<type>: <id>``
    headers, then indented ``<key> <value>`` lines; a flag (``disable``) has no value."""
    storages: list[Storage] = []
    current: Storage | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            type_, colon, storeid = raw.partition(":")
            current = Storage(storeid.strip(), type_.strip()) if colon else None
            if current is not None:
                storages.append(current)
            continue
        if current is None:
            continue
        key, _, value = raw.strip().partition(" ")
        value = value.strip()
        if key == "path":
            current.path = value
        elif key == "content":
            current.content = [c.strip() for c in value.split(",") if c.strip()]
        elif key == "disable":
            current.disabled = value in ("", "1")
        elif key == "nodes":
            current.nodes = [n.strip() for n in value.split(",") if n.strip()]
    return storages
