"""The optional override file ``/etc/pve-gpu-hook/config.yaml``, validated with file:line errors.

PyYAML is imported only when the file holds more than comments: the package installs a fully
commented template, and the hook should not pay for a parser it does not need.
"""

from __future__ import annotations

from pvegpuhook import paths
from pvegpuhook.errors import ConfigError

RESTORE_MODES = ("after-guest", "after-job")

# key: (type description, default)
SCHEMA: dict[str, tuple[str, object]] = {
    "shutdown_timeout": ("a whole number of seconds (1-86400)", 180),
    "force_stop": ("true or false", False),
    "start_timeout": ("a whole number of seconds (1-86400)", 120),
    "protect": ("a list of VMIDs", []),
    "restore": ("after-guest or after-job", "after-guest"),
}


class Settings:
    __slots__ = ("shutdown_timeout", "force_stop", "start_timeout", "protect", "restore", "source")

    def __init__(self) -> None:
        self.shutdown_timeout = 180
        self.force_stop = False
        self.start_timeout = 120
        self.protect: frozenset[int] = frozenset()
        self.restore = "after-guest"
        self.source: str | None = None  # the file the values came from, None for defaults

    def as_dict(self) -> dict[str, object]:
        return {
            "shutdown_timeout": self.shutdown_timeout,
            "force_stop": self.force_stop,
            "start_timeout": self.start_timeout,
            "protect": sorted(self.protect),
            "restore": self.restore,
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
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, None, f"cannot read: {error}") from None
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
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str) or key not in SCHEMA:
            known = ", ".join(SCHEMA)
            raise ConfigError(path, line, f"unknown key {key!r} (known keys: {known})")
        if key in seen:
            raise ConfigError(path, line, f"{key}: given twice")
        seen.add(key)
        if key == "protect" and isinstance(value_node, yaml.SequenceNode):
            settings.protect = frozenset(
                _vmid(construct(item, key), path, item.start_mark.line + 1)
                for item in value_node.value
            )
            continue
        _apply(settings, key, construct(value_node, key), path, value_node.start_mark.line + 1)
    return settings


def _vmid(item: object, path: str, line: int) -> int:
    if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 999999999:
        raise ConfigError(path, line, f"protect: {item!r} is not a VMID (100-999999999)")
    return item


def _apply(settings: Settings, key: str, value: object, path: str, line: int) -> None:
    expected = SCHEMA[key][0]

    def wrong() -> ConfigError:
        return ConfigError(path, line, f"{key}: expected {expected}, got {value!r}")

    if key in ("shutdown_timeout", "start_timeout"):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 86400:
            raise wrong()
        setattr(settings, key, value)
    elif key == "force_stop":
        if not isinstance(value, bool):
            raise wrong()
        settings.force_stop = value
    elif key == "protect":
        if value is not None:  # "protect:" with nothing after it means none
            raise wrong()
        settings.protect = frozenset()
    elif key == "restore":
        if value not in RESTORE_MODES:
            raise wrong()
        settings.restore = str(value)
