"""The fixtures every test folder shares: a host root, a fake node, the seed's node, the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fronts import run_main, seed_node
from tests.sim.node import FakeNode


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Path]:
    """Point the library at a directory that stands for ``/`` (``PVE_GPU_HOOK_ROOT``)."""

    def use(root: Path) -> Path:
        monkeypatch.setenv("PVE_GPU_HOOK_ROOT", str(root))
        monkeypatch.delenv("VMTYPE", raising=False)
        return root

    return use


@pytest.fixture
def host_root(tmp_path: Path, at_root: Callable[[Path], Path]) -> Path:
    """An empty host under ``tmp_path``, in use by the library."""
    return at_root(tmp_path)


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    """An empty fake PVE node (not in use by the library until a test says so)."""
    return FakeNode(tmp_path)


@pytest.fixture
def seed(tmp_path: Path) -> FakeNode:
    """The seed's home lab (tests.fronts.seed_node) with short time limits."""
    return seed_node(tmp_path)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run_cli("status", "--output-format", "json")`` → (exit status, stdout, stderr)."""
    return lambda *argv: run_main(capsys, *argv)
