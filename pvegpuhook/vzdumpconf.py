"""Pure text functions for ``/etc/vzdump.conf`` (our ``script:`` block) and ``/etc/pve/jobs.cfg``.

They read and write text as PVE's parsers read it; :mod:`pvegpuhook.registration` does the file
I/O. Files are handled as text decoded with ``surrogateescape``, so bytes that are not UTF-8
survive a round trip unchanged.
"""

from __future__ import annotations

import re

from pvegpuhook.errors import GpuHookError

HOOK_PATH = "/usr/share/pve-gpu-hook/vzdump-hook"
BEGIN_MARK = "# pve-gpu-hook: begin (added by 'pve-gpu-hook register'; removed by 'unregister')"
BEGIN_PREFIX = "# pve-gpu-hook: begin"  # recognised even if the admin shortened the comment
END_MARK = "# pve-gpu-hook: end"
SCRIPT_LINE = f"script: {HOOK_PATH}"
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # undecodable bytes round-trip unchanged

# Perl's \s on a byte string: ASCII whitespace only (PVE reads the file as bytes).
_WS = " \t\n\r\f\v"
# PVE::JSONSchema::parse_config: after trimming, skip '#' lines, then `key: value`.
_SETTING = re.compile(r"(\S+?):\s*(.*)", re.ASCII | re.DOTALL)
_SECTION = re.compile(r"(\S+):\s*(\S+)", re.ASCII)
_PROPERTY = re.compile(r"(\S+)(?:\s+(.*))?", re.ASCII | re.DOTALL)


# ---- pure text functions -------------------------------------------------------------------


class _Value:
    """Compared and shown by its fields (what a dataclass gives, without its import cost on the
    hook path, which reads the chain through :mod:`pvegpuhook.registration`)."""

    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Setting(_Value):
    """One ``key: value`` line as PVE reads it; ``line`` is 1-based."""

    __slots__ = ("line", "key", "value")

    def __init__(self, line: int, key: str, value: str) -> None:
        self.line, self.key, self.value = line, key, value


def lines_of(text: str) -> list[str]:
    """The lines with their line ends kept. Only ``\\n`` ends a line, as in Perl's ``/m``."""
    if not text:
        return []
    parts = text.split("\n")
    result = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        result.append(parts[-1])  # no final newline
    return result


def parse(text: str) -> list[Setting]:
    """Every setting in file order, read like PVE's parser (comments and junk lines skipped)."""
    settings: list[Setting] = []
    for number, raw in enumerate(lines_of(text), start=1):
        line = raw.strip(_WS)
        if not line or line.startswith("#"):
            continue
        match = _SETTING.fullmatch(line)
        if match:
            settings.append(Setting(number, match.group(1), match.group(2)))
    return settings


def active_script(text: str) -> Setting | None:
    """The ``script`` setting vzdump uses: the last one; None when unset or set empty."""
    last = None
    for setting in parse(text):
        if setting.key == "script":
            last = setting
    return last if last is not None and last.value else None


def eol_of(text: str) -> str:
    """The file's line-end style: CRLF when most of its lines end so."""
    crlf = text.count("\r\n")
    return "\r\n" if crlf and crlf * 2 >= text.count("\n") else "\n"


def block_text(eol: str = "\n") -> str:
    return eol.join((BEGIN_MARK, SCRIPT_LINE, END_MARK)) + eol


class Added(_Value):
    """What ``register`` appended: the exact suffix, and whether it starts with a newline that
    the file lacked (a file without a final newline)."""

    __slots__ = ("suffix", "newline_added")

    def __init__(self, suffix: str, newline_added: bool) -> None:
        self.suffix, self.newline_added = suffix, newline_added

    def to_dict(self) -> dict[str, object]:
        return {"suffix": self.suffix, "newline_added": self.newline_added}

    @classmethod
    def from_dict(cls, data: object) -> Added | None:
        if not isinstance(data, dict):
            return None
        suffix, added = data.get("suffix"), data.get("newline_added")
        if not isinstance(suffix, str) or not isinstance(added, bool) or BEGIN_PREFIX not in suffix:
            return None
        return cls(suffix, added)


def add_block(text: str) -> tuple[str, Added]:
    """``text`` with our block appended, in the file's line-end style."""
    eol = eol_of(text)
    newline_added = bool(text) and not text.endswith("\n")
    suffix = (eol if newline_added else "") + block_text(eol)
    new = text + suffix
    # a safety net for odd input: the block must be what vzdump ends up using
    active = active_script(new)
    if active is None or active.value != HOOK_PATH:
        raise GpuHookError("internal error: the appended script line would not be the active one")
    return new, Added(suffix, newline_added)


def _is_our_script(line: str) -> bool:
    match = _SETTING.fullmatch(line.strip(_WS))
    return bool(match) and match.group(1) == "script" and match.group(2) == HOOK_PATH


def has_block(text: str) -> bool:
    return any(line.strip(_WS).startswith(BEGIN_PREFIX) for line in lines_of(text))


def remove_block(text: str, added: Added | None) -> tuple[str, list[str]]:
    """``text`` without our block(s), and the admin's non-blank lines found inside a block (kept).

    When the file still ends with exactly what was appended, that suffix is cut off: the result is
    the original byte for byte. Otherwise only the lines we wrote (markers, our ``script:`` line)
    are dropped, wherever the block is; the newline we had added goes too when nothing follows.
    """
    if added is not None and text.endswith(added.suffix):
        return text[: len(text) - len(added.suffix)], []
    kept: list[str] = []
    leftovers: list[str] = []
    inside = False
    last_begin: int | None = None  # index in `kept` where the last block started
    for line in lines_of(text):
        stripped = line.strip(_WS)
        if not inside and stripped.startswith(BEGIN_PREFIX):
            inside = True
            last_begin = len(kept)
            continue
        if inside:
            if stripped == END_MARK:
                inside = False
                continue
            if _is_our_script(line):
                continue
            if stripped:
                leftovers.append(stripped)
        kept.append(line)
    result = "".join(kept)
    if added is not None and added.newline_added and last_begin == len(kept):
        # nothing follows the block: the newline we put before it goes as well
        eol = "\r\n" if added.suffix.startswith("\r\n") else "\n"
        if result.endswith(eol):
            result = result[: len(result) - len(eol)]
    return result, leftovers


class Job(_Value):
    """A backup job of ``/etc/pve/jobs.cfg`` that sets its own hook script."""

    __slots__ = ("id", "script", "enabled")

    def __init__(self, id: str, script: str, enabled: bool) -> None:
        self.id, self.script, self.enabled = id, script, enabled


def parse_jobs(text: str) -> list[Job]:
    """Backup jobs (``vzdump: <id>`` sections) whose ``script`` replaces ours (not our own path).

    PVE's SectionConfig format: an unindented ``type: id`` header, then indented ``key value``.
    """
    jobs: list[Job] = []
    section: tuple[str, str] | None = None
    props: dict[str, str] = {}

    def finish() -> None:
        if section is not None and section[0] == "vzdump":
            script = props.get("script", "")
            if script and script != HOOK_PATH:
                enabled = props.get("enabled", "1").strip() not in ("0", "false", "no", "off")
                jobs.append(Job(section[1], script, enabled))

    for raw in text.split("\n"):
        line = raw.rstrip(_WS)
        if not line.strip(_WS) or line.lstrip(_WS).startswith("#"):
            continue
        if line[0] not in _WS:
            finish()
            match = _SECTION.fullmatch(line)
            section = (match.group(1), match.group(2)) if match else None
            props = {}
        elif section is not None:
            match = _PROPERTY.fullmatch(line.strip(_WS))
            if match:
                props[match.group(1)] = (match.group(2) or "").strip(_WS)
    finish()
    return jobs
