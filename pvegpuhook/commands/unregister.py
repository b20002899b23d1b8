"""``pve-gpu-hook unregister``: take the block ``register`` added out of ``/etc/vzdump.conf``.

When the file still ends with exactly what ``register`` appended, it is cut off and the file is
byte for byte what it was before. Otherwise only the lines ``register`` wrote are removed and the
admin's own lines (also those inside our block) stay. The chained-hook record is dropped, so a
hook that ``register --chain`` shadowed is vzdump's script again. Called by the Debian prerm.
"""

from __future__ import annotations

import argparse

from pvegpuhook import paths, vzdumpconf
from pvegpuhook.commands.register import warn, warn_jobs
from pvegpuhook.errors import EXIT_OK, GpuHookError
from pvegpuhook.log import Log, clean
from pvegpuhook.state import StateStore


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "unregister",
        help="remove the hook from /etc/vzdump.conf",
        description=(
            "Remove the block 'pve-gpu-hook register' added to /etc/vzdump.conf, restoring the "
            "file byte for byte, and forget the chained hook (it is vzdump's script again). "
            "Lines the admin added are never removed. Safe to run again."
        ),
    )
    parser.add_argument(
        "--wait", type=float, default=10.0, metavar="SECONDS", help="how long to wait for the lock"
    )
    parser.set_defaults(run=run)


def _forget(store: StateStore) -> str | None:
    """Drop the chain and registration records; the chained path, if there was one."""
    chained = store.chain()
    store.set_chain(None)
    vzdumpconf.save_registration(None)
    return chained


def run(args: argparse.Namespace) -> int:
    shown = vzdumpconf.display(paths.VZDUMP_CONF)
    store = StateStore()
    store.acquire(args.wait, "unregister")
    try:
        conf = vzdumpconf.read_conf(missing_ok=True)
        if conf is None:
            _forget(store)
            print(f"not registered: {shown} does not exist; nothing to do")
            return EXIT_OK
        warn_jobs()
        added = vzdumpconf.load_registration()
        if not vzdumpconf.has_block(conf.text):
            active = vzdumpconf.active_script(conf.text)
            if active is not None and active.value == vzdumpconf.HOOK_PATH:
                # someone wrote the line by hand (or an old installer): not ours to remove
                raise GpuHookError(
                    f"{shown} line {active.line} sets 'script: {vzdumpconf.HOOK_PATH}' outside "
                    "a pve-gpu-hook block (not added by register): left in place; remove it by "
                    "hand, or vzdump will fail when the hook is gone"
                )
            chained = _forget(store)
            print(
                f"not registered: {shown} has no pve-gpu-hook block; nothing to do"
                + (f" (forgot the chained hook {clean(chained)})" if chained else "")
            )
            return EXIT_OK
        new, leftovers = vzdumpconf.remove_block(conf.text, added)
        vzdumpconf.write_conf(conf, new)
        chained = _forget(store)
        exact = added is not None and conf.text.endswith(added.suffix)
        detail = f"unregistered: removed the pve-gpu-hook block from {shown}" + (
            "; the file is as it was before register" if exact else ""
        )
        Log("unregister", echo=False).file(detail)
        print(clean(detail))
        if leftovers:
            warn(
                f"kept {len(leftovers)} line(s) someone added inside the pve-gpu-hook block: "
                + " | ".join(leftovers)
            )
        now = vzdumpconf.active_script(new)
        if now is not None and now.value == vzdumpconf.HOOK_PATH:
            warn(
                f"{shown} line {now.line} still sets 'script: {vzdumpconf.HOOK_PATH}' "
                "(not added by register): left in place"
            )
        elif now is not None:
            print(
                clean(f"vzdump's hook script is '{now.value}' again (line {now.line})")
                + (" (it was chained)" if chained == now.value else "")
            )
        return EXIT_OK
    finally:
        store.release()
