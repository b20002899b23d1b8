#!/usr/bin/python3
"""Write the upstream tarball that ``make deb`` hands to stdeb's sdist_dsc.

Usage: orig_tarball.py TOPDIR OUTPUT.tar.gz MTIME

Every file of the work tree that git knows or would add (tracked, or untracked and not ignored),
except debian/ (a 3.0 (quilt) source package carries it separately) and deb-build/, under
TOPDIR/ — so the source package holds everything debian/rules installs (bin/, etc/, man/,
completion/), which setuptools' sdist would leave out. Reproducible: sorted names, root-owned,
modes as in the work tree, every mtime MTIME (the changelog's date), gzip without a timestamp.
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import tarfile

EXCLUDED = ("debian/", "deb-build/")


def work_tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        stdout=subprocess.PIPE,
    ).stdout
    names = {name for name in out.decode("utf-8", "surrogateescape").split("\0") if name}
    return sorted(
        name
        for name in names
        if not name.startswith(EXCLUDED) and os.path.lexists(name)  # skip deleted, tracked files
    )


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    top, output, mtime = argv[0], argv[1], int(argv[2])
    files = work_tree_files()
    if not files:
        print(
            "orig_tarball.py: git lists no files: run it in the project's git work tree",
            file=sys.stderr,
        )
        return 1
    with (
        open(output, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        directories: set[str] = set()
        for name in files:
            parts = name.split("/")[:-1]
            for depth in range(len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(f"{top}/{directory}".rstrip("/"))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
                    tar.addfile(info)
            info = tar.gettarinfo(name, arcname=f"{top}/{name}")
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = mtime
            info.mode = 0o755 if info.mode & stat.S_IXUSR else 0o644
            if info.isreg():
                with open(name, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
