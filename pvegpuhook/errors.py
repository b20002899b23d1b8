"""The one exception type of the library, mapped to exit codes by the fronts."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ATTENTION = 1  # something failed or needs the admin
EXIT_USAGE = 2  # bad argument, invalid override file


class GpuHookError(Exception):
    """An error with a one-line message meant for the admin."""

    exit_code = EXIT_ATTENTION

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(GpuHookError):
    """A file we must obey (the override file) is invalid: ``file:line: message``."""

    exit_code = EXIT_USAGE

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line else path
        message = " ".join(message.split())  # one line, whatever the parser said
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class NotPermitted(GpuHookError):
    """A file the answer depends on cannot be read by this user: any answer would be a guess.

    ``/etc/pve`` (0640 root:www-data) and ``/var/lib/pve-gpu-hook`` (0700) are root's: a run as
    another user (a monitoring agent) must say so, never answer "none" from what it could not see.
    """

    exit_code = EXIT_USAGE

    def __init__(self, path: str) -> None:
        import os

        from pvegpuhook import paths

        shown = paths.unhost(path)
        if os.geteuid() != 0:
            message = f"must be run as root: cannot read {shown}"
        else:
            message = f"cannot read {shown}: permission denied"
        super().__init__(message)
        self.path = path


class LockTimeout(GpuHookError):
    pass


class StateError(GpuHookError):
    pass
