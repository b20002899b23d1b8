"""``pve-gpu-hook register [--chain]``: make vzdump call the hook from ``/etc/vzdump.conf``.

Appends a marked block with our ``script:`` line at the end of the file (PVE uses the last
``script:``), never changing a line of the admin's, and records what was appended so that
``unregister`` restores the file byte for byte. Another active hook is never overridden silently:
``--chain`` keeps it (its line stays, shadowed by ours) and records it in our state, and the hook
runs it after its own work with the same arguments and environment. Called by the Debian postinst.
"""

from __future__ import annotations

import argparse
import sys

from pvegpuhook import paths, vzdumpconf
from pvegpuhook.errors import EXIT_OK, GpuHookError
from pvegpuhook.log import Log, clean
from pvegpuhook.state import StateStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="add the hook to /etc/vzdump.conf",
        description=(
            f"Append a marked block setting 'script: {vzdumpconf.HOOK_PATH}' to /etc/vzdump.conf "
            "(atomically; nothing else in the file changes). Refused when another hook script "
            "is active, unless --chain is given: then that script is kept and run by "
            "pve-gpu-hook after its own work, with the same arguments and environment. "
            "Safe to run again."
        ),
    )
    parser.add_argument(
        "--chain",
        action="store_true",
        help="keep the hook script already set in /etc/vzdump.conf and run it after ours",
    )
    parser.add_argument(
        "--wait", type=float, default=10.0, metavar="SECONDS", help="how long to wait for the lock"
    )
    parser.set_defaults(run=run)


def warn(message: str) -> None:
    print(f"pve-gpu-hook: warning: {clean(message)}", file=sys.stderr)


def warn_jobs() -> None:
    jobs, problem = vzdumpconf.read_jobs()
    if problem:
        warn(problem)
    message = vzdumpconf.jobs_warning(jobs)
    if message:
        warn(message)


def run(args: argparse.Namespace) -> int:
    shown = vzdumpconf.display(paths.VZDUMP_CONF)
    store = StateStore()
    store.acquire(args.wait, "register")
    try:
        conf = vzdumpconf.read_conf()
        assert conf is not None
        warn_jobs()
        active = vzdumpconf.active_script(conf.text)
        if active is not None and active.value == vzdumpconf.HOOK_PATH:
            chained = store.chain()
            print(
                f"already registered: line {active.line} of {shown} sets "
                f"'script: {vzdumpconf.HOOK_PATH}'"
                + (f"; chained hook: {clean(chained)}" if chained else "")
            )
            if args.chain and not chained:
                print("--chain: nothing to chain (the hook is already active); nothing changed")
            return EXIT_OK
        text = conf.text
        notes: list[str] = []
        if vzdumpconf.has_block(text):
            # our old block is shadowed by a later script line: drop it so there is only one
            text, _ = vzdumpconf.remove_block(text, vzdumpconf.load_registration())
            notes.append("an earlier pve-gpu-hook block that was no longer active was removed")
        chain: str | None = None
        if active is not None:
            if not args.chain:
                raise GpuHookError(
                    f"{shown} line {active.line} already sets another hook script: "
                    f"'{active.value}'. vzdump runs only one script, so registering would "
                    f"silently turn that one off. Run 'pve-gpu-hook register --chain' to keep it: "
                    "pve-gpu-hook then runs it after its own work with the same arguments and "
                    "environment (it must be an absolute path, owned by root, not writable by "
                    "group or others, executable). Nothing changed"
                )
            problem = vzdumpconf.chain_problem(active.value)
            if problem is not None:
                raise GpuHookError(
                    f"cannot chain the hook script '{active.value}' ({shown} line {active.line}): "
                    f"it {problem}. Fix it (chown root, chmod go-w,+x) and run register --chain "
                    "again. Nothing changed"
                )
            chain = active.value
        elif args.chain:
            notes.append("--chain: no other hook script is active, nothing to chain")
        new, added = vzdumpconf.add_block(text)
        # the records first: a crash before the rename leaves records that unregister ignores
        old_chain, old_added = store.chain(), vzdumpconf.load_registration()
        store.set_chain(chain)
        vzdumpconf.save_registration(added)
        try:
            vzdumpconf.write_conf(conf, new)
        except GpuHookError:
            store.set_chain(old_chain)  # the file is unchanged: so are our records
            vzdumpconf.save_registration(old_added)
            raise
        line = vzdumpconf.active_script(new)
        assert line is not None
        detail = f"registered: {shown} line {line.line} now sets 'script: {vzdumpconf.HOOK_PATH}'"
        if chain:
            detail += (
                f"; the previous hook '{chain}' (line {active.line if active else '?'}) stays "
                "in the file and is run after pve-gpu-hook's work (chained)"
            )
        Log("register", echo=False).file(detail)
        print(clean(detail))
        if not vzdumpconf.executable(vzdumpconf.HOOK_PATH):
            # not refused: a source checkout may register before installing; vzdump would not
            warn(
                f"{vzdumpconf.HOOK_PATH} is missing or not executable: vzdump fails every "
                "backup job until it is installed (or run 'pve-gpu-hook unregister')"
            )
        for note in notes:
            print(clean(note))
        return EXIT_OK
    finally:
        store.release()
