"""The Debian package (issue 4): build, lintian, and a life cycle in clean Debian 12 and 13 roots.

``make deb`` runs once per session. The clean roots are made with ``mmdebstrap --variant=minbase``
from the Debian mirror this machine's own apt sources name (never a host name written here), and
cached as tarballs in ``~/.cache/pve-gpu-hook/roots/``, so that a second run needs no network.
Each root gets a stub ``pve-manager`` that owns ``/etc/vzdump.conf`` (stock content) as a
conffile; the package then goes through install, upgrade from an older build, reinstall, remove,
re-install, purge, an existing foreign ``script:`` line, ``register --chain`` and a host without
``/etc/vzdump.conf``, run inside the root with ``chroot`` in private mount and pid namespaces.

Needs the Debian packages in tests/packaging/apt-packages.txt (skipped without them, except in
CI, where that is a failure). The clean-root tests need root and skip otherwise, or when
mmdebstrap cannot reach the archive and no cached root exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fronts import REPO

DEB_BUILD = REPO / "deb-build"
APT_PACKAGES = REPO / "tests" / "packaging" / "apt-packages.txt"
CACHE = Path.home() / ".cache" / "pve-gpu-hook" / "roots"
CACHE_MAX_AGE = 30 * 24 * 3600  # a root older than this is made again (security updates)
IN_CI = bool(os.environ.get("CI"))

PACKAGE = "pve-gpu-hook"
HOOK = "/usr/share/pve-gpu-hook/vzdump-hook"
METRICS_DIR = "/var/lib/prometheus/node-exporter"
SCRIPT_LINE = f"script: {HOOK}"
# Debian 12 = Proxmox VE 8, Debian 13 = Proxmox VE 9
SUITES = {"bookworm": "Debian 12", "trixie": "Debian 13"}
# what a Proxmox VE host has of the package's dependencies, plus logrotate to try the rotation
ROOT_PACKAGES = ("python3", "python3-yaml", "python3-rich", "python3-argcomplete", "logrotate")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# /etc/vzdump.conf as pve-manager ships it (PVE 8.x/9.x)
STOCK_VZDUMP_CONF = b"""\
# vzdump default settings

#tmpdir: DIR
#dumpdir: DIR
#storage: STORAGE_ID
#mode: snapshot|suspend|stop
#bwlimit: KBPS
#performance: max-workers=N
#ionice: PRI
#lockwait: MINUTES
#stopwait: MINUTES
#stdexcludes: BOOLEAN
#mailto: ADDRESSLIST
#prune-backups: keep-INTERVAL=N[,...]
#script: FILENAME
#exclude-path: PATHLIST
#pigz: N
#notes-template: {{guestname}}
#pbs-change-detection-mode: legacy|data|metadata
#fleecing: enabled=BOOLEAN,storage=STORAGE_ID
"""

# a site's own hook, already configured before pve-gpu-hook comes
FOREIGN_HOOK = "/usr/local/bin/site-backup-hook"
FOREIGN_HOOK_LOG = "/var/tmp/site-backup-hook.calls"
FOREIGN_HOOK_TEXT = f"""#!/bin/sh
echo "$*" >>{FOREIGN_HOOK_LOG}
"""

# the record of a guest the hook stopped and has not started again yet, state format 1
PENDING_STATE = (
    b'{"format": 1, "records": [\n'
    b'{"vmid": 104, "kind": "qemu", "name": "gpu-holder", "for_vmid": 102, '
    b'"since": 1790000000.0, "addresses": ["0000:05:00.0"], "status": "stopped", '
    b'"job": null, "note": null}\n'
    b"]}\n"
)

# the environment vzdump gives its hook: emptied, no PATH (docs/pve-facts.md §1)
JOB_ENV = "LC_ALL=C STOREID=local DUMPDIR=/var/lib/vz/dump LVM_SUPPRESS_FD_WARNINGS=1"
GUEST_ENV = (
    f"{JOB_ENV} VMTYPE=qemu HOSTNAME=vm100 TARGET=/var/lib/vz/dump/vzdump-qemu-100.vma.zst "
    "LOGFILE=/var/lib/vz/dump/vzdump-qemu-100.log"
)


# ---- helpers -------------------------------------------------------------------------------


def apt_packages() -> list[str]:
    lines = APT_PACKAGES.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def missing_tools() -> list[str]:
    """What `make deb` and lintian need and this machine lacks."""
    missing = [
        tool
        for tool in ("make", "git", "dpkg-buildpackage", "dh", "dh_python3", "lintian")
        if shutil.which(tool) is None
    ]
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import stdeb, setuptools"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        missing.append("python3-stdeb")
    return missing


def need_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    message = (
        f"missing {', '.join(missing)}: apt-get install {' '.join(apt_packages())} "
        "(list in tests/packaging/apt-packages.txt)"
    )
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a host command, its stderr merged into stdout."""
    kwargs.setdefault("timeout", 900)
    return subprocess.run(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, **kwargs
    )


def clean_env() -> dict[str, str]:
    """The environment for a nested make and dpkg-buildpackage: no outer make's jobserver."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.pop("PVE_GPU_HOOK_ROOT", None)
    env["LC_ALL"] = "C.UTF-8"
    return env


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def said(out: subprocess.CompletedProcess[str]) -> list[str]:
    """What the maintainer scripts told the admin in apt's output: each line prefixed, said once
    (apt's and dpkg's own lines never name the registration or vzdump.conf)."""
    ours = [line for line in out.stdout.splitlines() if line.startswith("pve-gpu-hook: ")]
    loose = [
        line
        for line in out.stdout.splitlines()
        if not line.startswith("pve-gpu-hook: ") and re.search(r"regist|vzdump\.conf|recover", line)
    ]
    assert loose == [], out.stdout
    assert len(ours) == len(set(ours)), out.stdout
    return ours


def deb_fields(deb: Path) -> dict[str, str]:
    out = run(["dpkg-deb", "--field", str(deb)])
    assert out.returncode == 0, out.stdout
    fields: dict[str, str] = {}
    key = ""
    for line in out.stdout.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def active_script(text: str) -> str | None:
    """The hook script vzdump uses: the last ``script:`` setting that is not a comment."""
    value = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"script:\s*(.*)", line)
        if match:
            value = match.group(1).strip() or None
    return value


# ---- the build -----------------------------------------------------------------------------


class Build:
    """What `make deb` produced (copied out of deb-build/), and an older build of the same tree."""

    def __init__(self, directory: Path, older: Path) -> None:
        self.dir = directory
        debs = sorted(directory.glob(f"{PACKAGE}_*_all.deb"))
        assert len(debs) == 1, f"make deb left {debs} in {DEB_BUILD}"
        self.deb = debs[0]
        self.version = self.deb.name.split("_")[1]
        self.upstream = self.version.rsplit("-", 1)[0]
        changes = [
            p
            for p in directory.glob(f"{PACKAGE}_{self.version}_*.changes")
            if "_source" not in p.name
        ]
        assert len(changes) == 1, changes
        self.changes = changes[0]
        self.dsc = directory / f"{PACKAGE}_{self.version}.dsc"
        self.orig = directory / f"{PACKAGE}_{self.upstream}.orig.tar.gz"
        self.debian_tar = directory / f"{PACKAGE}_{self.version}.debian.tar.xz"
        self.tree = directory / f"{PACKAGE}-{self.upstream}"
        self.older = older


def build_older(tree: Path, version: str, work: Path) -> Path:
    """The same source with a lower version in a copy of its changelog, built binary-only."""
    older_version = f"{version}~pkgtest1"
    copy = work / "older" / tree.name
    shutil.copytree(tree, copy, symlinks=True)
    changelog = copy / "debian" / "changelog"
    text = changelog.read_text()
    first, rest = text.split("\n", 1)
    assert f"({version})" in first, first
    changelog.write_text(first.replace(f"({version})", f"({older_version})", 1) + "\n" + rest)
    out = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=copy, env=clean_env())
    assert out.returncode == 0, f"building the older version failed:\n{tail(out.stdout)}"
    return work / "older" / f"{PACKAGE}_{older_version}_all.deb"


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    need_tools()
    started = time.monotonic()
    work = tmp_path_factory.mktemp("build")
    # `make test` may run in two checkouts' sessions at once on this machine, or twice in one:
    # deb-build/ is rebuilt and copied out under a lock
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / "make-deb.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = run(["make", "deb"], cwd=REPO, env=clean_env())
        assert out.returncode == 0, f"make deb failed:\n{tail(out.stdout)}"
        shutil.copytree(DEB_BUILD, work / "deb-build", symlinks=True)
    made = Build(work / "deb-build", Path())
    made.older = build_older(made.tree, made.version, work)
    print(f"\nmake deb and the older build: {time.monotonic() - started:.0f} s")
    return made


def test_make_deb_gives_source_and_binary_packages(build: Build) -> None:
    upstream = build.upstream
    assert build.dsc.is_file()
    assert build.orig.is_file()
    dsc = build.dsc.read_text()
    assert "Format: 3.0 (quilt)" in dsc
    assert re.search(r"^Architecture: all$", dsc, re.M), dsc
    # the hand-written debian/ won over stdeb's: its rules, maintainer scripts and overrides
    listing = run(["tar", "-tJf", str(build.debian_tar)])
    for name in ("debian/rules", "debian/postinst", "debian/prerm", "debian/postrm"):
        assert name in listing.stdout.split(), listing.stdout
    built = build.tree / "debian"
    for name in ("rules", "control", "postinst"):
        assert (built / name).read_bytes() == (REPO / "debian" / name).read_bytes(), name
    # the orig tarball carries what debian/rules installs, which setuptools' sdist leaves out
    orig = run(["tar", "-tzf", str(build.orig)]).stdout.split()
    for name in ("bin/pve-gpu-hook", "bin/vzdump-hook", "bin/guest-hook", "etc/config.yaml"):
        assert f"{PACKAGE}-{upstream}/{name}" in orig
    for name in ("setup.cfg",):
        assert f"{PACKAGE}-{upstream}/{name}" in orig
    assert not any(name.startswith(f"{PACKAGE}-{upstream}/debian/") for name in orig)


def test_lintian_reports_no_error_or_warning(build: Build) -> None:
    out = run(["lintian", "--fail-on", "error,warning", "--display-info", str(build.changes)])
    assert out.returncode == 0, f"lintian:\n{out.stdout}"
    assert not re.search(r"^[EW]: ", out.stdout, re.M), out.stdout


def test_control_fields(build: Build) -> None:
    fields = deb_fields(build.deb)
    assert fields["Package"] == PACKAGE
    assert fields["Architecture"] == "all"
    assert fields["Section"] == "admin"
    assert fields["Priority"] == "optional"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    for dep in ("python3-yaml", "python3-rich"):
        assert dep in depends, depends
    assert any(re.fullmatch(r"python3(:any)? \(>= 3\.11~?\)", d) for d in depends), depends
    assert fields["Recommends"] == "python3-argcomplete"
    assert fields["Enhances"] == "pve-manager"


def test_contents(build: Build, tmp_path: Path) -> None:
    tree = tmp_path / "x"
    out = run(["dpkg-deb", "-R", str(build.deb), str(tree)])
    assert out.returncode == 0, out.stdout
    lib = tree / "usr/lib/python3/dist-packages/pvegpuhook"
    for name in ("__init__.py", "cli.py", "hook.py", "commands/__init__.py"):
        assert (lib / name).is_file(), name
    assert not (tree / "usr/bin").exists(), "the command belongs in /usr/sbin"
    for path, marker in (
        ("usr/sbin/pve-gpu-hook", "# PYTHON_ARGCOMPLETE_OK"),
        (HOOK[1:], ""),
        ("usr/share/pve-gpu-hook/guest-hook", "pvegpuhook.guesthook"),
    ):
        script = tree / path
        assert script.stat().st_mode & 0o777 == 0o755, path
        text = script.read_text()
        assert text.startswith("#!/usr/bin/python3\n"), path
        assert marker in text[:1024], path
    conffiles = (tree / "DEBIAN/conffiles").read_text().split()
    assert sorted(conffiles) == ["/etc/logrotate.d/pve-gpu-hook", "/etc/pve-gpu-hook/config.yaml"]
    assert (tree / "etc/pve-gpu-hook/config.yaml").read_bytes() == (
        REPO / "etc/config.yaml"
    ).read_bytes()
    for name in ("postinst", "prerm", "postrm"):
        script = (tree / "DEBIAN" / name).read_text()
        assert script.startswith("#!/bin/sh\n") and "\nset -e\n" in script, name
    assert (tree / "usr/share/doc/pve-gpu-hook/copyright").is_file()
    assert (tree / "usr/share/doc/pve-gpu-hook/changelog.Debian.gz").is_file()
    for installed in (
        "usr/share/man/man8/pve-gpu-hook.8.gz",
        "usr/share/man/man5/pve-gpu-hook.yaml.5.gz",
        "usr/share/bash-completion/completions/pve-gpu-hook",
    ):
        assert (tree / installed).is_file(), installed


def test_config_template_holds_every_key_commented_with_its_default() -> None:
    from pvegpuhook import settings

    text = (REPO / "etc/config.yaml").read_text()
    assert all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())
    assert settings.load_settings(str(REPO / "etc/config.yaml")).as_dict() == (
        settings.Settings().as_dict()
    )
    uncommented = "\n".join(line[1:] for line in text.splitlines() if re.match(r"#[a-z_]+: ", line))
    keys = re.findall(r"^([a-z_]+):", uncommented, re.M)
    assert sorted(keys) == sorted(settings.SCHEMA), keys
    parsed = settings.parse_settings(uncommented, "config.yaml")
    assert parsed.as_dict() == settings.Settings().as_dict()


# ---- clean Debian roots --------------------------------------------------------------------


def os_release() -> dict[str, str]:
    values: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = value.strip().strip('"')
    return values


def apt_source_uris() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled binary apt source of this machine."""
    sources: list[tuple[str, list[str]]] = []
    lists = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for raw in Path(path).read_text().splitlines():
                line = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
                if len(line) >= 3 and line[0] == "deb":
                    sources.append((line[1], [line[2]]))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with contextlib.suppress(OSError):
            text = Path(path).read_text()
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for raw in stanza.splitlines():
                    if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                        continue
                    key, _, value = raw.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    sources.append((uri, suites))
    return sources


def debian_mirror() -> str | None:
    """The Debian archive this machine's apt uses: the source of its own release's suite."""
    override = os.environ.get("PVE_GPU_HOOK_TEST_MIRROR")
    if override:
        return override.rstrip("/")
    codename = os_release().get("VERSION_CODENAME", "")
    names = {codename, *SUITES, "stable", "oldstable", "testing", "unstable", "sid"} - {""}
    for uri, suites in apt_source_uris():
        if uri.startswith(("http://", "https://")) and names & set(suites):
            return uri.rstrip("/")
    return None


def reachable(mirror: str, suite: str) -> str | None:
    """None when the mirror serves the suite, else why not."""
    url = f"{mirror}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30):
            return None
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"


def cached_root(suite: str, packages: tuple[str, ...], variant: str) -> Path:
    """A tarball of a clean root of ``suite``; made with mmdebstrap unless cached and fresh."""
    key = hashlib.sha256(f"1 {variant} {suite} {' '.join(sorted(packages))}".encode()).hexdigest()
    tarball = CACHE / f"{suite}-{variant}-{key[:12]}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < CACHE_MAX_AGE:
        return tarball
    if shutil.which("mmdebstrap") is None:
        message = "mmdebstrap missing: apt-get install mmdebstrap (see apt-packages.txt)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    mirror = debian_mirror()
    if mirror is None:
        pytest.skip("no Debian mirror found in /etc/apt/sources.list(.d) for mmdebstrap")
    problem = reachable(mirror, suite)
    if problem is not None:
        pytest.skip(f"mmdebstrap cannot reach the Debian archive: {problem}")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f"{tarball.name}.partial-{os.getpid()}")
    started = time.monotonic()
    out = run(
        [
            "mmdebstrap",
            "--quiet",
            f"--variant={variant}",
            f"--include={','.join(packages)}",
            '--aptopt=Acquire::Retries "3"',
            "--format=tar",
            suite,
            str(partial),
            mirror,
        ],
        timeout=1200,
    )
    if out.returncode != 0:
        partial.unlink(missing_ok=True)
        pytest.fail(f"mmdebstrap {suite} failed:\n{tail(out.stdout)}")
    partial.replace(tarball)
    for old in CACHE.glob(f"{suite}-{variant}-*.tar"):
        if old != tarball:
            old.unlink(missing_ok=True)
    print(f"\nmmdebstrap {variant} {suite}: {time.monotonic() - started:.0f} s")
    return tarball


class Root:
    """An extracted clean root; commands run in it with chroot, in their own mount and pid
    namespaces with a private /proc (so nothing is left mounted, and no host process shows)."""

    def __init__(self, path: Path, suite: str) -> None:
        self.path = path
        self.suite = suite
        self.failed: str | None = None  # the first step that failed: later steps are skipped
        self.notes: dict[str, bytes] = {}
        self.isolated = (
            run(
                [
                    "/usr/bin/unshare",
                    "--mount",
                    "--pid",
                    "--fork",
                    f"--mount-proc={path}/proc",
                    "true",
                ],
                timeout=60,
            ).returncode
            == 0
        )

    def sh(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = [
            f"PATH={CHROOT_PATH}",
            "LC_ALL=C.UTF-8",
            "HOME=/root",
            "DEBIAN_FRONTEND=noninteractive",
            "APT_LISTCHANGES_FRONTEND=none",
        ]
        command = [
            "/usr/sbin/chroot",
            str(self.path),
            "/usr/bin/env",
            "-i",
            *env,
            "/bin/sh",
            "-ec",
            script,
        ]
        if self.isolated:
            prefix = [
                "/usr/bin/unshare",
                "--mount",
                "--pid",
                "--fork",
                f"--mount-proc={self.path}/proc",
            ]
            command = prefix + command
        out = run(command, timeout=600)
        if check:
            assert out.returncode == 0, (
                f"[{self.suite}] {script}\nexit {out.returncode}:\n{out.stdout}"
            )
        return out

    def apt(self, arguments: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh(f"apt-get -y -o Dpkg::Use-Pty=0 {arguments}", check=check)

    def file(self, host_path: str) -> Path:
        return self.path / host_path.lstrip("/")

    def read(self, host_path: str) -> bytes:
        return self.file(host_path).read_bytes()

    def write(self, host_path: str, data: bytes, mode: int = 0o644) -> None:
        path = self.file(host_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)

    def vzdump_conf(self) -> str:
        return self.read("/etc/vzdump.conf").decode()

    def installed_version(self) -> str | None:
        out = self.sh(f"dpkg-query -W -f='${{Status}} ${{Version}}' {PACKAGE}", check=False)
        words = out.stdout.split()
        return words[-1] if out.returncode == 0 and "installed" in words[:3] else None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.failed is not None:
            pytest.skip(f"an earlier step failed in the {self.suite} root: {self.failed}")
        try:
            yield
        except pytest.skip.Exception:
            raise
        except BaseException:
            self.failed = name
            raise


def stub_pve_manager(work: Path) -> Path:
    """A pve-manager that only ships /etc/vzdump.conf (stock content) as a conffile."""
    tree = work / "pve-manager"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc/vzdump.conf").write_bytes(STOCK_VZDUMP_CONF)
    (tree / "DEBIAN/conffiles").write_text("/etc/vzdump.conf\n")
    (tree / "DEBIAN/control").write_text(
        "Package: pve-manager\n"
        "Version: 9.0.0~pkgtest1\n"
        "Architecture: all\n"
        "Maintainer: pve-gpu-hook tests <root@localhost>\n"
        "Section: admin\n"
        "Priority: optional\n"
        "Description: stub of Proxmox VE's pve-manager for the package tests\n"
        " Ships only /etc/vzdump.conf, as a conffile, with the stock content.\n"
    )
    deb = work / "pve-manager_9.0.0~pkgtest1_all.deb"
    out = run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)])
    assert out.returncode == 0, out.stdout
    return deb


@pytest.fixture(scope="class", params=list(SUITES), ids=[f"{s}" for s in SUITES])
def root(
    request: pytest.FixtureRequest, build: Build, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Root]:
    suite = request.param
    if os.geteuid() != 0:
        pytest.skip("the clean-root tests need root (chroot, mmdebstrap, device nodes)")
    tarball = cached_root(suite, ROOT_PACKAGES, "minbase")
    work = tmp_path_factory.mktemp(f"root-{suite}")
    path = work / "root"
    path.mkdir()
    out = run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(tarball)])
    assert out.returncode == 0, out.stdout
    pkgs = path / "tmp/pkgs"
    pkgs.mkdir(parents=True)
    for deb in (build.deb, build.older, stub_pve_manager(work)):
        shutil.copy2(deb, pkgs / deb.name)
    the_root = Root(path, suite)
    try:
        yield the_root
    finally:
        if os.environ.get("PVE_GPU_HOOK_KEEP_ROOTS"):
            print(f"\nkept the {suite} root: {path}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def in_root(build: Build, which: str = "current") -> str:
    deb = build.deb if which == "current" else build.older
    return f"/tmp/pkgs/{deb.name}"


@pytest.mark.usefixtures("root")
class TestCleanRoot:
    """One life cycle per root; the steps run in order and build on each other."""

    def test_01_install_older_build_registers_the_hook(self, root: Root, build: Build) -> None:
        with root.step("install"):
            root.sh("dpkg -i /tmp/pkgs/pve-manager_*.deb")
            assert root.read("/etc/vzdump.conf") == STOCK_VZDUMP_CONF
            # the textfile directory of prometheus-node-exporter (docs/pve-facts.md §11)
            root.file(METRICS_DIR).mkdir(parents=True)
            out = root.apt(f"install {in_root(build, 'older')}")
            assert root.installed_version() == f"{build.version}~pkgtest1"
            assert [line.split(" line ")[0] for line in said(out)] == [
                "pve-gpu-hook: registered: /etc/vzdump.conf"
            ]
            conf = root.vzdump_conf()
            assert active_script(conf) == HOOK, f"{out.stdout}\n{conf}"
            assert conf.startswith(STOCK_VZDUMP_CONF.decode()), "the admin's lines must stay"
            state = root.file("/var/lib/pve-gpu-hook")
            assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
            root.notes["registered"] = root.read("/etc/vzdump.conf")
            metrics = root.file(f"{METRICS_DIR}/pve-gpu-hook.prom")  # written by register
            assert metrics.stat().st_mode & 0o777 == 0o644
            assert "pve_gpu_hook_registered 1\n" in metrics.read_text()

    def test_02_upgrade_keeps_registration_and_pending_records(
        self, root: Root, build: Build
    ) -> None:
        with root.step("upgrade"):
            root.write("/var/lib/pve-gpu-hook/state.json", PENDING_STATE, 0o600)
            out = root.apt(f"install {in_root(build)}")
            assert root.installed_version() == build.version, out.stdout
            assert root.read("/etc/vzdump.conf") == root.notes["registered"], out.stdout
            assert root.read("/var/lib/pve-gpu-hook/state.json") == PENDING_STATE
            status = root.sh("pve-gpu-hook status", check=False)
            assert "104" in status.stdout, status.stdout

    def test_03_conffiles_untouched(self, root: Root) -> None:
        with root.step("verify"):
            out = root.sh("dpkg --verify pve-gpu-hook", check=False)
            assert out.returncode == 0 and not out.stdout.strip(), out.stdout
            # only the registration changed pve-manager's conffile
            out = root.sh("dpkg --verify pve-manager", check=False)
            assert [line.split()[-1] for line in out.stdout.splitlines()] == ["/etc/vzdump.conf"]
            template = root.read("/etc/pve-gpu-hook/config.yaml")
            assert template == (REPO / "etc/config.yaml").read_bytes()

    def test_04_command_works_with_debians_python(self, root: Root, build: Build) -> None:
        with root.step("command"):
            out = root.sh("pve-gpu-hook --help")
            for command in ("status", "scan", "dry-run", "recover", "register", "unregister"):
                assert command in out.stdout, out.stdout
            out = root.sh("pve-gpu-hook --version")
            assert build.version.rsplit("-", 1)[0] in out.stdout
            root.sh("pve-gpu-hook scan")
            root.sh("python3 -c 'import pvegpuhook.hook, pvegpuhook.cli'")
            completion = "/usr/share/bash-completion/completions/pve-gpu-hook"
            if root.file(completion).exists():
                out = root.sh(f"bash -c '. {completion} && complete -p pve-gpu-hook'")
                assert "pve-gpu-hook" in out.stdout, out.stdout

    def test_05_vzdump_calls_the_hook_with_an_empty_environment(self, root: Root) -> None:
        with root.step("hook"):
            # no pending record here: job-end would try to start guest 104 of test 02
            root.file("/var/lib/pve-gpu-hook/state.json").unlink(missing_ok=True)
            root.sh(f"env -i LC_ALL=C VMTYPE=qemu {HOOK} backup-start stop 100")
            calls = [f"env -i {JOB_ENV} {HOOK} {phase}" for phase in ("job-init", "job-start")]
            calls += [
                f"env -i {GUEST_ENV} {HOOK} {phase} stop 100"
                for phase in ("backup-start", "backup-end", "log-end")
            ]
            calls += [f"env -i {JOB_ENV} {HOOK} job-end"]
            for call in calls:
                out = root.sh(call, check=False)
                assert out.returncode == 0, f"{call}\nexit {out.returncode}:\n{out.stdout}"
            log = root.file("/var/log/pve-gpu-hook.log")
            assert log.is_file() and log.stat().st_mode & 0o077 == 0

    def test_06_logrotate_accepts_the_file(self, root: Root) -> None:
        with root.step("logrotate"):
            out = root.sh("logrotate -d /etc/logrotate.d/pve-gpu-hook 2>&1")
            assert "error" not in out.stdout.lower(), out.stdout
            root.sh(
                "echo line >>/var/log/pve-gpu-hook.log\n"
                "logrotate -f -s /var/tmp/logrotate.status /etc/logrotate.d/pve-gpu-hook"
            )
            rotated = root.file("/var/log/pve-gpu-hook.log.1")
            fresh = root.file("/var/log/pve-gpu-hook.log")
            assert rotated.is_file()
            assert fresh.is_file() and fresh.stat().st_mode & 0o777 == 0o600

    def test_07_reinstall_changes_nothing(self, root: Root, build: Build) -> None:
        with root.step("reinstall"):
            root.write("/var/lib/pve-gpu-hook/state.json", PENDING_STATE, 0o600)
            out = root.apt(f"install --reinstall {in_root(build)}")
            assert root.read("/etc/vzdump.conf") == root.notes["registered"], out.stdout
            assert root.read("/var/lib/pve-gpu-hook/state.json") == PENDING_STATE
            # an admin's unregistration survives a reinstall (and so an upgrade)
            root.sh("pve-gpu-hook unregister")
            assert root.read("/etc/vzdump.conf") == STOCK_VZDUMP_CONF
            out = root.apt(f"install --reinstall {in_root(build)}")
            assert root.read("/etc/vzdump.conf") == STOCK_VZDUMP_CONF, out.stdout
            root.sh("pve-gpu-hook register")
            assert root.read("/etc/vzdump.conf") == root.notes["registered"]

    def test_07b_remove_refuses_while_a_guest_is_waiting(self, root: Root, build: Build) -> None:
        """VM 104, stopped by the hook, not yet started: its record and 'recover' would go with
        the package and it would stay off with nothing to say why."""
        with root.step("remove refused: waiting"):
            registered = root.notes["registered"]
            for command in ("remove", "purge"):
                out = root.apt(f"{command} {PACKAGE}", check=False)
                assert out.returncode != 0, out.stdout
                assert said(out) == [
                    "pve-gpu-hook: guests it stopped are waiting to be started again: "
                    "VM 104 (gpu-holder)",
                    "pve-gpu-hook: start them with 'pve-gpu-hook recover', or drop a record "
                    "with 'pve-gpu-hook recover --forget VMID' (the guest is left as it is)",
                    "pve-gpu-hook: the package is not removed (see above).",
                ], out.stdout
                assert root.installed_version() == build.version
                assert root.read("/etc/vzdump.conf") == registered  # still starts it at job-end
                assert root.read("/var/lib/pve-gpu-hook/state.json") == PENDING_STATE
            root.sh("pve-gpu-hook recover --forget 104")

    def test_08_remove_restores_vzdump_conf_byte_for_byte(self, root: Root) -> None:
        with root.step("remove"):
            out = root.apt(f"remove {PACKAGE}")
            assert root.read("/etc/vzdump.conf") == STOCK_VZDUMP_CONF, out.stdout
            assert not root.file(HOOK).exists()
            assert root.sh("dpkg --verify pve-manager", check=False).stdout.strip() == ""
            # remove keeps the conffiles and the state directory
            assert root.file("/etc/pve-gpu-hook/config.yaml").is_file()
            assert root.file("/var/lib/pve-gpu-hook").is_dir()
            # and the metrics say so: unregistered, no guest waiting (the record was dropped)
            metrics = root.file(f"{METRICS_DIR}/pve-gpu-hook.prom").read_text()
            assert "pve_gpu_hook_registered 0\n" in metrics
            assert "pve_gpu_hook_guests_waiting 0\n" in metrics

    def test_09_installing_again_registers_again(self, root: Root, build: Build) -> None:
        with root.step("install again"):
            out = root.apt(f"install {in_root(build)}")
            assert active_script(root.vzdump_conf()) == HOOK, out.stdout
            out = root.apt(f"remove {PACKAGE}")
            assert root.read("/etc/vzdump.conf") == STOCK_VZDUMP_CONF, out.stdout

    def test_10_purge_removes_state_and_logs(self, root: Root) -> None:
        with root.step("purge"):
            assert glob.glob(str(root.file("/var/log/pve-gpu-hook.log*")))
            root.apt(f"purge {PACKAGE}")
            assert root.installed_version() is None
            assert not root.file("/var/lib/pve-gpu-hook").exists()
            assert glob.glob(str(root.file("/var/log/pve-gpu-hook.log*"))) == []
            assert not root.file("/etc/pve-gpu-hook").exists()
            assert not root.file("/etc/logrotate.d/pve-gpu-hook").exists()
            assert root.read("/etc/vzdump.conf") == STOCK_VZDUMP_CONF
            assert list(root.file(METRICS_DIR).iterdir()) == []  # the directory is not ours

    def test_11_a_foreign_script_line_is_left_alone(self, root: Root, build: Build) -> None:
        with root.step("foreign script"):
            root.write(FOREIGN_HOOK, FOREIGN_HOOK_TEXT.encode(), 0o755)
            foreign = STOCK_VZDUMP_CONF + f"script: {FOREIGN_HOOK}\n".encode()
            root.write("/etc/vzdump.conf", foreign)
            root.notes["foreign"] = foreign
            out = root.apt(f"install {in_root(build)}")
            assert root.read("/etc/vzdump.conf") == foreign
            assert said(out) == [
                "pve-gpu-hook: not registered: /etc/vzdump.conf already sets the hook script "
                f"'{FOREIGN_HOOK}' (left unchanged; vzdump runs only one).",
                "pve-gpu-hook: to run it after pve-gpu-hook's own work, type: "
                "pve-gpu-hook register --chain",
            ], out.stdout

    def test_12_register_chain_runs_the_foreign_hook_after_ours(self, root: Root) -> None:
        with root.step("register --chain"):
            out = root.sh("pve-gpu-hook register --chain")
            assert active_script(root.vzdump_conf()) == HOOK, out.stdout
            call = f"env -i {GUEST_ENV} {HOOK} backup-start stop 100"
            out = root.sh(call, check=False)
            assert out.returncode == 0, out.stdout
            assert root.read(FOREIGN_HOOK_LOG).decode().splitlines() == ["backup-start stop 100"]
            out = root.apt(f"remove {PACKAGE}")
            assert root.read("/etc/vzdump.conf") == root.notes["foreign"], out.stdout
            root.apt(f"purge {PACKAGE}")

    def test_13_remove_refuses_to_leave_vzdump_with_a_missing_hook(
        self, root: Root, build: Build
    ) -> None:
        with root.step("remove refused"):
            root.write("/etc/vzdump.conf", STOCK_VZDUMP_CONF)
            root.apt(f"install {in_root(build)}")
            root.sh("pve-gpu-hook unregister")
            by_hand = STOCK_VZDUMP_CONF + f"{SCRIPT_LINE}\n".encode()
            root.write("/etc/vzdump.conf", by_hand)  # not in a block: unregister leaves it
            out = root.apt(f"remove {PACKAGE}", check=False)
            assert out.returncode != 0, out.stdout
            assert "the package is not removed" in out.stdout, out.stdout
            assert root.installed_version() == build.version
            assert root.file(HOOK).is_file()
            assert root.read("/etc/vzdump.conf") == by_hand
            root.write("/etc/vzdump.conf", STOCK_VZDUMP_CONF)
            root.apt(f"purge {PACKAGE}")
            assert root.installed_version() is None

    def test_14_without_vzdump_conf_it_is_not_a_pve_host(self, root: Root, build: Build) -> None:
        with root.step("no pve"):
            root.sh("dpkg --purge pve-manager")
            assert not root.file("/etc/vzdump.conf").exists()
            out = root.apt(f"install {in_root(build)}")
            [line] = said(out)
            assert "not a Proxmox VE host" in line, out.stdout
            assert not root.file("/etc/vzdump.conf").exists()
            root.apt(f"purge {PACKAGE}")
            assert not root.file("/var/lib/pve-gpu-hook").exists()


# ---- it builds on Debian 12 and 13 -------------------------------------------------------------


def build_depends() -> tuple[str, ...]:
    """The package names of debian/control's Build-Depends (what a clean build root needs)."""
    text = (REPO / "debian/control").read_text()
    match = re.search(r"^Build-Depends:(.*?)^(?=\S)", text, re.M | re.S)
    assert match, "no Build-Depends in debian/control"
    names = []
    for item in match.group(1).split(","):
        name = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", item).strip().split("|")[0].strip()
        if name:
            names.append(name)
    return tuple(names)


@pytest.mark.parametrize("suite", list(SUITES))
def test_source_package_builds_in_a_clean_root(
    suite: str, build: Build, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The .dsc builds in a clean buildd root of Debian 12 and of Debian 13 with nothing but the
    declared Build-Depends, into the same files and dependencies as the host's build."""
    if os.geteuid() != 0:
        pytest.skip("the clean-root tests need root (chroot, mmdebstrap, device nodes)")
    tarball = cached_root(suite, build_depends(), "buildd")
    work = tmp_path_factory.mktemp(f"build-{suite}")
    path = work / "root"
    path.mkdir()
    try:
        out = run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(tarball)])
        assert out.returncode == 0, out.stdout
        src = path / "tmp/src"
        src.mkdir(parents=True)
        for source in (build.dsc, build.orig, build.debian_tar):
            shutil.copy2(source, src / source.name)
        the_root = Root(path, suite)
        the_root.sh(
            f"cd /tmp/src && dpkg-source -x {build.dsc.name} tree && cd tree && "
            "dpkg-buildpackage -us -uc -b"
        )
        built = src / build.deb.name
        assert built.is_file()
        ours = run(["dpkg-deb", "-c", str(build.deb)]).stdout
        theirs = run(["dpkg-deb", "-c", str(built)]).stdout

        def names(listing: str) -> list[str]:
            return sorted(line.split()[-1] for line in listing.splitlines())

        assert names(theirs) == names(ours)
        assert deb_fields(built)["Depends"] == deb_fields(build.deb)["Depends"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_postinst_and_prerm_are_posix_sh() -> None:
    for name in ("postinst", "prerm", "postrm"):
        script = REPO / "debian" / name
        out = run(["sh", "-n", str(script)])
        assert out.returncode == 0, out.stdout
        if shutil.which("checkbashisms"):
            out = run(["checkbashisms", str(script)])
            assert out.returncode == 0, out.stdout


def test_state_record_fixture_is_valid() -> None:
    """The pending record the upgrade test plants is one the library reads back."""
    from pvegpuhook.records import Record

    data = json.loads(PENDING_STATE)  # format 1: what an installed 0.1 release left behind
    assert [Record.from_dict(item).vmid for item in data["records"]] == [104]
