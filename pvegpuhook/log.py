"""What the hook says: one concise line per action on stdout (the vzdump task log and the backup
notification), and every detail in ``/var/log/pve-gpu-hook.log``.

Text from guest configs or commands may carry control characters; they are escaped before they
reach the terminal or the log.
"""

from __future__ import annotations

import os
import sys
import time

from pvegpuhook import paths

PREFIX = "pve-gpu-hook: "


def clean(text: str) -> str:
    """Escape control characters (and lone surrogates) so a line stays one printable line."""
    out = []
    for char in text:
        code = ord(char)
        if code < 32 or code == 127 or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def timestamp(epoch: float | None = None) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(epoch))
    return stamp[:-2] + ":" + stamp[-2:]


class Log:
    def __init__(self, phase: str, vmid: int | None = None, *, echo: bool = True) -> None:
        self.phase = phase
        self.vmid = vmid
        self.echo = echo
        self.lines: list[str] = []  # what was said, for callers that report it again

    def say(self, message: str) -> None:
        """A line for the task log (stdout) and the log file."""
        line = clean(message)
        self.lines.append(line)
        if self.echo:
            sys.stdout.write(PREFIX + line + "\n")
            sys.stdout.flush()
        self.file(line)

    def error(self, message: str) -> None:
        """A failure line: on stderr so it ends the task log entry of this guest."""
        line = clean(message)
        self.lines.append(line)
        if self.echo:
            sys.stdout.flush()
            sys.stderr.write(PREFIX + line + "\n")
            sys.stderr.flush()
        self.file("ERROR: " + line)

    def file(self, message: str) -> None:
        """A line for the log file only; logging must never break a backup."""
        vmid = str(self.vmid) if self.vmid is not None else "-"
        phase = clean(self.phase).replace(" ", "_") or "-"  # argv: never a forged log line
        entry = f"{timestamp()} {phase} {vmid} {clean(message)}\n"
        path = paths.host(paths.LOG_FILE)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            try:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                fd = os.open(path, flags, 0o600)
            except OSError:
                return
        except OSError:
            return
        try:
            if os.fstat(fd).st_uid == os.geteuid():  # not into a file someone else planted
                os.write(fd, entry.encode("utf-8", "backslashreplace"))
        except OSError:
            pass
        finally:
            os.close(fd)
